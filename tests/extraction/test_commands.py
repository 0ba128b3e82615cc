import io
import json
import re
import subprocess
import sys

import pytest
from django.utils import timezone
from django.core.management import CommandError, call_command

from extraction.models import Extraction
from tests.conftest import REPO, process_env, wait_for

pytestmark = pytest.mark.django_db


def test_extract_queues_by_names_and_says_so(model_record, dataset, capsys):
    call_command("extract", "tiny-gpt2", "samples", "--layers", "0,1", "--hooks", "residual,mlp", "--batch-size", "4")
    job = Extraction.objects.get()
    assert job.layers == [0, 1] and job.hooks == ["residual", "mlp"] and job.batch_size == 4
    assert f"Queued extraction {job.pk}" in capsys.readouterr().out
    call_command("extract", "tiny-gpt2", "samples", "--layers", "0,1", "--hooks", "residual,mlp", "--batch-size", "8")
    assert Extraction.objects.count() == 1, "the same request from a second terminal starts nothing"
    assert capsys.readouterr().out.strip() == (
        f"Extraction {job.pk}, started just now, already extracts the same dataset, layers, hooks and limits with "
        f"tiny-gpt2: it is queued (0/{job.total_samples} samples). It keeps its batch size 4, not 8. "
        "No second copy was started."
    )


def test_extract_with_a_path_registers_the_dataset(model_record, settings, capsys):
    from tests.conftest import write_dataset

    path = write_dataset(settings, "fresh.txt", ["one sample", "another sample"])
    call_command("extract", "tiny-gpt2", str(path), "--layers", "0")
    assert Extraction.objects.get().dataset.name == "fresh"


def test_extract_reads_layer_ranges_as_the_page_does(model_record, dataset, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        call_command("extract", "tiny-gpt2", "samples", "--layers", "0-1,2")
    assert Extraction.objects.get().layers == [0, 1, 2]


def test_extract_takes_transformerlens_names_with_their_layers(model_record, dataset,
                                                              django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        call_command("extract", "tiny-gpt2", "samples", "--hooks", "blocks.2.hook_resid_pre,blocks.2.mlp.hook_post")
    assert (Extraction.objects.get().layers, Extraction.objects.get().hooks) == ([2], ["resid_pre", "mlp_hidden"])


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--layers", "7"], "Layer 7 does not exist"),
        (["--layers", "zero"], "--layers .zero.: Write layers as numbers separated by commas, e.g. 0,2 or 0-3."),
        (["--layers", "3-1"], "The range 3-1 runs backwards; write it as 1-3."),
        (["--layers", "0", "--hooks", "logits"], "Hook 'logits' is unknown"),
        ([], "Choose at least one layer: tiny-gpt2 has layers 0-2"),
        (["--hooks", "blocks.5.hook_mlp_out"], "blocks.5.hook_mlp_out names layer 5, which does not exist: tiny-gpt2 "
                                               "has layers 0-2."),
    ],
)
def test_extract_refuses_bad_input_with_a_sentence(model_record, dataset, args, sentence):
    with pytest.raises(CommandError, match=sentence):
        call_command("extract", "tiny-gpt2", "samples", *args)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_wait_exits_1_with_the_failure_sentence_and_retry_suggested_exits_0(
    model_record, dataset, settings, start_worker
):
    """Real processes: the exit codes and sentences are what a script sees."""
    oom_at_8 = json.dumps({"extraction.batch": {"action": "oom", "min_batch_size": 8}})
    start_worker(JOBSITE_FAILPOINTS=oom_at_8, JOBSITE_QUEUE_POLL_S=0.2)
    env = process_env(settings)

    def manage(*args):
        return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180)

    failed = manage("extract", "tiny-gpt2", "samples", "--layers", "0", "--batch-size", "8", "--wait")
    job = Extraction.objects.get()
    assert failed.returncode == 1
    assert f"Extraction {job.pk} failed (OOM)" in failed.stderr
    assert "Suggested retry: {'batch_size': 4}" in failed.stderr

    retried = manage("extraction", "retry", str(job.pk), "--suggested", "--wait")
    assert retried.returncode == 0, retried.stderr
    retry = Extraction.objects.exclude(pk=job.pk).get()
    assert f"Extraction {retry.pk} retries {job.pk} with batch size 4" in retried.stdout
    assert f"Extraction {retry.pk} completed: {dataset.num_samples} samples" in retried.stdout
    assert retry.original_extraction_id == job.pk


def test_extraction_list_json_is_machine_readable(make_extraction, capsys):
    failed = make_extraction("failed", error_type="OOM", error_message="CUDA out of memory.")
    call_command("extraction", "list", "--json")
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == failed.pk and rows[0]["error_type"] == "OOM" and rows[0]["retry_available"] is True


def test_extraction_list_tells_a_failure_from_a_job_resumed_after_one(make_extraction, capsys):
    failed = make_extraction("failed", error_type="OOM", error_message="CUDA out of memory.")
    resumed = make_extraction("extracting", error_type="WORKER_LOST", worker="host:2", attempt=2,
                              error_message="Resumed by a person after 188 s without a heartbeat.")
    call_command("extraction", "list")
    lines = {int(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines[failed.pk].endswith(" OOM: CUDA out of memory.")
    assert lines[resumed.pk].endswith(" resumed after WORKER_LOST: Resumed by a person after 188 s without a heartbeat.")


def test_extraction_cancel_and_retry_refuse_with_sentences(make_extraction):
    done = make_extraction("completed")
    with pytest.raises(CommandError, match="only a queued or running extraction can be cancelled"):
        call_command("extraction", "cancel", str(done.pk))
    with pytest.raises(CommandError, match="only a failed or cancelled extraction can be retried"):
        call_command("extraction", "retry", str(done.pk))
    with pytest.raises(CommandError, match="Extraction 999 does not exist"):
        call_command("extraction", "cancel", "999")


def test_extract_again_what_failed_says_to_retry_it(model_record, dataset, django_capture_on_commit_callbacks):
    args = ("extract", "tiny-gpt2", "samples", "--layers", "0")
    with django_capture_on_commit_callbacks(execute=False):
        call_command(*args)
    Extraction.objects.update(status="failed", error_type="OOM", error_message="CUDA out of memory.",
                              finished_at=timezone.now())
    with pytest.raises(CommandError, match=r"failed \(OOM: CUDA out of memory.\); retry it"):
        call_command(*args)
    assert Extraction.objects.count() == 1


@pytest.mark.parametrize("limit", ["-1", "0", "x"])
def test_extraction_list_refuses_a_limit_below_one(limit):
    with pytest.raises(CommandError, match="argument --limit: must be a whole number of at least 1"):
        call_command("extraction", "list", "--limit", limit)


@pytest.mark.parametrize(("option", "sentence"), [
    ("--max-length", "Max length must be a positive number"),
    ("--max-samples", "Max samples must be between 1 and 100"),
])
def test_extraction_retry_refuses_a_zero_instead_of_ignoring_it(make_extraction, option, sentence):
    failed = make_extraction("failed", error_type="OOM")
    with pytest.raises(CommandError, match=sentence):
        call_command("extraction", "retry", str(failed.pk), option, "0")
    assert Extraction.objects.count() == 1


def test_a_model_argument_that_only_looks_like_an_id_is_a_sentence(model_record, dataset):
    with pytest.raises(CommandError, match="does not exist|outside the allowed directories"):
        call_command("extract", "²", "samples", "--layers", "0")


@pytest.mark.parametrize(("given", "kind"), [(["nosuch", "samples"], "model"), (["tiny-gpt2", "999"], "dataset")])
def test_a_name_or_id_that_is_not_registered_is_said_to_be_one(model_record, dataset, given, kind):
    with pytest.raises(CommandError, match=re.escape(
            f"No {kind} named or numbered {given[kind == 'dataset']!r} is registered (the {kind}s page and "
            f"/api/v1/{kind}s list them), and as a path: ")):
        call_command("extract", *given, "--layers", "0")
    assert Extraction.objects.count() == 0


def test_extract_refuses_a_max_length_beyond_the_position_limit(model_record, dataset):
    with pytest.raises(CommandError) as refused:
        call_command("extract", "tiny-gpt2", "samples", "--layers", "0", "--max-length", "2000")
    assert str(refused.value) == "Max length 2,000 is beyond tiny-gpt2's position limit: it reads at most 1,024 tokens."
    assert Extraction.objects.count() == 0


@pytest.mark.parametrize("suggested", [[], ["--suggested"]])
def test_extraction_retry_refuses_a_max_length_beyond_the_position_limit(make_extraction, fake_model, suggested):
    fake_model.max_positions = 512
    fake_model.save()
    failed = make_extraction("failed", error_type="OOM", batch_size=64, suggested_retry_params={"batch_size": 32})
    with pytest.raises(CommandError) as refused:
        call_command("extraction", "retry", str(failed.pk), *suggested, "--max-length", "600")
    assert str(refused.value) == "Max length 600 is beyond fake's position limit: it reads at most 512 tokens."
    assert Extraction.objects.count() == 1


def test_explicit_flags_override_the_suggested_ones(make_extraction, capsys, django_capture_on_commit_callbacks):
    failed = make_extraction("failed", error_type="OOM", batch_size=64, max_length=512,
                             suggested_retry_params={"batch_size": 32})
    with django_capture_on_commit_callbacks(execute=False):
        call_command("extraction", "retry", str(failed.pk), "--suggested", "--batch-size", "8", "--max-length", "128")
    retry = Extraction.objects.exclude(pk=failed.pk).get()
    assert capsys.readouterr().out.strip().splitlines() == [
        f"Extraction {retry.pk} retries {failed.pk} with batch size 8.",
        f"Extraction {retry.pk} starts from the first sample: it asks for other samples, lengths or storage than "
        f"extraction {failed.pk}."]
    assert (retry.batch_size, retry.max_length) == (8, 128)
    assert retry.retry_reason == ("retried from the command line with suggested parameters {'batch_size': 32} "
                                  "overridden by {'batch_size': 8, 'max_length': 128}")


def test_suggested_params_fill_what_no_flag_gives(make_extraction, capsys, django_capture_on_commit_callbacks):
    failed = make_extraction("failed", error_type="OOM", batch_size=1, max_length=512,
                             suggested_retry_params={"batch_size": 1, "max_length": 256})
    with django_capture_on_commit_callbacks(execute=False):
        call_command("extraction", "retry", str(failed.pk), "--suggested", "--max-samples", "10")
    retry = Extraction.objects.exclude(pk=failed.pk).get()
    assert (retry.batch_size, retry.max_length, retry.max_samples) == (1, 256, 10)


def test_retry_help_says_explicit_flags_override_the_suggestion(settings):
    shown = subprocess.run([sys.executable, "manage.py", "extraction", "retry", "--help"], cwd=REPO,
                           env=process_env(settings), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    assert "--max-length given as well override the suggestion" in " ".join(shown.stdout.split())


@pytest.mark.parametrize("flags, max_samples", [
    (["--max-samples", "all"], None),
    ([], 2000),
    (["--max-samples", "10"], 10),
    (["--suggested", "--max-samples", "all"], None),
])
def test_extraction_retry_max_samples_all_means_every_sample(make_extraction, fake_dataset, flags, max_samples,
                                                             django_capture_on_commit_callbacks):
    fake_dataset.num_samples = 3000
    fake_dataset.save()
    cancelled = make_extraction("cancelled", max_samples=2000, total_samples=2000)
    with django_capture_on_commit_callbacks(execute=False):
        call_command("extraction", "retry", str(cancelled.pk), *flags)
    retry = Extraction.objects.exclude(pk=cancelled.pk).get()
    assert (retry.max_samples, retry.total_samples) == (max_samples, max_samples or 3000)


def test_extraction_retry_refuses_a_max_samples_that_is_neither_a_number_nor_all(make_extraction):
    cancelled = make_extraction("cancelled")
    with pytest.raises(CommandError, match="give a number of samples or 'all', not 'most'"):
        call_command("extraction", "retry", str(cancelled.pk), "--max-samples", "most")


def test_retry_help_says_max_samples_all_means_the_whole_dataset(settings):
    shown = subprocess.run([sys.executable, "manage.py", "extraction", "retry", "--help"], cwd=REPO,
                           env=process_env(settings), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    assert "--max-samples N|all a number of samples, or 'all' for the whole dataset (default: the original's)" in (
        " ".join(shown.stdout.split()))


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_wait_without_a_worker_says_so_and_ctrl_c_leaves_the_job_queued(model_record, dataset, settings):
    """A real process with no worker anywhere: the notice, then Ctrl-C (SIGINT) as a person sends it."""
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "manage.py", "extract", "tiny-gpt2", "samples", "--layers", "0", "--wait"], cwd=REPO,
        env=process_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Extraction.objects.exists, timeout=60, message="the queued extraction")
        time.sleep(7)  # the command looks for a worker every 5 s
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    job = Extraction.objects.get()
    assert process.returncode == 130, err
    assert "No worker is running (start one with manage.py qcluster): the extraction waits until one starts." in err
    assert (f"Stopped following extraction {job.pk}; it goes on (`manage.py extraction list` shows it, "
            f"`manage.py extraction cancel {job.pk}` cancels it).") in err
    assert "Traceback" not in err and "Enqueued" not in err
    assert f"Queued extraction {job.pk}" in out
    assert Extraction.objects.get().status == "queued"


def test_extraction_retry_keeps_the_reason_given(make_extraction):
    failed = make_extraction("failed", error_type="UNKNOWN", error_message="boom")
    call_command("extraction", "retry", str(failed.pk), "--reason", "  the disk  was full ", stdout=io.StringIO())
    assert Extraction.objects.get(original_extraction=failed).retry_reason == "the disk was full"
    other = make_extraction("failed", error_type="UNKNOWN", error_message="boom")
    with pytest.raises(CommandError, match="The retry reason"):
        call_command("extraction", "retry", str(other.pk), "--reason", "x" * 600, stdout=io.StringIO())


@pytest.mark.parametrize("flag", ["--storage-dtype", "--dtype"])
def test_extract_takes_the_storage_dtype_by_its_name_and_its_old_one(model_record, dataset, flag,
                                                                    django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        call_command("extract", "tiny-gpt2", "samples", "--layers", "0", flag, "float16")
    assert Extraction.objects.get().storage_dtype == "float16"


def test_extract_help_names_the_storage_dtype_and_its_deprecated_alias(settings):
    shown = subprocess.run([sys.executable, "manage.py", "extract", "--help"], cwd=REPO, env=process_env(settings),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--storage-dtype" in shown.stdout
    assert "--dtype is its deprecated old name" in " ".join(shown.stdout.split())


def test_extraction_dismiss_moves_a_failed_job_into_the_history_and_refuses_a_running_one(make_extraction, capsys):
    failed, running = make_extraction("failed", error_type="OOM"), make_extraction("extracting")
    call_command("extraction", "dismiss", str(failed.pk))
    assert capsys.readouterr().out.strip() == (
        f"Extraction {failed.pk} is dismissed; it stays in the history, with its files.")
    assert Extraction.objects.get(pk=failed.pk).dismissed_at is not None
    with pytest.raises(CommandError, match=f"Extraction {running.pk} is extracting; only a failed or cancelled "
                                           r"extraction can be dismissed \(cancel it first\)."):
        call_command("extraction", "dismiss", str(running.pk))


def test_extract_says_every_problem_of_a_request_at_once(model_record, dataset):
    with pytest.raises(CommandError) as refused:
        call_command("extract", "tiny-gpt2", "samples", "--layers", "7", "--max-length", "5000")
    assert "Layer 7 does not exist" in str(refused.value) and "Max length 5,000 is beyond" in str(refused.value)


def test_extraction_list_filters_by_model(make_extraction, fake_model, capsys):
    job = make_extraction("failed", error_type="OOM")
    call_command("extraction", "list", "--model", "fake", "--json")
    assert [row["id"] for row in json.loads(capsys.readouterr().out)] == [job.pk]
    with pytest.raises(CommandError, match="No model named or numbered 'nope' is registered."):
        call_command("extraction", "list", "--model", "nope")
