import json
import re
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionError
from jobsite.models import Event
from training_runs import generator as generator_module
from training_runs.models import TrainingPair, TrainingRun
from training_runs.services import (
    TrainingRunBlocked,
    corpus_create,
    training_run_generate,
    training_run_proceed,
    training_run_remove,
    training_run_review,
    training_run_stop,
    training_run_train,
)
from training_runs.tasks import run_training_phase

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_machinery")]


def reload(run):
    return TrainingRun.objects.get(pk=run.pk)


def generate_and_approve(corpus):
    run = training_run_generate(corpus=corpus)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generated"
    training_run_review(run=run, decision="approved")
    return run


def test_generation_writes_pairs_for_every_chunk_and_counts_them(small_corpus):
    run = training_run_generate(corpus=small_corpus, queries_per_chunk=2)
    assert run.total_chunks == small_corpus.chunks.count() > 10
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generated" and run.processed_chunks == run.total_chunks
    assert run.pair_count == TrainingPair.objects.filter(run=run).count() >= run.total_chunks
    assert set(run.pairs.values_list("chunk", flat=True)) == set(small_corpus.chunks.values_list("pk", flat=True))
    assert run.worker == "" and run.generated_at is not None


def test_failure_mid_generation_keeps_counts_and_proceed_generates_only_the_rest(small_corpus, settings, monkeypatch):
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "error", "at": 20, "attempt": 1}})
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generating_failed" and run.error_type == "UNKNOWN" and "Injected failure" in run.error_message
    assert run.processed_chunks == 16  # two full batches of 8 were committed before chunk 20's batch
    assert run.pair_count == run.pairs.count()
    total = run.total_chunks
    failed_event = Event.objects.filter(topic=run.topic, type="training.generating_failed").get()
    assert failed_event.payload["processed_chunks"] == 16 and failed_event.payload["retry_available"] is True

    seen = []
    original = generator_module.LocalGenerator.generate
    monkeypatch.setattr(generator_module.LocalGenerator, "generate",
                        lambda self, chunks: seen.extend(chunks) or original(self, chunks))
    training_run_proceed(run=run)
    run = reload(run)
    assert run.status == "generating" and run.error_message == "" and run.total_chunks == total
    assert f"{run.processed_chunks}/{run.total_chunks}" == f"16/{total}"
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generated" and run.processed_chunks == total
    assert len(seen) == total - 16
    already = set(small_corpus.chunks.order_by("index").values_list("text", flat=True)[:16])
    assert not already & set(seen)
    # Every chunk has the pairs of exactly one uninterrupted generation: none lost, none twice,
    # and no query the first attempt wrote is written again for another chunk.
    chunks = list(small_corpus.chunks.order_by("index"))
    expected = original(generator_module.LocalGenerator(queries_per_chunk=2), [chunk.text for chunk in chunks])
    for chunk, queries in zip(chunks, expected, strict=True):
        assert sorted(run.pairs.filter(chunk=chunk).values_list("query", flat=True)) == sorted(queries)


def test_failure_mid_training_resumes_from_the_checkpoint(small_corpus, settings):
    run = generate_and_approve(small_corpus)
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.epoch": {"action": "error", "at": 3, "attempt": 1}})
    training_run_train(run=run, epochs=5, patience=5)  # every epoch runs, whatever validation says
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "training_failed" and run.epochs_done == 3 and len(run.loss_curve) == 3
    assert run.attempt == 1, "the training phase counts its own attempts"
    assert run.progress_label == "3 of 5 epochs", "the failed row says where training stopped"
    pairs_before = run.pairs.count()
    training_run_proceed(run=run)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "completed" and run.epochs_done == 5 and len(run.loss_curve) == 5
    assert run.pairs.count() == pairs_before  # no regeneration
    assert (run.output_dir / "adapter.safetensors").exists()

    assert_same_as_an_uninterrupted_training(run, settings, epochs=5)


def assert_same_as_an_uninterrupted_training(run, settings, *, epochs):
    """The run's loss curve and adapter are those of one uninterrupted training on its approved pairs."""
    from safetensors.torch import load_file

    from training_runs.trainer import TrainSpec, run_training, split_pairs

    chunks = run.corpus.chunks.order_by("index")
    positions = {pk: i for i, pk in enumerate(chunks.values_list("pk", flat=True))}
    approved = run.pairs.filter(review="approved").order_by("pk")
    train, validation, test = split_pairs([(p.pk, p.query, positions[p.chunk_id]) for p in approved])
    reference = run_training(
        TrainSpec(encoder_path=settings.JOBSITE_ENCODER_PATH, output_dir=str(run.output_dir.parent / "reference"),
                  epochs=epochs, patience=run.patience),
        chunk_texts=list(chunks.values_list("text", flat=True)), train_pairs=train, validation_pairs=validation,
        test_pairs=test, progress=lambda *a: None, heartbeat=lambda: None, should_cancel=lambda: False,
        failpoint=lambda *a: None,
    )
    assert run.loss_curve == reference.loss_curve
    assert (run.validation_curve, run.best_epoch, run.adopted) == (
        reference.validation_curve, reference.best_epoch, reference.adopted)
    resumed, uninterrupted = load_file(run.output_dir / "adapter.safetensors"), load_file(reference.adapter_path)
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


def test_changing_the_pairs_of_a_failed_training_says_proceed_trains_again_and_it_does(small_corpus, settings):
    run = generate_and_approve(small_corpus)
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.epoch": {"action": "error", "at": 2, "attempt": 1}})
    training_run_train(run=run, epochs=4, patience=4)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "training_failed" and run.epochs_done == 2
    assert run.proceed_sentence == "training resumes from its checkpoint after 2 of 4 epochs"
    first = run.pairs.order_by("pk").first()
    training_run_review(run=run, decision="approved", pair_ids=[first.pk])  # no change: the checkpoint still holds
    assert reload(run).epochs_done == 2

    texts_total = run.texts_total
    training_run_review(run=run, decision="rejected", pair_ids=[first.pk])
    run = reload(run)
    assert (run.epochs_done, run.loss_curve, run.texts_embedded, run.texts_total) == (0, [], 0, texts_total - 1)
    assert run.proceed_sentence == "training starts from its first epoch (the texts embedded before are kept)"
    assert run.progress_label == "Embedding 0 of " + f"{texts_total - 1:,} texts"

    settings.JOBSITE_FAILPOINTS = ""
    training_run_proceed(run=run)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "completed" and len(run.loss_curve) == 4
    assert_same_as_an_uninterrupted_training(run, settings, epochs=4)


def test_a_later_run_on_the_corpus_takes_its_chunks_embeddings_from_the_first(small_corpus, settings, monkeypatch):
    import numpy as np

    from training_runs import trainer

    first = generate_and_approve(small_corpus)
    training_run_train(run=first, epochs=1)
    run_training_phase(first.pk)
    assert reload(first).status == "completed"
    assert list((settings.JOBSITE_DATA_DIR / "embeddings").glob("*/chunks-*.npy")), "kept for later runs"

    embedded, embed_batches = [], trainer.embed_batches

    def counting(path, texts, **options):
        embedded.extend(texts)
        return embed_batches(path, texts, **options)

    monkeypatch.setattr(trainer, "embed_batches", counting)
    second = generate_and_approve(small_corpus)
    training_run_train(run=second, epochs=1)
    run_training_phase(second.pk)
    second = reload(second)
    assert second.status == "completed" and second.texts_embedded == second.texts_total
    chunks = set(small_corpus.chunks.values_list("text", flat=True))
    assert not chunks & set(embedded), "no chunk embedded again"
    assert np.array_equal(np.load(first.output_dir / "index.npy"), np.load(second.output_dir / "index.npy"))


def test_failure_again_returns_to_the_failed_state_with_the_new_error(small_corpus, settings):
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "error", "at": 8, "message": "first"}})
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    assert reload(run).error_message == "first"
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "input", "message": "second"}})
    training_run_proceed(run=reload(run))
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generating_failed" and run.error_message == "second" and run.error_type == "VALIDATION"


def test_remove_keeps_the_row_with_who_and_when_but_no_pair_and_no_file(small_corpus, settings, staff_user):
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.epoch": {"action": "error", "at": 1}})
    run = generate_and_approve(small_corpus)
    training_run_train(run=run, epochs=3)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "training_failed" and run.output_dir.exists() and run.pairs.exists()
    output_dir, topic, pairs = run.output_dir, run.topic, run.pair_count
    training_run_remove(run=run, user=staff_user)
    run = reload(run)
    assert (run.status, run.removed_by, run.pair_count, run.status_label) == ("training_failed", staff_user, pairs,
                                                                              "removed")
    assert run.removed_at is not None and not run.retry_available and run.next_step == ""
    assert not TrainingPair.objects.filter(run_id=run.pk).exists()
    assert not output_dir.exists()
    removed = Event.objects.filter(topic=topic, type="training.removed").get()
    assert (removed.payload["status"], removed.payload["removed_by"]) == ("training_failed", "staff")
    with pytest.raises(TransitionError, match=f"Training run {run.pk} was removed by staff on .*; its pairs and files "
                                              "are gone."):
        training_run_proceed(run=run)
    with pytest.raises(TransitionError, match="was removed"):
        training_run_remove(run=run)


def test_a_removed_run_is_never_claimed_nor_moved_by_a_stale_caller(small_corpus):
    """A caller that read the run before its removal (a stale page, a late task) changes nothing."""
    from jobsite.lifecycle import transition
    from jobsite.worker import claim

    run = TrainingRun.objects.create(corpus=small_corpus, status="generating_failed", total_chunks=3)
    stale = reload(run)
    training_run_remove(run=run)
    with pytest.raises(TransitionError, match="This training run was removed; it cannot become generating."):
        transition(stale, "generating")
    TrainingRun.objects.filter(pk=run.pk).update(status="generating")  # as if it were waiting for a worker
    assert not reload(run).is_claimable
    with pytest.raises(TransitionError):
        claim(reload(run))


@pytest.mark.parametrize("status, why", [
    ("generating", "is generating pairs; stop it first, then it can be removed"),
    ("training", "is training; stop it first, then it can be removed"),
])
def test_remove_is_refused_while_a_run_works(small_corpus, status, why):
    run = TrainingRun.objects.create(corpus=small_corpus, status=status,
                                     finished_at=None if status != "completed" else "2026-01-01T00:00Z")
    with pytest.raises(TransitionError, match=f"Training run {run.pk} {why}."):
        training_run_remove(run=run)
    assert TrainingRun.objects.filter(pk=run.pk).exists()


@pytest.mark.parametrize("status", ["generating", "generated", "training", "completed"])
def test_proceed_is_refused_outside_the_failed_states(small_corpus, status):
    run = TrainingRun.objects.create(corpus=small_corpus, status=status,
                                     finished_at=None if status != "completed" else "2026-01-01T00:00Z")
    with pytest.raises(TransitionError, match="only a failed run can proceed"):
        training_run_proceed(run=run)


def test_a_run_waiting_for_review_can_be_removed_and_then_no_longer_blocks_a_generation(small_corpus):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generated" and run.pairs.exists()
    with pytest.raises(TrainingRunBlocked, match="review its pairs and train it \\(or delete it\\) first"):
        training_run_generate(corpus=small_corpus)
    training_run_remove(run=run)
    assert reload(run).removed_at and not TrainingPair.objects.filter(run_id=run.pk).exists()
    assert Event.objects.filter(topic=run.topic, type="training.removed").get().payload["status"] == "generated"
    assert training_run_generate(corpus=small_corpus).status == "generating"


def test_a_removed_completed_run_is_no_longer_searched_nor_the_latest_result(small_corpus, staff_client):
    from training_runs import selectors

    run = TrainingRun.objects.create(corpus=small_corpus, status="completed", finished_at=timezone.now(),
                                     pair_count=24, adopted=False)
    training_run_remove(run=run)
    run = reload(run)
    assert run.removed_at and run.verdict_label == "not adopted"
    with pytest.raises(TransitionError, match=f"Training run {run.pk} was removed; search needs a completed run."):
        selectors.training_run_search(run=run, query="chain")
    assert selectors.training_run_open() is None
    assert f'id="result-{run.pk}"' not in staff_client.get("/training/").content.decode()


def test_a_generation_that_cannot_give_enough_pairs_to_train_is_refused_before_it_starts(small_corpus, settings):
    from training_runs.services import corpus_create

    source = settings.JOBSITE_DATA_DIR / "corpora-src" / "one.txt"
    source.write_text("The bike shed door code changes on the first Monday of every month.\n")
    one = corpus_create(name="one", path=str(source))
    assert one.chunks.count() == 1 and settings.JOBSITE_MIN_APPROVED_PAIRS == 4
    with pytest.raises(JobInputError, match=r"^Corpus one has 1 chunk; at 2 queries per chunk it gives at most 2 pairs, "
                                            r"and training needs 4 approved\. Ask for 4 queries per chunk or use a larger "
                                            r"corpus\.$") as refused:
        training_run_generate(corpus=one, queries_per_chunk=2)
    assert refused.value.field == "queries_per_chunk" and not TrainingRun.objects.exists()
    settings.JOBSITE_MIN_APPROVED_PAIRS = 40
    with pytest.raises(JobInputError, match=r"at most 20 pairs, and training needs 40 approved\. Use a larger corpus\.$"):
        training_run_generate(corpus=one, queries_per_chunk=20)
    settings.JOBSITE_MIN_APPROVED_PAIRS = 4
    assert training_run_generate(corpus=one, queries_per_chunk=4).status == "generating"


def test_a_stop_that_comes_as_generation_ends_does_not_stop_the_training_after_it(small_corpus, settings):
    last = small_corpus.chunks.count() - 1
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "sleep", "seconds": 1.5, "at": last}})
    run = training_run_generate(corpus=small_corpus)
    worker = threading.Thread(target=run_training_phase, args=(run.pk,))
    worker.start()
    deadline = time.monotonic() + 30
    while reload(run).processed_chunks < last // 8 * 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the last batch asked whether to stop and sleeps before its chunks: the stop comes too late
    assert training_run_stop(run=reload(run)).cancel_requested
    worker.join(timeout=30)
    run = reload(run)
    assert run.status == "generated" and run.processed_chunks == run.total_chunks and not run.cancel_requested

    settings.JOBSITE_FAILPOINTS = ""
    training_run_review(run=run, decision="approved")
    training_run_train(run=reload(run), epochs=2)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "completed", run.error_message


def test_twenty_concurrent_generate_requests_make_exactly_one_run(small_corpus):
    barrier = threading.Barrier(20)
    outcomes = []

    def request():
        barrier.wait()
        try:
            outcomes.append(("created", training_run_generate(corpus=small_corpus).pk))
        except TrainingRunBlocked as exc:
            outcomes.append(("blocked", str(exc)))
        finally:
            connection.close()

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = [value for kind, value in outcomes if kind == "created"]
    assert len(outcomes) == 20 and len(created) == 1
    assert TrainingRun.objects.count() == 1
    for kind, value in outcomes:
        if kind == "blocked":
            assert f"training run {created[0]}, started just now, is generating pairs (" in value


def test_the_blocking_sentence_names_the_blocking_run_and_its_status(small_corpus, settings):
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "error", "at": 0}})
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    with pytest.raises(TrainingRunBlocked) as blocked:
        training_run_generate(corpus=small_corpus)
    assert str(blocked.value) == (
        f"A new generation cannot start while training run {run.pk}, started just now, has a failed generation "
        f"(0/{run.total_chunks} chunks); proceed with it or delete it first."
    )


@pytest.mark.parametrize(("fields", "standing"), [
    ({"status": "training", "texts_total": 1479, "texts_embedded": 480},
     "is training (embedding 480 of 1,479 texts); wait for its training to finish first."),
    ({"status": "training", "texts_total": 1479, "texts_embedded": 1479, "epochs": 8, "epochs_done": 3},
     "is training (3 of 8 epochs); wait for its training to finish first."),
    ({"status": "generated", "pair_count": 850},
     "is waiting for review (850 pairs); review its pairs and train it (or delete it) first."),
])
def test_the_blocking_sentence_says_who_started_the_run_when_and_where_it_stands(
    small_corpus, django_user_model, fields, standing
):
    owner = django_user_model.objects.create_user("ada")
    run = TrainingRun.objects.create(corpus=small_corpus, created_by=owner,
                                     created_at=timezone.now() - timedelta(hours=2, minutes=1), **fields)
    with pytest.raises(TrainingRunBlocked) as blocked:
        training_run_generate(corpus=small_corpus)
    assert str(blocked.value) == (
        f"A new generation cannot start while training run {run.pk}, started by ada 2 hours ago, {standing}")


def test_training_needs_enough_approved_pairs(small_corpus, settings):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    run = reload(run)
    with pytest.raises(JobInputError, match="needs at least 4 approved pairs; training run .* has 0"):
        training_run_train(run=run)
    rejected = list(run.pairs.values_list("pk", flat=True)[:3])
    assert training_run_review(run=run, decision="rejected", pair_ids=rejected) == 3
    assert training_run_review(run=run, decision="approved") == run.pair_count - 3
    with pytest.raises(JobInputError, match="do not belong to training run"):
        training_run_review(run=run, decision="approved", pair_ids=[10**9])


@pytest.mark.parametrize(("params", "sentence"), [
    ({"epochs": 0}, "Epochs must be between 1 and 1,000; got 0."),
    ({"epochs": -1}, "Epochs must be between 1 and 1,000; got -1."),
    ({"batch_size": 0}, "The batch size must be between 2 and 4,096; got 0."),
    ({"learning_rate": 0.0}, "The learning rate must be above 0 and at most 0.1, e.g. 0.001; got 0."),
    ({"learning_rate": 0.5}, "The learning rate must be above 0 and at most 0.1, e.g. 0.001; got 0.5."),
])
def test_train_refuses_zero_instead_of_using_the_default(small_corpus, params, sentence):
    run = generate_and_approve(small_corpus)
    with pytest.raises(JobInputError) as refused:
        training_run_train(run=run, **params)
    assert str(refused.value) == sentence
    assert reload(run).status == "generated"


def test_train_over_the_api_refuses_zero_epochs(staff_client, small_corpus):
    run = generate_and_approve(small_corpus)
    response = staff_client.post(f"/api/v1/training/runs/{run.pk}/train", data=json.dumps({"epochs": 0}),
                                 content_type="application/json")
    assert response.status_code == 422 and response.json()["message"] == "epochs must be at least 1, not 0."
    assert reload(run).status == "generated"


def test_training_is_unavailable_without_an_encoder(small_corpus, settings):
    from training_runs.services import training_availability

    settings.JOBSITE_ENCODER_PATH = str(settings.JOBSITE_DATA_DIR / "models" / "missing-encoder")
    available, reason = training_availability()
    assert not available and "does not exist" in reason
    with pytest.raises(JobInputError, match="Training is unavailable"):
        training_run_generate(corpus=small_corpus)


def test_read_only_data_directory_fails_training_as_storage_and_proceed_completes_once_writable(
    small_corpus, settings, small_disk
):
    run = generate_and_approve(small_corpus)
    runs_dir = small_disk.mount(settings.JOBSITE_DATA_DIR / "training_runs", "64m", read_only=True)
    training_run_train(run=run, epochs=2)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "training_failed" and run.error_type == "STORAGE"
    assert run.error_message.startswith("The file system is read-only writing ")
    failed = Event.objects.filter(topic=run.topic, type="training.training_failed").get()
    assert failed.payload["next_step"] == "Free space or fix permissions in the data directory, then Proceed."
    small_disk.remount(runs_dir, "rw")
    training_run_proceed(run=run)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "completed" and (run.output_dir / "adapter.safetensors").exists()


def test_stop_mid_generation_keeps_the_pairs_waits_as_stopped_and_proceed_finishes(small_corpus, settings):
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "sleep", "seconds": 0.2}})
    run = training_run_generate(corpus=small_corpus)
    worker = threading.Thread(target=run_training_phase, args=(run.pk,))
    worker.start()
    deadline = time.monotonic() + 30
    while reload(run).processed_chunks < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stopping = training_run_stop(run=reload(run))
    assert stopping.cancel_requested and stopping.status == "generating"
    worker.join(timeout=30)
    run = reload(run)
    assert run.status == "generating_failed" and run.error_type == "CANCELLED"
    assert run.error_message == f"Stopped on request after {run.processed_chunks} of {run.total_chunks} chunks."
    assert 3 <= run.processed_chunks < run.total_chunks and not run.cancel_requested
    assert run.next_step.startswith("Proceed continues")
    assert run.pairs.count() == run.pair_count > 0
    stopped = Event.objects.filter(topic=run.topic, type="training.generating_failed").get()
    assert stopped.payload["error_type"] == "CANCELLED"

    settings.JOBSITE_FAILPOINTS = ""
    training_run_proceed(run=run)
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "generated" and run.processed_chunks == run.total_chunks
    assert run.pairs.values("chunk_id").distinct().count() == run.total_chunks


def test_stop_before_a_worker_takes_the_run_stops_it_at_once_and_no_worker_runs_it(small_corpus):
    run = training_run_generate(corpus=small_corpus)
    stopped = training_run_stop(run=run)
    assert stopped.status == "generating_failed" and stopped.error_type == "CANCELLED"
    assert stopped.error_message == f"Stopped on request after 0 of {run.total_chunks} chunks."
    run_training_phase(run.pk)  # the task that was already queued: a quiet no-op
    assert reload(run).status == "generating_failed" and reload(run).pair_count == 0


@pytest.mark.parametrize("status", ["generated", "completed", "generating_failed"])
def test_stop_is_refused_unless_generating_or_training(small_corpus, status):
    run = TrainingRun.objects.create(corpus=small_corpus, status=status, total_chunks=4,
                                     finished_at=timezone.now() if status == "completed" else None)
    said = {"generated": "is waiting for review", "completed": "is completed", "generating_failed": "has a failed generation"}
    with pytest.raises(TransitionError, match=f"{said[status]}; only a generating or training run can be stopped"):
        training_run_stop(run=run)


def test_stop_while_embedding_ends_the_phase_before_any_epoch_and_proceed_continues_the_embedding(
    small_corpus, settings
):
    run = generate_and_approve(small_corpus)
    texts = small_corpus.chunks.count() + run.pairs.filter(review="approved").count()
    # Slow enough between embedding batches for the stop to land while embedding.
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.embed": {"action": "sleep", "seconds": 1.0}})
    generated_up_to = Event.objects.order_by("-seq").first().seq
    training_run_train(run=run, epochs=2)
    assert reload(run).progress_label == f"Embedding 0 of {texts:,} texts"

    def work():
        run_training_phase(run.pk)
        connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 60
    while reload(run).texts_embedded == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert training_run_stop(run=reload(run)).cancel_requested
    worker.join(timeout=60)
    run = reload(run)
    assert run.status == "training_failed" and run.error_type == "CANCELLED" and not run.cancel_requested
    assert 0 < run.texts_embedded < run.texts_total == texts
    assert run.error_message == f"Stopped on request while embedding ({run.texts_embedded:,} of {texts:,} texts)."
    assert run.epochs_done == 0 and run.loss_curve == [] and not (run.output_dir / "checkpoint").exists()
    labels = [e.payload["progress_label"]
              for e in Event.objects.filter(topic=run.topic, type="training.progress", seq__gt=generated_up_to)]
    assert labels[0] == "Loading the encoder…", "before its first batch the worker loads the encoder"
    assert labels[-1] == f"Embedding {run.texts_embedded:,} of {texts:,} texts"
    assert Event.objects.filter(topic=run.topic, type="training.training_failed").get().payload["error_type"] == "CANCELLED"

    kept = run.texts_embedded
    settings.JOBSITE_FAILPOINTS = ""
    training_run_proceed(run=run)
    resumed_after = Event.objects.filter(topic=run.topic).order_by("-seq").first().seq
    run_training_phase(run.pk)
    run = reload(run)
    assert run.status == "completed" and run.epochs_done == 2 and len(run.loss_curve) == 2
    assert run.texts_embedded == run.texts_total == texts
    resumed = [e.payload for e in Event.objects.filter(topic=run.topic, type="training.progress", seq__gt=resumed_after)]
    # The batches embedded before the stop count at once; the epochs follow the embedding.
    assert resumed[0]["progress_label"] == f"Embedding {kept:,} of {texts:,} texts"
    assert [p["progress_label"] for p in resumed[-3:]] == ["0 of 2 epochs", "1 of 2 epochs", "2 of 2 epochs"]


@pytest.fixture
def trained_model_dir(tiny_model_dir, settings):
    """A causal LM as a person configures one: the tiny model's files without the marker of
    random weights (what it writes is patched in by each test)."""
    import shutil

    from jobsite.paths import RANDOM_WEIGHTS_MARKER

    target = settings.JOBSITE_MODEL_ROOTS[0] / "trained-lm"
    shutil.copytree(tiny_model_dir, target, ignore=shutil.ignore_patterns(RANDOM_WEIGHTS_MARKER))
    settings.JOBSITE_GENERATOR_MODEL_PATH = str(target)
    return target


def test_the_causal_lm_generator_writes_text_postgresql_can_hold_for_every_chunk(small_corpus, trained_model_dir,
                                                                                monkeypatch):
    """A byte-level model decodes to anything, NUL and control bytes included (seen from the
    demo model: 'out\\ufffdway\\x04 dep…'); PostgreSQL refused the pairs and every run failed."""
    load = generator_module.CausalLMGenerator.__init__

    def with_raw_bytes(self, **kwargs):  # what the model may write, every time
        load(self, **kwargs)
        decode = self.tokenizer.batch_decode
        self.tokenizer.batch_decode = lambda *a, **k: [f"\x00wh\x04at does  it say\ufffd {i} {text}"
                                                       for i, text in enumerate(decode(*a, **k))]

    monkeypatch.setattr(generator_module.CausalLMGenerator, "__init__", with_raw_bytes)
    run = training_run_generate(corpus=small_corpus, generator="causal_lm", queries_per_chunk=2)
    run_training_phase(run.pk)
    run = reload(run)
    assert (run.status, run.error_message) == ("generated", "")
    assert set(run.pairs.values_list("chunk", flat=True)) == set(small_corpus.chunks.values_list("pk", flat=True))
    for query in run.pairs.values_list("query", flat=True):
        assert query.startswith("what") and query == generator_module.clean_query(query), repr(query)


def test_a_heading_never_stays_a_chunk_of_its_own():
    paragraph = " ".join(["Inspect every frame for eggs and capped brood before closing the hive."] * 12)
    text = f"# Beehive Inspection Notes\n\n## Spring\n\n{paragraph}\n\n### B-08 Heron\n\nSeen at dawn."
    chunks = generator_module.chunk_text(text, size=300, overlap=0)
    assert chunks[0].startswith("# Beehive Inspection Notes\n\n## Spring\n\nInspect every frame")
    assert chunks[-1] == "### B-08 Heron\n\nSeen at dawn."
    for chunk in chunks:
        assert not all(line.startswith("#") for line in chunk.splitlines() if line.strip()), chunk


@pytest.fixture
def guide_path(settings):
    path = settings.JOBSITE_DATA_DIR / "corpora" / "guides" / "code-review-guidelines.md"
    path.parent.mkdir(parents=True)
    path.write_text("Read the change twice before approving it. " * 40, encoding="utf-8")
    return path


def test_generate_from_a_path_refused_by_a_blocking_run_makes_no_corpus(small_corpus, guide_path):
    from training_runs.models import Corpus
    from training_runs.services import training_run_generate_from_path

    blocking = training_run_generate(corpus=small_corpus)
    with pytest.raises(TrainingRunBlocked, match=f"while training run {blocking.pk}"):
        training_run_generate_from_path(path=str(guide_path))
    assert list(Corpus.objects.values_list("name", flat=True)) == ["small"]
    assert not Event.objects.filter(type="training.corpus_created", payload__name="code-review-guidelines").exists()


def test_generate_from_a_path_refused_at_the_last_moment_takes_its_new_corpus_back(small_corpus, guide_path,
                                                                                   monkeypatch):
    """Another start commits between the check and the insert: the unique index refuses the run,
    and the corpus made for it goes with it, so the same request later is not told the name is taken."""
    from training_runs import services
    from training_runs.models import Corpus

    blocking = TrainingRun.objects.create(corpus=small_corpus, status="generating", total_chunks=3)
    real, calls = services._blocking_run, []
    monkeypatch.setattr(services, "_blocking_run", lambda: real() if calls.append(1) or len(calls) > 2 else None)
    with pytest.raises(TrainingRunBlocked, match=f"while training run {blocking.pk}"):
        services.training_run_generate_from_path(path=str(guide_path))
    assert len(calls) == 3  # both checks passed; the sentence names the run the index found
    assert list(Corpus.objects.values_list("name", flat=True)) == ["small"]
    assert TrainingRun.objects.get() == blocking


def test_generate_from_a_path_uses_the_corpus_made_from_it_unless_given_a_name(small_corpus, guide_path):
    from training_runs.models import Corpus
    from training_runs.services import training_run_generate_from_path

    run, corpus, created = training_run_generate_from_path(path="corpora/guides/code-review-guidelines.md")
    assert created and corpus.name == "code-review-guidelines" and corpus.source == str(guide_path)
    TrainingRun.objects.filter(pk=run.pk).update(status="completed", finished_at=timezone.now())
    run, again, created = training_run_generate_from_path(path=str(guide_path))
    assert (again, created, run.corpus) == (corpus, False, corpus)
    TrainingRun.objects.filter(pk=run.pk).update(status="completed", finished_at=timezone.now())
    run, named, created = training_run_generate_from_path(path=str(guide_path), name="reviews", chunk_size=200)
    assert created and (named.name, named.source, named.chunk_size) == ("reviews", str(guide_path), 200)
    assert Corpus.objects.count() == 3


@pytest.mark.parametrize(("status", "why"), [
    ("generating", "is generating pairs; pairs are reviewed once generation is done."),
    ("generating_failed",
     "has a failed generation; pairs are reviewed once generation is done, so proceed with it first."),
    ("training", "is training; its pairs cannot be reviewed while they are used for training."),
    ("completed", "is completed; its pairs were used for training and can no longer be reviewed."),
])
def test_review_refusal_says_why_each_state_cannot_be_reviewed(small_corpus, status, why):
    run = TrainingRun.objects.create(corpus=small_corpus, status=status, total_chunks=3,
                                     finished_at=timezone.now() if status == "completed" else None)
    with pytest.raises(TransitionError) as refused:
        training_run_review(run=run, decision="approved")
    assert str(refused.value) == f"Training run {run.pk} {why}"


def test_corpus_names_are_unique_ignoring_case_in_the_database_too(small_corpus):
    """The service refuses 'SMALL' beside 'small'; a writer that skips it (a concurrent request
    past the check, the admin, a script) meets the same rule in PostgreSQL."""
    from django.db import IntegrityError, transaction

    from training_runs.models import Corpus

    with pytest.raises(JobInputError, match=re.escape("A corpus named 'SMALL' already exists (as 'small')")):
        corpus_create(name="SMALL", path=small_corpus.source)
    with pytest.raises(IntegrityError), transaction.atomic():
        Corpus.objects.create(name="Small", source=small_corpus.source)
    assert list(Corpus.objects.values_list("name", flat=True)) == ["small"]


def dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def lose_the_worker(run, settings, *, attempt: int) -> None:
    """The run as a worker of this host holds it when that worker's process dies."""
    now, pid = timezone.now(), dead_pid()
    TrainingRun.objects.filter(pk=run.pk).update(worker=f"{settings.JOBSITE_HOSTNAME}:{pid}", worker_pid=pid,
                                                 worker_host=settings.JOBSITE_HOSTNAME, attempt=attempt,
                                                 started_at=now, heartbeat_at=now)


def test_a_worker_lost_mid_generation_is_retried_automatically_from_where_it_stopped(small_corpus, settings):
    from jobsite import watchdog

    settings.JOBSITE_RETRY_BASE_S = 0.05
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "error", "at": 9, "attempt": 1}})
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    run = reload(run)
    assert (run.status, run.error_type, run.processed_chunks) == ("generating_failed", "UNKNOWN", 8), \
        "any other failure waits for Proceed"
    training_run_proceed(run=run)
    lose_the_worker(run, settings, attempt=2)
    assert any(line.startswith(f"{run.topic}: WORKER_LOST") and line.endswith("-> generating")
               for line in watchdog.run())
    run = reload(run)
    assert (run.status, run.worker, run.error_type, run.auto_retried) == ("generating", "", "WORKER_LOST", True)
    assert run.next_step == "Retried automatically: it continues where it stopped."
    retry = Event.objects.filter(topic=run.topic, type="training.retry_started").last()
    assert retry.payload["automatic"] is True
    run_training_phase(run.pk)
    run = reload(run)
    assert (run.status, run.attempt, run.processed_chunks) == ("generated", 3, small_corpus.chunks.count())
    assert run.pair_count == run.pairs.count() == 2 * small_corpus.chunks.count(), "no chunk generated twice"


def test_a_worker_lost_after_the_last_attempt_waits_for_proceed(small_corpus, settings):
    from jobsite import watchdog

    run = training_run_generate(corpus=small_corpus)
    lose_the_worker(run, settings, attempt=settings.JOBSITE_MAX_ATTEMPTS)
    watchdog.run()
    run = reload(run)
    assert (run.status, run.error_type) == ("generating_failed", "WORKER_LOST")
    assert run.next_step == (f"Its automatic attempts are used up (attempt {settings.JOBSITE_MAX_ATTEMPTS}). Proceed "
                             "resumes the run where it stopped; Delete discards it.")


def test_generating_counts_the_queries_the_filter_dropped(small_corpus, trained_model_dir, monkeypatch):
    load = generator_module.CausalLMGenerator.__init__

    def writing(self, **kwargs):  # per chunk: one good query, one too short, one not text
        load(self, **kwargs)
        written = iter(range(10**6))
        self.tokenizer.batch_decode = lambda out, **k: [
            text for _ in range(len(out) // 3)
            for text in (f"what does passage {next(written)} say", "why", "%% 12 ## !!")]

    monkeypatch.setattr(generator_module.CausalLMGenerator, "__init__", writing)
    run = training_run_generate(corpus=small_corpus, generator="causal_lm", queries_per_chunk=3)
    run_training_phase(run.pk)
    run = reload(run)
    chunks = small_corpus.chunks.count()
    assert run.status == "generated" and run.pair_count == chunks
    assert run.queries_dropped == 2 * chunks
    last = Event.objects.filter(topic=run.topic, type="training.progress").order_by("seq").last()
    assert last.payload["queries_dropped"] == run.queries_dropped


def test_causal_lm_is_refused_with_the_demo_random_weight_model(small_corpus, tiny_model_dir, settings):
    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
    settings.JOBSITE_GENERATOR_MODEL_PATH = str(tiny_model_dir)
    with pytest.raises(JobInputError, match="random-weight model, which writes noise") as refused:
        training_run_generate(corpus=small_corpus, generator="causal_lm")
    assert refused.value.field == "generator" and not TrainingRun.objects.exists()
    settings.JOBSITE_GENERATOR_MODEL_PATH = ""
    with pytest.raises(JobInputError, match="No generator model is configured"):
        training_run_generate(corpus=small_corpus, generator="causal_lm")
    assert training_run_generate(corpus=small_corpus, generator="local").status == "generating"
