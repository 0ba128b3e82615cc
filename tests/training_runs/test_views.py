"""The training page through Django's test client: access, the gate, the workflow card, the
history table and every action, including the refusals."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from jobsite.models import Event
from training_runs import services
from training_runs.models import Chunk, Corpus, TrainingPair, TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("encoder")]

PAGE = "/training/"
NOT_COMPLETED = ["generating", "generated", "training", "generating_failed", "training_failed"]


@pytest.fixture
def corpus(db):
    corpus = Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)
    Chunk.objects.bulk_create(
        Chunk(corpus=corpus, index=i, document="handbook.md", text=f"Section {i}: bicycles need oil every {i + 2} weeks.")
        for i in range(12)
    )
    return corpus


@pytest.fixture
def make_run(corpus):
    """A run row in any status, created directly (no worker, no task)."""

    def make(status="generating", **fields):
        if status == "completed":
            fields.setdefault("finished_at", timezone.now())
        fields.setdefault("total_chunks", 12)
        return TrainingRun.objects.create(corpus=corpus, status=status, **fields)

    return make


@pytest.fixture
def generated_run(make_run, corpus):
    run = make_run("generated", processed_chunks=12, pair_count=12, generated_at=timezone.now())
    TrainingPair.objects.bulk_create(
        TrainingPair(run=run, chunk=chunk, query=f"how often do bicycles need oil {chunk.index}")
        for chunk in corpus.chunks.all()
    )
    return run


def completed(make_run, **fields):
    return make_run(
        "completed", processed_chunks=12, pair_count=24, epochs=4, epochs_done=4,
        metrics={"before": {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75},
                 "after": {"recall@1": 0.5, "recall@5": 0.75, "recall@10": 1.0}, "train_pairs": 19, "eval_pairs": 5},
        loss_curve=[2.1, 1.4, 0.9, 0.7], **fields,
    )


def failed(make_run, status="generating_failed", **fields):
    fields.setdefault("processed_chunks", 5)
    return make_run(status, error_type="UNKNOWN", error_message="Injected failure (failpoint training.generate)",
                    attempt=1, **fields)


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] if response.context else []


def section(html: str, element_id: str) -> str:
    start = html.index(f'id="{element_id}"')
    return html[start:]


def row_html(html: str, run_id: int) -> str:
    start = html.index(f'<tbody id="run-row-{run_id}"')
    return html[start:html.index("\n</tbody>", start)]  # the row's own, not its recall table's


def progress_cell(html: str, run_id: int) -> str:
    return re.search(r'data-field="progress_label">([^<]*)<', row_html(html, run_id))[1]


# -- access --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [PAGE, "/training/workflow/", "/training/history/", "/training/runs/1/row/",
                                 "/training/runs/1/delete/"])
def test_pages_redirect_an_anonymous_visitor_to_the_login_page(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_a_reader_sees_the_page_read_only(client, plain_user, make_run, corpus):
    failed(make_run)
    client.force_login(plain_user)
    html = client.get(PAGE + f"?open={TrainingRun.objects.get().pk}").content.decode()
    assert "group (and superusers) can start, cancel or retry jobs, or add models, datasets and corpora" in html
    assert 'class="generate-form"' not in section(html, "workflow"), "the form is replaced by the sentence"
    assert "Read only: ask an administrator to proceed with it or delete it." in html
    for action in ("/proceed/", "/delete/", "/review/", "/train/", "/resume/", 'action="/training/corpora/"'):
        assert action not in html
    assert "handbook" in section(html, "corpora"), "a reader still sees the corpora"


@pytest.mark.parametrize("path", ["generate/", "corpora/", "runs/{id}/review/", "runs/{id}/train/", "runs/{id}/proceed/",
                                  "runs/{id}/resume/", "runs/{id}/delete/"])
def test_a_user_who_is_not_staff_cannot_post_any_action(client, plain_user, make_run, corpus, path):
    run = failed(make_run)
    client.force_login(plain_user)
    data = {"corpus": corpus.pk, "generator": "local", "decision": "approved", "scope": "all", "confirmed": "1",
            "name": "other", "path": "corpora-src", "chunk_size": 500, "chunk_overlap": 50}
    response = client.post(PAGE + path.format(id=run.pk), data)
    assert response.status_code == 403
    assert b"You may view jobs but not" in response.content
    assert list(TrainingRun.objects.values_list("pk", "status")) == [(run.pk, "generating_failed")]
    assert list(Corpus.objects.values_list("name", flat=True)) == ["handbook"]


def test_the_page_embeds_the_live_topic_and_the_delays(staff_client, settings, corpus):
    settings.JOBSITE_POLL_FALLBACK_S = 2
    settled = Event.objects.create(topic="training.1", type="training.progress", payload={},
                                   created_at=timezone.now() - timedelta(seconds=6))
    Event.objects.create(topic="training.1", type="training.progress", payload={})  # replayed: the last 5 s
    html = staff_client.get(PAGE).content.decode()
    assert f'data-live-after="{settled.seq}"' in html and 'data-live-topic="training."' in html
    assert 'data-poll-fallback-s="2"' in html and "jobsite/live.js" in html
    assert 'href="/training/" aria-current="page"' in html


# -- the gate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["unset", "missing files"])
def test_when_training_is_unavailable_the_warning_the_corpora_and_the_history_read_only_show(
        staff_client, settings, tmp_path, make_run, problem):
    run = failed(make_run)
    if problem == "unset":
        settings.JOBSITE_ENCODER_PATH = ""
        reason = "No encoder is configured: set JOBSITE_ENCODER_PATH"
    else:
        empty = settings.JOBSITE_MODEL_ROOTS[0] / "empty-encoder"
        empty.mkdir()
        settings.JOBSITE_ENCODER_PATH = str(empty)
        reason = "cannot be loaded: config.json, model.safetensors missing"
    response = staff_client.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    content = html[html.index("<main>"):html.index("</main>")]
    assert re.findall(r"<h1>(.*?)</h1>", content) == ["Training"]
    assert len(re.findall(r'class="alert ', content)) == 1
    assert reason in content
    for absent in ('id="workflow"', "data-generate", "data-live", "{#", "#}", "No actions on runs"):
        assert absent not in content
    assert "data-live-topic" not in html
    assert 'id="corpora"' in content and "data-create-corpus" in content, "corpora can be prepared meanwhile"
    row = row_html(content, run.pk)
    assert "Injected failure" in row and "data-history-read-only" in content
    for action in ("/proceed/", "/delete/", "data-refresh", "ask an administrator"):
        assert action not in row


def test_a_corpus_is_created_while_training_is_unavailable_and_a_refusal_keeps_its_sentence(staff_client, settings):
    settings.JOBSITE_ENCODER_PATH = ""
    refused = staff_client.post(PAGE + "corpora/", {**CORPUS_FIELDS, "name": "x", "chunk_overlap": 150,
                                                    "files": [upload("a.txt", "text")]})
    assert refused.status_code == 400
    html = refused.content.decode()
    assert "Training is unavailable." in html
    assert "The overlap must be between 0 and 99 characters for a chunk size of 200." in section(html, "corpora")
    created = staff_client.post(PAGE + "corpora/", {**CORPUS_FIELDS, "name": "notes",
                                                    "files": [upload("a.txt", "Tyres hold 4 bar. " * 5)]})
    assert created.status_code == 302
    page = staff_client.get(created.url).content.decode()
    assert "Corpus notes is ready: 1 document" in page and 'id="corpus-' in section(page, "corpora")


# -- the workflow card ---------------------------------------------------------------------------

@pytest.mark.parametrize("status", NOT_COMPLETED)
def test_generate_is_disabled_with_the_sentence_naming_the_blocking_run(staff_client, make_run, status):
    completed(make_run)
    run = make_run(status, error_type="UNKNOWN" if "failed" in status else "")
    html = staff_client.get(PAGE).content.decode()
    sentence = services.blocking_sentence(run)
    said = {"generating": "is generating pairs", "generated": "is waiting for review", "training": "is training",
            "generating_failed": "has a failed generation", "training_failed": "has a failed training"}[status]
    assert f"training run {run.pk}, started just now, {said} (" in sentence
    assert f'<p class="note" id="generate-blocked" data-blocking-sentence>{sentence}</p>' in html
    button = re.search(r"<button[^>]*data-generate[^>]*>", html)[0]
    assert "disabled" in button
    form = html[html.index('class="generate-form"'):html.index("</form>", html.index('class="generate-form"'))]
    assert "<fieldset disabled>" in form, "the whole form reads as blocked, not only its button"


def test_generate_is_enabled_when_every_run_is_completed(staff_client, make_run):
    completed(make_run)
    html = staff_client.get(PAGE).content.decode()
    assert "disabled" not in re.search(r"<button[^>]*data-generate[^>]*>", html)[0]
    assert "data-blocking-sentence" not in html


def test_generate_from_the_page_starts_a_run(staff_client, corpus):
    response = staff_client.post(PAGE + "generate/", {"corpus": corpus.pk, "generator": "local"}, follow=True)
    run = TrainingRun.objects.get()
    assert (run.status, run.total_chunks, run.generator, run.created_by.username) == ("generating", 12, "local", "staff")
    assert f"Training run {run.pk} is generating pairs for the 12 chunks of handbook." in messages_of(response)
    html = response.content.decode()
    card = section(html, f"run-{run.pk}")
    assert 'data-status="generating"' in card and "Waiting for a worker" in card
    assert 'data-running-statuses=""' in card, "no stall check before a worker holds it"
    # The answer keeps the corpus chosen, and its message says what it is about, for the page to
    # take it down once the run is seen in another status.
    assert response.redirect_chain[-1][0] == f"{PAGE}?corpus={corpus.pk}#run-{run.pk}"
    assert re.search(rf'<option value="{corpus.pk}" selected>', html)
    assert f'data-message data-about="training.{run.pk} generating"' in html


def test_a_run_that_waits_without_a_worker_says_none_is_running(staff_client, make_run):
    run = make_run("generating")
    html = staff_client.get(PAGE).content.decode()
    assert f"No worker is running</strong> (start one with manage.py qcluster): training run {run.pk} waits" in html
    assert "No worker is running" in staff_client.get(PAGE + "workflow/").content.decode()


def test_a_run_waiting_for_a_person_does_not_ask_for_a_worker(staff_client, generated_run):
    assert "No worker is running" not in staff_client.get(PAGE).content.decode()


def test_pages_have_an_icon(staff_client):
    html = staff_client.get(PAGE).content.decode()
    assert '<link rel="icon" href="/static/jobsite/favicon.svg"' in html


def test_an_active_run_shows_its_live_progress_bar(staff_client, make_run, settings):
    now = timezone.now()
    run = make_run("generating", processed_chunks=3, pair_count=6, worker="host:1", started_at=now, heartbeat_at=now,
                   progress_at=now, attempt=1)
    card = section(staff_client.get(PAGE).content.decode(), f"run-{run.pk}")
    assert 'style="width: 25.0%"' in card
    assert '<span data-field="processed_chunks">3</span>/<span data-field="total_chunks">12</span> chunks' in card
    assert f'data-api-url="/api/v1/training/runs/{run.pk}"' in card
    assert 'data-running-statuses="generating training"' in card and "Generating queries" in card
    assert "data-stalled-notice hidden" in card and "data-slow-notice hidden" in card


def test_a_training_run_shows_epochs_on_its_bar(staff_client, make_run):
    now = timezone.now()
    run = make_run("training", processed_chunks=12, epochs=8, epochs_done=2, texts_total=1479, texts_embedded=1479,
                   worker="host:1", started_at=now, heartbeat_at=now, progress_at=now, attempt=1)
    card = section(staff_client.get(PAGE).content.decode(), f"run-{run.pk}")
    assert 'data-done-field="progress_done" data-total-field="progress_total"' in card
    assert 'style="width: 25.0%"' in card and "Training the adapter" in card
    assert '<span data-field="progress_label">2 of 8 epochs</span> (<span data-percent>25</span> %)' in card


def test_a_training_run_that_is_embedding_counts_texts_on_its_bar_and_in_its_row(staff_client, make_run):
    now = timezone.now()
    run = make_run("training", processed_chunks=12, epochs=8, texts_total=1479, texts_embedded=480,
                   worker="host:1", started_at=now, heartbeat_at=now, progress_at=now, attempt=1)
    html = staff_client.get(f"{PAGE}?open={run.pk}").content.decode()
    card = section(html, f"run-{run.pk}")
    assert 'style="width: 32.5%"' in card and 'aria-valuenow="32.5"' in card
    assert '<span data-field="progress_label">Embedding 480 of 1,479 texts</span> (<span data-percent>32.5</span> %)' in card
    row = row_html(html, run.pk)
    assert progress_cell(html, run.pk) == "Embedding 480 of 1,479 texts"
    assert 'holds this run: <span data-field="progress_label">Embedding 480 of 1,479 texts</span>.' in row


def test_an_embedding_card_weighs_its_texts_by_length_for_its_time_left(staff_client, make_run, corpus):
    """Chunks are embedded first, then the approved queries: the card says how many chunks come
    first and what a query weighs against a chunk (their mean lengths), and shows a time left."""
    now = timezone.now()
    run = make_run("training", processed_chunks=12, texts_total=14, texts_embedded=3, worker="host:1",
                   started_at=now, heartbeat_at=now, progress_at=now, attempt=1)
    chunks = list(corpus.chunks.all())
    TrainingPair.objects.bulk_create([TrainingPair(run=run, chunk=chunks[0], query="oil?", review="approved"),
                                      TrainingPair(run=run, chunk=chunks[1], query="brakes??", review="approved"),
                                      TrainingPair(run=run, chunk=chunks[2], query="rejected one", review="rejected")])
    weight = 6 / (sum(len(chunk.text) for chunk in chunks) / len(chunks))
    card = section(staff_client.get(PAGE).content.decode(), f"run-{run.pk}")
    assert f'data-embed-chunks="12" data-embed-query-weight="{weight:.4f}"' in card
    assert "<span data-eta-step><span class=\"sep\">·</span> <span data-eta>—</span> left in this step</span>" in card


def test_a_run_stopped_while_embedding_says_how_far_it_got(staff_client, make_run):
    run = make_run("training_failed", processed_chunks=12, epochs=8, texts_total=1479, texts_embedded=480,
                   attempt=1, error_type="CANCELLED",
                   error_message="Stopped on request while embedding (480 of 1,479 texts).")
    html = staff_client.get(f"{PAGE}?open={run.pk}").content.decode()
    card = section(html, f"run-{run.pk}")
    assert "<strong>Stopped on request</strong>" in card and "CANCELLED" not in card
    assert "Stopped on request while embedding (480 of 1,479 texts)." in card
    assert "(Stopped on request)" not in card and "Stopped on request: " not in card, "said once, in the message"
    assert "480 of 1,479 texts were embedded before it stopped (attempt 1)." in card
    row = row_html(html, run.pk)
    assert "Training stopped while embedding: 480 of 1,479 texts are embedded. Proceed embeds the rest" in row
    # Stopped on request reads as a pause, not a failure: badge, alert, card, blocking sentence.
    assert '<span class="badge badge-cancelled" data-status-label>stopped</span>' in card
    assert '<span class="badge badge-cancelled" data-status-label>stopped</span>' in row
    assert 'class="alert alert-warning"' in card and "alert-error" not in card and "data-card-proceed" in card
    assert f"while training run {run.pk}, started just now, is stopped (embedding 480 of 1,479 texts); " in html


def test_a_run_that_failed_is_drawn_failed(staff_client, make_run):
    run = make_run("generating_failed", processed_chunks=3, attempt=1, error_type="UNKNOWN", error_message="boom")
    html = staff_client.get(PAGE).content.decode()
    card = section(html, f"run-{run.pk}")
    assert "data-status-label>generating failed</span>" in card and 'class="alert alert-error"' in card
    assert f"while training run {run.pk}, started just now, has a failed generation (3/12 chunks); " in html


def test_a_silent_worker_shows_no_heartbeat_and_resume_requeues_the_run(staff_client, settings, make_run):
    settings.JOBSITE_STALL_AFTER_S = 30
    old = timezone.now() - timedelta(seconds=95)
    run = make_run("generating", processed_chunks=4, worker="gone:1", started_at=old, heartbeat_at=old,
                   progress_at=old, queued_at=old, attempt=1)
    html = staff_client.get(PAGE).content.decode()
    card = section(html, f"run-{run.pk}")
    stalled = card.split("data-stalled-notice", 1)[1]
    assert not stalled.startswith(" hidden")
    assert "No heartbeat for <span data-heartbeat-age>95</span> s." in stalled
    assert re.search(rf'<article class="[^"]* is-stalled" id="run-{run.pk}"', html), "no time left beside the notice"
    assert f"/training/runs/{run.pk}/resume/" in stalled
    response = staff_client.post(f"/training/runs/{run.pk}/resume/", follow=True)
    run.refresh_from_db()
    assert (run.status, run.worker, run.error_type) == ("generating", "", "WORKER_LOST")
    assert f"Training run {run.pk} is queued again" in messages_of(response)[0]


def test_a_run_without_progress_for_long_says_so(staff_client, settings, make_run):
    settings.JOBSITE_SLOW_AFTER_S = 60
    run = make_run("generating", queued_at=timezone.now() - timedelta(seconds=120))
    slow = section(staff_client.get(PAGE).content.decode(), f"run-{run.pk}").split("data-slow-notice", 1)[1]
    assert not slow.startswith(" hidden")
    assert "No progress for <span data-idle>2 min 0 s</span>" in slow and "qcluster" in slow


@pytest.mark.parametrize("status", ["generated", "generating_failed", "training_failed"])
def test_runs_that_wait_for_a_person_show_no_bar_and_no_spinner(staff_client, make_run, generated_run, status):
    if status != "generated":
        generated_run.delete()
        failed(make_run, status)
    html = staff_client.get(PAGE).content.decode()
    workflow = html[html.index('id="workflow"'):html.index('id="history"')]
    assert 'class="progress' not in workflow and "data-spinner" not in workflow


def test_a_failed_run_shows_its_error_in_the_card_with_proceed_and_delete(staff_client, make_run):
    run = failed(make_run)
    card = section(staff_client.get(PAGE).content.decode(), f"run-{run.pk}")
    card = card[:card.index("</article>")]
    assert "<strong>Failed: Unknown error</strong>" in card and "UNKNOWN" not in card and "Injected failure" in card
    assert "5/12 chunks were generated before it failed" in card
    # Delete is offered on the card itself, beside Proceed, not only in its history row.
    assert "Delete is in its history row" not in card
    assert f'action="/training/runs/{run.pk}/proceed/"' in card and f'action="/training/runs/{run.pk}/delete/"' in card


# -- review and train ----------------------------------------------------------------------------

def test_the_review_step_lists_pairs_with_their_chunk_and_counts(staff_client, generated_run):
    html = staff_client.get(PAGE).content.decode()
    review = section(html, f"run-{generated_run.pk}")
    assert len(re.findall(r'<tr id="pair-\d+"', review)) == 12
    assert "how often do bicycles need oil 3" in review and "Section 3: bicycles need oil every 5 weeks." in review
    assert '<strong data-count="pending">12</strong> pending' in review
    assert "Approve all pending" in review and "Reject all pending" in review
    assert "Approve selected" in review and "Reject selected" in review
    assert 'data-train disabled' in review
    assert (f"Training needs at least 4 approved pairs; training run {generated_run.pk} has 0. Approve more pairs first."
            in review)


def test_a_run_waiting_for_review_is_deleted_from_its_review_step_after_a_confirmation(staff_client, generated_run):
    review = section(staff_client.get(PAGE).content.decode(), f"run-{generated_run.pk}")
    form = re.search(r'<form[^>]*action="/training/runs/%d/delete/"[^>]*>' % generated_run.pk, review).group(0)
    assert f'data-confirm="Delete training run {generated_run.pk}? Its 12 pairs and their reviews are removed' in form
    assert TrainingRun.objects.filter(pk=generated_run.pk).exists(), "nothing is deleted before the confirmation"
    response = staff_client.post(f"/training/runs/{generated_run.pk}/delete/", {"confirmed": "1"}, follow=True)
    assert (f"Training run {generated_run.pk} is removed: its pairs and files are deleted; its row stays in the "
            "history.") in messages_of(response)
    assert TrainingRun.objects.get(pk=generated_run.pk).removed_at and not TrainingPair.objects.exists()
    assert "Generate" in section(response.content.decode(), "workflow")


def test_review_one_pair_selected_pairs_and_all_pending_through_the_page(staff_client, generated_run):
    pairs = list(generated_run.pairs.order_by("pk").values_list("pk", flat=True))
    url = f"/training/runs/{generated_run.pk}/review/"
    response = staff_client.post(url, {"one": f"{pairs[0]}:rejected"}, follow=True)
    assert (f"1 pair rejected. Training run {generated_run.pk} now has 0 approved, 1 rejected and 11 pending."
            in messages_of(response))
    response = staff_client.post(url, {"scope": "selected", "decision": "approved", "pair": [pairs[1], pairs[2]]},
                                 follow=True)
    assert "2 pairs approved." in messages_of(response)[0]
    assert TrainingPair.objects.get(pk=pairs[2]).review == "approved"
    response = staff_client.post(url, {"scope": "all", "decision": "approved"}, follow=True)
    assert "9 pairs approved." in messages_of(response)[0]
    assert services.review_counts(generated_run) == {"pending": 0, "approved": 11, "rejected": 1}
    review = section(response.content.decode(), f"run-{generated_run.pk}")
    assert '<strong data-count="approved">11</strong> approved' in review
    assert "data-train-blocked" not in review and "data-train disabled" not in review


def test_train_through_the_page_starts_phase_two(staff_client, generated_run):
    generated_run.pairs.update(review="approved")
    response = staff_client.post(f"/training/runs/{generated_run.pk}/train/", {"epochs": "3", "patience": "2"},
                                 follow=True)
    generated_run.refresh_from_db()
    assert (generated_run.status, generated_run.epochs, generated_run.patience) == ("training", 3, 2)
    assert (f"Training run {generated_run.pk} is training on its approved pairs for at most 3 epochs; the epoch best "
            "on validation is kept.") in messages_of(response)


def test_a_patience_below_one_is_refused_with_the_field_named(staff_client, generated_run):
    generated_run.pairs.update(review="approved")
    response = staff_client.post(f"/training/runs/{generated_run.pk}/train/", {"epochs": "3", "patience": "0"},
                                 follow=True)
    generated_run.refresh_from_db()
    assert generated_run.status == "generated"
    assert any(m.startswith(f"Training run {generated_run.pk} was not trained: patience:") for m in messages_of(response))


@pytest.mark.parametrize(
    ("data", "sentence"),
    [
        ({}, "Choose approve or reject."),
        ({"decision": "approved", "scope": "selected"}, "Tick at least one pair first"),
        ({"decision": "maybe", "scope": "all"}, "No pair was reviewed. Decision: Select a valid choice."),
        ({"decision": "approved", "pair": ["x"]}, "No pair was reviewed. Pairs: Pair ids are numbers."),
        ({"decision": "approved", "pair": ["99999999"]}, "do not belong to training run"),
        ({"one": "1:perhaps"}, "No pair was reviewed. Pair: Send a pair id and a decision, e.g. 12:approved."),
        ({"decision": "approved", "pair": ["²"]}, "No pair was reviewed. Pairs: Pair ids are numbers."),
    ],
)
def test_bad_review_input_is_a_message(staff_client, generated_run, data, sentence):
    response = staff_client.post(f"/training/runs/{generated_run.pk}/review/", data, follow=True)
    assert response.status_code == 200
    assert any(sentence in m for m in messages_of(response)), messages_of(response)
    assert not generated_run.pairs.exclude(review="pending").exists()


# -- history -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "fields", "expected"),
    [
        ("generating", {"processed_chunks": 7}, "7/12"),
        ("generating_failed", {"processed_chunks": 5, "error_type": "UNKNOWN"}, "5/12"),
        ("training", {"processed_chunks": 12, "texts_total": 1479, "texts_embedded": 480}, "Embedding 480 of 1,479 texts"),
        ("training", {"processed_chunks": 12, "texts_total": 1479, "texts_embedded": 1479, "epochs_done": 3},
         "3 of 8 epochs"),
        ("training_failed", {"processed_chunks": 12, "error_type": "UNKNOWN", "epochs_done": 5}, "5 of 8 epochs"),
        ("training_failed", {"processed_chunks": 12, "error_type": "CANCELLED", "texts_total": 1479,
                             "texts_embedded": 480}, "Embedding 480 of 1,479 texts"),
        ("training", {"processed_chunks": 12, "texts_total": 1479, "worker": "host:1"}, "Loading the encoder…"),
        ("training", {"processed_chunks": 12, "texts_total": 1479}, "Embedding 0 of 1,479 texts"),  # no worker yet
        ("generated", {"processed_chunks": 12, "pair_count": 1234}, "12/12 chunks · 1,234 pairs"),
        ("completed", {"processed_chunks": 12, "epochs_done": 5}, "5 of 8 epochs (stopped early)"),
        ("completed", {"processed_chunks": 12, "epochs_done": 8}, "8 of 8 epochs"),
    ],
)
def test_the_progress_column_for_each_status(staff_client, make_run, status, fields, expected):
    run = make_run(status, **fields)
    html = staff_client.get("/training/history/").content.decode()
    assert "<th>Status</th><th class=\"num\">Progress</th>" in html
    assert progress_cell(html, run.pk) == expected


def test_active_and_failed_rows_have_a_refresh_button_and_every_row_opens(staff_client, make_run):
    done = completed(make_run)
    active = make_run("generating", processed_chunks=2)
    html = staff_client.get("/training/history/").content.decode()
    row = row_html(html, active.pk)
    assert f'data-api-url="/api/v1/training/runs/{active.pk}"' in row
    assert f'data-redraw-url="/training/runs/{active.pk}/row/"' in row
    assert 'class="icon-button" data-refresh' in row and "data-accordion-panel hidden" in row
    assert "<span data-field=\"processed_chunks\">2</span>/<span data-field=\"total_chunks\">12</span> chunks" in row
    plain = row_html(html, done.pk)
    assert "data-refresh" not in plain and "data-accordion-panel hidden" in plain
    assert "data-loss-chart" in plain and "data-recall" in plain


def test_a_failed_row_opens_with_its_error_proceed_and_delete(staff_client, make_run):
    done = completed(make_run)
    run = failed(make_run)
    closed = row_html(staff_client.get(PAGE).content.decode(), run.pk)
    assert "data-accordion-panel hidden" in closed
    html = staff_client.get(f"{PAGE}?open={run.pk}").content.decode()
    row = row_html(html, run.pk)
    assert "is-open" in row and "data-accordion-panel hidden" not in row and 'aria-expanded="true"' in row
    assert "<strong>Unknown error</strong>" in row and "UNKNOWN" not in row
    assert "Injected failure (failpoint training.generate)" in row
    assert f'action="/training/runs/{run.pk}/proceed/"' in row and f'action="/training/runs/{run.pk}/delete/"' in row
    assert f'data-confirm="Delete training run {run.pk}?' in row
    assert 'class="icon-button" data-refresh' in row
    assert "is-open" not in row_html(html, done.pk)


def test_a_completed_run_shows_recall_before_and_after_and_the_loss_chart(staff_client, make_run):
    run = completed(make_run)
    html = staff_client.get(PAGE).content.decode()
    result = section(html, f"result-{run.pk}")
    for k, before, after in ((1, "0.25", "0.50"), (5, "0.50", "0.75"), (10, "0.75", "1.00")):
        assert re.search(rf'recall@{k}</th><td class="num">{before}</td>.*?<td class="num better">{after}</td>', result)
    chart = result[result.index("<svg"):result.index("</svg>")]
    assert 'aria-label="Training loss per epoch, from 2.100 to 0.700"' in chart
    assert len(re.findall(r"<circle", chart)) == 4 and "<polyline" in chart
    assert "0.25 → <strong>0.50</strong>" in row_html(html, run.pk)


def test_the_row_fragment_redraws_one_run(staff_client, make_run):
    run = failed(make_run)
    html = staff_client.get(f"/training/runs/{run.pk}/row/").content.decode()
    assert html.strip().startswith(f'<tbody id="run-row-{run.pk}"') and html.strip().endswith("</tbody>")


@pytest.mark.parametrize("path", ["/training/history/?open=²", "/training/runs/{pk}/row/?open=²"])
def test_an_open_id_that_only_looks_like_a_number_opens_no_row(staff_client, make_run, path):
    run = failed(make_run)
    response = staff_client.get(path.format(pk=run.pk))
    assert response.status_code == 200 and f'id="run-row-{run.pk}"' in response.content.decode()


# -- proceed and delete --------------------------------------------------------------------------

def test_proceed_after_a_generation_failure_continues_generating(staff_client, make_run):
    run = failed(make_run)
    response = staff_client.post(f"/training/runs/{run.pk}/proceed/", follow=True)
    run.refresh_from_db()
    assert (run.status, run.error_type, run.processed_chunks) == ("generating", "", 5)
    assert f"Training run {run.pk} proceeds: generation continues after chunk 5 of 12." in messages_of(response)
    html = response.content.decode()
    assert 'class="progress' in section(html, f"run-{run.pk}")
    assert "is-open" not in row_html(html, run.pk)


def test_proceed_after_a_training_failure_resumes_training(staff_client, make_run):
    run = failed(make_run, "training_failed", processed_chunks=12, epochs=8, epochs_done=3, texts_total=40,
                 texts_embedded=40)
    response = staff_client.post(f"/training/runs/{run.pk}/proceed/", follow=True)
    run.refresh_from_db()
    assert run.status == "training"
    assert f"Training run {run.pk} proceeds: training resumes from its checkpoint after {run.epochs_label}." in \
        messages_of(response)


def test_proceed_after_a_stop_while_embedding_continues_the_embedding(staff_client, make_run):
    run = make_run("training_failed", processed_chunks=12, texts_total=1479, texts_embedded=480, attempt=1,
                   error_type="CANCELLED", error_message="Stopped on request while embedding (480 of 1,479 texts).")
    response = staff_client.post(f"/training/runs/{run.pk}/proceed/", follow=True)
    assert f"Training run {run.pk} proceeds: embedding continues after 480 of 1,479 texts, then training starts." in messages_of(response)
    card = section(response.content.decode(), f"run-{run.pk}")
    assert "Waiting for a worker" in card and '<span data-field="progress_label">Embedding 480 of 1,479 texts</span>' in card


def test_delete_asks_for_confirmation_then_removes_the_run(staff_client, make_run):
    run = failed(make_run)
    for confirm in (staff_client.get(f"/training/runs/{run.pk}/delete/"),
                    staff_client.post(f"/training/runs/{run.pk}/delete/")):
        assert confirm.status_code == 200
        assert f"Delete training run {run.pk}?" in confirm.content.decode() and b"Yes, delete it" in confirm.content
    assert TrainingRun.objects.filter(pk=run.pk).exists()
    response = staff_client.post(f"/training/runs/{run.pk}/delete/", {"confirmed": "1"}, follow=True)
    assert (f"Training run {run.pk} is removed: its pairs and files are deleted; its row stays in the history."
            in messages_of(response))
    run.refresh_from_db()
    # Its row stays: "removed", who and when, its pair count and verdict, and nothing to act on.
    row = row_html(response.content.decode(), run.pk)
    assert "data-status-label>removed</span>" in row
    assert f"<span class=\"muted small\" data-removed-by>by staff on {run.removed_at:%Y-%m-%d %H:%M} UTC</span>" in row
    assert f"its {run.pair_count} pair{'s' if run.pair_count != 1 else ''} and its files were deleted" in row
    assert "<strong data-verdict>—</strong>" in row
    for action in ("/proceed/", "/delete/", "/stop/", "/review/", "data-refresh"):
        assert action not in row
    assert f'id="run-{run.pk}"' not in section(response.content.decode(), "workflow")
    assert Event.objects.filter(topic=f"training.{run.pk}", type="training.removed").exists()
    assert "disabled" not in re.search(r"<button[^>]*data-generate[^>]*>", response.content.decode())[0]


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["review/", "train/", "proceed/", "resume/", "delete/"])
def test_an_unknown_run_is_a_404_page_never_a_500(staff_client, corpus, path):
    response = staff_client.post(f"/training/runs/999/{path}", {"confirmed": "1", "decision": "approved"})
    assert response.status_code == 404
    assert b"Not found" in response.content
    assert staff_client.get("/training/runs/999/row/").status_code == 404


@pytest.mark.parametrize(
    ("status", "path", "data", "sentence"),
    [
        ("generated", "proceed/", {}, "only a failed run can proceed"),
        ("generating", "delete/", {"confirmed": "1"}, "is generating pairs; stop it first, then it can be removed."),
        ("generating", "train/", {}, "only a generated run can start training"),
        ("generating", "review/", {"decision": "approved", "scope": "all"}, "pairs are reviewed once generation is done"),
        ("generating", "resume/", {}, "waits for a worker; only a stalled"),
        ("generated", "train/", {}, "Training needs at least 4 approved pairs"),
        ("generated", "train/", {"epochs": "0"}, "epochs: Ensure this value is greater than or equal to 1."),
    ],
)
def test_an_action_in_the_wrong_state_is_a_message(staff_client, make_run, status, path, data, sentence):
    run = make_run(status)
    response = staff_client.post(f"/training/runs/{run.pk}/{path}", data, follow=True)
    assert response.status_code == 200
    assert any(sentence in m for m in messages_of(response)), messages_of(response)
    assert TrainingRun.objects.get(pk=run.pk).status == status


@pytest.mark.parametrize(
    ("data", "sentence"),
    [
        ({"corpus": "999", "generator": "local"}, "Corpus: Select a valid choice"),
        ({"corpus": "x", "generator": "local"}, "Corpus: Select a valid choice"),
        ({"generator": "local"}, "Corpus: This field is required."),
        ({"corpus": "{corpus}", "generator": "gpt-9"}, "Generator: Select a valid choice"),
        ({"corpus": "{corpus}", "generator": "local", "queries_per_chunk": "0"},
         "No generation was started. Queries per chunk: Ensure this value is greater than or equal to 1."),
        ({"corpus": "{corpus}", "generator": "local", "queries_per_chunk": "21"},
         "Queries per chunk: Ensure this value is less than or equal to 20."),
        ({"corpus": "{corpus}", "generator": "local", "queries_per_chunk": "many"},
         "Queries per chunk: Enter a whole number."),
    ],
)
def test_bad_generate_input_is_a_message_and_starts_nothing(staff_client, corpus, data, sentence):
    data = {k: v.format(corpus=corpus.pk) for k, v in data.items()}
    response = staff_client.post(PAGE + "generate/", data, follow=True)
    assert response.status_code == 200
    assert any(sentence in m for m in messages_of(response)), messages_of(response)
    assert not TrainingRun.objects.exists()


def test_generate_while_a_run_is_open_is_refused_with_the_blocking_sentence(staff_client, corpus, make_run):
    run = failed(make_run)
    response = staff_client.post(PAGE + "generate/", {"corpus": corpus.pk, "generator": "local"}, follow=True)
    assert services.blocking_sentence(run) in messages_of(response)
    assert TrainingRun.objects.count() == 1


def test_generate_while_unavailable_is_a_message(staff_client, settings, corpus):
    settings.JOBSITE_ENCODER_PATH = ""
    response = staff_client.post(PAGE + "generate/", {"corpus": corpus.pk, "generator": "local"}, follow=True)
    assert "Training is unavailable: No encoder is configured" in messages_of(response)[0]
    assert not TrainingRun.objects.exists()


def test_the_form_offers_causal_lm_only_with_a_trained_model_and_names_it(staff_client, settings, corpus,
                                                                          tiny_model_dir):
    import shutil

    from jobsite.paths import RANDOM_WEIGHTS_MARKER

    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
    settings.JOBSITE_GENERATOR_MODEL_PATH = str(tiny_model_dir)
    workflow = section(staff_client.get(PAGE).content.decode(), "workflow")
    assert 'value="causal_lm"' not in workflow
    assert "The causal language model generator is not offered. The generator model at" in workflow
    assert "random-weight model, which writes noise" in workflow
    response = staff_client.post(PAGE + "generate/", {"corpus": corpus.pk, "generator": "causal_lm"}, follow=True)
    assert "The causal_lm generator is unavailable" in messages_of(response)[0]
    assert "random-weight model, which writes noise" in messages_of(response)[0]
    assert not TrainingRun.objects.exists()

    trained = settings.JOBSITE_MODEL_ROOTS[0] / "trained-lm"
    shutil.copytree(tiny_model_dir, trained, ignore=shutil.ignore_patterns(RANDOM_WEIGHTS_MARKER))
    settings.JOBSITE_GENERATOR_MODEL_PATH = str(trained)
    workflow = section(staff_client.get(PAGE).content.decode(), "workflow")
    assert re.search(rf'<option value="causal_lm">[^<]*: {re.escape(str(trained))}</option>', workflow), workflow[:3000]
    assert "data-generator-note" not in workflow


def test_the_run_card_says_how_many_queries_were_dropped(staff_client, generated_run):
    workflow = section(staff_client.get(PAGE).content.decode(), "workflow")
    assert "dropped" not in workflow
    TrainingRun.objects.filter(pk=generated_run.pk).update(queries_dropped=5)
    workflow = section(staff_client.get(PAGE).content.decode(), "workflow")
    assert re.search(r'<span data-field="queries_dropped">5</span> queries dropped', workflow)


@pytest.mark.parametrize("method", ["get", "put"])
def test_actions_refuse_other_methods(staff_client, make_run, method):
    run = failed(make_run)
    assert getattr(staff_client, method)(f"/training/runs/{run.pk}/proceed/").status_code == 405
    assert staff_client.post(PAGE).status_code == 405


def test_stop_on_the_page_stops_a_run_no_worker_holds_and_shows_it_as_stopped(staff_client, make_run):
    run = make_run("generating", processed_chunks=4)
    html = staff_client.get(PAGE).content.decode()
    assert f'action="/training/runs/{run.pk}/stop/"' in section(html, f"run-{run.pk}")
    response = staff_client.post(f"/training/runs/{run.pk}/stop/", follow=True)
    run.refresh_from_db()
    assert (run.status, run.error_type) == ("generating_failed", "CANCELLED")
    assert f"Training run {run.pk} stopped; Proceed continues it, Delete discards it." in messages_of(response)
    card = section(response.content.decode(), f"run-{run.pk}")
    assert "<strong>Stopped on request</strong>" in card and "Stopped on request after 4 of 12 chunks." in card


def test_stop_on_the_page_asks_the_worker_holding_the_run_and_says_so(staff_client, make_run):
    run = make_run("training", processed_chunks=12, worker="elsewhere:1", heartbeat_at=timezone.now())
    response = staff_client.post(f"/training/runs/{run.pk}/stop/", follow=True)
    run.refresh_from_db()
    assert run.status == "training" and run.cancel_requested
    assert f"Training run {run.pk} stops after its current step; Proceed continues it later." in messages_of(response)
    assert "Stopping…" in section(response.content.decode(), f"run-{run.pk}")


def test_stop_of_a_finished_run_is_a_message_not_an_error_page(staff_client, make_run):
    run = make_run("completed")
    response = staff_client.post(f"/training/runs/{run.pk}/stop/", follow=True)
    assert response.status_code == 200
    assert f"Training run {run.pk} is completed; only a generating or training run can be stopped." in messages_of(response)


def test_generate_from_the_page_takes_the_queries_per_chunk(staff_client, corpus):
    html = staff_client.get(PAGE).content.decode()
    assert 'name="queries_per_chunk"' in section(html, "workflow")
    staff_client.post(PAGE + "generate/", {"corpus": corpus.pk, "generator": "local", "queries_per_chunk": "3"})
    assert TrainingRun.objects.get().queries_per_chunk == 3


# -- corpora ------------------------------------------------------------------------------------

def upload(name: str, text: str):
    from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: PLC0415
    return SimpleUploadedFile(name, text.encode())


CORPUS_FIELDS = {"chunk_size": 200, "chunk_overlap": 20}


def test_without_corpora_the_page_offers_the_new_corpus_form_open(staff_client):
    html = staff_client.get(PAGE).content.decode()
    assert re.search(r"<fieldset[^>]*disabled", section(html, "workflow")), "Generate waits for a corpus"
    assert 'href="#corpora"' in section(html, "workflow")
    corpora = section(html, "corpora")
    assert "No corpora yet." in corpora
    assert re.search(r'<details class="corpus-editor" open>', corpora)
    assert 'enctype="multipart/form-data"' in corpora and 'type="file"' in corpora and "multiple" in corpora


def test_uploaded_documents_become_a_corpus_picked_for_generation(staff_client, settings, corpus):
    text = "Brakes need new pads when they squeal. " * 12
    response = staff_client.post(PAGE + "corpora/", {
        "name": "manuals", "files": [upload("brakes.md", text), upload("chain.txt", "Oil the chain monthly.")],
        **CORPUS_FIELDS,
    })
    created = Corpus.objects.get(name="manuals")
    assert response.status_code == 302
    assert response["Location"] == f"/training/?corpus={created.pk}#workflow"
    assert created.num_documents == 2 and created.chunk_size == 200 and created.chunk_overlap == 20
    chunks = created.chunks.count()
    assert chunks > 2, "the long document is cut into chunks of 200 characters"
    assert (settings.JOBSITE_DATA_DIR / "corpora" / "manuals" / "brakes.md").read_text() == text

    page = staff_client.get(response["Location"])
    assert f"Corpus manuals is ready: 2 documents, {chunks} chunks. Generate pairs from it below." in messages_of(page)
    html = page.content.decode()
    assert re.search(rf'<option value="{created.pk}" selected>manuals</option>', section(html, "workflow"))
    assert f'hx-get="/training/workflow/?corpus={created.pk}"' in html, "a live redraw keeps the choice"
    row = re.search(rf'<tr id="corpus-{created.pk}".*?</tr>', html)[0]
    assert ">manuals<" in row and f">{chunks}<" in row and ">200 · 20<" in row

    staff_client.post(PAGE + "generate/", {"corpus": created.pk, "generator": "local"})
    assert TrainingRun.objects.get().total_chunks == chunks


def test_a_new_corpus_is_announced_and_its_list_redraws_on_its_own(staff_client, corpus):
    response = staff_client.post(PAGE + "corpora/", {**CORPUS_FIELDS, "name": "notes",
                                                     "files": [upload("a.txt", "Tyres hold 4 bar. " * 5)]})
    assert response.status_code == 302
    notes = Corpus.objects.get(name="notes")
    event = Event.objects.get(topic="training.corpora")
    assert (event.type, event.payload) == ("training.corpus_created", {"id": notes.pk, "name": "notes"})
    html = staff_client.get(PAGE + "corpora/list/").content.decode()
    assert '<div id="corpora-list" data-redraw-on="training.corpora"' in html
    assert re.findall(r'<tr id="corpus-(\d+)"', html) == [str(corpus.pk), str(notes.pk)]  # by name
    assert "<form" not in html, "a redraw leaves the New corpus form and what is typed in it alone"


def test_a_corpus_from_a_path_under_the_data_directory(staff_client, settings):
    folder = settings.JOBSITE_DATA_DIR / "docs"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("Tyres hold 4 bar. " * 5)
    (folder / "b.jsonl").write_text('{"text": "Lights must work at night."}\n{"text": "Bells ring twice."}\n')
    response = staff_client.post(PAGE + "corpora/", {"name": "docs", "path": "docs", **CORPUS_FIELDS})
    assert response.status_code == 302
    assert Corpus.objects.get(name="docs").num_documents == 3


@pytest.mark.parametrize("data, files, field, sentence", [
    ({"name": "x"}, {}, None, "Choose documents to upload, or give a path under the data directory."),
    ({"name": "x", "path": "docs"}, {"files": [upload("a.txt", "text")]}, None,
     "Upload documents or give a path, not both."),
    ({"name": "../up"}, {"files": [upload("a.txt", "text")]}, "name", "The corpus name must be 1-100 letters"),
    ({"name": "handbook"}, {"files": [upload("a.txt", "text")]}, "name", "A corpus named 'handbook' already exists"),
    ({"name": "x"}, {"files": [upload("notes.pdf", "%PDF")]}, "files", "notes.pdf: upload .txt, .md or .jsonl files only."),
    ({"name": "x"}, {"files": [upload("a.txt", "a\x00b")]}, "files", "a.txt contains a NUL character"),
    ({"name": "x"}, {"files": [upload("a.txt", "   ")]}, "files", "The documents contain no text."),
    ({"name": "x", "path": "unnamed"}, {}, "path", "The corpus path unnamed does not exist."),
    ({"name": "x"}, {"files": [upload("renamed.pdf", "%PDF")]}, "files", "renamed.pdf: upload .txt, .md or .jsonl"),
    ({"name": "x", "chunk_overlap": 150}, {"files": [upload("a.txt", "text")]}, "chunk_overlap",
     "The overlap must be between 0 and 99 characters for a chunk size of 200."),
    ({"name": "x", "chunk_size": 10}, {"files": [upload("a.txt", "text")]}, "chunk_size",
     "Ensure this value is greater than or equal to 50."),
    ({"name": "x", "path": "../../etc"}, {}, "path", "is outside the allowed directories"),
])
def test_a_refused_corpus_shows_the_form_again_with_the_reason(staff_client, settings, corpus, data, files, field,
                                                                 sentence):
    response = staff_client.post(PAGE + "corpora/", {**CORPUS_FIELDS, **data, **files})
    assert response.status_code == 400
    form = response.context["corpus_form"]
    errors = form.errors.get(field or "__all__", [])
    assert any(sentence in error for error in errors), form.errors
    html = section(response.content.decode(), "corpora")
    assert re.search(r'<details class="corpus-editor" open>', html), "the form stays open with the reason"
    assert f'value="{data["name"]}"' in html, "what was typed is kept"
    assert list(Corpus.objects.values_list("name", flat=True)) == ["handbook"]
    assert not (settings.JOBSITE_DATA_DIR / "corpora" / "x").exists()


def test_counts_over_a_thousand_read_with_separators_in_the_card_and_the_row(staff_client, make_run):
    run = make_run("generating", processed_chunks=1200, total_chunks=1500, pair_count=2400)
    html = staff_client.get(PAGE).content.decode()
    card = section(html, f"run-{run.pk}")
    assert '<span data-field="processed_chunks">1,200</span>/<span data-field="total_chunks">1,500</span> chunks' in card
    assert '<span data-field="pair_count">2,400</span> pairs' in card
    assert "1,200/1,500" in row_html(html, run.pk)


def test_a_corpus_upload_to_a_full_disk_is_a_sentence_and_leaves_nothing(staff_client, settings, small_disk):
    corpora = small_disk.mount(settings.JOBSITE_DATA_DIR / "corpora", "64k")
    response = staff_client.post(PAGE + "corpora/", {"name": "big", "files": [upload("big.md", "Oil chains. " * 12000)],
                                                     **CORPUS_FIELDS})
    assert response.status_code == 400
    assert response.context["corpus_form"].errors["files"] == [
        "The upload cannot be kept in the data directory: No space left on device."
    ]
    assert list(corpora.iterdir()) == [] and not Corpus.objects.exists()


def test_upper_case_extensions_are_documents_too(staff_client, settings):
    response = staff_client.post(PAGE + "corpora/", {"name": "shouting", "files": [upload("NOTES.TXT", "Oil the chain."),
                                                                                   upload("Guide.MD", "Pump tyres.")],
                                                     **CORPUS_FIELDS})
    assert response.status_code == 302
    assert Corpus.objects.get(name="shouting").num_documents == 2


def test_a_file_over_the_limit_is_refused_from_its_size(staff_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = None
    big = upload("big.txt", "x" * (services.MAX_UPLOAD_BYTES + 1))
    response = staff_client.post(PAGE + "corpora/", {"name": "big", "files": [big], **CORPUS_FIELDS})
    assert response.status_code == 400
    assert response.context["corpus_form"].errors["files"] == ["big.txt is larger than 20 MB; split it."]
    assert not Corpus.objects.exists()


def test_links_on_a_refused_form_page_lead_back_to_the_page(staff_client, make_run):
    run = failed(make_run)
    response = staff_client.post(PAGE + "corpora/", {"name": "", **CORPUS_FIELDS})
    assert response.status_code == 400
    html = response.content.decode()
    assert f'href="/training/?open={run.pk}#run-row-{run.pk}"' in html
    assert 'href="?open=' not in html, "relative to /training/corpora/, which only takes POST"


def test_rejecting_every_pending_pair_asks_first_and_the_answer_counts_with_separators(staff_client, generated_run):
    html = staff_client.get(PAGE).content.decode()
    assert f'data-confirm="Reject all 12 pending pairs of training run {generated_run.pk}?"' in html
    TrainingPair.objects.bulk_create(
        TrainingPair(run=generated_run, chunk=generated_run.corpus.chunks.first(), query=f"q {i}") for i in range(1200)
    )
    response = staff_client.post(PAGE + f"runs/{generated_run.pk}/review/", {"decision": "rejected", "scope": "all"},
                                 follow=True)
    assert (f"1,212 pairs rejected. Training run {generated_run.pk} now has 0 approved, 1,212 rejected and 0 pending."
            in messages_of(response))


def test_corpora_are_listed_by_name(staff_client, corpus):
    for name in ("zeta", "Alpha", "mid"):
        Corpus.objects.create(name=name, source="/x", num_documents=1)
    html = section(staff_client.get(PAGE).content.decode(), "corpora")
    names = re.findall(r'<tr id="corpus-\d+" data-corpus><td>([^<]+)</td>', html)
    assert names == sorted(names) and len(names) == 4


def test_every_pair_can_be_reached_page_by_page_and_a_decision_keeps_the_page(staff_client, generated_run):
    chunk = generated_run.corpus.chunks.first()
    TrainingPair.objects.bulk_create(
        TrainingPair(run=generated_run, chunk=chunk, query=f"page query {i}") for i in range(640))
    total = generated_run.pairs.count()
    html = staff_client.get(PAGE).content.decode()
    assert f"Pairs 1–300 of {total}" in html and 'rel="next"' in html and 'rel="prev"' not in html
    last = staff_client.get(PAGE + "?pairs=3").content.decode()
    assert f"Pairs 601–{total} of {total}" in last and 'rel="prev"' in last and 'rel="next"' not in last
    shown = [int(pk) for pk in re.findall(r'<tr id="pair-(\d+)"', last)]
    assert len(shown) == total - 600 and not set(shown) & set(map(int, re.findall(r'<tr id="pair-(\d+)"', html)))
    assert 'hx-get="/training/workflow/?pairs=3"' in last, "a live redraw keeps the page"
    response = staff_client.post(PAGE + f"runs/{generated_run.pk}/review/", {"one": f"{shown[-1]}:rejected", "pairs": "3"})
    assert response.url == f"{PAGE}?pairs=3#run-{generated_run.pk}"
    assert TrainingPair.objects.get(pk=shown[-1]).review == "rejected"
    assert f"Pairs 601–{total} of {total}" in staff_client.get(PAGE + "?pairs=99").content.decode()
    assert f"Pairs 601–{total} of {total}" in staff_client.get(PAGE + "?pairs=" + "9" * 25).content.decode()


def test_the_chosen_corpus_and_page_stay_across_live_redraws_whatever_the_corpus_id(staff_client, corpus):
    first = corpus if corpus.pk == 1 else Corpus.objects.create(pk=1, name="first", source="/x", num_documents=1)
    html = staff_client.get(PAGE + "?corpus=1").content.decode()
    assert 'hx-get="/training/workflow/?corpus=1"' in html, "corpus 1 was dropped from the redraw's address"
    assert re.search(rf'<option value="{first.pk}" selected>', html)


def test_a_pair_is_edited_on_its_own_page_beside_its_chunk_and_the_review_returns_to_its_page(
        staff_client, generated_run):
    pair = generated_run.pairs.order_by("pk").last()
    review = section(staff_client.get(PAGE).content.decode(), f"run-{generated_run.pk}")
    assert f'href="/training/runs/{generated_run.pk}/pairs/{pair.pk}/edit/?pairs=1"' in review
    url = f"/training/runs/{generated_run.pk}/pairs/{pair.pk}/edit/"
    page = staff_client.get(url + "?pairs=2")
    html = page.content.decode()
    assert page.status_code == 200 and pair.chunk.text.split("\n")[0][:40] in html and f'value="{pair.query}"' in html
    refused = staff_client.post(url, {"query": " ", "pairs": "2"})
    assert refused.status_code == 400
    assert refused.context["form"].errors["query"] == ["This field is required."]
    refused = staff_client.post(url, {"query": "y" * 250, "pairs": "2"})
    assert refused.context["form"].errors["query"] == ["The query is 250 characters long; the most is 200."]
    response = staff_client.post(url, {"query": "when do bicycles need oil", "pairs": "2"})
    assert response.status_code == 302 and response["Location"] == f"{PAGE}?pairs=2#run-{generated_run.pk}"
    pair.refresh_from_db()
    assert (pair.query, pair.review) == ("when do bicycles need oil", "approved")
    response = staff_client.get(response["Location"])
    assert f"Pair {pair.pk} now asks “when do bicycles need oil” and is approved." in messages_of(response)


def test_a_reader_cannot_edit_a_pair(client, plain_user, generated_run):
    client.force_login(plain_user)
    pair = generated_run.pairs.first()
    response = client.post(f"/training/runs/{generated_run.pk}/pairs/{pair.pk}/edit/", {"query": "mine"})
    assert response.status_code in (302, 403)
    pair.refresh_from_db()
    assert pair.query != "mine"
    review = section(client.get(PAGE).content.decode(), f"run-{generated_run.pk}")
    assert "/edit/" not in review
