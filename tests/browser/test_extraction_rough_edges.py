"""Live behaviour of the extractions page and the admin's layout, in a real Chromium against daphne."""

from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.conftest import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_job_without_progress_past_the_slow_limit_loses_its_rate_and_time_left_live(site, staff_user,
                                                                                     make_extraction):
    """Drawn with a pace, then no progress: once 'Taking longer than expected' shows, the card no
    longer shows the last pace or a time left counting down to 0 s beside it."""
    now = timezone.now()
    job = make_extraction("extracting", started_at=now - timedelta(seconds=10), heartbeat_at=now, progress_at=now,
                          queued_at=now, worker="elsewhere:1", attempt=1, samples_processed=40, total_samples=100,
                          tokens_processed=4000, total_tokens=10000)
    site.start_web(JOBSITE_SLOW_AFTER_S=4, JOBSITE_STALL_AFTER_S=600)
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    card = page.locator(f"#extraction-{job.pk}")
    expect(card.locator("[data-rate]")).to_have_text("400")
    expect(card.locator("[data-eta]")).not_to_have_text("—")
    expect(card.locator("[data-slow-notice]")).to_be_visible(timeout=15_000)
    expect(card.locator("[data-rate]")).to_have_text("—")
    expect(card.locator("[data-eta]")).to_have_text("—")
    page.wait_for_timeout(1500)  # the countdown's own timer does not put a time back
    expect(card.locator("[data-eta]")).to_have_text("—")
    screenshot(page, "extractions-slow-no-rate")


def test_the_extractions_changelist_fits_a_1280_px_window(site, django_user_model, make_extraction):
    boss = django_user_model.objects.create_superuser("boss", password="pw")
    original = make_extraction("failed", error_type="WORKER_LOST", attempt=3, samples_processed=12480,
                               total_samples=20000, worker="gpu-host-17.example:123456")
    silent = timezone.now() - timedelta(seconds=3600)
    make_extraction("extracting", original_extraction=original, retry_count=1, samples_processed=1,
                    total_samples=20000, heartbeat_at=silent, started_at=silent, attempt=2,
                    worker="gpu-host-17.example:123456")
    make_extraction("completed", samples_processed=20000, total_samples=20000)
    site.start_web()
    page = site.page(boss)  # 1,280 px wide
    page.goto(site.url("/admin/extraction/extraction/"))
    expect(page.locator("#result_list")).to_be_visible()
    screenshot(page, "admin-extractions-1280")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    results = page.evaluate("(() => { const r = document.querySelector('#changelist .results');"
                            " return [r.scrollWidth, r.clientWidth]; })()")
    assert results[0] <= results[1], f"the list scrolls sideways in its box: {results}"
    screenshot(page, "admin-extractions-1280")
