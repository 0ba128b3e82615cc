"""Processes a team can leave running: a real qcluster stopped by a signal to its whole process
group, and `make run`'s supervisor (supervisord with the repository's supervisord.conf)."""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from django_q.models import OrmQ

from extraction.models import Extraction
from extraction.services import extraction_start
from jobsite.errors import Cancelled
from jobsite.models import Event
from jobsite.worker import execute
from tests.conftest import REPO, free_port, process_env, wait_for
from tests.extraction.test_worker_integration import reference_files
from training_runs.models import TrainingRun

FAST = dict(
    JOBSITE_HEARTBEAT_S=0.3, JOBSITE_STALL_AFTER_S=20, JOBSITE_WATCHDOG_EVERY_S=0.5, JOBSITE_QUEUE_POLL_S=0.2,
)
GRACE_S = 5
# Every batch takes a while, so that the job is mid-run when the signal comes.
SLOW_BATCHES = json.dumps({"extraction.batch": {"action": "sleep", "seconds": 0.4}})


def processes() -> dict[int, tuple[int, str, int]]:
    """Every process: pid -> (process group, state, parent pid), zombies included."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry.name)] = (int(fields[2]), fields[0], int(fields[1]))
    return found


def group(pgid: int) -> dict[int, str]:
    return {pid: state for pid, (pgrp, state, _) in processes().items() if pgrp == pgid}


def descendants(pid: int) -> set[int]:
    table = processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (_, _, parent) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def start_slow_extraction(model_record, dataset):
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0, 2],
                              hooks=["residual", "mlp", "attention"], batch_size=4)
    return job


def assert_released_mid_run(job: Extraction, done_before: int) -> Extraction:
    job.refresh_from_db()
    assert job.status == "queued", f"the stopped job is {job.status}, not queued again"
    assert job.worker == "" and job.worker_pid is None
    assert done_before <= job.samples_processed < job.total_samples, "it kept the samples done, and was not finished"
    assert job.attempt == 0, "a worker's stop is not one of the job's attempts"
    assert (job.output_dir / "checkpoint.json").exists()
    checkpoint = json.loads((job.output_dir / "checkpoint.json").read_text())
    assert checkpoint["samples_done"] == job.samples_processed
    types = list(Event.objects.filter(topic=job.topic).values_list("type", flat=True))
    assert types[-2:] == ["extraction.released", "extraction.requeued"]
    assert "extraction.cancelled" not in types and "extraction.failed" not in types
    return job


def assert_completes_as_uninterrupted(job: Extraction, start_worker, tmp_path) -> None:
    second = start_worker(**FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).status == "completed", timeout=120,
             message=f"completion by the next worker\n{second.output()}")
    job.refresh_from_db()
    assert job.attempt == 1
    produced = {p.name: p.read_bytes() for p in job.output_dir.iterdir() if p.suffix == ".npy"}
    expected = reference_files(job, tmp_path / "reference")
    assert produced.keys() == expected.keys()
    for name in expected:
        assert produced[name] == expected[name], f"{name} differs from an uninterrupted run"


# -- the worker's side, in-process: what a stopping cluster does with each job ------------------

@pytest.fixture
def cluster(monkeypatch):
    """The event the sentinel sets when its cluster stops, as the worker processes share it.
    (`execute` closes the connection it finds, as a worker does between tasks: these tests run
    outside a test transaction.)"""
    stopping = threading.Event()
    monkeypatch.setattr("jobsite.worker._cluster_stopping", stopping)
    return stopping


def stopped_mid_run(cluster):
    def work(job, lease):
        lease.report(final=True)
        cluster.set()
        if lease.should_cancel():
            raise Cancelled("Stopped at a batch boundary.")
        raise AssertionError("the work was not told to stop")

    return work


@pytest.mark.django_db(transaction=True)
def test_a_stopping_worker_releases_a_training_run_to_its_phase_with_no_worker(small_corpus, cluster):
    run = TrainingRun.objects.create(corpus=small_corpus, status="generating", total_chunks=3, processed_chunks=1)
    execute(TrainingRun, run.pk, stopped_mid_run(cluster))
    run.refresh_from_db()
    assert (run.status, run.worker, run.attempt, run.processed_chunks) == ("generating", "", 0, 1)
    assert run.is_claimable, "the next worker picks it up"
    types = list(Event.objects.filter(topic=run.topic).values_list("type", flat=True))
    assert types[-2:] == ["training.released", "training.requeued"]


@pytest.mark.django_db(transaction=True)
def test_a_cancel_asked_before_the_stop_still_cancels(make_extraction, cluster):
    job = make_extraction("queued")

    def cancelled_by_a_person(job, lease):
        Extraction.objects.filter(pk=job.pk).update(cancel_requested=True)
        lease._check()
        stopped_mid_run(cluster)(job, lease)

    execute(Extraction, job.pk, cancelled_by_a_person)
    job.refresh_from_db()
    assert job.status == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_a_cancel_that_lands_while_the_work_stops_for_the_cluster_still_cancels(make_extraction, cluster):
    """The runner stopped for the cluster's stop before its lease read the person's cancel."""
    job = make_extraction("queued")

    def stopped_then_cancelled(job, lease):
        lease.report(final=True)
        cluster.set()
        assert lease.should_cancel() and not lease.cancelled.is_set()
        Extraction.objects.filter(pk=job.pk).update(cancel_requested=True)
        raise Cancelled("Stopped at a batch boundary.")

    execute(Extraction, job.pk, stopped_then_cancelled)
    job.refresh_from_db()
    assert job.status == "cancelled", "a person's cancel is not undone by a worker's stop"
    assert "extraction.released" not in Event.objects.filter(topic=job.topic).values_list("type", flat=True)


@pytest.mark.django_db(transaction=True)
def test_a_release_gives_back_only_a_claim_this_worker_still_holds(make_extraction, cluster):
    from jobsite.worker import release

    job = make_extraction("extracting", worker="host-b:4242", worker_host="host-b", worker_pid=4242, attempt=1)
    release(job, reason="another worker stops")
    job.refresh_from_db()
    assert (job.status, job.worker, job.attempt, job.releases) == ("extracting", "host-b:4242", 1, 0)
    assert not Event.objects.filter(topic=job.topic, type="extraction.released").exists()


@pytest.mark.django_db(transaction=True)
def test_a_released_job_counts_the_release_and_its_card_claims_no_rate_from_earlier_work(
        make_extraction, cluster):
    job = make_extraction("queued", total_samples=100, total_tokens=10_000)
    execute(Extraction, job.pk, stopped_mid_run(cluster))
    job.refresh_from_db()
    assert (job.status, job.attempt, job.releases) == ("queued", 0, 1)
    from extraction.views import job_view

    # Claimed again, its counters include the work done before the release: no rate from them.
    from django.utils import timezone

    now = timezone.now()
    Extraction.objects.filter(pk=job.pk).update(
        status="extracting", attempt=1, samples_processed=50, tokens_processed=5_000,
        started_at=now - timezone.timedelta(seconds=1), progress_at=now, heartbeat_at=now)
    job.refresh_from_db()
    assert job_view(job)["rate"] == "—"
    Extraction.objects.filter(pk=job.pk).update(releases=0)  # a first attempt with these counters has one
    job.refresh_from_db()
    assert job_view(job)["rate"] == "5,000"


@pytest.mark.django_db(transaction=True)
def test_a_task_taken_as_the_cluster_stops_goes_back_to_the_queue_unclaimed(make_extraction, cluster):
    job = make_extraction("queued")
    cluster.set()

    def never_runs(job, lease):
        raise AssertionError("a stopping worker started a job")

    execute(Extraction, job.pk, never_runs)
    job.refresh_from_db()
    assert (job.status, job.attempt, job.worker) == ("queued", 0, "")
    assert job.enqueued_at is not None and OrmQ.objects.count() == 1
    assert not Event.objects.filter(topic=job.topic).exists(), "never claimed"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_whole_worker_group_releases_the_job_and_leaves_no_process(
    sig, model_record, dataset, start_worker, tmp_path
):
    job = start_slow_extraction(model_record, dataset)
    worker = start_worker(JOBSITE_FAILPOINTS=SLOW_BATCHES, JOBSITE_CANCEL_GRACE_S=GRACE_S, **FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 8, timeout=90,
             message=f"progress in the worker\n{worker.output()}")
    pgid = os.getpgid(worker.pid)
    assert len(group(pgid)) >= 4, "the cluster runs as a group: main process, sentinel, worker, monitor, pusher"
    done_before = Extraction.objects.get(pk=job.pk).samples_processed

    started = time.monotonic()
    os.killpg(pgid, sig)
    worker.process.wait(timeout=GRACE_S + 10)
    left = wait_for_group_gone(pgid, started + GRACE_S + 5)
    elapsed = time.monotonic() - started
    assert not left, f"left behind after {elapsed:.1f} s: {left}\n{worker.output()}"
    assert elapsed < GRACE_S + 5
    assert worker.process.returncode == 0, worker.output()

    job = assert_released_mid_run(job, done_before)
    assert_completes_as_uninterrupted(job, start_worker, tmp_path)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_sigterm_to_the_main_process_alone_releases_the_job_too(model_record, dataset, start_worker, tmp_path):
    """What `kill <pid>` and systemd's KillMode=mixed send: the sentinel's orderly stop reaches the job."""
    job = start_slow_extraction(model_record, dataset)
    worker = start_worker(JOBSITE_FAILPOINTS=SLOW_BATCHES, JOBSITE_CANCEL_GRACE_S=GRACE_S, **FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 8, timeout=90,
             message=f"progress in the worker\n{worker.output()}")
    done_before = Extraction.objects.get(pk=job.pk).samples_processed
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=GRACE_S + 10)
    assert not wait_for_group_gone(worker.pid, time.monotonic() + 5)
    assert_released_mid_run(job, done_before)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_job_that_reaches_no_checkpoint_is_released_after_the_grace_period(model_record, dataset, start_worker):
    hang = json.dumps({"extraction.batch": {"action": "hang", "at": 2}})
    job = start_slow_extraction(model_record, dataset)
    worker = start_worker(JOBSITE_FAILPOINTS=hang, JOBSITE_CANCEL_GRACE_S=2, **FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 8, timeout=90,
             message=f"the batches before the hung one\n{worker.output()}")
    started = time.monotonic()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.process.wait(timeout=15)
    assert not wait_for_group_gone(worker.pid, time.monotonic() + 5)
    assert time.monotonic() - started < 2 + 5
    job.refresh_from_db()
    assert job.status == "queued" and job.worker == ""
    released = Event.objects.filter(topic=job.topic, type="extraction.released").get()
    assert "did not reach a checkpoint within 2 s" in released.payload["reason"]


def wait_for_group_gone(pgid: int, deadline: float) -> dict[int, str]:
    while time.monotonic() < deadline:
        left = group(pgid)
        if not left:
            return left
        time.sleep(0.1)
    return group(pgid)


# -- make run's supervisor ------------------------------------------------------------------------

def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as response:
            return response.status in (200, 503)
    except urllib.error.HTTPError as exc:
        return exc.code in (200, 503)
    except OSError:
        return False


def qcluster_leader(supervisor_pid: int) -> int | None:
    """The qcluster main process supervisord started (its child)."""
    for pid, (_, state, parent) in processes().items():
        if parent == supervisor_pid and state != "Z":
            try:
                if b"qcluster" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
    return None


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_make_run_keeps_the_web_up_when_the_worker_dies_and_ctrl_c_stops_everything(
    settings, model_record, dataset, tmp_path
):
    port = free_port()
    # A worker that starts finds the killed one's job by its dead pid and resumes it after a short backoff.
    env = process_env(settings, JOBSITE_PORT=port, JOBSITE_FAILPOINTS=SLOW_BATCHES, JOBSITE_CANCEL_GRACE_S=GRACE_S,
                      JOBSITE_RETRY_BASE_S=0.5, **FAST)
    log = open(tmp_path / "supervisord.log", "wb")
    # As `make run` starts it, in its own process group as a terminal's foreground job would be.
    supervisor = subprocess.Popen([str(REPO / ".venv" / "bin" / "supervisord"), "-n", "-c", "supervisord.conf"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    seen: set[int] = set()

    def output() -> str:
        log.flush()
        return (tmp_path / "supervisord.log").read_text(errors="replace")

    try:
        wait_for(lambda: http_ok(port), timeout=60, message=f"the web server\n{output()}")
        first = wait_for(lambda: qcluster_leader(supervisor.pid), timeout=30, message=f"the worker\n{output()}")

        job = start_slow_extraction(model_record, dataset)
        wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 4, timeout=90,
                 message=f"progress in the worker\n{output()}")
        os.killpg(first, signal.SIGKILL)
        killed_at = time.monotonic()
        second = wait_for(lambda: (pid := qcluster_leader(supervisor.pid)) not in (None, first) and pid,
                          timeout=5, interval=0.05, message=f"a new worker within 5 s\n{output()}")
        assert time.monotonic() - killed_at < 5
        assert http_ok(port), "the web server answers while the worker is down and back"

        # The new worker takes the job over (the dead one's pid is seen at its start) and runs it.
        wait_for(lambda: (j := Extraction.objects.get(pk=job.pk)).status == "extracting" and j.worker_pid not in (
            None, first) and j.samples_processed < j.total_samples and j.worker_pid in descendants(second),
                 timeout=60, message=f"the new worker to run the job\n{output()}")
        tree = {supervisor.pid} | descendants(supervisor.pid)
        seen.update(tree)
        assert len(tree) >= 6, "supervisord, daphne, and the cluster's processes"

        # Ctrl-C: the terminal's SIGINT to the foreground group, which supervisord leads.
        stopped_at = time.monotonic()
        os.killpg(supervisor.pid, signal.SIGINT)
        supervisor.wait(timeout=10)
        left = {pid for pid in tree if pid in processes()}
        assert not left, f"still there after Ctrl-C: {left}\n{output()}"
        assert time.monotonic() - stopped_at < 10
        assert not http_ok(port)
        job.refresh_from_db()
        assert job.status == "queued" and job.worker == "", f"the running job is released: {job.status}\n{output()}"
        assert Event.objects.filter(topic=job.topic, type="extraction.released").exists()
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
        for pid in seen & set(processes()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
