"""`manage.py jobs cleanup`: real rows in the database, real folders under JOBSITE_DATA_DIR."""

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from extraction.services import extraction_retry
from extraction.tasks import run_extraction
from jobsite.models import Event
from training_runs.models import Corpus, TrainingRun


def folder(job, *files: str, size: int = 2048):
    """The job's output folder with these files (each `size` bytes)."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        (job.output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (job.output_dir / name).write_bytes(b"x" * size)
    return job.output_dir


def cleanup(capsys, *args) -> list[str]:
    call_command("jobs", "cleanup", *args)
    return capsys.readouterr().out.splitlines()


@pytest.fixture
def corpus(db):
    return Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)


def make_run(corpus, status, **fields):
    if status == "completed":
        fields.setdefault("finished_at", timezone.now())
    return TrainingRun.objects.create(corpus=corpus, status=status, total_chunks=12, **fields)


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["queued", "loading", "extracting", "saving"])
def test_an_active_extractions_folder_and_its_temporary_files_are_never_touched(make_extraction, capsys, status):
    job = make_extraction(status, samples_processed=8, total_samples=100)
    out = folder(job, "layer_0_residual.npy", "checkpoint.json.tmp", "tokenizer.tmp/vocab.json")
    (out / "checkpoint.json").write_text('{"samples_done": 8}')
    lines = cleanup(capsys, "--delete", "--include-reusable")
    assert lines == ["Removed 0 item(s), 0 B. Left alone 1 folder(s) of jobs that are active or still need them."]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.json", "checkpoint.json.tmp", "layer_0_residual.npy", "tokenizer.tmp"]


@pytest.mark.django_db
@pytest.mark.parametrize("status, error_type, phrase", [
    ("generating", "", "is generating pairs"), ("training", "", "is training"),
    ("generated", "", "is waiting for review"), ("generating_failed", "UNKNOWN", "has a failed generation"),
    ("training_failed", "CANCELLED", "is stopped"), ("training_failed", "OOM", "has a failed training"),
])
def test_a_training_run_that_works_or_waits_for_review_or_proceed_keeps_everything(corpus, capsys, status, error_type,
                                                                                    phrase):
    """A failed or stopped run waits for Proceed, which continues from its checkpoint and cached
    embeddings; a generated one waits for review: none of their files are garbage, not even the
    temporary ones, and --include-reusable takes nothing from them either."""
    run = make_run(corpus, status, error_type=error_type)
    out = folder(run, "checkpoint/state.safetensors", "checkpoint/state.safetensors.tmp", "chunks-ab12.npy",
                 "queries-cd34.npy.tmp.npy")
    assert cleanup(capsys, "--include-reusable") == [
        "Would remove 0 item(s), 0 B. Left alone 1 folder(s) of jobs that are active or still need them."]
    assert cleanup(capsys, "--delete", "--include-reusable", "--show-kept") == [
        f"      left  {out}  (training run {run.pk} {phrase})",
        "Removed 0 item(s), 0 B. Left alone 1 folder(s) of jobs that are active or still need them."]
    assert (out / "checkpoint" / "state.safetensors.tmp").exists() and (out / "queries-cd34.npy.tmp.npy").exists()
    assert (out / "chunks-ab12.npy").exists()


@pytest.mark.django_db
def test_a_completed_runs_adapter_stays_its_temporary_files_and_removed_runs_go(corpus, capsys):
    completed = make_run(corpus, "completed", adopted=True)
    removed = make_run(corpus, "training_failed", removed_at=timezone.now())
    kept = folder(completed, "adapter.safetensors", "index.npy", "checkpoint/state.safetensors.tmp")
    gone = folder(removed, "checkpoint/state.safetensors")
    lines = cleanup(capsys, "--delete")
    assert lines == [
        f"    2.0 KB  {kept / 'checkpoint' / 'state.safetensors.tmp'}  (unfinished temporary file)",
        f"    2.0 KB  {gone}  (training run {removed.pk} was removed)",
        "Removed 2 item(s), 4.0 KB. Left alone 1 folder(s) of jobs that are active or still need them.",
    ]
    assert sorted(p.name for p in kept.iterdir()) == ["adapter.safetensors", "checkpoint", "index.npy"]
    assert not gone.exists()


@pytest.mark.django_db
def test_a_listing_is_a_dry_run_in_numeric_order_with_every_reason(make_extraction, settings, capsys):
    root = settings.JOBSITE_DATA_DIR / "activations"
    cancelled = make_extraction("cancelled")
    folder(cancelled, "layer_0_residual.npy")
    completed = make_extraction("completed")
    folder(completed, "layer_0_residual.npy", "metadata.json.tmp")
    empty = make_extraction("completed")
    empty.output_dir.mkdir(parents=True)
    (root / "99999").mkdir()
    (root / "notes.txt").write_text("x" * 10)
    lines = cleanup(capsys)
    expected = [
        f"    2.0 KB  {cancelled.output_dir}  (extraction {cancelled.pk} is cancelled; a Retry has nothing in it to "
        "reuse)",
        f"    2.0 KB  {completed.output_dir / 'metadata.json.tmp'}  (unfinished temporary file)",
        f"       0 B  {empty.output_dir}  (extraction {empty.pk} is completed; its folder is empty)",
        f"       0 B  {root / '99999'}  (extraction 99999 no longer exists)",
        f"      10 B  {root / 'notes.txt'}  (not a job directory)",
        "Would remove 5 item(s), 4.0 KB. Run again with --delete to remove them. Left alone 1 folder(s) of jobs that "
        "are active or still need them.",
    ]
    assert lines == expected
    assert cancelled.output_dir.exists() and (root / "notes.txt").exists(), "a dry run removes nothing"
    call_command("jobs", "cleanup", "--delete")
    assert sorted(p.name for p in root.iterdir()) == [str(completed.pk)]
    assert sorted(p.name for p in completed.output_dir.iterdir()) == ["layer_0_residual.npy"]


def test_job_ids_are_listed_in_numeric_order_not_as_text(settings, capsys, db):
    """Folder 10 after folder 9 (as text, "10" sorts first); "012" names no job (job 12's is "12")."""
    root = settings.JOBSITE_DATA_DIR / "activations"
    for name in ("10", "9", "012", "100", "2"):
        (root / name).mkdir(parents=True)
    lines = cleanup(capsys)
    assert [line.split("  (")[1] for line in lines[:-1]] == [
        "extraction 2 no longer exists)", "extraction 9 no longer exists)", "extraction 10 no longer exists)",
        "extraction 100 no longer exists)", "not a job directory)"]
    assert lines[-2].split()[2] == str(root / "012")


@pytest.fixture
def fail_at_batch_3(settings):
    settings.JOBSITE_HEARTBEAT_S = 0.2
    settings.JOBSITE_PROGRESS_EVERY_S = 0
    settings.JOBSITE_FAILPOINTS = '{"extraction.batch": {"action": "error", "at": 2, "attempt": 1}}'


def failed_extraction(model_record, dataset):
    from extraction.services import extraction_start

    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=8)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert (job.status, job.error_type, job.samples_processed) == ("failed", "UNKNOWN", 16)
    (job.output_dir / "metadata.json.tmp").write_text("{}")
    return job


def said_on_retry(retry) -> str:
    return Event.objects.get(topic=retry.topic, type="extraction.retry_started").payload["starts_from"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_extractions_samples_are_kept_for_retry_by_delete_and_the_retry_reuses_them(
        model_record, dataset, fail_at_batch_3, capsys, settings):
    job = failed_extraction(model_record, dataset)
    lines = cleanup(capsys)
    size = sum(p.stat().st_size for p in job.output_dir.rglob("*") if p.is_file() and ".tmp" not in p.name)
    assert lines[0] == f"       2 B  {job.output_dir / 'metadata.json.tmp'}  (unfinished temporary file)"
    assert lines[1] == "Kept for Retry (--include-reusable removes them too):"
    assert lines[2].endswith(f"  {job.output_dir}  (extraction {job.pk} is failed; reusable by Retry: 16 of 36 "
                             f"samples, {lines[2].split()[0]} {lines[2].split()[1]})")
    assert lines[3].startswith("Would remove 1 item(s), 2 B. Run again with --delete to remove them. Kept 1 output(s) "
                               "a Retry can reuse, ")
    assert int(float(lines[2].split()[0]) * 1024) in range(size - 1024, size + 1024)
    assert cleanup(capsys, "--delete")[0] == lines[0]
    assert (job.output_dir / "checkpoint.json").exists() and not (job.output_dir / "metadata.json.tmp").exists()
    assert job.next_step == "Read the worker log for the cause, then retry."
    retry = extraction_retry(extraction=job, reason="after cleanup")
    assert said_on_retry(retry) == f"Extraction {retry.pk} starts after the 16 samples extraction {job.pk} finished."
    # Until the retry has copied them, its original's files are needed even with --include-reusable.
    assert cleanup(capsys, "--delete", "--include-reusable") == [
        "Removed 0 item(s), 0 B. Left alone 1 folder(s) of jobs that are active or still need them."]
    assert (job.output_dir / "checkpoint.json").exists()
    settings.JOBSITE_FAILPOINTS = ""
    run_extraction(retry.pk)
    retry.refresh_from_db()
    assert (retry.status, retry.resumed_samples) == ("completed", 16)


@pytest.mark.django_db(transaction=True)
def test_removing_reusable_samples_takes_include_reusable_and_a_later_retry_starts_from_the_first_sample(
        model_record, dataset, fail_at_batch_3, capsys, settings):
    job = failed_extraction(model_record, dataset)
    lines = cleanup(capsys, "--delete", "--include-reusable")
    assert lines[0].endswith(f"  {job.output_dir}  (extraction {job.pk} is failed; reusable by Retry: 16 of 36 "
                             f"samples, {lines[0].split()[0]} {lines[0].split()[1]})")
    assert lines[1] == (f"Removed 1 item(s), {lines[0].split()[0]} {lines[0].split()[1]}. Left alone 0 folder(s) of "
                        "jobs that are active or still need them.")
    assert not job.output_dir.exists()
    job.refresh_from_db()
    assert job.next_step == "Read the worker log for the cause, then retry. A Retry starts from the first sample: none of its samples " \
                            "are left to reuse."
    retry = extraction_retry(extraction=job, reason="after cleanup")
    assert said_on_retry(retry) == (f"Extraction {retry.pk} starts from the first sample: none of extraction "
                                    f"{job.pk}'s samples are left to reuse.")
    settings.JOBSITE_FAILPOINTS = ""
    run_extraction(retry.pk)
    retry.refresh_from_db()
    assert (retry.status, retry.resumed_samples, retry.samples_processed) == ("completed", 0, 36)


@pytest.mark.django_db
def test_a_failed_extraction_whose_retry_completed_the_same_request_is_garbage(make_extraction, capsys):
    original = make_extraction("failed", fingerprint="same", samples_processed=8, total_samples=100)
    folder(original, "layer_0_residual.npy")
    (original.output_dir / "checkpoint.json").write_text('{"samples_done": 8}')
    retry = make_extraction("completed", fingerprint="same", original_extraction=original)
    folder(retry, "layer_0_residual.npy")
    lines = cleanup(capsys)
    assert lines[0] == (f"    2.0 KB  {original.output_dir}  (extraction {original.pk} is failed; its retry, extraction "
                        f"{retry.pk}, completed the same request)")


@pytest.mark.django_db
def test_a_queued_retrys_original_is_needed_even_with_include_reusable(make_extraction, capsys):
    original = make_extraction("cancelled", fingerprint="same", samples_processed=8, total_samples=100)
    folder(original, "layer_0_residual.npy")
    (original.output_dir / "checkpoint.json").write_text('{"samples_done": 8}')
    make_extraction("queued", fingerprint="same", original_extraction=original)
    call_command("jobs", "cleanup", "--delete", "--include-reusable")
    assert "Left alone 1 folder(s)" in capsys.readouterr().out
    assert (original.output_dir / "layer_0_residual.npy").exists()


@pytest.mark.django_db
def test_a_job_that_became_active_since_the_listing_keeps_its_folder(make_extraction):
    """Listing and removing are two steps: a job requeued in between is judged again, and stays."""
    from jobsite import cleanup as service
    from jobsite.services import job_requeue

    job = make_extraction("failed", error_type="WORKER_LOST")
    folder(job, "layer_0_residual.npy")
    found = service.cleanup_find()
    assert [item.path for item in found.removable()] == [job.output_dir]
    job_requeue(job, automatic=False, reason="resumed by a person")
    done = service.cleanup_remove(items=found.removable())
    assert done.removed == [] and done.skipped == [(found.removable()[0], f"extraction {job.pk} is queued now")]
    assert job.output_dir.exists()


@pytest.mark.django_db
def test_what_cannot_be_removed_is_said_and_the_command_fails(settings, capsys, small_disk):
    activations = small_disk.mount(settings.JOBSITE_DATA_DIR / "activations", "1m")
    (activations / "424242").mkdir()
    small_disk.remount(activations, "ro")
    with pytest.raises(CommandError, match=r"^1 item\(s\) could not be removed; see above\.$"):
        call_command("jobs", "cleanup", "--delete")
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"Could not remove {activations / '424242'}: Read-only file system."
    assert out[2].startswith("Removed 0 item(s), 0 B.")
    assert (activations / "424242").exists()
