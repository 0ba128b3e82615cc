"""The training page in a real Chromium against a real daphne and a real qcluster worker.

Each test saves screenshots of the states it reaches under tests/artifacts/.
"""

import json
import re
import shutil

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.conftest import deliver, page_on_held_clock, run_clock_until, screenshot, settled
from tests.conftest import DEMO_CORPUS
from jobsite.events import publish
from training_runs import services
from training_runs.models import Corpus, TrainingPair, TrainingRun

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

expect.set_options(timeout=60_000)

# Chunk 12 fails on the first attempt (two batches of 8: chunks 0-7 are saved); every chunk
# takes a moment so the bar is seen moving.
FAIL_AT_CHUNK_12 = json.dumps({"training.generate": [
    {"action": "error", "at": 12, "attempt": 1, "message": "Injected generator failure at chunk 12"},
    {"action": "sleep", "seconds": 0.12},
], "training.embed": {"action": "sleep", "seconds": 1.0}})  # embedding long enough to be watched

SAW_PROGRESS = """() => {
    window.sawProgress = false;
    const look = () => { if (document.querySelector("#workflow [data-progress]")) window.sawProgress = true; };
    new MutationObserver(look).observe(document.body, {subtree: true, childList: true});
    look();
}"""


@pytest.fixture
def training_env(settings, encoder):
    """What the web and worker processes need to see the encoder and the review threshold."""
    return dict(JOBSITE_ENCODER_PATH=settings.JOBSITE_ENCODER_PATH, JOBSITE_MIN_APPROVED_PAIRS=4)


@pytest.fixture
def corpus(settings, encoder):
    root = settings.JOBSITE_DATA_DIR / "corpora-src" / "policy"
    root.mkdir(parents=True)
    shutil.copy(DEMO_CORPUS / "expense-policy.md", root / "expense-policy.md")
    return services.corpus_create(name="policy", path=str(root), chunk_size=800, chunk_overlap=0)


def make_run(corpus, status, **fields):
    if status == "completed":
        fields.setdefault("finished_at", timezone.now())
    return TrainingRun.objects.create(corpus=corpus, status=status, total_chunks=corpus.chunks.count(), **fields)


def completed_run(corpus, recall_after=0.8):
    total = corpus.chunks.count()
    return make_run(
        corpus, "completed", processed_chunks=total, pair_count=2 * total, epochs=5, epochs_done=5,
        metrics={"before": {"recall@1": 0.3, "recall@5": 0.55, "recall@10": 0.7},
                 "after": {"recall@1": recall_after - 0.2, "recall@5": recall_after, "recall@10": 0.9},
                 "train_pairs": 38, "eval_pairs": 10},
        loss_curve=[2.4, 1.9, 1.3, 1.0, 0.85],
    )


def failed_run(corpus):
    return make_run(corpus, "generating_failed", processed_chunks=8, pair_count=16, attempt=1, error_type="UNKNOWN",
                    error_message="Injected generator failure at chunk 12")


def test_a_failed_generation_proceeds_then_review_and_training_complete_without_a_reload(
    site, staff_user, training_env, corpus
):
    total = corpus.chunks.count()
    site.start_worker(JOBSITE_FAILPOINTS=FAIL_AT_CHUNK_12, **training_env)
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    page.evaluate("window.sameDocument = true")
    workflow = page.locator("#workflow")
    expect(workflow.locator("[data-generate]")).to_be_enabled()

    page.select_option("#id_corpus", str(corpus.pk))
    workflow.locator("[data-generate]").click()
    expect(page.locator(".message-success")).to_contain_text(f"is generating pairs for the {total} chunks of policy")
    run = TrainingRun.objects.get()
    expect(workflow.locator("[data-generate]")).to_be_disabled()
    expect(workflow.locator("[data-blocking-sentence]")).to_contain_text(
        f"A new generation cannot start while training run {run.pk}, started by")

    # The failure reaches the card and the history row by itself.
    row = page.locator(f"#run-row-{run.pk}")
    card = page.locator(f"#run-{run.pk}")
    expect(row.locator("[data-status-label]")).to_have_text("generating failed")
    expect(row.locator("[data-progress-cell] [data-field=progress_label]")).to_have_text(f"8/{total}")
    expect(card.locator(".alert-error")).to_contain_text("Injected generator failure at chunk 12")
    expect(card.locator("[data-progress]")).to_have_count(0)
    expect(card.locator(".spinner")).to_have_count(0)
    expect(workflow.locator("[data-blocking-sentence]")).to_have_text(
        services.blocking_sentence(TrainingRun.objects.get()))
    screenshot(page, "training-01-generation-failed")

    row.locator("td", has_text="policy").click()
    detail = page.locator(f"#run-detail-{run.pk}")
    expect(detail).to_be_visible()
    expect(detail.locator(".alert-title")).to_have_text("Unknown error")
    expect(detail).to_contain_text("Injected generator failure at chunk 12")
    screenshot(page, "training-02-failed-row-open")

    page.evaluate(SAW_PROGRESS)
    detail.get_by_role("button", name="Proceed").click()
    expect(page.locator(".message-success")).to_contain_text(
        f"Training run {run.pk} proceeds: generation continues after chunk 8 of {total}.")
    expect(detail).to_be_hidden()
    page.wait_for_function("window.sawProgress")
    screenshot(page, "training-03-generating-after-proceed")

    review = card.locator("[data-review]")
    expect(review).to_be_visible()
    expect(row.locator("[data-status-label]")).to_have_text("generated")
    pairs = TrainingRun.objects.get().pair_count
    expect(row.locator("[data-progress-cell] [data-field=progress_label]")).to_have_text(
        f"{total}/{total} chunks · {pairs} pairs")
    assert TrainingRun.objects.get().processed_chunks == total
    expect(review.locator("[data-count=pending]")).to_have_text(str(pairs))
    expect(review.locator("[data-train]")).to_be_disabled()
    expect(review.locator("[data-train-blocked]")).to_have_text(
        f"Training needs at least 4 approved pairs; training run {run.pk} has 0. Approve more pairs first.")
    screenshot(page, "training-04-review")

    boxes = review.locator("input[data-pick]")
    boxes.nth(0).check()
    boxes.nth(1).check()
    review.get_by_role("button", name="Approve selected").click()
    expect(review.locator("[data-count=approved]")).to_have_text("2")
    third = boxes.nth(2).get_attribute("value")
    fourth = boxes.nth(3).get_attribute("value")
    review.get_by_role("button", name=f"Reject pair {third}", exact=True).click()
    expect(review.locator("[data-count=rejected]")).to_have_text("1")
    expect(review.locator(f"#pair-{third} .badge")).to_have_text("rejected")
    # The page was redrawn; the focus waits on the next pair's Reject, for the keyboard's next decision.
    expect(review.get_by_role("button", name=f"Reject pair {fourth}", exact=True)).to_be_focused()
    review.get_by_role("button", name="Approve all pending").click()
    expect(review.locator("[data-count=pending]")).to_have_text("0")
    expect(review.locator("[data-count=approved]")).to_have_text(str(pairs - 1))
    expect(review.locator("[data-train]")).to_be_enabled()

    review.locator("input[name=epochs]").fill("3")
    # Typed, then the focus moves on: a live event for the run must not put the default back
    # (the form would then train 8 epochs where the person chose 3).
    page.keyboard.press("Tab")
    publish(run.topic, "training.pairs_reviewed", TrainingRun.objects.get().event_payload())
    page.wait_for_timeout(1500)
    expect(review.locator("input[name=epochs]")).to_have_value("3")
    review.locator("[data-train]").click()
    # Before the first epoch the encoder embeds every chunk and query: the card counts them live.
    # (and the card says a worker holds the run, not "Waiting for a worker").
    embedding = re.compile(r"Training the adapter\s*·\s*Embedding [1-9][\d,]* of [\d,]+ texts")
    expect(workflow.locator(".stats")).to_contain_text(embedding)
    screenshot(page, "training-04b-embedding")
    result = workflow.locator("[data-result]")
    expect(result).to_be_visible(timeout=90_000)
    expect(result.locator("[data-recall-k]")).to_have_count(3)
    expect(result.locator("[data-loss-chart] svg")).to_be_visible()
    expect(result.locator("[data-loss-chart] circle")).to_have_count(3)
    expect(row.locator("[data-status-label]")).to_have_text("completed")
    expect(row.locator("[data-progress-cell] [data-field=progress_label]")).to_have_text(
        re.compile(r"^([12] of 3 epochs \(stopped early\)|3 of 3 epochs)$"))
    expect(row.locator(".recall-cell")).to_contain_text("→")
    expect(workflow.locator("[data-generate]")).to_be_enabled()
    expect(workflow.locator(".spinner")).to_have_count(0)
    done = TrainingRun.objects.get()
    assert done.status == "completed" and len(done.loss_curve) == 3
    assert {"recall@1", "recall@5", "recall@10"} <= set(done.metrics["after"])
    assert page.evaluate("window.sameDocument") is True, "the page was reloaded"
    assert page.evaluate("jobsiteLive.events") > 0
    screenshot(page, "training-05-completed")


def test_delete_asks_in_a_dialog_then_the_row_reads_removed_and_the_generate_button_updates(
    site, staff_user, training_env, corpus
):
    site.start_web(**training_env)
    completed_run(corpus)
    failed = failed_run(corpus)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    settled(page, events=1)  # the corpus's creation, seconds ago

    generate = page.locator("#workflow [data-generate]")
    expect(generate).to_be_disabled()
    expect(page.locator("[data-blocking-sentence]")).to_have_text(
        f"A new generation cannot start while training run {failed.pk}, started just now, has a failed generation "
        f"({failed.processed_chunks}/{failed.total_chunks:,} chunks); proceed with it or delete it first.")
    screenshot(page, "training-06-generate-blocked")

    page.locator(f"#run-row-{failed.pk} [data-accordion-toggle]").click()
    detail = page.locator(f"#run-detail-{failed.pk}")
    detail.get_by_role("button", name="Delete").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text(f"Delete training run {failed.pk}?")
    screenshot(page, "training-07-confirm-delete", full_page=False)
    dialog.get_by_role("button", name="No, go back").click()
    expect(dialog).to_be_hidden()
    assert TrainingRun.objects.filter(pk=failed.pk).exists()
    expect(detail).to_be_visible()

    detail.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Yes, delete it").click()
    expect(page.locator(".message-success")).to_contain_text(
        f"Training run {failed.pk} is removed: its pairs and files are deleted; its row stays in the history.")
    expect(generate).to_be_enabled()
    expect(page.locator("[data-blocking-sentence]")).to_have_count(0)
    removed = TrainingRun.objects.get(pk=failed.pk)
    assert removed.removed_by == staff_user and not removed.pairs.exists()
    # The row stays in the history: removed, by whom and when, its pair count and verdict, nothing to act on.
    row = page.locator(f"#run-row-{failed.pk}")
    expect(row.locator("[data-status-label]")).to_have_text("removed")
    expect(row.locator("[data-removed-by]")).to_have_text(f"by staff on {removed.removed_at:%Y-%m-%d %H:%M} UTC")
    expect(row.locator("[data-field=pair_count]").first).to_have_text(f"{removed.pair_count}")
    row.locator("[data-accordion-toggle]").click()
    expect(row.locator("[data-removed]")).to_have_text(
        f"Training run {failed.pk} was removed by staff on {removed.removed_at:%Y-%m-%d %H:%M} UTC: its "
        f"{removed.pair_count} pairs and its files were deleted; its row stays here. Verdict: —.")
    expect(row.get_by_role("button")).to_have_count(0)
    screenshot(page, "training-08-removed-row")


def test_one_row_opens_at_a_time_and_refresh_updates_only_its_row(site, staff_user, plain_user, training_env,
                                                                  corpus):
    site.start_web(**training_env)
    first = completed_run(corpus, recall_after=0.7)
    second = completed_run(corpus, recall_after=0.85)
    active = make_run(corpus, "generating", processed_chunks=3, pair_count=6)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    settled(page, events=1)  # the corpus's creation, seconds ago

    def panel(run):
        return page.locator(f"#run-detail-{run.pk}")

    page.locator(f"#run-row-{first.pk} .run-main td", has_text="policy").click()
    expect(panel(first)).to_be_visible()
    expect(panel(first).locator("[data-loss-chart] svg")).to_be_visible()
    page.locator(f"#run-row-{second.pk} .run-main td", has_text="policy").click()
    expect(panel(second)).to_be_visible()
    expect(panel(first)).to_be_hidden()
    screenshot(page, "training-09-one-row-open")
    page.locator(f"#run-row-{second.pk} .run-main td", has_text="policy").click()
    expect(panel(second)).to_be_hidden()
    expect(page.locator("[data-accordion-panel]:visible")).to_have_count(0)

    # The worker is away: only the refresh button can show what the row holds now.
    page.locator(f"#run-row-{active.pk} [data-accordion-toggle]").click()
    expect(panel(active)).to_be_visible()
    TrainingRun.objects.filter(pk=active.pk).update(processed_chunks=9, pair_count=18)
    page.locator(f"#run-row-{active.pk} .icon-button").click()
    expect(page.locator(f"#run-row-{active.pk} [data-progress-cell] [data-field=progress_label]")).to_have_text(f"9/{active.total_chunks}")
    expect(panel(active).locator("[data-field=processed_chunks]")).to_have_text("9")
    expect(page.locator(f"#run-{active.pk} [data-field=processed_chunks]")).to_have_text("3")
    assert page.evaluate("jobsiteLive.rowRefreshes") == 1

    TrainingRun.objects.filter(pk=active.pk).update(status="generating_failed", error_type="UNKNOWN",
                                                     error_message="The generator process ended")
    panel(active).get_by_role("button", name="Refresh").click()
    expect(page.locator(f"#run-row-{active.pk} [data-status-label]")).to_have_text("generating failed")
    expect(panel(active)).to_be_visible()
    expect(panel(active)).to_contain_text("The generator process ended")
    expect(panel(active).get_by_role("button", name="Proceed")).to_be_visible()
    expect(page.locator(f"#run-{active.pk} [data-status-label]")).to_have_text("generating")
    screenshot(page, "training-10-row-refreshed")

    reader = site.page(plain_user)
    reader.goto(site.url(f"/training/?open={active.pk}"))
    expect(reader.locator("[data-staff-note]")).to_contain_text("group (and superusers) can start")
    expect(reader.locator("#workflow [data-generate]")).to_have_count(0)
    expect(reader.locator(f"#run-detail-{active.pk}")).to_contain_text("Read only: ask an administrator")
    expect(reader.locator(f"#run-detail-{active.pk} form")).to_have_count(0)
    screenshot(reader, "training-11-read-only")


def test_without_an_encoder_the_page_shows_the_reason_the_corpora_and_the_history_read_only(site, staff_user, db):
    corpus = Corpus.objects.create(name="policy", source="policy", num_documents=1)
    done = make_run(corpus, "completed", epochs=8, epochs_done=5, pair_count=24, loss_curve=[2.0, 1.2, 0.9, 0.8, 0.7])
    failed = failed_run(corpus)
    site.start_web(JOBSITE_ENCODER_PATH="")
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    main = page.locator("main")
    expect(main.locator("h1")).to_have_text("Training")
    expect(main.locator("[data-unavailable]")).to_contain_text("No encoder is configured: set JOBSITE_ENCODER_PATH")
    expect(main.locator("#workflow, [data-generate]")).to_have_count(0)
    expect(main.locator("#corpora summary")).to_have_text("New corpus")  # corpora can be prepared meanwhile
    assert "{#" not in main.inner_text() and "No actions on runs" not in main.inner_text()

    # The history is there to read: rows open, and nothing in them acts on a run.
    history = main.locator("#history")
    expect(history.locator("[data-history-read-only]")).to_be_visible()
    expect(page.locator(f"#run-row-{done.pk} [data-field=progress_label]")).to_have_text("5 of 8 epochs (stopped early)")
    page.locator(f"#run-row-{failed.pk} [data-accordion-toggle]").click()
    detail = page.locator(f"#run-detail-{failed.pk}")
    expect(detail).to_contain_text("Injected generator failure at chunk 12")
    expect(history.locator("form, button")).to_have_count(0)
    screenshot(page, "training-12-unavailable")


def test_stop_mid_generation_shows_the_run_stopped_and_proceed_finishes_it(site, staff_user, training_env, corpus):
    total = corpus.chunks.count()
    site.start_worker(JOBSITE_FAILPOINTS=json.dumps({"training.generate": {"action": "sleep", "seconds": 0.3}}),
                      **training_env)
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    page.select_option("#id_corpus", str(corpus.pk))
    page.locator("#workflow [data-generate]").click()
    expect(page.locator(".message-success")).to_contain_text(f"is generating pairs for the {total} chunks of policy")
    run = TrainingRun.objects.get()
    card = page.locator(f"#run-{run.pk}")
    expect(card.locator("[data-field=processed_chunks]")).not_to_have_text("0")

    card.get_by_role("button", name="Stop").click()
    expect(page.locator(".message-success")).to_contain_text(f"Training run {run.pk} stop")
    # Stopped on request: a warning and a "stopped" badge, not a failure, with Proceed on the card.
    expect(card.locator(".alert-warning .alert-title")).to_have_text("Stopped on request")
    expect(card.locator(".alert-warning")).to_contain_text("Stopped on request after")
    expect(card.locator(".alert-warning")).to_contain_text("Proceed continues where it stopped")
    expect(card.locator("[data-status-label]")).to_have_text("stopped")
    expect(card.get_by_role("button", name="Proceed")).to_be_visible()
    expect(card.locator("[data-progress]")).to_have_count(0)
    expect(card.locator(".spinner")).to_have_count(0)
    stopped = TrainingRun.objects.get()
    assert stopped.status == "generating_failed" and stopped.error_type == "CANCELLED"
    assert 0 < stopped.processed_chunks < total
    row = page.locator(f"#run-row-{run.pk}")
    expect(row.locator("[data-progress-cell] [data-field=progress_label]")).to_have_text(f"{stopped.processed_chunks}/{total}")
    # The row is redrawn as a stopped one ("stopped", not its error code), with the Refresh of failed rows
    # (another tab may proceed it).
    expect(row.locator(".run-main [data-status-label]")).to_have_text("stopped")
    expect(row.locator(".run-main")).not_to_contain_text("CANCELLED")
    expect(row.locator("[data-refresh]")).to_have_count(1)
    screenshot(page, "training-13-stopped")

    card.get_by_role("button", name="Proceed").click()  # the row's own Proceed is covered above
    expect(page.locator(f"#run-row-{run.pk} [data-status-label]")).to_have_text("generated", timeout=90_000)
    done = TrainingRun.objects.get()
    assert done.processed_chunks == total and done.pairs.values("chunk_id").distinct().count() == total


def test_a_corpus_uploaded_from_the_page_is_picked_and_generated_from(site, staff_user, training_env, tmp_path,
                                                                     settings):
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    expect(page.locator("#workflow [data-no-corpora]")).to_contain_text("create one from documents")
    expect(page.locator("#workflow [data-generate]")).to_be_disabled()
    form = page.locator("[data-corpus-form]")
    expect(form).to_be_visible()  # open by itself while there is no corpus

    # A PDF is refused under its field, and what was typed stays.
    (tmp_path / "manual.pdf").write_bytes(b"%PDF-1.7")
    form.locator("#id_name").fill("field-guides")
    form.locator("#id_files").set_input_files(str(tmp_path / "manual.pdf"))
    form.locator("[data-create-corpus]").click()
    expect(form.locator(".field-files .field-error")).to_have_text("manual.pdf: upload .txt, .md or .jsonl files only.")
    expect(form.locator("#id_name")).to_have_value("field-guides")
    screenshot(page, "training-15-corpus-refused")

    form.locator("#id_files").set_input_files([str(DEMO_CORPUS / "telescope-setup.md"),
                                               str(DEMO_CORPUS / "tide-pool-field-notes.md")])
    form.locator("[data-create-corpus]").click()
    corpus = Corpus.objects.get(name="field-guides")
    chunks = corpus.chunks.count()
    expect(page.locator(".message-success")).to_have_text(
        f"Corpus field-guides is ready: 2 documents, {chunks} chunks. Generate pairs from it below.")
    expect(page.locator(f"#corpus-{corpus.pk}")).to_contain_text("field-guides")
    expect(page.locator("#id_corpus")).to_have_value(str(corpus.pk))
    screenshot(page, "training-16-corpus-created")

    # A corpus made elsewhere (another tab, the API) is listed and offered without a reload,
    # the one just created stays picked, and a number typed into the form meanwhile stays too.
    page.locator("#id_queries_per_chunk").fill("5")
    page.keyboard.press("Tab")
    source = settings.JOBSITE_DATA_DIR / "handbook-src"
    source.mkdir(parents=True)
    shutil.copy(DEMO_CORPUS / "expense-policy.md", source / "expense-policy.md")
    other = services.corpus_create(name="handbook", path=str(source), chunk_size=800, chunk_overlap=0)
    expect(page.locator(f"#corpus-{other.pk}")).to_contain_text("handbook")
    expect(page.locator(f"#id_corpus option[value='{other.pk}']")).to_have_count(1)
    expect(page.locator("#id_corpus")).to_have_value(str(corpus.pk))
    expect(page.locator("#id_queries_per_chunk")).to_have_value("5")

    # Generate from the other corpus: the answer keeps it chosen, in a form drawn disabled while the
    # run blocks another, and sits above the page's content, not over it.
    page.locator("#id_corpus").select_option(str(other.pk))
    page.locator("#workflow [data-generate]").click()
    message = page.locator(".message-success")
    expect(message).to_contain_text(f"is generating pairs for the {other.chunks.count()} chunks of handbook")
    run = TrainingRun.objects.get()
    assert run.queries_per_chunk == 5
    expect(page.locator("#id_corpus")).to_have_value(str(other.pk))
    expect(page.locator("#id_corpus")).to_be_disabled()
    expect(page.locator("#workflow [data-generate]")).to_be_disabled()
    said, workflow = page.locator(".messages").bounding_box(), page.locator("#workflow").bounding_box()
    assert said["y"] + said["height"] <= workflow["y"], (said, workflow)
    screenshot(page, "training-17-generated-form-kept")

    # The run fails meanwhile: the answer that says it is generating leaves.
    TrainingRun.objects.filter(pk=run.pk).update(status="generating_failed", error_type="UNKNOWN",
                                                 error_message="The generator process ended")
    run.refresh_from_db()
    deliver(page, 1_000_000_000, run.topic, "training.generating_failed", run.event_payload())
    expect(message).to_have_count(0)
    # Drawn again failed: the card itself offers Delete beside Proceed.
    expect(page.locator(f"#run-{run.pk} [data-discard]")).to_be_visible()
    expect(page.locator(f"#run-{run.pk} [data-card-proceed]")).to_be_visible()


def test_a_success_message_leaves_by_itself_and_any_message_can_be_dismissed(site, staff_user, training_env,
                                                                               corpus):
    """An answer to an action ("is generating pairs") goes stale as the run moves on: it leaves
    after 20 s, or at once by its Dismiss button; an error stays until dismissed."""
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.clock.install()
    page.goto(site.url("/training/"))
    page.locator("#workflow [data-generate]").click()
    message = page.locator(".message-success")
    expect(message).to_contain_text("is generating pairs for the")
    expect(message.get_by_role("button", name="Dismiss")).to_be_visible()
    page.clock.fast_forward(10_000)
    expect(message).to_be_visible()
    page.clock.fast_forward(11_000)
    expect(message).to_have_count(0)

    run = TrainingRun.objects.get()
    page.locator(f"#run-{run.pk}").get_by_role("button", name="Stop").click()
    expect(message).to_contain_text(f"Training run {run.pk} stopped")
    message.get_by_role("button", name="Dismiss").click()
    expect(message).to_have_count(0)

    # A refusal (the Generate form sent while a run is open, as from a second tab) stays.
    # Sent in one step: a button enabled by hand can be drawn disabled again by a live redraw first.
    page.evaluate("const form = document.querySelector('[data-generate]').form;"
                  "form.querySelector('fieldset').disabled = false; form.requestSubmit()")
    error = page.locator(".message-error")
    expect(error).to_contain_text(f"training run {run.pk}")
    page.clock.fast_forward(60_000)
    expect(error).to_be_visible()


WIDER_THAN_THE_WINDOW = """() => Array.from(document.querySelectorAll("main *"))
    .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5 && el.checkVisibility())
    .filter((el) => !el.closest(".table, .pairs-scroll") || el.matches(".table, .pairs-scroll"))
    .map((el) => `${el.tagName}.${el.className} ${Math.round(el.getBoundingClientRect().right)}`).slice(0, 8)"""


def test_at_400_px_each_pair_can_be_decided_and_nothing_is_cut_off(site, staff_user, training_env, corpus):
    """A phone's width: each pair shows its Approve, Reject and Edit inside the window, and Approve
    works; at 1,280 px Edit is inside the list's box; the loss chart and the history stay within
    the window (a wide history scrolls in its own panel)."""
    done = completed_run(corpus)
    run = make_run(corpus, "generated", processed_chunks=corpus.chunks.count(), pair_count=3)
    pairs = TrainingPair.objects.bulk_create(
        TrainingPair(run=run, chunk=chunk, query=f"what does part {chunk.index} of the policy say about receipts?")
        for chunk in corpus.chunks.all()[:3])
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    review = page.locator(f"#run-{run.pk} [data-review]")

    def decisions(pair):
        return [review.get_by_role("button", name=f"Approve pair {pair.pk}", exact=True),
                review.get_by_role("button", name=f"Reject pair {pair.pk}", exact=True),
                review.get_by_role("link", name=f"Edit the query of pair {pair.pk}", exact=True)]

    def within(box, left, right):
        return box is not None and box["x"] >= left and box["x"] + box["width"] <= right

    listed = review.locator(".pairs-scroll").bounding_box()
    for control in decisions(pairs[0]):
        assert within(control.bounding_box(), listed["x"], listed["x"] + listed["width"]), control

    page.set_viewport_size({"width": 400, "height": 900})
    page.locator(f"#run-{run.pk}").scroll_into_view_if_needed()
    assert page.evaluate("document.documentElement.scrollWidth") <= 400, page.evaluate(WIDER_THAN_THE_WINDOW)
    for pair in pairs:
        for control in decisions(pair):
            expect(control).to_be_visible()
            # Scrolled and measured in one call in the page: a live redraw between Playwright's steps
            # replaces the element, and a box asked for in a second step can find none.
            box = control.evaluate("element => { element.scrollIntoView({block: 'center', inline: 'nearest'});"
                                   " const r = element.getBoundingClientRect(); return {x: r.x, width: r.width}; }")
            assert within(box, 0, 400), (control, box)
    screenshot(page, "training-18-review-400px", full_page=False)
    decisions(pairs[1])[0].click()
    expect(review.locator("[data-count=approved]")).to_have_text("1")
    expect(page.locator(f"#pair-{pairs[1].pk} .badge")).to_have_text("approved")

    for shown in (page.locator(f"#result-{done.pk} [data-loss-chart] svg"), page.locator("#history")):
        shown.scroll_into_view_if_needed()
        assert within(shown.bounding_box(), 0, 400), shown.bounding_box()
    assert page.evaluate("document.documentElement.scrollWidth") <= 400, page.evaluate(WIDER_THAN_THE_WINDOW)


def test_a_number_typed_then_another_action_keeps_the_number_when_the_page_is_redrawn(site, staff_user,
                                                                                     training_env, corpus):
    """Epochs typed, then a pair rejected: the rejection's answer redraws the whole page, and
    the typed number stays (Train would otherwise train the default's 8 epochs)."""
    run = make_run(corpus, "generated")
    pairs = TrainingPair.objects.bulk_create(
        TrainingPair(run=run, chunk=chunk, query=f"what does part {chunk.index} say", review="approved")
        for chunk in corpus.chunks.all()[:6])
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    review = page.locator(f"#run-{run.pk} [data-review]")
    review.locator("input[name=epochs]").fill("3")
    review.get_by_role("button", name=f"Reject pair {pairs[0].pk}", exact=True).click()
    expect(page.locator(".message-success")).to_contain_text("1 pair rejected")
    expect(review.locator("[data-count=rejected]")).to_have_text("1")
    expect(review.locator("input[name=epochs]")).to_have_value("3")
    review.locator("[data-train]").click()
    expect(page.locator(".message-success")).to_contain_text(
        f"Training run {run.pk} is training on its approved pairs for at most 3 epochs")
    assert TrainingRun.objects.get().epochs == 3


def test_reject_all_pending_asks_then_rejects_every_pending_pair(site, staff_user, training_env, corpus):
    """Asked in a dialog, then every pending pair is rejected (the decided ones stay as they are)."""
    run = make_run(corpus, "generated")
    chunks = list(corpus.chunks.all()[:5])
    TrainingPair.objects.bulk_create(
        TrainingPair(run=run, chunk=chunk, query=f"what does part {chunk.index} say",
                     review="approved" if i == 0 else "pending")
        for i, chunk in enumerate(chunks))
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    review = page.locator(f"#run-{run.pk} [data-review]")
    review.get_by_role("button", name="Reject all pending").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text(f"Reject all 4 pending pairs of training run {run.pk}?")
    dialog.get_by_role("button", name="Yes, reject them").click()
    expect(page.locator(".message-success")).to_contain_text("4 pairs rejected")
    expect(review.locator("[data-count=rejected]")).to_have_text("4")
    expect(review.locator("[data-count=approved]")).to_have_text("1")
    assert sorted(run.pairs.values_list("review", flat=True)) == ["approved"] + ["rejected"] * 4


def test_an_action_the_server_cannot_do_or_never_gets_says_so_on_the_page(site, staff_user, training_env, corpus):
    """A form whose security token is out of date gets a page that says so; a server error and
    a server that cannot be reached each leave an error message; none of them is silent."""
    run = make_run(corpus, "generated")
    TrainingPair.objects.bulk_create(
        TrainingPair(run=run, chunk=chunk, query=f"what does part {chunk.index} say")
        for chunk in corpus.chunks.all()[:3])
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    review = page.locator(f"#run-{run.pk} [data-review]")

    page.route(f"**/training/runs/{run.pk}/review/", lambda route: route.fulfill(status=500, body="oops"))
    review.get_by_role("button", name="Approve all pending").click()
    expect(page.locator(".message-error")).to_contain_text("The server could not do this (error 500)")
    page.unroute(f"**/training/runs/{run.pk}/review/")
    page.route(f"**/training/runs/{run.pk}/review/", lambda route: route.abort())
    page.locator(".message-error").get_by_role("button", name="Dismiss").click()
    review.get_by_role("button", name="Approve all pending").click()
    expect(page.locator(".message-error")).to_contain_text("The server could not be reached, so this was not sent")
    page.unroute(f"**/training/runs/{run.pk}/review/")
    assert set(run.pairs.values_list("review", flat=True)) == {"pending"}

    # The form's token out of date on its way (a live redraw would draw a fresh one into the page).
    page.route(f"**/training/runs/{run.pk}/review/", lambda route: route.continue_(
        post_data=re.sub(r"csrfmiddlewaretoken=[^&]*", "csrfmiddlewaretoken=" + "x" * 64, route.request.post_data)))
    review.get_by_role("button", name="Approve all pending").click()
    expect(page.locator("main")).to_contain_text("This form was not sent: its security token is missing or out of date")
    page.unroute(f"**/training/runs/{run.pk}/review/")
    page.get_by_role("link", name="Back to the page").click()
    expect(page.locator(f"#run-{run.pk} [data-review]")).to_be_visible()
    assert set(run.pairs.values_list("review", flat=True)) == {"pending"}


def test_a_running_step_says_how_long_it_has_left(site, staff_user, training_env, corpus):
    """Generation at a chunk a second: as many seconds left as chunks, counting down. Training:
    "Loading the encoder…" until its first batch, then a time left for the embedding that weighs
    the short queries by their length (chunks come first), then its epochs' own."""
    now = timezone.now()
    run = make_run(corpus, "generating", processed_chunks=0, started_at=now, heartbeat_at=now,
                   progress_at=now, worker="host:1", attempt=1)
    chunks = run.total_chunks
    assert chunks > 15
    site.start_web(**training_env)
    page = page_on_held_clock(site, staff_user, "/training/")
    eta = page.locator(f"#run-{run.pk} [data-eta]")
    expect(eta).to_have_text("—")
    payload = run.event_payload()
    seq = iter(range(1_000_000, 2_000_000))

    def progress(**counts):
        deliver(page, next(seq), run.topic, "training.progress", {**payload, **counts})

    for second in range(1, 11):
        page.clock.run_for(1000)
        progress(processed_chunks=second)
    left = chunks - 10
    expect(eta).to_have_text(f"{left} s")
    page.clock.run_for(3000)
    expect(eta).to_have_text(f"{left - 3} s")

    # The training step, drawn by the server, embeds the chunks and two approved queries a chunk, then
    # trains 8 epochs.
    TrainingPair.objects.bulk_create(
        TrainingPair(run=run, chunk=chunk, query=f"{word} of part {chunk.index}?", review="approved")
        for chunk in corpus.chunks.all() for word in ("what", "why"))
    texts = 3 * chunks
    TrainingRun.objects.filter(pk=run.pk).update(status="training", processed_chunks=chunks, texts_total=texts,
                                                 texts_embedded=0, epochs=8, epochs_done=0)
    run.refresh_from_db()
    payload = run.event_payload()
    deliver(page, next(seq), run.topic, "training.training", payload)
    # The card the server draws for the training step, which the event asked for.
    run_clock_until(page, f"document.querySelector('#run-{run.pk}').textContent.includes('Loading the encoder…')")
    step = page.locator(f"#run-{run.pk} [data-eta-step]")
    expect(step).to_be_visible()
    expect(eta).to_have_text("—")
    # Two chunks a second. A query costs what its length does against a chunk's: texts/s would say
    # the queries take twice as long as the chunks.
    for second in range(1, 5):
        page.clock.run_for(1000)
        progress(texts_embedded=2 * second, progress_done=2 * second, progress_total=texts, is_embedding=True,
                 progress_label=f"Embedding {2 * second} of {texts} texts")
    expect(page.locator(f"#run-{run.pk} [data-field=progress_label]").first).to_have_text(
        re.compile(r"^Embedding 8 of "))
    sizes = [len(text) for text in corpus.chunks.values_list("text", flat=True)]
    query_chars = sum(len(query) for query in run.pairs.values_list("query", flat=True)) / (2 * chunks)
    weight = round(query_chars / (sum(sizes) / chunks), 4)
    expected = round((chunks - 8 + 2 * chunks * weight) / 2)
    expect(eta).to_have_text(re.compile(rf"^({expected - 1}|{expected}|{expected + 1}) s$"))
    for epoch in range(1, 4):  # 2 s an epoch, 8 epochs
        page.clock.run_for(2000)
        progress(texts_embedded=texts, is_embedding=False, progress_done=epoch, progress_total=8, epochs_done=epoch)
        if epoch == 1:
            expect(step).to_be_visible()
            expect(eta).to_have_text("—")  # one epoch tells no pace yet
    expect(step).to_contain_text("left in this step")
    expect(eta).to_have_text(re.compile(r"^(9|10|11) s$"))  # 5 epochs left at 2 s each

    # Its worker falls silent past the stall limit: "No heartbeat", and no time left beside it.
    page.clock.run_for(page.evaluate("parseFloat(document.body.dataset.stallAfterS)") * 1000 - 1000)
    run_clock_until(page, f"document.querySelector('#run-{run.pk}').classList.contains('is-stalled')")
    expect(page.locator(f"#run-{run.pk} [data-stalled-notice]")).to_be_visible()
    expect(step).to_be_hidden()


def test_a_redraw_that_crosses_a_progress_does_not_take_the_card_back(site, staff_user, training_env, corpus):
    """A redraw the server rendered before a progress event, answered after the page applied that
    event: the card keeps showing the newer progress, not what the server had read before it."""
    now = timezone.now()
    run = make_run(corpus, "generating", processed_chunks=2, pair_count=4, started_at=now, heartbeat_at=now,
                   progress_at=now, worker="host:1", attempt=1)
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    card = page.locator(f"#run-{run.pk}")
    expect(card).to_contain_text(f"2/{run.total_chunks} chunks")
    held = []
    page.route(re.compile(r"/training/workflow/"), lambda route: held.append(route))
    payload = run.event_payload()
    # The run's status event asks for a redraw; the answer is held while two chunks are done.
    deliver(page, 1_000_001, run.topic, "training.generating", payload)
    for _ in range(100):  # the route's handler runs while Playwright waits
        if held:
            break
        page.wait_for_timeout(50)
    assert len(held) == 1
    deliver(page, 1_000_002, run.topic, "training.progress", {**payload, "processed_chunks": 3, "pair_count": 6})
    deliver(page, 1_000_003, run.topic, "training.progress", {**payload, "processed_chunks": 4, "pair_count": 8})
    expect(card).to_contain_text(f"4/{run.total_chunks} chunks")
    page.evaluate(f"document.getElementById('run-{run.pk}').dataset.before = '1'")
    held[0].continue_()
    page.unroute(re.compile(r"/training/workflow/"))
    expect(card).not_to_have_attribute("data-before", "1")  # the server's card is in the page now
    expect(card).to_contain_text(f"4/{run.total_chunks} chunks")
    expect(card).to_contain_text("8 pairs")
    expect(card).to_have_attribute("data-seq", "1000003")


def test_a_run_whose_adapter_is_not_adopted_says_so_and_can_be_adopted_by_hand_after_a_confirmation(
    site, staff_user, training_env, corpus
):
    total = corpus.chunks.count()
    run = make_run(
        corpus, "completed", processed_chunks=total, pair_count=2 * total, epochs=8, epochs_done=4, best_epoch=1,
        adopted=False, loss_curve=[1.2, 0.6, 0.3, 0.2],
        validation_curve=[{"recall@1": 0.5, "recall@5": 0.7, "recall@10": 0.8},
                          {"recall@1": 0.4, "recall@5": 0.6, "recall@10": 0.8},
                          {"recall@1": 0.4, "recall@5": 0.6, "recall@10": 0.7},
                          {"recall@1": 0.3, "recall@5": 0.5, "recall@10": 0.7}],
        metrics={"before": {"recall@1": 0.5, "recall@5": 0.75, "recall@10": 0.9},
                 "after": {"recall@1": 0.45, "recall@5": 0.7, "recall@10": 0.85},
                 "validation_before": {"recall@1": 0.5, "recall@5": 0.75, "recall@10": 0.85},
                 "validation_after": {"recall@1": 0.5, "recall@5": 0.7, "recall@10": 0.8},
                 "train_pairs": 30, "validation_pairs": 8, "test_pairs": 10},
    )
    site.start_web(**training_env)
    page = site.page(staff_user)
    page.goto(site.url("/training/"))
    result = page.locator("#workflow [data-result]")
    verdict = result.locator("[data-verdict]")
    expect(verdict).to_have_text(
        "Not adopted: no epoch beat the encoder alone on validation (its best, epoch 1 of 4, fell at recall@5 "
        "0.75 → 0.70, recall@10 0.85 → 0.80), so search uses the encoder alone. Try more or better pairs, or a "
        "lower learning rate.")
    # Test recall before → after for the chosen epoch, validation beside it; the chart marks the epoch.
    expect(result.locator("[data-recall-k='5'] td").nth(2)).to_have_text("0.70")
    expect(result.locator("[data-recall-k='5'] [data-validation]")).to_have_text("0.75 → 0.70")
    expect(result.locator("[data-loss-chart] [data-chosen-epoch='1']")).to_have_count(1)
    expect(result.locator("[data-loss-chart] [data-validation-line]")).to_have_count(1)
    expect(page.locator(f"#run-row-{run.pk} [data-not-adopted]")).to_have_text("not adopted")
    screenshot(page, "training-14-not-adopted")

    result.locator("[data-adopt]").click()
    expect(page.locator("h1")).to_have_text(f"Adopt training run {run.pk}'s adapter?")
    page.get_by_role("button", name="Yes, adopt it").click()
    expect(page.locator(".message-success")).to_contain_text(f"Training run {run.pk}'s adapter is adopted")
    expect(page.locator("#workflow [data-result] [data-verdict]")).to_contain_text(
        f"Adopted by hand by {staff_user.username}: epoch 1 of 4 did not beat the encoder alone on validation")
    expect(page.locator(f"#run-row-{run.pk} [data-not-adopted]")).to_have_count(0)
    run.refresh_from_db()
    assert run.adopted and run.adopted_by == staff_user
