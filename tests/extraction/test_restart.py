"""Restart ("taking longer than expected" → Retry): cancel, wait for the worker to stop, retry.

One service, extraction_restart, does it for every entry point; the API's cancel waits the
same way through extraction_cancel_and_wait.
"""

import threading
import time
from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.utils import timezone

from extraction import services
from extraction.models import Extraction
from jobsite.lifecycle import transition_cancelled


def running(make_extraction, **fields):
    """An extraction whose worker is alive: it heartbeats, so a cancel waits for it to stop."""
    now = timezone.now()
    return make_extraction("extracting", worker="w:1", worker_host="elsewhere", worker_pid=1, started_at=now,
                           heartbeat_at=now, attempt=1, **fields)


@pytest.mark.django_db
def test_a_worker_that_does_not_stop_in_time_keeps_its_stop_request_and_no_retry_is_made(
        staff_client, make_extraction, monkeypatch):
    monkeypatch.setattr("extraction.services.CANCEL_WAIT_S", 0.3)
    job = running(make_extraction)
    started = time.monotonic()
    response = staff_client.post(f"/extractions/{job.pk}/restart/", {"confirmed": "1"}, follow=True)
    assert time.monotonic() - started >= 0.3, "it waited for the worker"
    messages = [str(m) for m in response.context["messages"]]
    assert messages == [f"Extraction {job.pk} is stopping but has not stopped yet; press Retry on it once it shows "
                        "cancelled."]
    job.refresh_from_db()
    assert job.status == "extracting" and job.cancel_requested
    assert Extraction.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_restart_retries_as_soon_as_the_worker_has_stopped(make_extraction, staff_user, monkeypatch):
    monkeypatch.setattr("extraction.services.CANCEL_WAIT_S", 20)
    job = running(make_extraction)

    def worker_stops_at_its_batch_boundary():
        try:
            deadline = time.monotonic() + 10
            while not Extraction.objects.get(pk=job.pk).cancel_requested and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            transition_cancelled(Extraction.objects.get(pk=job.pk))
        finally:
            connection.close()

    worker = threading.Thread(target=worker_stops_at_its_batch_boundary)
    worker.start()
    started = time.monotonic()
    retry = services.extraction_restart(extraction=job, reason="taking longer than expected", user=staff_user)
    worker.join()
    assert time.monotonic() - started < 10, "it went on once the job was cancelled, not after the whole wait"
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert (retry.original_extraction_id, retry.status, retry.retry_reason) == (
        job.pk, "queued", "taking longer than expected")


@pytest.mark.django_db
def test_a_person_who_may_cancel_but_not_retry_is_refused_before_anything_changes(
        make_extraction, django_user_model):
    from django.contrib.auth.models import Permission

    canceller = django_user_model.objects.create_user("canceller", is_staff=True)
    canceller.user_permissions.add(Permission.objects.get(codename="cancel_extraction"))
    job = make_extraction("queued", queued_at=timezone.now() - timedelta(hours=1))
    with pytest.raises(PermissionDenied, match="retry extractions"):
        services.extraction_restart(extraction=job, reason="slow", user=canceller)
    job.refresh_from_db()
    assert job.status == "queued" and Extraction.objects.count() == 1
