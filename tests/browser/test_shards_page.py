"""A sharded extraction's card in a real browser: each shard's heartbeat, and a silent shard
called stalled while another shard's progress keeps coming."""

from __future__ import annotations

import time

import pytest
from django.db.models import F
from django.utils import timezone
from playwright.sync_api import expect

from extraction.models import ExtractionShard
from jobsite.events import publish
from tests.extraction.test_shards_entry_points import held, planned

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_silent_shard_is_stalled_on_the_card_however_busy_the_other_is(site, staff_user, model_record, dataset):
    site.start_web(JOBSITE_STALL_AFTER_S=4)
    job = planned(model_record, dataset)
    silent, busy = job.shard_set.order_by("index")
    held(silent, "gone-host:1")
    held(busy, "live-host:2")
    page = site.page(staff_user)
    page.goto(site.url("/extractions/"))
    card = page.locator(f"#extraction-{job.pk}")
    silent_row, busy_row = card.locator('[data-shard="0"]'), card.locator('[data-shard="1"]')
    expect(silent_row.locator("[data-shard-age]")).to_be_visible()
    expect(silent_row.locator("[data-shard-stalled]")).to_be_hidden()

    # The busy shard beats and publishes its progress twice a second; the silent one never again.
    ages = []
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        ExtractionShard.objects.filter(pk=busy.pk).update(heartbeat_at=timezone.now(),
                                                          samples_processed=F("samples_processed") + 1)
        publish(job.topic, "extraction_shard.progress", ExtractionShard.objects.get(pk=busy.pk).event_payload())
        ages.append(int(silent_row.locator("[data-shard-age]").text_content()))
        time.sleep(0.5)
    assert ages[-1] >= ages[0] + 5, f"the silent shard's heartbeat age counts up on the page: {ages}"

    # The card is as alive as its most silent shard: stalled, and the row says which host.
    expect(card.locator("[data-stalled-notice]")).to_be_visible()
    expect(silent_row.locator("[data-shard-stalled]")).to_be_visible()
    expect(busy_row.locator("[data-shard-stalled]")).to_be_hidden()
    assert int(busy_row.locator("[data-shard-age]").text_content()) <= 2
    assert int(busy_row.locator('[data-shard-field="samples_processed"]').text_content()) >= 10
