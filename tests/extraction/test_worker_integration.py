"""Real `qcluster` processes on the test database: crash, watchdog, automatic resume."""

import json
import signal

import numpy as np
import pytest

from extraction import runner
from extraction.models import Extraction
from extraction.services import extraction_start
from jobsite.models import Event
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FAST = dict(
    JOBSITE_HEARTBEAT_S=0.3, JOBSITE_STALL_AFTER_S=4, JOBSITE_WATCHDOG_EVERY_S=0.5, JOBSITE_RETRY_BASE_S=0.5,
    JOBSITE_QUEUE_POLL_S=0.2,
)


def reference_files(job: Extraction, out_dir) -> dict[str, bytes]:
    spec = runner.ExtractionSpec(
        model_path=job.model.path, dataset_path=job.dataset.path, output_dir=str(out_dir), layers=tuple(job.layers),
        hooks=tuple(job.hooks), batch_size=job.batch_size, max_length=job.max_length, max_samples=job.max_samples,
        storage_dtype=job.storage_dtype,
    )
    runner.run_extraction(spec, progress=None, heartbeat=None, should_cancel=lambda: False)
    return {p.name: p.read_bytes() for p in out_dir.iterdir() if p.suffix == ".npy"}


def test_worker_killed_mid_run_is_detected_and_resumed_with_identical_files(
    model_record, dataset, start_worker, tmp_path
):
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0, 2],
                              hooks=["residual", "mlp", "attention"], batch_size=4)
    # Queued behind it: the cluster takes its task before its one worker is free, and dies with it.
    behind, _ = extraction_start(model=model_record, dataset=dataset, layers=[1], hooks=["residual"], batch_size=4)
    slow = json.dumps({"extraction.batch": {"action": "sleep", "seconds": 0.4}})
    first = start_worker(JOBSITE_FAILPOINTS=slow, **FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 8, timeout=90,
             message=f"progress in the first worker\n{first.output()}")
    job.refresh_from_db()
    worker_pid = job.worker_pid
    first.kill(signal.SIGKILL)
    job.refresh_from_db()
    assert job.status == "extracting", "the killed worker leaves a running row behind"
    assert 8 <= job.samples_processed < job.total_samples
    wait_for(lambda: not _alive(worker_pid), timeout=10, message="the killed worker to be gone")

    second = start_worker(**FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).status == "completed", timeout=120,
             message=f"completion by the second worker\n{second.output()}")
    job.refresh_from_db()
    assert job.attempt == 2 and job.auto_retried
    types = list(Event.objects.filter(topic=job.topic).values_list("type", flat=True))
    assert "extraction.failed" in types and "extraction.retry_started" in types
    failure = Event.objects.filter(topic=job.topic, type="extraction.failed").get()
    assert failure.payload["error_type"] == "WORKER_LOST"
    retry = Event.objects.filter(topic=job.topic, type="extraction.retry_started").get()
    assert retry.payload["automatic"] is True

    produced = {p.name: p.read_bytes() for p in job.output_dir.iterdir() if p.suffix == ".npy"}
    expected = reference_files(job, tmp_path / "reference")
    assert produced.keys() == expected.keys()
    for name in expected:
        assert produced[name] == expected[name], f"{name} differs from an uninterrupted run"
    offsets = np.load(job.output_dir / "offsets.npy")
    assert offsets[-1] == job.total_tokens

    wait_for(lambda: Extraction.objects.get(pk=behind.pk).status == "completed", timeout=60,
             message=f"the job queued behind it, whose task died with the first cluster\n{second.output()}")
    assert Extraction.objects.get(pk=behind.pk).attempt == 1


def test_a_worker_that_dies_after_an_oom_resumes_at_the_batch_size_in_force_with_the_same_activations(
    model_record, dataset, start_worker, tmp_path
):
    """A device that holds fewer than 300 tokens: halved at the first batch (8 x 63), grown back
    to 8 at sample 24 (8 x 31 <= 4 x 63), and the worker process dies in that first batch of 8:
    the job says 8, no checkpoint counts the growth yet. The next attempt goes on from the
    checkpoint with the size and rule in force there, grows at the same sample again, the job
    lists each change once, and the activations are an uninterrupted run's."""
    grew_back = [{"at_sample": 0, "from": 8, "to": 4, "why": "out_of_memory"},
                 {"at_sample": 24, "from": 4, "to": 8, "why": "grew_back"}]
    device = json.dumps({"extraction.batch": [{"action": "oom", "min_tokens": 300},
                                              {"action": "exit", "at": 6, "attempt": 1}]})
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0, 2],
                              hooks=["residual", "mlp", "attention"], batch_size=8, auto_retry_on_oom=True)
    worker = start_worker(JOBSITE_FAILPOINTS=device, **FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).status == "completed", timeout=120,
             message=f"completion after the worker process died\n{worker.output()}")
    job.refresh_from_db()
    assert job.attempt == 2 and job.auto_retried
    assert Event.objects.get(topic=job.topic, type="extraction.failed").payload["error_type"] == "WORKER_LOST"
    assert job.current_batch_size == 8 and job.batch_size_changes == grew_back
    resumed = Event.objects.filter(topic=job.topic, type="extraction.extracting").order_by("seq").last().payload
    assert (resumed["attempt"], resumed["current_batch_size"], resumed["batch_size_changes"]) == (2, 4, grew_back[:1])
    grown = Event.objects.filter(topic=job.topic, type="extraction.batch_size_grown").order_by("seq")
    assert [(e.payload["attempt"], e.payload["at_sample"]) for e in grown] == [(1, 24), (2, 24)]
    produced = {p.name: np.load(p) for p in job.output_dir.glob("layer_*.npy")}
    reference_files(job, tmp_path / "reference")
    assert len(produced) == 6
    for name, values in produced.items():
        np.testing.assert_allclose(values, np.load(tmp_path / "reference" / name), atol=1e-6, rtol=0, err_msg=name)


def test_cancel_reaches_a_hung_worker_through_its_heartbeat_thread(model_record, dataset, start_worker, settings):
    from extraction.services import extraction_cancel

    hang = json.dumps({"extraction.batch": {"action": "hang", "at": 1}})
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=4)
    worker = start_worker(JOBSITE_FAILPOINTS=hang, JOBSITE_CANCEL_GRACE_S=1, **FAST)
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 4, timeout=90,
             message=f"the first batch\n{worker.output()}")
    hung_pid = Extraction.objects.get(pk=job.pk).worker_pid
    extraction_cancel(extraction=Extraction.objects.get(pk=job.pk))
    wait_for(lambda: Extraction.objects.get(pk=job.pk).status == "cancelled", timeout=30,
             message=f"the forced cancel\n{worker.output()}")
    cancelled = Event.objects.filter(topic=job.topic, type="extraction.cancelled").get()
    assert cancelled.payload.get("forced") is True
    wait_for(lambda: not _alive(hung_pid), timeout=10, message="the hung worker process to end")


def _alive(pid: int) -> bool:
    from jobsite.watchdog import pid_alive

    return pid_alive(pid)
