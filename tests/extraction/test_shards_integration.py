"""One extraction run as shards by real `qcluster` workers on the test database: the files of
one worker, a killed shard resumed alone, a stop that reaches a silent shard, and workers that
do not see the job's files."""

import filecmp
import json
import os
import re
import signal

import pytest

from extraction.models import Extraction, ExtractionShard
from extraction.services import extraction_cancel, extraction_start
from extraction.tasks import run_extraction
from jobsite.models import Event
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FAST = dict(
    JOBSITE_HEARTBEAT_S=0.3, JOBSITE_STALL_AFTER_S=4, JOBSITE_WATCHDOG_EVERY_S=0.5, JOBSITE_RETRY_BASE_S=0.5,
    JOBSITE_QUEUE_POLL_S=0.2, JOBSITE_PROGRESS_EVERY_S=0,
)
PARAMS = {"layers": [0, 2], "hooks": ["residual", "mlp"], "batch_size": 2}


def slow(seconds: float) -> str:
    return json.dumps({"extraction.batch": {"action": "sleep", "seconds": seconds}})


@pytest.fixture(autouse=True)
def machinery(settings):
    """This process judges heartbeats and stalls as its workers do."""
    for name, value in FAST.items():
        setattr(settings, name, value)
    settings.JOBSITE_FAILPOINTS = ""


def data_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".npy") + ["metadata.json"]


def one_worker_output(model_record, dataset, **params):
    """The same request run by one worker in this process; its row is removed afterwards so the
    sharded request is not the identical active one, and its files stay as the reference."""
    one, created = extraction_start(model=model_record, dataset=dataset, **{**PARAMS, **params})
    assert created
    run_extraction(one.pk)
    one.refresh_from_db()
    assert one.status == "completed", one.error_message
    Extraction.objects.filter(pk=one.pk).delete()
    return one.output_dir


def assert_identical(job: Extraction, reference) -> None:
    names = data_files(reference)
    assert data_files(job.output_dir) == names
    assert any(name.startswith("layer_") for name in names)
    differ = [n for n in names if not filecmp.cmp(reference / n, job.output_dir / n, shallow=False)]
    assert differ == [], f"{differ} differ from one worker's files"


def start_sharded(model_record, dataset, shards=2, **params) -> Extraction:
    job, created = extraction_start(model=model_record, dataset=dataset, shards=shards, **{**PARAMS, **params})
    assert created and job.shards == shards
    return job


def status(job: Extraction) -> str:
    return Extraction.objects.get(pk=job.pk).status


def shards_of(job: Extraction) -> list[ExtractionShard]:
    return list(ExtractionShard.objects.filter(extraction_id=job.pk).order_by("index"))


def all_running(job: Extraction) -> bool:
    parts = shards_of(job)
    return len(parts) == job.shards and all(p.status == "running" for p in parts)


def holder(services, shard: ExtractionShard):
    """The started qcluster whose process group holds the shard's worker process."""
    group = os.getpgid(shard.worker_pid)
    return next(service for service in services if service.pid == group)


def wait(predicate, services, what: str, timeout: float = 60):
    """wait_for, and on a timeout the rows and the workers' logs, read then."""
    try:
        return wait_for(predicate, timeout=timeout, message=what)
    except AssertionError as exc:
        rows = [(p.index, p.status, p.worker, p.attempt, p.samples_processed) for p in ExtractionShard.objects.all()]
        jobs = [(e.pk, e.status, e.worker, e.attempt, e.error_type, e.error_message) for e in Extraction.objects.all()]
        events = [(e.seq, e.type, e.payload.get("status"), (e.payload.get("shard") or {}).get("index"))
                  for e in Event.objects.order_by("seq") if e.type != "extraction_shard.progress"]
        tails = "\n".join(f"--- {s.log_path.name}\n{s.output()[-4000:]}" for s in services)
        raise AssertionError(f"{exc}\nextractions: {jobs}\nshards: {rows}\nevents: {events}\n{tails}") from None


def test_two_fresh_workers_each_take_a_shard_of_the_first_job(model_record, dataset, start_worker):
    """Clusters just started, their workers yet to run a job: each takes a shard. A worker that
    imported torch and transformers at its first task spent seconds there before its claim,
    while the worker that had planned ran its shard and took the other one too (the job ran on
    one worker); the clusters import them before they fork (JOBSITE_WORKER_PRELOAD)."""
    workers = [start_worker(JOBSITE_FAILPOINTS=slow(0.1), **FAST) for _ in range(2)]
    wait(lambda: all("running." in worker.output() for worker in workers), workers, "both clusters up")
    job = start_sharded(model_record, dataset, batch_size=1)
    wait(lambda: status(job) == "completed", workers, "completion", timeout=90)
    ran_by = [shard.worker for shard in shards_of(job)]
    assert len(set(ran_by)) == 2, f"both shards ran on {ran_by[0]}"


def test_a_shard_whose_worker_is_killed_resumes_alone_to_one_workers_files(model_record, dataset, start_worker):
    # Batches of one sample, slowed: each shard runs long enough for the other worker to join in
    # and for the kill to land mid-shard.
    reference = one_worker_output(model_record, dataset, batch_size=1)
    workers = [start_worker(JOBSITE_FAILPOINTS=slow(0.6), **FAST) for _ in range(2)]
    job = start_sharded(model_record, dataset, batch_size=1)
    # The second shard mid-way, the first taken by the other worker (running, or done already
    # where that worker got going first: on a slow host the window where both run can be short).
    wait(lambda: len(shards_of(job)) == 2 and shards_of(job)[1].status == "running"
         and shards_of(job)[1].samples_processed > 0 and shards_of(job)[0].status in ("running", "completed"),
         workers, "the second shard running, the first taken")
    killed = holder(workers, shards_of(job)[1])
    killed.kill(signal.SIGKILL)
    fresh = start_worker(**FAST)
    wait(lambda: status(job) == "completed", [*workers, fresh], "completion", timeout=90)
    first, second = shards_of(job)
    assert (first.status, first.attempt) == ("completed", 1), "the shard whose worker lived ran once"
    assert (second.status, second.attempt) == ("completed", 2)
    lost = Event.objects.filter(topic=job.topic, type="extraction_shard.failed").values_list("payload", flat=True)
    assert [(e["shard"]["index"], e["shard"]["error_type"]) for e in lost] == [(1, "WORKER_LOST")]
    assert_identical(Extraction.objects.get(pk=job.pk), reference)


def test_a_stop_ends_a_sharded_extraction_at_once_for_its_silent_shard(model_record, dataset, start_worker,
                                                                        settings):
    workers = [start_worker(JOBSITE_FAILPOINTS=slow(1), **FAST) for _ in range(2)]
    # The stop is judged here, as by the web server, with a shorter stall limit than the workers'
    # watchdog: the silent shard is still running, stalled, when the stop comes (not retried yet).
    settings.JOBSITE_STALL_AFTER_S = 2
    job = start_sharded(model_record, dataset, batch_size=1)  # many batches: the live shard is far from done
    wait(lambda: all_running(job), workers, "both shards running")
    silent = holder(workers, shards_of(job)[1])
    os.killpg(silent.pid, signal.SIGSTOP)
    try:
        wait(lambda: shards_of(job)[1].heartbeat_age_s > 2.5, workers, "the silent shard to stall", timeout=20)
        assert shards_of(job)[0].status == "running"
        extraction_cancel(extraction=Extraction.objects.get(pk=job.pk))
        assert shards_of(job)[1].status == "cancelled", "the silent shard is cancelled at once"
        wait(lambda: status(job) == "cancelled", workers, "the cancel", timeout=15)
    finally:
        os.killpg(silent.pid, signal.SIGCONT)
    # Woken up, its worker finds the shard no longer its own and leaves it as it is.
    wait(lambda: "was decided elsewhere; this worker lets it go" in silent.output(), [silent], "the woken worker")
    assert [p.status for p in shards_of(job)] == ["cancelled", "cancelled"]
    stalled = Event.objects.filter(topic=job.topic, type="extraction_shard.cancelled").values_list("payload",
                                                                                                 flat=True)
    assert sorted((e["shard"]["index"], bool(e.get("stalled"))) for e in stalled) == [(0, False), (1, True)]


def planned_here(model_record, dataset) -> Extraction:
    """A sharded extraction planned by this process, in the data directory worker host-a shares."""
    job = start_sharded(model_record, dataset)
    run_extraction(job.pk)
    assert status(job) == "extracting"
    return job


def test_a_worker_that_does_not_see_the_files_leaves_the_plan_and_the_shards_to_one_that_does(
        model_record, dataset, start_worker, tmp_path):
    elsewhere = tmp_path / "host-b-data"
    elsewhere.mkdir()
    reference = one_worker_output(model_record, dataset)
    # host-b alone first: the planning attempt reaches it, and it must not plan in its own folder.
    # It waits long enough for host-a to start before it would give the job up.
    host_b = start_worker(JOBSITE_HOSTNAME="host-b", JOBSITE_DATA_DIR=elsewhere,
                          **{**FAST, "JOBSITE_STALL_AFTER_S": 30})
    job = start_sharded(model_record, dataset)
    refused = Event.objects.filter(topic=job.topic, type="extraction.shard_refused")
    wait(lambda: refused.exists(), [host_b], "host-b to refuse the planning")
    host_a = start_worker(JOBSITE_HOSTNAME="host-a", **FAST)
    wait(lambda: status(job) == "completed", [host_a, host_b], "completion by host-a", timeout=90)
    assert [(p.status, p.worker_host, p.attempt) for p in shards_of(job)] == [("completed", "host-a", 1)] * 2
    job.refresh_from_db()
    assert job.samples_processed == job.total_samples == dataset.num_samples
    assert_identical(job, reference)
    assert not (elsewhere / "activations" / str(job.pk)).exists(), "host-b wrote nothing of the job"
    types = list(Event.objects.filter(topic=job.topic).order_by("seq").values_list("type", flat=True))
    assert types.count("extraction_shard.completed") == 2 and types[-1] == "extraction.completed"
    events = [e.payload for e in refused.order_by("seq")]
    sentence = re.compile(rf"[Ww]orker host-b cannot write {re.escape(str(elsewhere / 'activations' / str(job.pk)))}"
                          r": mount the shared data directory there\.$")
    assert all(e["host"] == "host-b" and sentence.search(e["message"]) for e in events), events
    assert events[0]["shard_index"] is None, "the planning attempt was refused first"
    refusers = [e["shard_index"] for e in events]
    assert len(refusers) == len(set(refusers)), f"refused twice by one host: {refusers}"


def test_shards_no_worker_can_take_fail_the_extraction_with_the_storage_sentence(model_record, dataset,
                                                                                start_worker, tmp_path):
    elsewhere = tmp_path / "host-b-data"
    elsewhere.mkdir()
    job = planned_here(model_record, dataset)
    host_b = start_worker(JOBSITE_HOSTNAME="host-b", JOBSITE_DATA_DIR=elsewhere, **{**FAST, "JOBSITE_STALL_AFTER_S": 3})
    wait(lambda: status(job) == "failed", [host_b], "the failure after the stall limit")
    job.refresh_from_db()
    assert job.error_type == "STORAGE"
    assert "mount the shared data directory there" in job.error_message, job.error_message
    parts = shards_of(job)
    failed = [p for p in parts if p.status == "failed"]
    assert failed and all(p.error_type == "STORAGE" and "No worker could take it" in p.error_message for p in failed)
    assert not [p for p in parts if p.status in ("queued", "running")]
    assert not (elsewhere / "activations" / str(job.pk)).exists(), "host-b wrote nothing of the job"
