import io
import json
import re
import threading

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from jobsite.models import Event
from tests.conftest import wait_for
from training_runs.models import TrainingPair, TrainingRun
from training_runs.services import training_run_generate
from training_runs.tasks import run_training_phase

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_machinery")]


@pytest.fixture
def superuser_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("boss", password="pw"))
    return client


@pytest.fixture
def failed_run(small_corpus, settings):
    settings.JOBSITE_FAILPOINTS = json.dumps({"training.generate": {"action": "error", "at": 8, "attempt": 1}})
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    settings.JOBSITE_FAILPOINTS = ""
    return TrainingRun.objects.get(pk=run.pk)


def act(client, model, action, objects, **extra):
    url = reverse(f"admin:training_runs_{model}_changelist")
    return client.post(url, {"action": action, "_selected_action": [o.pk for o in objects], **extra}, follow=True)


def test_admin_lists_runs_with_progress_and_error(superuser_client, failed_run):
    page = superuser_client.get(reverse("admin:training_runs_trainingrun_changelist")).content.decode()
    assert f"8/{failed_run.total_chunks}" in page and "Injected failure" in page
    assert '<td class="field-status_text">generating failed</td>' in page
    assert '<td class="field-error_text">Unknown error</td>' in page


def test_admin_remove_asks_for_confirmation_then_removes(superuser_client, failed_run):
    page = act(superuser_client, "trainingrun", "remove", [failed_run]).content.decode()
    assert "Remove these training runs?" in page and TrainingRun.objects.filter(pk=failed_run.pk).exists()
    page = act(superuser_client, "trainingrun", "remove", [failed_run], confirmed="yes").content.decode()
    assert "1 run removed." in page
    run = TrainingRun.objects.get(pk=failed_run.pk)
    assert run.removed_by.username == "boss" and not run.pairs.exists()
    assert Event.objects.filter(topic=failed_run.topic, type="training.removed").exists()
    # The changelist keeps its row: "removed", who, when, its pair count and verdict.
    page = superuser_client.get(reverse("admin:training_runs_trainingrun_changelist")).content.decode()
    assert '<td class="field-status_text">removed</td>' in page
    assert f"by boss on {run.removed_at:%Y-%m-%d %H:%M} UTC; {run.pair_count:,} pairs; —" in page


def test_admin_removes_a_completed_run_after_a_confirmation_and_refuses_a_working_one(superuser_client, failed_run):
    done = TrainingRun.objects.create(corpus=failed_run.corpus, status="completed", finished_at=timezone.now(),
                                      total_chunks=failed_run.total_chunks, adopted=True)
    TrainingRun.objects.filter(pk=failed_run.pk).update(status="generating", finished_at=None)
    page = act(superuser_client, "trainingrun", "remove", [done, failed_run]).content.decode()
    assert f"Training run {failed_run.pk} is generating pairs; stop it first, then it can be removed." in page
    assert "Remove these training runs?" in page and not TrainingRun.objects.get(pk=done.pk).removed_at
    page = act(superuser_client, "trainingrun", "remove", [done], confirmed="yes").content.decode()
    assert "1 run removed." in page and TrainingRun.objects.get(pk=done.pk).removed_at
    assert TrainingRun.objects.filter(pk=done.pk).exists()


def test_admin_proceed_requeues_and_refuses_generated_runs(superuser_client, failed_run):
    act(superuser_client, "trainingrun", "proceed", [failed_run])
    run = TrainingRun.objects.get(pk=failed_run.pk)
    assert run.status == "generating" and run.error_message == ""
    run_training_phase(run.pk)
    page = act(superuser_client, "trainingrun", "proceed", [run]).content.decode()
    assert "only a failed run can proceed" in page


def test_admin_bulk_approves_pairs(superuser_client, small_corpus):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    pairs = list(TrainingPair.objects.filter(run=run)[:5])
    page = act(superuser_client, "trainingpair", "approve", pairs).content.decode()
    assert "5 pairs approved." in page
    assert TrainingPair.objects.filter(run=run, review="approved").count() == 5


@pytest.fixture
def generated_run(db):
    """A generated run with six pending pairs, created directly (no worker, no encoder)."""
    from django.utils import timezone

    from training_runs.models import Chunk, Corpus

    corpus = Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)
    Chunk.objects.bulk_create(Chunk(corpus=corpus, index=i, document="h.md", text=f"Section {i}") for i in range(6))
    run = TrainingRun.objects.create(corpus=corpus, status="generated", total_chunks=6, processed_chunks=6,
                                     pair_count=6, generated_at=timezone.now())
    TrainingPair.objects.bulk_create(TrainingPair(run=run, chunk=c, query=f"q {c.index}") for c in corpus.chunks.all())
    return run


def test_admin_approving_three_pairs_of_one_run_reviews_them_once(superuser_client, generated_run):
    pairs = list(TrainingPair.objects.filter(run=generated_run)[:3])
    page = act(superuser_client, "trainingpair", "approve", pairs).content.decode()
    assert "3 pairs approved." in page
    assert Event.objects.filter(topic=generated_run.topic, type="training.pairs_reviewed").count() == 1


@pytest.mark.parametrize("selected", [["abc"], ["\x00"], ["²"]])
@pytest.mark.parametrize("confirmed", ["", "yes"])
def test_admin_remove_with_tampered_ids_is_a_warning_not_a_500(superuser_client, generated_run, selected, confirmed):
    page = act(superuser_client, "trainingrun", "remove", [], _selected_action=selected, confirmed=confirmed)
    assert page.status_code == 200
    assert "The selection was not understood; no action was taken." in page.content.decode()
    assert TrainingRun.objects.filter(pk=generated_run.pk).exists()


def test_command_refuses_causal_lm_with_the_demo_random_weight_model(small_corpus, tiny_model_dir, settings):
    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
    settings.JOBSITE_GENERATOR_MODEL_PATH = str(tiny_model_dir)
    with pytest.raises(CommandError, match="The causal_lm generator is unavailable: The generator model at .* is the "
                                           "demo's random-weight model, which writes noise"):
        call_command("training", "generate", "small", "--generator", "causal_lm")
    assert not TrainingRun.objects.exists()


def test_commands_generate_review_status_and_refusals(small_corpus, capsys, settings):
    call_command("training", "generate", "small")
    run = TrainingRun.objects.get()
    assert f"Training run {run.pk} is generating pairs for {run.total_chunks} chunks." in capsys.readouterr().out
    with pytest.raises(CommandError, match=re.escape(
            f"training run {run.pk}, started just now, is generating pairs (0/{run.total_chunks} chunks); "
            "wait for it to finish generating first.")):
        call_command("training", "generate", "small")
    run_training_phase(run.pk)
    call_command("training", "review", str(run.pk), "approve")
    assert "0 pending" in capsys.readouterr().out
    call_command("training", "status", "--json")
    assert json.loads(capsys.readouterr().out)[0]["status"] == "generated"
    with pytest.raises(CommandError, match="Training run 999 does not exist"):
        call_command("training", "proceed", "999")


def test_remove_command_needs_confirmation(failed_run, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(CommandError, match="Nothing removed"):
        call_command("training", "remove", str(failed_run.pk))
    assert not TrainingRun.objects.get(pk=failed_run.pk).removed_at
    call_command("training", "remove", str(failed_run.pk), "--yes")
    assert TrainingRun.objects.filter(pk=failed_run.pk, removed_at__isnull=False).exists()


def test_remove_command_refuses_a_run_that_cannot_be_removed_before_asking(small_corpus, monkeypatch):
    run = training_run_generate(corpus=small_corpus)
    monkeypatch.setattr("builtins.input", lambda prompt: pytest.fail(f"asked {prompt!r}"))
    with pytest.raises(CommandError, match=re.escape(
            f"Training run {run.pk} is generating pairs; stop it first, then it can be removed.")):
        call_command("training", "remove", str(run.pk))
    assert TrainingRun.objects.filter(pk=run.pk).exists()


def test_remove_command_discards_a_run_waiting_for_review(small_corpus, capsys):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    call_command("training", "review", str(run.pk), "reject")
    call_command("training", "remove", str(run.pk), "--yes")
    assert (f"Training run {run.pk} removed: its pairs and files are deleted; its row stays in the history."
            in capsys.readouterr().out)
    assert TrainingRun.objects.get(pk=run.pk).removed_at


def test_remove_command_without_an_answer_removes_nothing_and_names_yes(failed_run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `< /dev/null`: input() meets the end of the file
    with pytest.raises(CommandError, match=re.escape(
            f"No answer to the confirmation; nothing removed. To remove without a prompt, run "
            f"`manage.py training remove {failed_run.pk} --yes`.")) as refused:
        call_command("training", "remove", str(failed_run.pk), stdout=io.StringIO())
    assert refused.value.returncode == 1
    assert not TrainingRun.objects.get(pk=failed_run.pk).removed_at


def test_remove_command_takes_a_yes_piped_in(failed_run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    out = io.StringIO()
    call_command("training", "remove", str(failed_run.pk), stdout=out)
    assert f"Training run {failed_run.pk} removed: its pairs and files are deleted" in out.getvalue()
    assert TrainingRun.objects.filter(pk=failed_run.pk, removed_at__isnull=False).exists()


def test_admin_stop_stops_a_generating_run_and_refuses_a_failed_one(superuser_client, small_corpus):
    run = training_run_generate(corpus=small_corpus)
    page = act(superuser_client, "trainingrun", "stop", [run]).content.decode()
    assert "Stop asked of 1 run: a working run stops after its current chunk or batch" in page
    run = TrainingRun.objects.get(pk=run.pk)
    assert (run.status, run.error_type) == ("generating_failed", "CANCELLED")
    page = act(superuser_client, "trainingrun", "stop", [run]).content.decode()
    assert "only a generating or training run can be stopped" in page


def test_stop_command_stops_the_run_and_fails_with_a_sentence_when_it_cannot(small_corpus, capsys):
    run = training_run_generate(corpus=small_corpus)
    call_command("training", "stop", str(run.pk))
    assert (f"Training run {run.pk} stopped (0/{run.total_chunks}); proceed continues it, remove discards it."
            in capsys.readouterr().out)
    with pytest.raises(CommandError, match="only a generating or training run can be stopped"):
        call_command("training", "stop", str(run.pk))


def test_train_wait_draws_the_embedding_bar_then_the_epochs_bar(small_corpus, settings):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    call_command("training", "review", str(run.pk), "approve", stdout=io.StringIO())
    texts = small_corpus.chunks.count() + TrainingPair.objects.filter(run=run).count()

    def worker():
        # The phase starts once `train` has committed it, as a qcluster would pick it up.
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == "training", timeout=30)
        run_training_phase(run.pk)
        connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    out, err = io.StringIO(), io.StringIO()
    call_command("training", "train", str(run.pk), "--epochs", "2", "--wait", stdout=out, stderr=err)
    thread.join(timeout=60)
    draws = [line.strip() for line in re.split(r"[\r\n]", err.getvalue()) if line.strip()]
    embedding = [d for d in draws if d.startswith(f"run {run.pk} embedding:")]
    epochs = [d for d in draws if d.startswith(f"run {run.pk} training:")]
    assert embedding and epochs and draws.index(embedding[-1]) < draws.index(epochs[0])
    assert f" 0/{texts} " in embedding[0]
    assert embedding[-1].startswith(f"run {run.pk} embedding: 100%") and f" {texts}/{texts} " in embedding[-1]
    assert epochs[-1].startswith(f"run {run.pk} training: 100%") and " 2/2 " in epochs[-1]
    assert "completed" in epochs[-1] and "completed" in out.getvalue()


@pytest.mark.parametrize("pairs", ["1,x", "1,", ""])
def test_review_command_refuses_pair_ids_that_are_not_numbers(small_corpus, pairs):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    with pytest.raises(CommandError, match=f"--pairs must be pair ids separated by commas, e.g. 4,5,6; got '{pairs}'"):
        call_command("training", "review", str(run.pk), "approve", "--pairs", pairs)
    assert not TrainingPair.objects.filter(run=run).exclude(review="pending").exists()


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_train_command_refuses_epochs_below_one_instead_of_training_the_default(small_corpus, epochs):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    call_command("training", "review", str(run.pk), "approve", stdout=io.StringIO())
    with pytest.raises(CommandError, match=f"Epochs must be between 1 and 1,000; got {epochs}."):
        call_command("training", "train", str(run.pk), "--epochs", epochs)
    assert TrainingRun.objects.get(pk=run.pk).status == "generated"


def test_status_command_for_run_zero_says_it_does_not_exist(small_corpus, capsys):
    training_run_generate(corpus=small_corpus)
    with pytest.raises(CommandError, match="Training run 0 does not exist"):
        call_command("training", "status", "0")
    assert capsys.readouterr().out == ""


@pytest.fixture
def handbook_file(settings):
    """A one-document corpus source under the data directory, as `corpora/handbook/<file>.md`."""
    folder = settings.JOBSITE_DATA_DIR / "corpora" / "handbook"
    folder.mkdir(parents=True)
    path = folder / "code-review-guidelines.md"
    path.write_text("# Code review\n\n" + "Read the change twice before approving it. " * 40, encoding="utf-8")
    return path


def complete(run):
    """The blocking run is done, as if trained (no worker needed for the command's choices)."""
    TrainingRun.objects.filter(pk=run.pk).update(status="completed", finished_at=timezone.now())


@pytest.mark.parametrize("target", ["corpora/handbook/code-review-guidelines.md", "corpora/handbook"])
def test_generate_from_a_path_while_another_run_blocks_makes_no_corpus_and_works_once_unblocked(
        small_corpus, handbook_file, target):
    from training_runs.models import Corpus

    blocking = training_run_generate(corpus=small_corpus)
    out = io.StringIO()
    refusal = re.escape(f"A new generation cannot start while training run {blocking.pk}")
    with pytest.raises(CommandError, match=refusal):
        call_command("training", "generate", target, stdout=out)
    assert "Corpus" not in out.getvalue()
    assert list(Corpus.objects.values_list("name", flat=True)) == ["small"]
    with pytest.raises(CommandError, match=re.escape(f"while training run {blocking.pk}")):
        call_command("training", "generate", target, stdout=out)  # the same refusal, not "already exists"
    complete(blocking)
    call_command("training", "generate", target, stdout=out)
    name = handbook_file.stem if target.endswith(".md") else "handbook"
    corpus = Corpus.objects.get(name=name)
    assert corpus.source == str(handbook_file if target.endswith(".md") else handbook_file.parent)
    assert f"Corpus {name}: 1 document, {corpus.chunks.count()} chunks." in out.getvalue()
    assert TrainingRun.objects.get(status="generating").corpus == corpus


def test_generate_with_a_path_given_again_uses_the_corpus_made_from_it(small_corpus, handbook_file):
    from training_runs.models import Corpus

    first = io.StringIO()
    call_command("training", "generate", "corpora/handbook/code-review-guidelines.md", stdout=first)
    corpus = Corpus.objects.get(name="code-review-guidelines")
    complete(TrainingRun.objects.get(corpus=corpus))
    again = io.StringIO()
    call_command("training", "generate", str(handbook_file), stdout=again)  # absolute this time: the same file
    assert Corpus.objects.count() == 2
    run = TrainingRun.objects.get(status="generating")
    assert run.corpus == corpus
    assert (f"Corpus code-review-guidelines (made from {handbook_file} before): 1 document, "
            f"{corpus.chunks.count()} chunks.") in again.getvalue()
    assert f"Training run {run.pk} is generating pairs for {corpus.chunks.count()} chunks." in again.getvalue()


def test_generate_with_name_makes_a_new_corpus_of_that_name_and_refuses_a_taken_one(small_corpus, handbook_file):
    from training_runs.models import Corpus

    out = io.StringIO()
    call_command("training", "generate", "corpora/handbook", "--name", "guides", "--chunk-size", "200", stdout=out)
    corpus = Corpus.objects.get(name="guides")
    assert (corpus.source, corpus.chunk_size) == (str(handbook_file.parent), 200)
    assert f"Corpus guides: 1 document, {corpus.chunks.count()} chunks." in out.getvalue()
    complete(TrainingRun.objects.get(corpus=corpus))
    with pytest.raises(CommandError, match=re.escape("A corpus named 'small' already exists; choose another name.")):
        call_command("training", "generate", "corpora/handbook", "--name", "small")
    assert Corpus.objects.count() == 2 and TrainingRun.objects.filter(status="generating").count() == 0


def test_generate_from_a_path_whose_name_is_taken_by_another_corpus_says_to_use_name(small_corpus, settings):
    from training_runs.models import Corpus

    other = settings.JOBSITE_DATA_DIR / "elsewhere" / "small.md"
    other.parent.mkdir(parents=True)
    other.write_text("Another small document.", encoding="utf-8")
    with pytest.raises(CommandError, match=re.escape(
            f"A corpus named 'small' already exists, made from {small_corpus.source}; the corpus made from "
            "elsewhere/small.md needs another name. Give the new corpus a name with --name.")):
        call_command("training", "generate", "elsewhere/small.md")
    assert Corpus.objects.count() == 1 and not TrainingRun.objects.exists()


@pytest.mark.integration
def test_generate_command_refused_by_a_blocking_run_exits_1_and_leaves_no_corpus(small_corpus, handbook_file, settings):
    """A real process: the exit code and the sentence a script sees, and nothing left behind."""
    import subprocess
    import sys

    from tests.conftest import REPO, process_env
    from training_runs.models import Corpus

    blocking = training_run_generate(corpus=small_corpus)
    env = process_env(settings, JOBSITE_ENCODER_PATH=settings.JOBSITE_ENCODER_PATH)
    for _ in range(2):  # the second time too: the refusal, never "already exists"
        done = subprocess.run([sys.executable, "manage.py", "training", "generate",
                               "corpora/handbook/code-review-guidelines.md"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert f"A new generation cannot start while training run {blocking.pk}" in done.stderr
        assert "Corpus" not in done.stdout
    assert list(Corpus.objects.values_list("name", flat=True)) == ["small"]


@pytest.mark.parametrize(("status", "sentence"), [
    ("generating", "is generating pairs; pairs are reviewed once generation is done."),
    ("training", "is training; its pairs cannot be reviewed while they are used for training."),
    ("completed", "is completed; its pairs were used for training and can no longer be reviewed."),
])
def test_review_command_refusal_says_why_the_runs_state_cannot_be_reviewed(generated_run, status, sentence):
    TrainingRun.objects.filter(pk=generated_run.pk).update(
        status=status, finished_at=timezone.now() if status == "completed" else None)
    with pytest.raises(CommandError, match=re.escape(f"Training run {generated_run.pk} {sentence}")) as refused:
        call_command("training", "review", str(generated_run.pk), "approve")
    assert refused.value.returncode == 1
    assert not TrainingPair.objects.filter(run=generated_run).exclude(review="pending").exists()


def test_admin_offers_no_deletion_of_pairs_whose_run_counts_them(superuser_client, failed_run):
    """A pair is approved or rejected; deleting one left the run's pair count stale."""
    page = superuser_client.get(reverse("admin:training_runs_trainingpair_changelist")).content.decode()
    assert 'value="approve"' in page and 'value="delete_selected"' not in page
    pair = failed_run.pairs.first()
    response = superuser_client.post(reverse("admin:training_runs_trainingpair_delete", args=[pair.pk]),
                                     {"post": "yes"})
    assert response.status_code == 403 and failed_run.pairs.filter(pk=pair.pk).exists()


def test_admin_remove_confirmation_reads_each_runs_progress_once(superuser_client, failed_run):
    page = act(superuser_client, "trainingrun", "remove", [failed_run]).content.decode()
    assert f"Training run {failed_run.pk} — generating failed, 8/{failed_run.total_chunks} chunks, " in page
    TrainingRun.objects.filter(pk=failed_run.pk).update(status="training_failed", texts_total=1270, texts_embedded=192,
                                                        error_type="CANCELLED")
    page = act(superuser_client, "trainingrun", "remove", [failed_run]).content.decode()
    assert f"Training run {failed_run.pk} — stopped, Embedding 192 of 1,270 texts, " in page


def test_status_says_when_there_is_no_run_and_names_each_runs_corpus(small_corpus, capsys):
    call_command("training", "status")
    assert capsys.readouterr().out.strip() == ("No training runs yet; start one with "
                                               "`manage.py training generate <corpus>`.")
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    call_command("training", "status")
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "status", "progress", "pairs", "corpus"]
    assert line.split()[:2] == [str(run.pk), "generated"] and line.endswith("small")


def test_edit_command_rewrites_a_query_and_approves_it(small_corpus, capsys):
    run = training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    pair = run.pairs.order_by("pk").first()
    call_command("training", "edit", str(run.pk), str(pair.pk), "where is the telescope kept")
    assert capsys.readouterr().out.strip() == (f"Pair {pair.pk} of training run {run.pk} now asks "
                                               "'where is the telescope kept' and is approved.")
    pair.refresh_from_db()
    assert (pair.query, pair.review) == ("where is the telescope kept", "approved")
    with pytest.raises(CommandError, match=r"^The query is empty; write the question this chunk answers\.$"):
        call_command("training", "edit", str(run.pk), str(pair.pk), "  ")


def test_a_stopped_run_reads_the_same_on_the_page_in_the_admin_the_command_and_the_api(superuser_client, small_corpus,
                                                                                        capsys):
    run = training_run_generate(corpus=small_corpus)
    call_command("training", "stop", str(run.pk), stdout=io.StringIO())
    run = TrainingRun.objects.get(pk=run.pk)
    assert (run.status, run.status_label, run.error_label) == ("generating_failed", "stopped", "Stopped on request")
    page = superuser_client.get("/training/").content.decode()
    assert 'data-status-label>stopped</span>' in page and "CANCELLED" not in page
    admin_page = superuser_client.get(reverse("admin:training_runs_trainingrun_changelist")).content.decode()
    assert '<td class="field-status_text">stopped</td>' in admin_page
    assert '<td class="field-error_text">Stopped on request</td>' in admin_page
    call_command("training", "status")
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[1] == "stopped" and "Stopped on request: Stopped on request after" in line
    body = superuser_client.get(f"/api/v1/training/runs/{run.pk}").json()
    assert (body["status_label"], body["error_label"]) == ("stopped", "Stopped on request")


def test_status_shows_a_stalled_run_as_stalled(small_corpus, settings, capsys):
    run = training_run_generate(corpus=small_corpus)
    old = timezone.now() - timezone.timedelta(seconds=settings.JOBSITE_STALL_AFTER_S + 65)
    TrainingRun.objects.filter(pk=run.pk).update(worker="gone:1", worker_host="gone", worker_pid=1, started_at=old,
                                                 heartbeat_at=old)
    call_command("training", "status")
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[1:3] == ["generating", "(stalled)"]
    assert f"no heartbeat for {settings.JOBSITE_STALL_AFTER_S + 65:.0f} s" in line


def test_a_completed_run_is_removed_by_the_command_after_a_confirmation_and_stays_listed(small_corpus, staff_user,
                                                                                         monkeypatch, capsys):
    run = TrainingRun.objects.create(corpus=small_corpus, status="completed", finished_at=timezone.now(),
                                     pair_count=24, adopted=True)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or "y")
    call_command("training", "remove", str(run.pk))
    assert prompts == [f"Remove training run {run.pk} (completed, 24 pairs, adopted)? Its pairs and files are deleted; "
                       "its row stays in the history. [y/N] "]
    run = TrainingRun.objects.get(pk=run.pk)
    assert run.removed_at and run.removed_by is None
    capsys.readouterr()
    call_command("training", "status")
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[1] == "removed"
    assert line.endswith(f"removed on {run.removed_at:%Y-%m-%d %H:%M} UTC; verdict: adopted")
    with pytest.raises(CommandError, match=f"Training run {run.pk} was removed on .*; its pairs and files are gone."):
        call_command("training", "remove", str(run.pk), "--yes")


def test_search_with_the_encoder_missing_answers_a_sentence(small_corpus, settings):
    run = TrainingRun.objects.create(corpus=small_corpus, status="completed", finished_at=timezone.now())
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "adapter.safetensors").write_bytes(b"")
    (run.output_dir / "index.npy").write_bytes(b"")
    settings.JOBSITE_ENCODER_PATH = str(settings.JOBSITE_MODEL_ROOTS[0] / "no-such-encoder")
    with pytest.raises(CommandError) as refused:
        call_command("training", "search", str(run.pk), "how do I oil the chain")
    assert str(refused.value).startswith("Search is unavailable: ") and refused.value.returncode == 1
    assert "no-such-encoder" in str(refused.value) and "huggingface" not in str(refused.value).lower()


def test_commands_print_no_django_q_info_lines(small_corpus, settings):
    """A real `manage.py` process: django-q's "Enqueued [jobsite] N" line stays out of its output."""
    import subprocess
    import sys

    from tests.conftest import REPO, process_env

    env = process_env(settings, JOBSITE_ENCODER_PATH=settings.JOBSITE_ENCODER_PATH, JOBSITE_LOG_LEVEL="INFO")
    done = subprocess.run([sys.executable, "manage.py", "training", "generate", "small"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "is generating pairs" in done.stdout
    assert "django-q" not in done.stdout + done.stderr and "Enqueued" not in done.stdout + done.stderr
