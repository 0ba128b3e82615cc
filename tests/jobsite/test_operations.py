from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from tests.conftest import wait_for


@pytest.mark.django_db
def test_health_is_503_naming_the_workers_when_none_runs(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["workers"]
    assert body["parts"]["workers"]["detail"] == "start one with manage.py qcluster"
    assert body["parts"]["database"]["ok"] and body["parts"]["broker"]["queue_depth"] == 0


@pytest.mark.django_db
def test_health_names_stalled_jobs(client, make_extraction, settings):
    settings.JOBSITE_STALL_AFTER_S = 5
    stale = timezone.now() - timedelta(seconds=120)
    job = make_extraction("extracting", heartbeat_at=stale, started_at=stale, worker="gone:1")
    body = client.get("/api/v1/health").json()
    assert "stalled_jobs" in body["failing"] and job.topic in body["parts"]["stalled_jobs"]["detail"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_health_is_200_with_a_live_worker(client, start_worker):
    start_worker()
    response = wait_for(lambda: (r := client.get("/api/v1/health")).status_code == 200 and r, timeout=60,
                        message="the cluster to report itself")
    assert response.json()["parts"]["workers"]["workers"] >= 1


@pytest.mark.django_db
def test_metrics_count_jobs_by_kind_status_and_error(client, make_extraction):
    make_extraction("failed", error_type="OOM")
    make_extraction("completed")
    make_extraction("queued")
    text = client.get("/metrics").content.decode()
    assert 'jobsite_jobs{kind="extraction",status="failed"} 1.0' in text
    assert 'jobsite_jobs{kind="extraction",status="queued"} 1.0' in text
    assert 'jobsite_job_failures{error_type="OOM",kind="extraction"} 1.0' in text
    assert 'jobsite_jobs{kind="training",status="generating"} 0.0' in text
    assert "jobsite_oldest_heartbeat_age_seconds" in text


@pytest.mark.django_db
def test_metrics_count_a_retry_once(client, model_record, dataset, django_capture_on_commit_callbacks):
    """A person's retry is told on the old job's topic and on the new one's; an automatic
    retry on its own job's only: each is one retry."""
    from extraction.services import extraction_retry, extraction_start
    from jobsite.services import job_requeue

    with django_capture_on_commit_callbacks():
        job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=4)
    job.status, job.finished_at = "failed", timezone.now()
    job.save()
    with django_capture_on_commit_callbacks():
        retry = extraction_retry(extraction=job, batch_size=2, reason="smaller batches")
    assert 'jobsite_events_total{kind="extraction",type="retry_started"} 1.0' in client.get("/metrics").content.decode()
    retry.status, retry.finished_at = "failed", timezone.now()
    retry.save()
    with django_capture_on_commit_callbacks():
        job_requeue(retry, automatic=True, reason="worker lost")
    assert 'jobsite_events_total{kind="extraction",type="retry_started"} 2.0' in client.get("/metrics").content.decode()


@pytest.mark.django_db
def test_jobs_recover_prints_what_it_changed(make_extraction, settings, capsys):
    settings.JOBSITE_STALL_AFTER_S = 5
    call_command("jobs", "recover")
    assert "Nothing to recover: 0 running job(s)" in capsys.readouterr().out
    stale = timezone.now() - timedelta(seconds=120)
    job = make_extraction("extracting", heartbeat_at=stale, started_at=stale, worker="gone:1", attempt=1)
    call_command("jobs", "recover")
    assert f"{job.topic}: WORKER_LOST" in capsys.readouterr().out


@pytest.mark.django_db
def test_health_names_the_channel_layer_when_redis_is_down(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"
    body = client.get("/api/v1/health").json()
    assert "channel_layer" in body["failing"]
    assert "ConnectionError" in body["parts"]["channel_layer"]["detail"] or "Error" in body["parts"]["channel_layer"]["detail"]
