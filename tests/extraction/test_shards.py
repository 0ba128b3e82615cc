"""An extraction run as shards, in this process: the planning attempt, each shard's own claim and
checkpoint, the extraction summing them, and failure, cancel and retry going through them."""

import filecmp

import pytest

from extraction.models import Extraction, ExtractionShard
from extraction.services import extraction_cancel, extraction_retry, extraction_settle, extraction_start
from extraction.tasks import run_extraction, run_extraction_shard
from jobsite.errors import JobInputError
from jobsite.models import Event
from jobsite.services import job_resume

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_machinery")]

PARAMS = {"layers": [0, 2], "hooks": ["residual", "mlp"], "batch_size": 4}


def start(model_record, dataset, **params):
    extraction, created = extraction_start(model=model_record, dataset=dataset, **{**PARAMS, **params})
    assert created
    return extraction


def data_files(job) -> list[str]:
    return sorted(p.name for p in job.output_dir.iterdir() if p.suffix == ".npy") + ["metadata.json"]


def test_shards_complete_the_extraction_byte_identical_to_one_worker(model_record, dataset, settings):
    one = start(model_record, dataset)
    run_extraction(one.pk)
    one.refresh_from_db()
    Extraction.objects.filter(pk=one.pk).delete()  # the same request again, sharded

    job = start(model_record, dataset, shards=3)
    run_extraction(job.pk)  # the planning attempt
    job.refresh_from_db()
    assert job.status == "extracting" and job.worker == "" and job.shards == 3
    parts = list(job.shard_set.order_by("index"))
    assert [p.status for p in parts] == ["queued"] * 3
    assert parts[0].first_sample == 0 and parts[-1].end_sample == dataset.num_samples
    assert sum(p.total_samples for p in parts) == dataset.num_samples
    for part in reversed(parts):
        run_extraction_shard(part.pk)
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert job.samples_processed == job.total_samples == dataset.num_samples
    assert job.tokens_processed == one.tokens_processed
    assert data_files(job) == data_files(one)
    assert [n for n in data_files(one) if not filecmp.cmp(one.output_dir / n, job.output_dir / n, shallow=False)] == []
    assert all(p.attempt == 1 and p.status == "completed" for p in job.shard_set.all())
    types = list(Event.objects.filter(topic=job.topic).values_list("type", flat=True))
    assert types.count("extraction_shard.running") == 3 and types[-1] == "extraction.completed"
    # Each shard's progress event carries the extraction, summed, and the shard.
    progress = Event.objects.filter(topic=job.topic, type="extraction_shard.progress").last()
    assert progress.payload["id"] == job.pk and progress.payload["shard"]["index"] == 0
    assert len(progress.payload["shards"]) == 3


def test_a_failed_shard_fails_the_extraction_and_a_retry_runs_only_the_shards_not_done(model_record, dataset,
                                                                                       settings):
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    first, second = job.shard_set.order_by("index")
    run_extraction_shard(second.pk)
    settings.JOBSITE_FAILPOINTS = {"extraction.batch": {"action": "oom", "at": 0}}
    run_extraction_shard(first.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "OOM"
    assert job.error_message.startswith("Shard 0 of 2 on ")
    assert job.suggested_retry_params == {"batch_size": 2}
    assert job.reusable_samples() == second.total_samples
    settings.JOBSITE_FAILPOINTS = ""

    # At the suggested half batch size, cut as the original was: the shard it finished is kept.
    retry = extraction_retry(extraction=job, batch_size=job.suggested_retry_params["batch_size"])
    assert retry.shards == 2 and retry.batch_size == 2
    run_extraction(retry.pk)
    retry.refresh_from_db()
    statuses = dict(retry.shard_set.values_list("index", "status"))
    assert statuses == {0: "queued", 1: "completed"}
    assert retry.resumed_samples == second.total_samples
    run_extraction_shard(retry.shard_set.get(index=0).pk)
    retry.refresh_from_db()
    assert retry.status == "completed"


def test_cancel_reaches_every_shard_and_the_extraction_ends_cancelled(model_record, dataset):
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    job.refresh_from_db()
    cancelled = extraction_cancel(extraction=job)
    assert cancelled.status == "cancelled"
    assert set(job.shard_set.values_list("status", flat=True)) == {"cancelled"}


def test_a_stalled_shard_is_resumed_alone(model_record, dataset, settings):
    from django.utils import timezone
    from datetime import timedelta

    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    first, second = job.shard_set.order_by("index")
    ExtractionShard.objects.filter(pk=first.pk).update(
        status="running", worker="host-x:1", worker_host="host-x", worker_pid=1, attempt=1,
        heartbeat_at=timezone.now() - timedelta(seconds=settings.JOBSITE_STALL_AFTER_S + 5))
    job.refresh_from_db()
    assert job.is_stalled
    job_resume(job)
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == "queued" and first.error_type == "WORKER_LOST"
    assert second.status == "queued" and second.attempt == 0


@pytest.mark.parametrize("shards", [0, -1, 10_000, "many", True])
def test_a_shard_count_out_of_range_is_refused_naming_the_field(model_record, dataset, shards):
    with pytest.raises(JobInputError, match="Shards must be") as refused:
        extraction_start(model=model_record, dataset=dataset, **PARAMS, shards=shards)
    assert refused.value.field == "shards"
    assert not Extraction.objects.exists()


def test_auto_shards_is_one_without_live_workers(model_record, dataset):
    job = start(model_record, dataset, shards="auto")
    assert job.shards == 1


def test_settle_leaves_an_extraction_whose_shards_still_run(model_record, dataset):
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    assert extraction_settle(extraction_id=job.pk) == ""
    job.refresh_from_db()
    assert job.status == "extracting"


def test_a_worker_that_does_not_see_the_shared_folder_leaves_the_shard_and_says_so_once(
        model_record, dataset, settings, tmp_path):
    import time

    settings.JOBSITE_STALL_AFTER_S = 1.0
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)  # planned by a worker that sees the shared data directory
    first = job.shard_set.get(index=0)
    shared = settings.JOBSITE_DATA_DIR
    settings.JOBSITE_DATA_DIR, settings.JOBSITE_HOSTNAME = tmp_path / "elsewhere", "host-b"
    run_extraction_shard(first.pk)
    run_extraction_shard(first.pk)
    first.refresh_from_db()
    assert first.status == "queued" and first.attempt == 0
    expected = f"worker host-b cannot write {tmp_path / 'elsewhere' / 'activations' / str(job.pk)}: " \
               "mount the shared data directory there"
    assert first.refusals == {"host-b": expected}
    refused = Event.objects.filter(topic=job.topic, type="extraction.shard_refused")
    assert [e.payload["message"] for e in refused] == [f"Shard 0: {expected}."]  # once per host
    # No worker able to take it past the stall limit: the shard fails, and with it the extraction.
    time.sleep(1.1)
    run_extraction_shard(first.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "STORAGE"
    assert "mount the shared data directory there" in job.error_message
    settings.JOBSITE_DATA_DIR = shared
    assert job.shard_set.get(index=1).status == "cancelled"


def test_a_worker_without_the_model_files_leaves_the_planning(model_record, dataset, settings):
    job = start(model_record, dataset, shards=2)
    original = model_record.path
    type(model_record).objects.filter(pk=model_record.pk).update(path=original + "-missing")
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "queued" and job.attempt == 0
    assert "has no model files at" in next(iter(job.refusals.values()))


def test_a_task_whose_shard_is_taken_runs_the_next_queued_one(model_record, dataset):
    """A busy cluster may hold a shard's task while another cluster is free: whichever task a
    free worker gets runs a shard that waits."""
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    first, second = job.shard_set.order_by("index")
    run_extraction_shard(first.pk)
    run_extraction_shard(first.pk)  # its own shard is done: it runs shard 1
    second.refresh_from_db()
    assert second.status == "completed" and second.attempt == 1
    job.refresh_from_db()
    assert job.status == "completed"


def test_a_large_dataset_is_tokenized_in_parts_by_several_workers_and_the_last_makes_the_plan(
        model_record, dataset, settings):
    settings.JOBSITE_TOKENIZE_PARTS_FROM = 1
    one = start(model_record, dataset)
    run_extraction(one.pk)
    one.refresh_from_db()
    Extraction.objects.filter(pk=one.pk).delete()

    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    job.refresh_from_db()
    # Loading, held by no worker: its parts are queued, one per shard.
    assert job.status == "loading" and job.worker == ""
    parts = list(job.part_set.filter(phase="tokenize").order_by("index"))
    assert [p.status for p in parts] == ["queued", "queued"]
    assert parts[0].first_sample == 0 and parts[-1].end_sample == dataset.num_samples
    run_extraction_shard(parts[1].pk)
    job.refresh_from_db()
    assert job.status == "loading"
    run_extraction_shard(parts[0].pk)  # the last part makes the plan and queues the shards
    job.refresh_from_db()
    assert job.status == "extracting" and job.total_tokens == one.total_tokens
    shards = list(job.shard_set.order_by("index"))
    assert [s.phase for s in shards] == ["extract", "extract"]
    for shard in shards:
        run_extraction_shard(shard.pk)
    job.refresh_from_db()
    assert job.status == "completed"
    assert not (job.output_dir / "tokenizing").exists()
    assert [n for n in data_files(one) if not filecmp.cmp(one.output_dir / n, job.output_dir / n, shallow=False)] == []
    messages = [e.payload.get("message", "") for e in Event.objects.filter(topic=job.topic, type="extraction.tokenizing")]
    assert messages[0] == f"Tokenizing {dataset.num_samples:,} samples in 2 parts, one per worker"
    assert messages[-1] == f"Tokenizing {dataset.num_samples:,} of {dataset.num_samples:,} samples (2 parts)"


def test_cancel_while_parts_tokenize_cancels_them_and_the_extraction(model_record, dataset, settings):
    settings.JOBSITE_TOKENIZE_PARTS_FROM = 1
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert extraction_cancel(extraction=job).status == "cancelled"
    assert set(job.part_set.values_list("status", flat=True)) == {"cancelled"}


def test_a_failed_shard_fails_the_extraction_only_once_its_siblings_have_stopped(model_record, dataset):
    """A Retry copies the siblings' rows: the extraction offers it only once they are synced."""
    from django.utils import timezone

    from jobsite.lifecycle import transition_cancelled

    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    first, second = job.shard_set.order_by("index")
    ExtractionShard.objects.filter(pk=first.pk).update(status="running", worker="host-x:1", worker_host="host-x",
                                                       worker_pid=1, attempt=1, heartbeat_at=timezone.now())
    ExtractionShard.objects.filter(pk=second.pk).update(status="failed", error_type="OOM", attempt=1,
                                                        error_message="CUDA out of memory.", finished_at=timezone.now())
    extraction_settle(extraction_id=job.pk)
    job.refresh_from_db()
    first.refresh_from_db()
    assert job.status == "extracting" and not job.retry_available
    assert first.cancel_requested  # asked to stop at its next batch
    transition_cancelled(first)  # its worker stopped there
    extraction_settle(extraction_id=job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "OOM" and job.retry_available
    assert job.error_message == "Shard 1 of 2 on : CUDA out of memory.".replace(" on :", ":")


def test_two_settles_that_find_every_shard_done_finish_the_extraction_once(model_record, dataset, monkeypatch):
    """Two shards completing together each settle the extraction: one finishes it while the other
    waits, and never reads the files while the first is removing them."""
    import threading

    from django.db import connection

    from extraction import runner

    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    monkeypatch.setattr(ExtractionShard, "after_attempt", lambda self: None)  # both done, none settled yet
    for part in job.shard_set.all():
        run_extraction_shard(part.pk)
    assert Extraction.objects.get(pk=job.pk).status == "extracting"

    inside, entered, release = threading.Lock(), threading.Event(), threading.Event()
    at_once, finish = [], runner.finish_shards

    def held_finish(spec):
        if not inside.acquire(blocking=False):
            at_once.append("a second finisher read the files while the first was finishing")
        entered.set()
        release.wait(10)
        try:
            return finish(spec)
        finally:
            if inside.locked():
                inside.release()

    monkeypatch.setattr(runner, "finish_shards", held_finish)
    said = []

    def settle():
        try:
            said.append(extraction_settle(extraction_id=job.pk))
        finally:
            connection.close()

    first = threading.Thread(target=settle)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=settle)
    second.start()
    second.join(1.0)  # it waits on the row's lock, or reaches the files alongside the first
    release.set()
    first.join(10)
    second.join(10)
    assert at_once == []
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert sorted(said) == ["", f"{job.topic}: completed with its 2 shards"]


def test_shards_whose_files_cannot_be_finished_fail_the_extraction_with_the_reason(model_record, dataset):
    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    first, second = job.shard_set.order_by("index")
    run_extraction_shard(first.pk)
    (job.output_dir / "shards" / "1.json").unlink()  # the files say shard 1 never ran
    from django.utils import timezone

    ExtractionShard.objects.filter(pk=second.pk).update(status="completed", finished_at=timezone.now())
    extraction_settle(extraction_id=job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "STORAGE"
    assert "could not be finished" in job.error_message and "Shard 1" in job.error_message


def test_a_retry_of_fewer_samples_caps_the_shards_it_inherits(model_record, dataset):
    job = start(model_record, dataset, shards=4)
    extraction_cancel(extraction=job)
    retry = extraction_retry(extraction=job, max_samples=2)
    assert retry.shards == 2


def test_a_retry_on_one_worker_says_it_does_not_start_from_the_shards(model_record, dataset):
    from extraction.services import retry_starts_from

    job = start(model_record, dataset, shards=2)
    run_extraction(job.pk)
    run_extraction_shard(job.shard_set.get(index=0).pk)
    job.refresh_from_db()
    job = extraction_cancel(extraction=job)
    retry = extraction_retry(extraction=job, shards=1)
    said = retry_starts_from(original=job, retry=retry)
    assert said == (f"Extraction {retry.pk} starts from the first sample: it runs on one worker and extraction "
                    f"{job.pk} ran as shards.")
