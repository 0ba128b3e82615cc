"""The worker flow in this process: claim, lease, runner, classification, retry decisions."""

import json
import re
import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from extraction.models import Extraction
from extraction.services import extraction_cancel, extraction_retry, extraction_start
from extraction.tasks import run_extraction
from jobsite import watchdog
from jobsite.lifecycle import TransitionError
from jobsite.models import Event

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fast_machinery(settings):
    settings.JOBSITE_HEARTBEAT_S = 0.2
    settings.JOBSITE_PROGRESS_EVERY_S = 0
    settings.JOBSITE_RETRY_BASE_S = 0.2
    settings.JOBSITE_FAILPOINTS = ""


def start(model_record, dataset, **params):
    params = {"layers": [0, 2], "hooks": ["residual", "mlp", "attention"], "batch_size": 8, **params}
    extraction, created = extraction_start(model=model_record, dataset=dataset, **params)
    assert created
    return extraction


def event_types(job):
    return list(Event.objects.filter(topic=job.topic).values_list("type", flat=True))


def test_extraction_completes_with_files_counts_and_events(model_record, dataset):
    job = start(model_record, dataset)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "completed"
    assert job.samples_processed == job.total_samples == dataset.num_samples
    assert job.tokens_processed == job.total_tokens > 0
    assert job.attempt == 1 and job.finished_at is not None
    files = {p.name for p in job.output_dir.iterdir()}
    assert {"metadata.json", "offsets.npy", "layer_0_residual.npy", "layer_2_attention.npy"} <= files
    types = event_types(job)
    # Between loading and extracting, the tokenizing says how far it is (the page shows it).
    assert [t for t in types if t != "extraction.tokenizing"][:3] == [
        "extraction.queued", "extraction.loading", "extraction.extracting"]
    tokenizing = Event.objects.filter(topic=job.topic, type="extraction.tokenizing").order_by("seq")
    assert types.index("extraction.tokenizing") < types.index("extraction.extracting")
    assert tokenizing.last().payload["message"] == f"Tokenizing {dataset.num_samples:,} of {dataset.num_samples:,} samples"
    assert "extraction.progress" in types
    assert types[-2:] == ["extraction.saving", "extraction.completed"]


def test_oom_fails_classified_with_half_batch_size_suggested(model_record, dataset, settings):
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "oom", "at": 1}}'
    job = start(model_record, dataset, batch_size=8)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "OOM"
    assert "out of memory" in job.error_message
    assert job.suggested_retry_params == {"batch_size": 4}
    failed = Event.objects.filter(topic=job.topic, type="extraction.failed").get()
    assert failed.payload["error_type"] == "OOM"
    assert failed.payload["suggested_retry_params"] == {"batch_size": 4}
    assert failed.payload["retry_available"] is True and failed.payload["cancel_available"] is False
    assert job.samples_processed == 8  # the first batch was kept


def test_auto_retry_on_oom_halves_in_place_and_completes(model_record, dataset, settings):
    """Every batch of 4 or more runs out of memory: halved to 2, one growth back to 4 is tried
    (on samples half as long) and runs out too, so the job stays at 2."""
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "oom", "min_batch_size": 4}}'
    job = start(model_record, dataset, batch_size=8, auto_retry_on_oom=True)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "completed" and job.current_batch_size == 2
    reductions = Event.objects.filter(topic=job.topic, type="extraction.batch_size_reduced").order_by("seq")
    assert [(e.payload["from"], e.payload["to"]) for e in reductions] == [(8, 4), (4, 2), (4, 2)]
    assert [(c["from"], c["to"], c["why"]) for c in job.batch_size_changes] == [
        (8, 4, "out_of_memory"), (4, 2, "out_of_memory"), (2, 4, "grew_back"), (4, 2, "out_of_memory")]


# The dataset's samples run 63, 63, 63, 55, ... 35, 33, 33, 33, 31, 31, 31, 25, ... tokens long. A
# device that holds fewer than 300 tokens runs out at the first batch of 8 (8 x 63), runs 4 x 63 =
# 252, and takes 8 again from sample 24 on (8 x 31 = 248; at sample 20, 8 x 35 = 280 > 252).
HOLDS_UNDER_300 = {"action": "oom", "min_tokens": 300}
GREW_BACK = [{"at_sample": 0, "from": 8, "to": 4, "why": "out_of_memory"},
             {"at_sample": 24, "from": 4, "to": 8, "why": "grew_back"}]


@pytest.mark.parametrize("interrupted", [False, True], ids=["uninterrupted", "timed-out-and-resumed"])
def test_after_an_oom_the_batch_grows_back_and_the_card_says_why_and_when(model_record, dataset, settings,
                                                                           staff_client, tmp_path, interrupted):
    import json

    import numpy as np

    from extraction import runner

    rules = [HOLDS_UNDER_300, {"action": "timeout", "at": 3, "attempt": 1}] if interrupted else [HOLDS_UNDER_300]
    settings.JOBSITE_FAILPOINTS = json.dumps({"extraction.batch": rules})
    job = start(model_record, dataset, batch_size=8, auto_retry_on_oom=True)
    run_extraction(job.pk)
    if interrupted:
        job.refresh_from_db()
        assert job.status == "queued" and job.error_type == "TIMEOUT" and job.current_batch_size == 4
        assert job.batch_size_changes == GREW_BACK[:1]
        assert json.loads((job.output_dir / "checkpoint.json").read_text())["samples_done"] == 12
        run_extraction(job.pk)  # the automatic retry, from the checkpoint: at batch size 4, growing at 24
    job.refresh_from_db()
    assert job.status == "completed" and job.attempt == (2 if interrupted else 1)
    assert job.current_batch_size == 8 and job.batch_size_changes == GREW_BACK

    changed = Event.objects.filter(topic=job.topic, type__in=["extraction.batch_size_reduced",
                                                                "extraction.batch_size_grown"]).order_by("seq")
    assert [(e.type, e.payload["at_sample"], e.payload["current_batch_size"]) for e in changed] == [
        ("extraction.batch_size_reduced", 0, 4), ("extraction.batch_size_grown", 24, 8)]
    assert changed.last().payload["batch_size_changes"] == GREW_BACK
    completed = Event.objects.get(topic=job.topic, type="extraction.completed")
    assert completed.payload["batch_size_changes"] == GREW_BACK

    card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert ("Batch 8 → 4 from the first sample (out of memory); grew back to 8 after 24 samples "
            "(shorter samples).") in card

    spec = runner.ExtractionSpec(
        model_path=job.model.path, dataset_path=job.dataset.path, output_dir=str(tmp_path / "straight"),
        layers=tuple(job.layers), hooks=tuple(job.hooks), batch_size=8,
    )
    runner.run_extraction(spec, progress=None, heartbeat=None, should_cancel=None)
    names = sorted(p.name for p in (tmp_path / "straight").glob("layer_*.npy"))
    assert len(names) == 6
    for name in names:
        np.testing.assert_allclose(np.load(job.output_dir / name), np.load(tmp_path / "straight" / name),
                                   atol=1e-6, rtol=0, err_msg=name)


def test_user_retry_after_oom_with_suggested_batch_size_completes_and_reuses_done_samples(model_record, dataset, settings):
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "oom", "at": 2, "min_batch_size": 8}}'
    job = start(model_record, dataset, batch_size=8)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.samples_processed == 16
    retry = extraction_retry(extraction=job, batch_size=job.suggested_retry_params["batch_size"])
    assert retry.original_extraction_id == job.pk and retry.batch_size == 4
    run_extraction(retry.pk)
    retry.refresh_from_db()
    assert retry.status == "completed"
    assert retry.resumed_samples == 16
    # Each job's page hears of the retry about its own job: the original stays failed there.
    told = Event.objects.get(topic=job.topic, type="extraction.retry_started").payload
    assert (told["id"], told["status"], told["retry_id"]) == (job.pk, "failed", retry.pk)
    told = Event.objects.get(topic=retry.topic, type="extraction.retry_started").payload
    assert (told["id"], told["status"], told["original_extraction_id"]) == (retry.pk, "queued", job.pk)
    # Its retry completed the same request: another would compute the same files again.
    with pytest.raises(TransitionError, match=re.escape(
            f"Extraction {retry.pk}, a retry of extraction {job.pk}, completed this same request: its results are "
            f"in {retry.output_dir}. Delete it first to compute them again.")):
        extraction_retry(extraction=job, batch_size=2)
    assert Extraction.objects.count() == 2
    # A different request (fewer samples) is another computation: it starts.
    assert extraction_retry(extraction=job, max_samples=10).max_samples == 10


def test_cancel_stops_a_running_extraction_within_a_batch(model_record, dataset, settings):
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "sleep", "seconds": 0.3}}'
    job = start(model_record, dataset, batch_size=2)
    worker = threading.Thread(target=run_extraction, args=(job.pk,))
    worker.start()
    deadline = time.monotonic() + 30
    while Extraction.objects.get(pk=job.pk).samples_processed < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    extraction_cancel(extraction=Extraction.objects.get(pk=job.pk))
    worker.join(timeout=30)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert 4 <= job.samples_processed < job.total_samples
    types = event_types(job)
    assert types[-1] == "extraction.cancelled"
    # The batch in flight may still report; nothing after it does.
    assert types.index("extraction.cancel_requested") >= len(types) - 3


def test_a_progress_after_a_stop_request_says_the_job_is_cancelling(make_extraction):
    """Pages show "cancelling" from the stop until the job stops: a progress the worker sends
    meanwhile carries the request, instead of turning the badge back to "extracting"."""
    from jobsite.worker import Lease

    now = timezone.now()
    job = make_extraction("extracting", worker="host:1", started_at=now, heartbeat_at=now, attempt=1)
    lease = Lease(job, force_exit=False)  # the work's side only: no heartbeat thread started
    lease.report(final=True, samples_processed=1)
    extraction_cancel(extraction=Extraction.objects.get(pk=job.pk))
    lease.report(final=True, samples_processed=2)
    progress = Event.objects.filter(topic=job.topic, type="extraction.progress").order_by("seq")
    assert [(e.payload["samples_processed"], e.payload["cancel_requested"]) for e in progress] == [
        (1, False), (2, True)]
    assert lease.should_cancel()


def test_progress_of_many_small_batches_is_stored_at_its_pace_and_a_hung_batch_leaves_the_latest(
        make_extraction, settings):
    """A job of many tiny batches writes its row a few times a second, not once a batch; the
    counters held back reach the row and the pages without the work's help (its next batch may
    hang); a steady job's progress events keep coming."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobsite.worker import Lease

    now = timezone.now()
    job = make_extraction("extracting", worker="host:1", started_at=now, heartbeat_at=now, attempt=1)

    def row():
        return Extraction.objects.values_list("samples_processed", flat=True).get(pk=job.pk)

    def progress_events():
        return list(Event.objects.filter(topic=job.topic, type="extraction.progress").order_by("seq").values_list(
            "payload__samples_processed", flat=True))

    with Lease(job, force_exit=False) as lease:
        settings.JOBSITE_PROGRESS_EVERY_S = 30
        with CaptureQueriesContext(connection) as queries:
            for done in range(1, 101):
                lease.progress(samples_processed=done)
        writes = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
        assert len(writes) == 1 and row() == 1  # the first one, then the pace holds the rest back

        settings.JOBSITE_PROGRESS_EVERY_S = 0.3  # the work makes no call now, as in a hung batch
        deadline = time.monotonic() + 10
        while (row() != 100 or progress_events()[-1] != 100) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row() == 100 and progress_events()[-1] == 100  # stored and pushed by the heartbeat thread

        before = len(progress_events())
        for done in range(101, 121):  # a steady job: a call every 0.1 s for 2 s
            lease.progress(samples_processed=done)
            time.sleep(0.1)
        steady = progress_events()[before:]
        assert len(steady) >= 3 and steady == sorted(steady)  # the pages keep hearing of it

        lease.progress(samples_processed=121)
        lease.progress(samples_processed=122, final=True)
        assert row() == 122  # the last one is stored at once
        lease.progress(samples_processed=123)
        lease.set_status("saving")
        assert row() == 123  # a change of status takes the counters held with it


def test_duplicate_delivery_runs_the_job_once(model_record, dataset):
    job = start(model_record, dataset)
    run_extraction(job.pk)
    completed_events = event_types(job).count("extraction.completed")
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.attempt == 1 and completed_events == event_types(job).count("extraction.completed") == 1


def test_invalid_input_found_by_the_worker_fails_as_validation_without_retry(model_record, dataset, settings):
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "input", "message": "Sample 3 is not text."}}'
    job = start(model_record, dataset)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "VALIDATION" and job.error_message == "Sample 3 is not text."
    assert job.suggested_retry_params == {}


def test_watchdog_fails_a_stale_job_and_retries_it_with_backoff(make_extraction, settings):
    settings.JOBSITE_STALL_AFTER_S = 5
    stale = timezone.now() - timedelta(seconds=60)
    job = make_extraction("extracting", attempt=1, heartbeat_at=stale, started_at=stale, worker="elsewhere:1",
                          worker_host="elsewhere", worker_pid=1)
    changed = watchdog.run()
    job.refresh_from_db()
    assert changed and "WORKER_LOST" in changed[0]
    assert job.status == "queued" and job.auto_retried and job.error_type == "WORKER_LOST"
    assert job.next_attempt_at > timezone.now() - timedelta(seconds=1)
    assert event_types(job)[-2:] == ["extraction.failed", "extraction.retry_started"]
    retry_event = Event.objects.filter(topic=job.topic, type="extraction.retry_started").get()
    assert retry_event.payload["automatic"] is True and retry_event.payload["delay_s"] > 0


def test_watchdog_leaves_the_job_to_a_person_when_attempts_are_exhausted(make_extraction, settings):
    settings.JOBSITE_MAX_ATTEMPTS = 3
    stale = timezone.now() - timedelta(seconds=600)
    job = make_extraction("extracting", attempt=3, heartbeat_at=stale, started_at=stale, worker="elsewhere:1",
                          worker_host="elsewhere", worker_pid=1)
    watchdog.run()
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "WORKER_LOST" and "No heartbeat" in job.error_message


def test_watchdog_notices_a_dead_local_worker_before_the_stall_limit(make_extraction, settings):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    job = make_extraction("extracting", attempt=1, heartbeat_at=timezone.now(), started_at=timezone.now(),
                          worker=f"{settings.JOBSITE_HOSTNAME}:{dead.pid}", worker_host=settings.JOBSITE_HOSTNAME,
                          worker_pid=dead.pid)
    watchdog.run()
    job.refresh_from_db()
    assert job.status == "queued" and "is gone" in job.error_message


def test_watchdog_times_out_an_attempt_past_the_limit(make_extraction, settings):
    settings.JOBSITE_TIMEOUT_S = 60
    job = make_extraction("extracting", attempt=1, heartbeat_at=timezone.now(),
                          started_at=timezone.now() - timedelta(seconds=120), worker="elsewhere:1",
                          worker_host="elsewhere", worker_pid=1)
    watchdog.run()
    job.refresh_from_db()
    assert job.error_type == "TIMEOUT" and job.status == "queued"


def test_watchdog_finishes_a_cancel_whose_worker_died(make_extraction):
    stale = timezone.now() - timedelta(seconds=600)
    job = make_extraction("extracting", attempt=1, heartbeat_at=stale, started_at=stale, cancel_requested=True,
                          worker="elsewhere:1", worker_host="elsewhere", worker_pid=1)
    watchdog.run()
    job.refresh_from_db()
    assert job.status == "cancelled"


def test_healthy_running_job_is_left_alone(make_extraction, settings):
    job = make_extraction("extracting", attempt=1, heartbeat_at=timezone.now(), started_at=timezone.now(),
                          worker="elsewhere:1", worker_host="elsewhere", worker_pid=1)
    assert watchdog.run() == []
    job.refresh_from_db()
    assert job.status == "extracting"


def test_clamped_token_ids_are_counted_on_the_job_while_it_runs(model_record, settings):
    import json as jsonlib

    from extraction.services import dataset_register
    from tests.conftest import write_dataset

    vocab = model_record.vocab_size
    lines = [jsonlib.dumps({"input_ids": [1, 2, vocab + 5, vocab + 100, 3]}), jsonlib.dumps({"input_ids": [4, -1]}),
             jsonlib.dumps({"text": "Plain text is tokenized as usual."})]
    dataset = dataset_register(path=str(write_dataset(settings, "ids.jsonl", lines)))
    job = start(model_record, dataset, layers=[0], hooks=["residual"], batch_size=2)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "completed" and job.clamped_tokens == 3
    extracting = Event.objects.filter(topic=job.topic, type="extraction.extracting").get()
    assert extracting.payload["clamped_tokens"] == 3


def test_watchdog_resends_a_job_whose_enqueue_was_lost(make_extraction, settings):
    from django_q.models import OrmQ

    settings.JOBSITE_STALL_AFTER_S = 5
    lost = make_extraction("queued", queued_at=timezone.now() - timedelta(seconds=60))
    waiting = make_extraction("queued", queued_at=timezone.now() - timedelta(seconds=60), enqueued_at=timezone.now())
    fresh = make_extraction("queued")
    changed = watchdog.run()
    assert len(changed) == 1 and "never handed to the queue" in changed[0]
    assert OrmQ.objects.count() == 1
    lost.refresh_from_db()
    assert lost.enqueued_at is not None and lost.status == "queued"
    waiting.refresh_from_db(), fresh.refresh_from_db()
    assert fresh.enqueued_at is None


def test_start_records_the_hand_off_to_the_queue(model_record, dataset):
    from django_q.models import OrmQ

    job = start(model_record, dataset)
    job.refresh_from_db()
    assert job.enqueued_at is not None and OrmQ.objects.count() == 1


def test_a_person_resumes_a_stalled_job_and_it_is_queued_again(make_extraction, settings):
    from jobsite.lifecycle import TransitionError
    from jobsite.services import job_resume

    settings.JOBSITE_STALL_AFTER_S = 5
    settings.JOBSITE_MAX_ATTEMPTS = 1
    stale = timezone.now() - timedelta(seconds=60)
    job = make_extraction("extracting", attempt=1, heartbeat_at=stale, started_at=stale, worker="elsewhere:1")
    healthy = make_extraction("extracting", attempt=1, heartbeat_at=timezone.now(), started_at=stale, worker="w:2")
    job_resume(job)
    job.refresh_from_db()
    assert job.status == "queued" and job.enqueued_at is not None
    assert "Resumed by a person" in job.error_message
    retry_event = Event.objects.filter(topic=job.topic, type="extraction.retry_started").get()
    assert retry_event.payload["automatic"] is False
    with pytest.raises(TransitionError, match="its worker is alive; only a stalled extraction can be resumed"):
        job_resume(healthy)


@pytest.mark.parametrize("attempt", [1, 2, 3, 10])
def test_backoff_is_exponential_with_jitter_and_a_cap(settings, attempt):
    from jobsite.services import backoff_delay

    settings.JOBSITE_RETRY_BASE_S, settings.JOBSITE_RETRY_FACTOR, settings.JOBSITE_RETRY_MAX_S = 10, 2, 60
    step = min(60, 10 * 2 ** (attempt - 1))
    delays = {backoff_delay(attempt) for _ in range(50)}
    assert all(step / 2 <= d <= step for d in delays)
    assert len(delays) > 1  # jittered: two retries scheduled together do not fire together


def test_full_or_read_only_disk_fails_as_storage_with_a_sentence_and_the_retry_completes_once_fixed(
    model_record, dataset, settings, small_disk
):
    activations = small_disk.mount(settings.JOBSITE_DATA_DIR / "activations", "64k", read_only=True)
    job = start(model_record, dataset)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "STORAGE"
    assert job.error_message == f"The file system is read-only writing {activations / str(job.pk)}."
    failed = Event.objects.filter(topic=job.topic, type="extraction.failed").get()
    assert failed.payload["next_step"].startswith("Free space or fix permissions on the output directory")

    small_disk.remount(activations, "rw")
    retry = extraction_retry(extraction=job)
    run_extraction(retry.pk)
    retry.refresh_from_db()
    assert retry.status == "failed" and retry.error_type == "STORAGE"
    assert retry.error_message.startswith("The activations need ") and "free space there" in retry.error_message
    assert retry.samples_processed == 0, "nothing is computed for an output the disk cannot hold"

    small_disk.remount(activations, "size=64m")
    again = extraction_retry(extraction=retry)
    run_extraction(again.pk)
    again.refresh_from_db()
    assert again.status == "completed" and again.samples_processed == dataset.num_samples
    assert (again.output_dir / "metadata.json").exists()


def test_float16_values_beyond_its_range_are_counted_and_shown(tiny_model_dir, dataset, settings, staff_client):
    """A model whose activations pass float16's 65504: the job, its events, the API, the card
    and the extract command all say how many values were stored as infinity."""
    import shutil

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from extraction.services import model_register

    loud = settings.JOBSITE_MODEL_ROOTS[0] / "loud-gpt2"
    shutil.copytree(tiny_model_dir, loud)
    model = AutoModelForCausalLM.from_pretrained(loud)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e8)
    model.save_pretrained(loud)
    record = model_register(path=str(loud), name="loud-gpt2")

    exact = start(record, dataset, layers=[1], hooks=["mlp"])
    run_extraction(exact.pk)
    exact.refresh_from_db()
    assert exact.status == "completed" and exact.inf_values == 0

    job = start(record, dataset, layers=[1], hooks=["mlp"], storage_dtype="float16")
    run_extraction(job.pk)
    job.refresh_from_db()
    stored = np.load(job.output_dir / "layer_1_mlp.npy")
    assert job.status == "completed" and job.inf_values == int(np.isinf(stored).sum()) > 0
    completed = Event.objects.filter(topic=job.topic, type="extraction.completed").get()
    assert completed.payload["inf_values"] == job.inf_values
    api = staff_client.get(f"/api/v1/models/{record.pk}/extractions/{job.pk}").json()
    assert api["inf_values"] == job.inf_values
    card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert f"{job.inf_values:,} values stored as infinity" in card and "float32 storage" in card
    assert "stored as infinity" not in staff_client.get(f"/extractions/{exact.pk}/card/").content.decode()

    from io import StringIO

    from django.core.management.base import BaseCommand

    from extraction.management.commands.extract import follow

    command = BaseCommand(stdout=StringIO(), stderr=StringIO())
    follow(command, job, poll_s=0)
    assert f"Warning: {job.inf_values:,} values were beyond float16's range" in command.stdout.getvalue()


def test_a_failed_extractions_files_page_says_which_samples_hold_activations(model_record, dataset, settings,
                                                                           staff_client):
    """The page's recipe for the samples done is the runner's order: those samples' rows are
    written, every other sample's rows are zeros."""
    import numpy as np

    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "oom", "at": 2, "min_batch_size": 8}}'
    job = start(model_record, dataset, batch_size=8)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.samples_processed == 16 < job.total_samples
    html = staff_client.get(f"/extractions/{job.pk}/files/").content.decode()
    assert "Partial output." in html
    assert f"This extraction failed before it finished: 16 of {job.total_samples} samples hold activations" in html
    assert "done = np.lexsort((np.arange(len(lengths)), -lengths))[:16]" in html

    out = job.output_dir
    offsets = np.load(out / "offsets.npy")
    lengths = np.diff(offsets)
    done = np.lexsort((np.arange(len(lengths)), -lengths))[:16]
    acts = np.load(out / "layer_0_residual.npy", mmap_mode="r")
    written = {i for i in range(len(lengths)) if np.any(acts[offsets[i]:offsets[i + 1]] != 0)}
    assert written == set(done.tolist())


def test_an_automatic_resume_of_a_dataset_file_changed_since_the_plan_fails_with_what_changed(model_record, settings):
    from extraction.services import dataset_register
    from tests.conftest import TEXTS, write_dataset

    path = write_dataset(settings, "growing.txt", TEXTS)
    dataset = dataset_register(path=str(path), name="growing")
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "timeout", "at": 2, "attempt": 1}}'
    job = start(model_record, dataset, layers=[0], hooks=["residual"], batch_size=4)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "queued" and job.error_type == "TIMEOUT" and job.samples_processed == 8
    with open(path, "a", encoding="utf-8") as f:
        f.write("a line added while the job waited for its retry\n")
    time.sleep(max(0.0, (job.next_attempt_at - timezone.now()).total_seconds()) + 0.1)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_type == "VALIDATION"
    assert job.error_message.startswith(
        f"The dataset file changed since this extraction was planned (samples: {len(TEXTS)} then, "
        f"{len(TEXTS) + 1} now; tokens: "), job.error_message
    assert job.error_message.endswith("retry it to extract the file as it is now.")
    assert job.samples_processed == 8, "the samples done are not counted against other ones"
    assert json.loads((job.output_dir / "checkpoint.json").read_text())["samples_done"] == 8
    failed = Event.objects.filter(topic=job.topic, type="extraction.failed").order_by("seq").last()
    assert failed.payload["error_message"] == job.error_message and failed.payload["retry_available"] is True
    settings.JOBSITE_FAILPOINTS = ""
    retry = extraction_retry(extraction=job)
    run_extraction(retry.pk)
    retry.refresh_from_db()
    assert retry.status == "completed" and retry.samples_processed == len(TEXTS) + 1
