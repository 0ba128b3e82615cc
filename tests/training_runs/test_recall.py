import pytest

from training_runs.models import TrainingRun
from training_runs.services import corpus_create, training_run_generate, training_run_review, training_run_train
from training_runs.tasks import run_training_phase

from tests.conftest import DEMO_CORPUS


@pytest.mark.django_db(transaction=True)
def test_training_measurably_improves_recall_on_the_demo_corpus(encoder, fast_machinery, settings):
    corpus = corpus_create(name="handbook", path=str(_copy_corpus(settings)))
    assert corpus.chunks.count() >= 300
    run = training_run_generate(corpus=corpus)
    run_training_phase(run.pk)
    training_run_review(run=TrainingRun.objects.get(pk=run.pk), decision="approved")
    training_run_train(run=TrainingRun.objects.get(pk=run.pk))  # the default 8 epochs
    run_training_phase(run.pk)
    run = TrainingRun.objects.get(pk=run.pk)
    assert run.status == "completed", run.error_message
    before, after = run.metrics["before"], run.metrics["after"]
    assert run.metrics["eval_pairs"] >= 100
    for k in ("recall@1", "recall@5", "recall@10"):
        assert after[k] > before[k], (k, before, after)
    assert run.loss_curve[-1] < run.loss_curve[0]

    from training_runs.selectors import training_run_search

    hits = training_run_search(run=run, query="when does the bike shed door code change", k=3)
    assert hits[0]["document"] == "bicycle-maintenance-guide.md" and len(hits) == 3


def _copy_corpus(settings):
    import shutil

    target = settings.JOBSITE_DATA_DIR / "corpora" / "handbook"
    shutil.copytree(DEMO_CORPUS, target)
    return target
