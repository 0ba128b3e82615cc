"""The extractions page in a real Chromium against a real daphne and a real qcluster worker.

Each test saves screenshots of the states it reaches under tests/artifacts/.
"""

import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from extraction.models import Extraction
from extraction.reader import open_output
from extraction.services import extraction_start
from jobsite.events import publish
from tests.browser.conftest import deliver, page_on_held_clock, screenshot
from tests.conftest import TEXTS, wait_for, write_dataset

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

expect.set_options(timeout=60_000)


def slow_batches(seconds: float) -> str:
    return json.dumps({"extraction.batch": {"action": "sleep", "seconds": seconds}})


def live_counts(page) -> dict:
    return page.evaluate("({events: jobsiteLive.events, polls: jobsiteLive.polls, connects: jobsiteLive.connects})")


WATCH_BARS = """() => {
    // Every width a progress bar is drawn with, even within one frame (a replayed burst).
    window.seenWidths = [];
    const record = (bar) => window.seenWidths.push(parseFloat(bar.style.width));
    document.querySelectorAll("[data-bar]").forEach(record);
    new MutationObserver((changes) => {
        for (const change of changes) {
            if (change.type === "attributes" && change.target.matches("[data-bar]")) record(change.target);
            change.addedNodes.forEach((node) => node.querySelectorAll && node.querySelectorAll("[data-bar]").forEach(record));
        }
    }).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ["style"]});
}"""


def watch_bars(page) -> None:
    page.evaluate(WATCH_BARS)


def saw_progress_between(page, low: float, high: float) -> None:
    page.wait_for_function("([low, high]) => window.seenWidths.some((w) => w > low && w < high)", arg=[low, high])


def expect_completed(page, job) -> None:
    card = page.locator(f"#extraction-{job.pk}")
    expect(card.locator(".done")).to_contain_text(f"Completed: {len(TEXTS)} samples")
    expect(card.locator("[data-status-label]")).to_have_text("completed")
    expect(card.locator("[data-progress]")).to_have_count(0)
    expect(card.locator(".spinner")).to_have_count(0)


def test_start_from_the_page_shows_progress_to_100_percent_and_the_bar_clears_without_a_reload(
    site, staff_user, model_record, dataset
):
    site.start_worker(JOBSITE_FAILPOINTS=slow_batches(0.35))
    site.start_web()
    page = site.page(staff_user)
    page.goto(site.url("/"))
    expect(page).to_have_url(re.compile(r"/extractions/$"))

    page.fill("#id_layers", "7")
    page.get_by_role("button", name="Start extraction").click()
    expect(page.locator(".field-layers .field-error")).to_have_text("Layer 7 does not exist: tiny-gpt2 has layers 0-2.")
    screenshot(page, "01-start-form-error")

    page.fill("#id_layers", "0,2")
    page.check("input[name=hooks][value=mlp]")
    page.select_option("#id_batch_size", "4")
    page.get_by_role("button", name="Start extraction").click()
    expect(page.locator(".message-success")).to_contain_text("is queued.")
    job = Extraction.objects.get()
    assert (job.layers, job.hooks, job.batch_size) == ([0, 2], ["residual", "mlp"], 4)
    page.evaluate("window.sameDocument = true")

    watch_bars(page)
    expect(page.locator("[data-live-status]")).to_have_text("live")
    saw_progress_between(page, 20, 80)
    page.wait_for_timeout(350)  # the bar's width transition
    screenshot(page, "02-extraction-progress")
    expect_completed(page, job)
    assert page.evaluate("window.sameDocument") is True, "the page was reloaded"
    counts = live_counts(page)
    assert counts["events"] > 0 and counts["polls"] == 0
    expect(page.locator(f"#row-{job.pk} .badge")).to_have_text("completed")
    screenshot(page, "03-extraction-completed")

    page.locator(f"#extraction-{job.pk}").get_by_role("link", name="Files and metadata").click()
    expect(page.locator("h1")).to_have_text(f"Extraction {job.pk}: output")
    expect(page.locator("table.files")).to_contain_text("layer_2_mlp.npy")
    expect(page.locator("pre[data-metadata]")).to_contain_text('"hidden_size": 32')
    expect(page.locator("[data-snippet=reader]")).to_contain_text(f'open_output("{job.output_dir}")')
    expect(page.locator("[data-histogram]")).to_have_count(4)
    screenshot(page, "04-extraction-files")
    page.fill("input[name=sample]", "4")
    page.select_option("select[name=point]", "blocks.2.hook_mlp_out")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#sample")).to_contain_text("Sample 4 at blocks.2.hook_mlp_out")
    output = open_output(job.output_dir)
    assert page.locator(".tok").all_inner_texts() == output.token_strings(4)
    screenshot(page, "05-extraction-sample-tokens")


def test_a_failure_shows_the_alert_and_retry_with_suggested_params_completes(
    site, staff_user, plain_user, model_record, dataset
):
    site.start_worker(JOBSITE_FAILPOINTS=json.dumps({"extraction.batch": {"action": "oom", "min_batch_size": 8}}))
    site.start_web()
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")

    failed, _ = extraction_start(model=model_record, dataset=dataset, layers=[1], hooks=["residual"], batch_size=8)
    card = page.locator(f"#extraction-{failed.pk}")
    alert = card.locator(".alert-error")
    expect(alert).to_contain_text("Failed: OOM")
    expect(alert).to_contain_text("CUDA out of memory")
    expect(alert.locator("[data-suggested]")).to_have_text('{"batch_size": 4}')
    expect(card.locator("[data-progress]")).to_have_count(0)
    expect(card.locator("[data-status-label]")).to_have_text("failed")
    card.locator("summary", has_text="Retry…").click()
    expect(card.locator(".retry-form select[name=batch_size]")).to_have_value("4")
    expect(page.locator(f"#row-{failed.pk} .badge")).to_have_text("failed")
    screenshot(page, "05-failed-alert")
    card.locator(".retry-form").get_by_role("button", name="Close").click()  # not "Cancel": that is the job's
    expect(card.locator(".retry-form")).to_be_hidden()

    card.get_by_role("button", name="Retry (with suggested params)").click()
    expect(page.locator(".message-success")).to_contain_text(f'retries extraction {failed.pk} with {{"batch_size": 4}}')
    retry = Extraction.objects.exclude(pk=failed.pk).get()
    assert (retry.original_extraction_id, retry.batch_size) == (failed.pk, 4)
    expect(page.locator(f"#extraction-{retry.pk} .lineage")).to_have_text(f"retry of #{failed.pk}")
    expect_completed(page, retry)
    expect(page.locator(f"#row-{retry.pk}")).to_contain_text(f"retry of #{failed.pk}")
    expect(page.locator(f"#row-{retry.pk} .badge")).to_have_text("completed")
    expect(page.locator(f"#row-{failed.pk} .badge")).to_have_text("failed")
    screenshot(page, "06-retry-completed")

    reader = site.page(plain_user)
    reader.goto(site.url("/extractions/"))
    expect(reader.locator("[data-staff-note]")).to_contain_text("group (and superusers) can start, cancel or retry jobs, or add models, datasets and corpora")
    expect(reader.get_by_role("button", name="Start extraction")).to_have_count(0)
    screenshot(reader, "07-read-only")


def test_an_event_redraws_once_and_the_page_then_stays_quiet(site, staff_user, make_extraction):
    """An open page costs nothing while nothing happens: one event, one redraw of each part."""
    from jobsite.events import publish

    job = make_extraction("completed")
    site.start_web()
    page = site.page(staff_user)
    fragments = []
    page.on("request", lambda r: fragments.append(r.url) if re.search(r"/(active|history|card)/$", r.url) else None)
    page.goto(site.url("/extractions/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    publish(job.topic, "extraction.completed", job.event_payload())
    for _ in range(60):  # page.wait_for_timeout lets Playwright deliver the request events
        if fragments:
            break
        page.wait_for_timeout(500)
    assert fragments, "the event asked for no redraw"
    page.wait_for_timeout(8000)
    assert len(fragments) <= 2, f"redraws kept coming after the event: {fragments}"


def test_a_reload_mid_job_reattaches_at_once(site, staff_user, model_record, dataset):
    site.start_worker(JOBSITE_FAILPOINTS=slow_batches(0.4))
    site.start_web()
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=4)
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 8, timeout=60, message="progress")

    # Every width the reloaded page's bar takes, from its first paint: the events of the last
    # seconds that the socket replays must not draw their older counts over the rows.
    page.add_init_script(f"document.addEventListener('DOMContentLoaded', {WATCH_BARS})")
    page.reload()
    width = page.locator(f"#extraction-{job.pk} [data-bar]").evaluate("bar => parseFloat(bar.style.width)")
    assert width >= 100 * 8 / len(TEXTS) - 0.1, "the reloaded page draws the progress from the database"
    expect(page.locator("[data-live-status]")).to_have_text("live")
    wait_for(lambda: page.evaluate("jobsiteLive.events") >= 3, timeout=30, message="the replayed events")
    page.wait_for_timeout(300)
    assert min(page.evaluate("window.seenWidths")) >= 100 * 8 / len(TEXTS) - 0.1, "no replayed event took it back"
    screenshot(page, "08-reloaded-mid-job")
    expect_completed(page, job)
    counts = live_counts(page)
    assert counts["events"] > 0 and counts["polls"] == 0


def test_the_page_catches_up_after_the_server_restarts_mid_job(site, staff_user, model_record, dataset):
    site.start_worker(JOBSITE_FAILPOINTS=slow_batches(0.3))
    daphne = site.start_web()
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=2)
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    watch_bars(page)
    saw_progress_between(page, 0, 60)

    daphne.kill()
    expect(page.locator("[data-live-status]")).to_have_text("reconnecting…")
    shown = page.locator(f"#extraction-{job.pk} [data-field=samples_processed]").inner_text()
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= int(shown) + 4, timeout=30,
             message="the worker to go on while the server is down")
    screenshot(page, "09-server-down")

    site.start_web(port=site.port)
    expect_completed(page, job)
    assert live_counts(page)["connects"] >= 2
    screenshot(page, "10-caught-up-after-restart")


def test_without_socket_messages_the_page_polls_the_api_until_completion(site, staff_user, model_record, dataset):
    # Four batches of 0.6 s: polls a second apart must see the bar between 0 and 100 (at 0.2 s a
    # batch the run could finish between two polls on a busy machine).
    site.start_worker(JOBSITE_FAILPOINTS=slow_batches(0.6))
    site.start_web(JOBSITE_POLL_FALLBACK_S=1)
    page = site.page(staff_user)
    # The socket opens but never carries a message, like a proxy that swallows them.
    page.route_web_socket(re.compile(r".*/ws/events/.*"), lambda socket: None)
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=4)
    page.goto(site.url("/extractions/"))
    watch_bars(page)
    expect(page.locator("[data-live-status]")).to_have_text("polling")
    saw_progress_between(page, 0, 100)
    screenshot(page, "11-polling-fallback")
    expect_completed(page, job)
    counts = live_counts(page)
    assert counts["events"] == 0 and counts["polls"] > 0


def test_stalled_and_slow_jobs_offer_resume_retry_and_a_confirmed_cancel(site, staff_user, fake_model, fake_dataset,
                                                                        make_extraction):
    site.start_web(JOBSITE_STALL_AFTER_S=5, JOBSITE_SLOW_AFTER_S=60)
    old = timezone.now() - timedelta(seconds=90)
    stalled = make_extraction("extracting", started_at=old, heartbeat_at=old, progress_at=old, queued_at=old,
                              worker="gone-host:1", attempt=1, samples_processed=40, total_samples=100)
    slow = make_extraction("queued", queued_at=old)
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))

    stalled_card = page.locator(f"#extraction-{stalled.pk}")
    expect(stalled_card.locator("[data-stalled-notice]")).to_be_visible()
    expect(stalled_card.locator("[data-stalled-notice]")).to_contain_text(re.compile(r"No heartbeat for \d+ s"))
    slow_card = page.locator(f"#extraction-{slow.pk}")
    expect(slow_card.locator("[data-slow-notice]")).to_contain_text("Taking longer than expected")
    expect(slow_card.locator(".spinner")).to_be_hidden()
    # One Cancel each: the notice's, not the card's own beside it.
    expect(stalled_card.get_by_role("button", name="Cancel")).to_have_count(1)
    expect(slow_card.get_by_role("button", name="Cancel")).to_have_count(1)
    # No worker runs in this test: the page says why nothing moves.
    expect(page.locator("[data-no-worker]")).to_contain_text("No worker is running")
    screenshot(page, "12-stalled-and-slow")
    # An event about the job that its worker did not write (a person's, the watchdog's) is not a
    # sign of life: the card stays stalled, heartbeat age and all.
    publish(stalled.topic, "extraction.cancel_requested", stalled.event_payload())
    wait_for(lambda: page.evaluate("jobsiteLive.events") >= 1, timeout=10)
    page.wait_for_timeout(2500)  # two ticks of the page's clock; read at once, not waited for
    assert page.evaluate(f"document.querySelector('#extraction-{stalled.pk} [data-stalled-notice]').hidden") is False
    assert int(stalled_card.locator("[data-heartbeat-age]").first.text_content()) >= 80

    slow_card.locator("[data-slow-notice]").get_by_role("button", name="Cancel").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text(f"Cancel extraction {slow.pk}?")
    screenshot(page, "13-confirm-cancel", full_page=False)
    dialog.get_by_role("button", name="No, go back").click()
    expect(dialog).to_be_hidden()
    assert Extraction.objects.get(pk=slow.pk).status == "queued"
    slow_card.locator("[data-slow-notice]").get_by_role("button", name="Cancel").click()
    dialog.get_by_role("button", name="Yes, cancel it").click()
    expect(page.locator(".message-success")).to_contain_text(f"Extraction {slow.pk} is cancelled.")
    assert Extraction.objects.get(pk=slow.pk).status == "cancelled"

    page.locator(f"#extraction-{stalled.pk} [data-stalled-notice]").get_by_role("button", name="Resume").click()
    expect(page.locator(".message-success")).to_contain_text(f"Extraction {stalled.pk} is queued again")
    resumed = Extraction.objects.get(pk=stalled.pk)
    assert resumed.status == "queued" and resumed.error_type == "WORKER_LOST"
    expect(page.locator(f"#extraction-{stalled.pk} [data-status-label]")).to_have_text("queued")
    expect(page.locator(f"#extraction-{stalled.pk} [data-stalled-notice]")).to_have_count(0)


def test_the_time_left_is_fitted_to_what_each_sample_and_each_token_cost(site, staff_user):
    """live.js's estimate, fed progress points of a run where each sample costs 20 ms and each
    token 1 ms: the tokens/s estimate alone would be 2.5 times short here."""
    site.start_web()
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    # Longest first: 16 samples a batch, 200 then 120, 60, 20 tokens a sample.
    points, t, k, s = [], 0.0, 0, 0
    for tokens_per_sample in (200, 120, 60, 20):
        points.append([t * 1000, k, s])
        t, k, s = t + 16 * 0.020 + 16 * tokens_per_sample * 0.001, k + 16 * tokens_per_sample, s + 16
    points.append([t * 1000, k, s])
    left = page.evaluate("([p, k, s]) => jobsiteTimeLeft(p, k, s)", [points, 16 * 10 * 4, 16 * 4])
    assert left == pytest.approx(16 * 4 * 0.020 + 16 * 10 * 4 * 0.001)  # 64 samples of 10 tokens left
    token_rate_only = (16 * 10 * 4) / (k / t)
    assert token_rate_only < left / 2.4
    # Batches that all hold the same tokens per sample cannot tell the two costs apart: the mean.
    even = [[i * 1000, i * 160, i * 16] for i in range(4)]
    assert page.evaluate("([p, k, s]) => jobsiteTimeLeft(p, k, s)", [even, 320, 32]) == pytest.approx(2.0)
    assert page.evaluate("([p, k, s]) => jobsiteTimeLeft(p, k, s)", [even[:1], 320, 32]) is None


def seconds_in(text: str) -> int:
    """'2 min 6 s' -> 126, as live.js and the server write a duration."""
    units = {"h": 3600, "min": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+) (h|min|s)\b", text))


def test_the_time_left_counts_down_and_one_slow_batch_does_not_swing_it(site, staff_user, make_extraction):
    """A run of 60 batches, longest first, each taking 0.6-1.4 times its usual time, replayed
    into the page as the socket delivers progress: the time left moves little at each event,
    counts down between events, and stays near the time the run really has left."""
    batches = 60
    tokens = [16 * round(256 - 252 * b / (batches - 1)) for b in range(batches)]
    noise = [(0.6, 1.4, 1.0, 0.7, 1.3)[b % 5] for b in range(batches)]
    took = [(0.3 + k * 0.0003) * f for k, f in zip(tokens, noise)]  # seconds each batch took
    now = timezone.now()
    job = make_extraction("extracting", started_at=now, heartbeat_at=now, progress_at=now, queued_at=now,
                          worker="host:1", attempt=1, samples_processed=0, total_samples=16 * batches,
                          tokens_processed=0, total_tokens=sum(tokens))
    site.start_web()
    page = page_on_held_clock(site, staff_user, "/extractions/")
    eta = page.locator(f"#extraction-{job.pk} [data-eta]")
    expect(eta).to_have_text("—")
    payload = job.event_payload()

    def event(b: int) -> None:
        """Batch b (0-based) is written: the progress event the worker publishes."""
        done = {"samples_processed": 16 * (b + 1), "tokens_processed": sum(tokens[: b + 1])}
        deliver(page, 1_000_000 + b, job.topic, "extraction.progress", {**payload, **done})

    shown, jumps = [], []
    for b in range(batches - 1):
        page.clock.run_for(round(took[b] * 1000))
        before = seconds_in(eta.inner_text())
        event(b)
        after = seconds_in(eta.inner_text())
        if shown and b != batches // 2 + 1:  # (the event after the pause below may rise more)
            jumps.append((b, before, after))
        shown.append((b, after, sum(took[b + 1 :])))
        if b == batches // 2:
            # No event for 3 s (a long batch): the time left counts down meanwhile.
            page.clock.run_for(3000)
            assert after - 4 <= seconds_in(eta.inner_text()) <= after - 2, eta.inner_text()
    # Each event moves the time left by at most a third (or 3 s), whatever the batch took.
    assert [j for j in jumps[3:] if abs(j[2] - j[1]) > max(3, j[1] / 3)] == [], jumps
    # And what it shows stays near the truth from the first tenth of the run on.
    for b, left, truth in shown[batches // 10 : -5]:
        assert truth * 0.6 - 2 <= left <= truth * 1.5 + 2, (b, left, truth)
    assert shown[-1][1] <= 3


def test_the_time_left_the_server_drew_counts_down_and_a_redraw_does_not_put_it_back(site, staff_user,
                                                                                    make_extraction):
    """A card drawn 40 s into a run says 60 s left; 5 s later, with no event, 55 s; the card drawn
    again by the server (which still knows only the last progress) keeps counting down."""
    now = timezone.now()
    job = make_extraction("extracting", started_at=now - timedelta(seconds=40), heartbeat_at=now, progress_at=now,
                          queued_at=now, worker="host:1", attempt=1, samples_processed=40, total_samples=100,
                          tokens_processed=4000, total_tokens=10000)
    site.start_web()
    page = site.page(staff_user)
    page.clock.install()
    page.goto(site.url("/extractions/"))
    eta = page.locator(f"#extraction-{job.pk} [data-eta]")
    expect(eta).to_have_text(re.compile(r"^\d+ s$"))
    first = seconds_in(eta.inner_text())
    assert 55 <= first <= 60  # 60 s as of the last progress, drawn a moment after it
    page.clock.run_for(5000)
    assert first - 6 <= seconds_in(eta.inner_text()) <= first - 4
    with page.expect_response(lambda r: r.url.endswith(f"/extractions/{job.pk}/card/")):
        page.evaluate(f"document.getElementById('extraction-{job.pk}').dispatchEvent(new CustomEvent('jobsite-refresh'))")
    page.wait_for_timeout(100)  # the swap, well short of the next second's tick
    assert first - 6 <= seconds_in(eta.inner_text()) <= first - 4
    page.clock.run_for(2000)
    assert first - 8 <= seconds_in(eta.inner_text()) <= first - 6


def test_an_automatic_retrys_wait_counts_down_on_the_card(site, staff_user, make_extraction):
    """Drawn once by the server ("in 40 s"), the wait then counts down each second by itself."""
    now = timezone.now()
    job = make_extraction("queued", queued_at=now, next_attempt_at=now + timedelta(seconds=40), attempt=1,
                          auto_retried=True, error_type="WORKER_LOST", error_message="The worker process is gone.")
    site.start_web()
    page = site.page(staff_user)
    page.clock.install()
    page.goto(site.url("/extractions/"))
    phase = page.locator(f"#extraction-{job.pk} [data-phase]")
    expect(phase).to_have_text(re.compile(r"^Automatic retry in \d+ s$"))
    first = seconds_in(phase.inner_text())
    assert 34 <= first <= 40
    page.clock.run_for(5000)
    assert first - 6 <= seconds_in(phase.inner_text()) <= first - 4
    page.clock.run_for(40000)
    expect(phase).to_have_text("Automatic retry starting")


class LateCommit:
    """A job's completion written in a transaction that takes its event's seq now and commits
    only when told: meanwhile an event with a higher seq can commit first."""

    def __init__(self, job):
        import threading

        self.job, self.seq, self.go = job, None, threading.Event()
        self.taken = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.taken.wait(30)

    def _run(self):
        from django.db import connection, transaction

        from jobsite.events import publish

        try:
            with transaction.atomic():
                Extraction.objects.filter(pk=self.job.pk).update(status="completed", finished_at=timezone.now(),
                                                                 samples_processed=self.job.total_samples)
                self.job.refresh_from_db()
                self.seq = publish(self.job.topic, "extraction.completed", self.job.event_payload()).seq
                self.taken.set()
                assert self.go.wait(30)
        finally:
            connection.close()

    def commit(self):
        self.go.set()
        self.thread.join(30)


def test_an_event_that_commits_after_a_later_one_still_reaches_the_page(site, staff_user, make_extraction):
    """Two transactions: the completion of one job takes seq N, another job's progress takes N + 1
    and commits first. The page, which already saw N + 1, still shows the completion, and so does a
    page drawn between the two commits, without waiting for the poll that covers a silent socket."""
    from jobsite.events import publish

    now = timezone.now()
    running = dict(started_at=now, heartbeat_at=now, progress_at=now, queued_at=now, worker="host:1", attempt=1,
                   samples_processed=10, total_samples=100)
    first, second, busy = (make_extraction("extracting", **running) for _ in range(3))
    site.start_web(JOBSITE_POLL_FALLBACK_S="600", JOBSITE_STALL_AFTER_S="600")
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")

    late = LateCommit(first)
    later = publish(busy.topic, "extraction.progress", busy.event_payload()).seq
    assert later > late.seq
    page.wait_for_function("(seq) => jobsiteLive.lastSeq >= seq", arg=later)
    late.commit()
    expect(page.locator(f"#extraction-{first.pk} [data-status-label]")).to_have_text("completed", timeout=15_000)

    # A page drawn while the completion is not yet committed shows the job running, and then completed.
    late = LateCommit(second)
    publish(busy.topic, "extraction.progress", busy.event_payload())
    page.reload()
    expect(page.locator(f"#extraction-{second.pk} [data-status-label]")).to_have_text("extracting")
    late.commit()
    expect(page.locator(f"#extraction-{second.pk} [data-status-label]")).to_have_text("completed", timeout=15_000)


def test_when_the_last_worker_dies_the_card_drops_its_rate_and_the_page_says_no_worker_runs(site, staff_user,
                                                                                            make_extraction):
    """Every worker SIGKILLed while the page is open: once the card is stalled it shows no rate or
    time left (nothing moves) and, without a reload, the page says that no worker runs at all."""
    from jobsite.health import workers_missing

    now = timezone.now()
    job = make_extraction("extracting", started_at=now - timedelta(seconds=10), heartbeat_at=now, progress_at=now,
                          queued_at=now, worker="elsewhere:1", attempt=1, samples_processed=40, total_samples=100,
                          tokens_processed=4000, total_tokens=10000)
    worker = site.start_worker(JOBSITE_STALL_AFTER_S=600)
    wait_for(lambda: not workers_missing(), message="the worker cluster to be up")
    site.start_web(JOBSITE_STALL_AFTER_S=15)
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    card = page.locator(f"#extraction-{job.pk}")
    expect(card.locator("[data-rate]")).to_have_text("400")
    expect(page.locator("[data-no-worker]")).to_have_count(0)

    worker.kill()
    wait_for(workers_missing, timeout=30, message="the cluster to be gone")
    expect(card.locator("[data-stalled-notice]")).to_be_visible(timeout=30_000)
    expect(card.locator("[data-rate]")).to_have_text("—")
    expect(card.locator("[data-eta]")).to_have_text("—")
    expect(page.locator("[data-no-worker]")).to_contain_text("No worker is running")
    screenshot(page, "extractions-no-worker-live")


def test_a_narrow_window_keeps_the_pages_to_its_width(site, staff_user, make_extraction):
    """At 420 px the page does not scroll sideways: the top bar wraps, wide tables scroll in their panel."""
    for status in ("completed", "cancelled", "failed"):
        make_extraction(status)
    site.start_web()
    page = site.page(staff_user)
    page.set_viewport_size({"width": 420, "height": 900})
    for path in ("/extractions/", "/training/"):
        page.goto(site.url(path))
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 420, path
        bar = page.locator(".topbar").bounding_box()
        name = page.locator(".topbar .username").bounding_box()
        assert name["x"] + name["width"] <= bar["x"] + bar["width"] and name["y"] + name["height"] <= bar["y"] + bar["height"]
    screenshot(page, "14-narrow-window")


def test_a_model_and_a_dataset_registered_from_the_page_start_an_extraction(site, staff_user, settings,
                                                                            tiny_model_dir):
    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
    write_dataset(settings, "notes.jsonl", [json.dumps({"text": text}) for text in TEXTS[:5]])
    site.start_web()
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    dataset_form = page.locator("[data-register=dataset]")

    dataset_form.locator("#id_dataset-path").fill("datasets/notes.csv")
    dataset_form.get_by_role("button", name="Register dataset").click()
    expect(page.locator("[data-register=dataset] .field-error")).to_contain_text("datasets/notes.csv does not exist")
    # The form is far down the page: the refused field is scrolled to and has the focus.
    expect(dataset_form.locator("#id_dataset-path")).to_be_focused()
    expect(dataset_form.locator(".field-error")).to_be_in_viewport()
    screenshot(page, "24-register-refused")

    page.locator("#id_model-path").fill(str(tiny_model_dir))
    page.get_by_role("button", name="Register model").click()
    expect(page.locator(".message-success")).to_have_text(
        "Model tiny-gpt2 is registered: GPT2LMHeadModel, 3 layers, hidden size 32.")
    page.locator("#id_dataset-path").fill("datasets/notes.jsonl")
    page.get_by_role("button", name="Register dataset").click()
    expect(page.locator(".message-success")).to_have_text("Dataset notes is registered: 5 samples.")
    expect(page.locator("#datasets")).to_contain_text("notes")
    screenshot(page, "25-registered")

    page.get_by_role("button", name="Start extraction").click()
    expect(page.locator(".message-success")).to_contain_text("is queued.")
    job = Extraction.objects.get()
    assert (job.model.name, job.dataset.name, job.total_samples) == ("tiny-gpt2", "notes", 5)
    # The answer scrolls to the new card, whose header shows below the sticky message.
    header = page.locator(f"#extraction-{job.pk} .job-head").first
    expect(header).to_be_in_viewport()
    page.wait_for_timeout(300)
    message = page.locator(".messages").bounding_box()
    assert header.bounding_box()["y"] >= message["y"] + message["height"], (header.bounding_box(), message)


def test_counts_read_the_same_drawn_and_updated_live(site, staff_user, make_extraction):
    """12,480 of 20,000 whether the server drew it or a progress event wrote it in place."""
    from jobsite.events import publish

    now = timezone.now()
    job = make_extraction("extracting", started_at=now, heartbeat_at=now, progress_at=now, queued_at=now,
                          worker="host:1", attempt=1, samples_processed=1500, total_samples=20000,
                          tokens_processed=96000, total_tokens=1_280_000)
    site.start_web()
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    card = page.locator(f"#extraction-{job.pk}")
    expect(card.locator("[data-field=samples_processed]")).to_have_text("1,500")
    expect(card.locator("[data-field=total_samples]")).to_have_text("20,000")
    expect(page.locator(f"#row-{job.pk}")).to_contain_text("1,500/20,000")
    expect(page.locator("[data-live-status]")).to_have_text("live")

    job.samples_processed, job.tokens_processed, job.heartbeat_at = 12480, 798_720, timezone.now()
    job.save()
    publish(job.topic, "extraction.progress", job.event_payload())
    expect(card.locator("[data-field=samples_processed]")).to_have_text("12,480")
    expect(card.locator("[data-field=total_samples]")).to_have_text("20,000")
    expect(card.locator("[data-percent]")).to_have_text("62.4")
    expect(page.locator(f"#row-{job.pk}")).to_contain_text("12,480/20,000")  # the history row follows


def test_a_region_redraw_older_than_a_card_it_replaces_draws_that_card_again(site, staff_user, make_extraction):
    """A region rendered before an event can answer after the card drawn since: the older card
    it brings is drawn again at once instead of staying until the next event."""
    now = timezone.now()
    job = make_extraction("extracting", started_at=now, heartbeat_at=now, progress_at=now, queued_at=now,
                          worker="host:1", attempt=1, samples_processed=10, total_samples=100)
    site.start_web()
    page = site.page(staff_user)
    cards = []
    page.on("request", lambda r: cards.append(r.url) if r.url.endswith(f"/extractions/{job.pk}/card/") else None)
    page.goto(site.url("/extractions/"))
    expect(page.locator("[data-live-status]")).to_have_text("live")
    # The card on the page shows a later event than any the region's answer can know of.
    page.evaluate(f"document.getElementById('extraction-{job.pk}').dataset.seq = '999999'")
    page.evaluate("document.getElementById('active').dispatchEvent(new CustomEvent('jobsite-refresh'))")
    for _ in range(8):  # at once: not at the next sweep of dirty parts, seconds later
        if cards:
            break
        page.wait_for_timeout(125)
    assert cards, "the older card stayed"
    assert page.evaluate("jobsiteLive.staleRedraws") == 1
    expect(page.locator(f"#extraction-{job.pk}")).not_to_have_attribute("data-seq", "999999")

    # A region that is not older leaves its cards alone.
    page.evaluate("document.getElementById('active').dispatchEvent(new CustomEvent('jobsite-refresh'))")
    page.wait_for_timeout(1500)
    assert len(cards) == 1 and page.evaluate("jobsiteLive.staleRedraws") == 1


def test_with_the_server_unreachable_the_page_says_so_instead_of_calling_a_job_stalled(site, staff_user,
                                                                                       make_extraction):
    """No socket and no answer to a poll: a job's silence says nothing of its worker then. The
    page says the server cannot be reached, and calls the job stalled only once it can tell."""
    now = timezone.now()
    job = make_extraction("extracting", started_at=now, heartbeat_at=now, progress_at=now, worker="host:1",
                          attempt=1, samples_processed=4, total_samples=100)
    daphne = site.start_web(JOBSITE_STALL_AFTER_S=3, JOBSITE_POLL_FALLBACK_S=1)
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    card = page.locator(f"#extraction-{job.pk}")
    expect(page.locator("[data-live-status]")).to_have_text("live")
    banner = page.locator("[data-offline]")
    expect(banner).to_be_hidden()

    daphne.kill()
    expect(banner).to_be_visible(timeout=15_000)
    expect(banner).to_contain_text("The server cannot be reached.")
    expect(page.locator("[data-live-status]")).to_have_text("reconnecting…")
    page.wait_for_timeout(4000)  # past the stall limit, without a heartbeat seen
    assert page.evaluate(f"document.querySelector('#extraction-{job.pk} [data-stalled-notice]').hidden") is True
    screenshot(page, "27-server-unreachable")

    site.start_web(port=site.port)
    expect(banner).to_be_hidden(timeout=30_000)
    # Back in touch: the row's heartbeat is old now, and the job is called stalled.
    expect(card.locator("[data-stalled-notice]")).to_be_visible(timeout=15_000)
