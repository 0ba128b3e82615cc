import threading

import pytest
from django.db import connection

from extraction.models import Extraction
from jobsite.lifecycle import TransitionConflict, TransitionNotAllowed, transition
from jobsite.models import Event

Status = Extraction.Status
ALL_PAIRS = [(a, b) for a in Status for b in Status if a != b]
ALLOWED = [(a, b) for a, b in ALL_PAIRS if b in Extraction.TRANSITIONS[a]]
REFUSED = [(a, b) for a, b in ALL_PAIRS if b not in Extraction.TRANSITIONS[a]]


@pytest.mark.django_db
@pytest.mark.parametrize(("source", "target"), ALLOWED)
def test_allowed_transition_updates_row_and_appends_event(make_extraction, source, target):
    job = make_extraction(source)
    transition(job, target)
    job.refresh_from_db()
    assert job.status == target
    assert (job.finished_at is not None) == (target in Extraction.TERMINAL)
    event = Event.objects.filter(topic=job.topic).last()
    assert event.type == f"extraction.{target}"
    assert event.payload["status"] == target


@pytest.mark.django_db
@pytest.mark.parametrize(("source", "target"), REFUSED)
def test_refused_transition_changes_nothing_and_says_why(make_extraction, source, target):
    job = make_extraction(source)
    events_before = Event.objects.count()
    with pytest.raises(TransitionNotAllowed, match=f"is {source}; it cannot become {target}"):
        transition(job, target)
    job.refresh_from_db()
    assert job.status == source
    assert Event.objects.count() == events_before


@pytest.mark.django_db
def test_stale_copy_loses_the_compare_and_set(make_extraction):
    job = make_extraction("queued")
    stale = Extraction.objects.get(pk=job.pk)
    transition(job, Status.CANCELLED)
    with pytest.raises(TransitionConflict, match="changed to cancelled while you were changing it to loading"):
        transition(stale, Status.LOADING)
    assert Extraction.objects.get(pk=job.pk).status == Status.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_two_threads_claim_the_same_job_one_wins_one_gets_a_clear_error(make_extraction):
    job = make_extraction("queued")
    barrier = threading.Barrier(2)
    outcomes = []

    def claim(target):
        copy = Extraction.objects.get(pk=job.pk)
        barrier.wait()
        try:
            transition(copy, target)
            outcomes.append(("won", target))
        except TransitionConflict as exc:
            outcomes.append(("lost", str(exc)))
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(t,)) for t in (Status.LOADING, Status.CANCELLED)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(kind for kind, _ in outcomes) == ["lost", "won"]
    winner = next(value for kind, value in outcomes if kind == "won")
    loser_message = next(value for kind, value in outcomes if kind == "lost")
    assert Extraction.objects.get(pk=job.pk).status == winner
    assert f"changed to {winner}" in loser_message
    # Exactly one event: the loser wrote nothing.
    assert list(Event.objects.filter(topic=job.topic).values_list("type", flat=True)) == [f"extraction.{winner}"]


@pytest.mark.django_db
def test_events_are_pushed_only_after_commit(make_extraction, django_capture_on_commit_callbacks, monkeypatch):
    pushed = []
    monkeypatch.setattr("jobsite.events.push", pushed.append)
    job = make_extraction("queued")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        transition(job, Status.LOADING)
    assert pushed == []
    for callback in callbacks:
        callback()
    assert [event.type for event in pushed] == ["extraction.loading"]


RESUME_REFUSALS = [
    ("cancelled", {}, "This extraction was cancelled and no worker holds it; Resume is for a stalled extraction. "
                      "Retry starts a new extraction."),
    ("completed", {}, "This extraction is completed; there is nothing to resume."),
    ("failed", {"error_type": "OOM"},
     "This extraction has failed and no worker holds it; Resume is for a stalled extraction. "
     "Retry with the suggested (half) batch size, or turn on auto retry on OOM."),
    ("queued", {}, "This extraction is queued and waits for a worker; only a stalled extraction can be resumed."),
    ("extracting", {"worker": "w:1"},
     "This extraction is extracting and its worker is alive; only a stalled extraction can be resumed."),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("status", "fields", "sentence"), RESUME_REFUSALS)
def test_resume_refusal_says_where_the_extraction_stands(staff_client, make_extraction, status, fields, sentence):
    from django.utils import timezone

    if status == "extracting":
        fields = {**fields, "started_at": timezone.now(), "heartbeat_at": timezone.now()}
    job = make_extraction(status, **fields)
    response = staff_client.post(f"/api/v1/models/{job.model_id}/extractions/{job.pk}/resume",
                                 content_type="application/json")
    assert response.status_code == 409
    assert response.json()["message"] == sentence
    job.refresh_from_db()
    assert job.status == status


@pytest.mark.django_db
@pytest.mark.parametrize(("status", "fields", "sentence"), [
    ("completed", {}, "This training run is completed; there is nothing to resume."),
    ("generated", {}, "This training run is waiting for review and no worker holds it; Resume is for a stalled "
                      "training run."),
    ("generating_failed", {"error_type": "CANCELLED", "error_message": "Stopped on request after 4 of 12 chunks."},
     "This training run is stopped and no worker holds it; Resume is for a stalled training run. Proceed "
     "continues where it stopped; Delete discards the run."),
    ("generating", {}, "This training run is generating and waits for a worker; only a stalled training run can be "
                       "resumed."),
    ("training", {"worker": "w:1"},
     "This training run is training and its worker is alive; only a stalled training run can be resumed."),
])
def test_resume_refusal_says_where_the_training_run_stands(staff_client, status, fields, sentence):
    from django.contrib.messages import get_messages
    from django.utils import timezone

    from training_runs.models import Corpus, TrainingRun

    corpus = Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)
    if status == "completed":
        fields = {**fields, "finished_at": timezone.now()}
    if fields.get("worker"):
        fields = {**fields, "started_at": timezone.now(), "heartbeat_at": timezone.now()}
    run = TrainingRun.objects.create(corpus=corpus, status=status, total_chunks=12, **fields)
    response = staff_client.post(f"/training/runs/{run.pk}/resume/")
    assert [str(m) for m in get_messages(response.wsgi_request)] == [sentence]
    run.refresh_from_db()
    assert run.status == status


@pytest.mark.django_db
def test_a_resumed_job_cancelled_before_it_runs_again_shows_no_earlier_error(staff_client, make_extraction, settings):
    """Resume records why (a lost worker); a cancel that follows ends the job for that reason
    instead: the API does not say 'cancelled' beside the lost worker's error and next step."""
    from datetime import timedelta

    from django.utils import timezone

    settings.JOBSITE_STALL_AFTER_S = 5
    stale = timezone.now() - timedelta(seconds=60)
    job = make_extraction("extracting", worker="w:1", started_at=stale, heartbeat_at=stale, attempt=1)
    url = f"/api/v1/models/{job.model_id}/extractions/{job.pk}"
    resumed = staff_client.post(f"{url}/resume", content_type="application/json").json()
    assert (resumed["status"], resumed["error_type"]) == ("queued", "WORKER_LOST")
    staff_client.post(f"{url}/cancel", content_type="application/json")
    answer = staff_client.get(url).json()
    assert answer["status"] == "cancelled"
    assert (answer["error_type"], answer["error_message"], answer["suggested_retry_params"]) == ("", "", {})
    assert answer["next_step"] == "" and answer["retry_available"] is True


@pytest.mark.django_db
def test_cancel_and_stop_of_a_stalled_job_take_effect_at_once(staff_client, make_extraction, settings, monkeypatch):
    """A worker that is gone cannot read a stop request: the job would say "cancelling" until some
    worker starts, and could not be deleted meanwhile."""
    from datetime import timedelta

    from django.utils import timezone

    from training_runs.models import Corpus, TrainingRun

    settings.JOBSITE_STALL_AFTER_S = 5
    monkeypatch.setattr("extraction.services.CANCEL_WAIT_S", 0.2)  # how long the answer waits for a live worker
    stale = timezone.now() - timedelta(seconds=60)
    job = make_extraction("extracting", worker="w:1", started_at=stale, heartbeat_at=stale, attempt=1)
    answer = staff_client.post(f"/api/v1/models/{job.model_id}/extractions/{job.pk}/cancel",
                               content_type="application/json").json()
    assert answer["status"] == "cancelled"
    live = make_extraction("extracting", worker="w:2", started_at=stale, heartbeat_at=timezone.now(), attempt=1)
    answer = staff_client.post(f"/api/v1/models/{live.model_id}/extractions/{live.pk}/cancel",
                               content_type="application/json").json()
    assert answer["status"] == "cancelling", "a live worker stops the job itself, after its batch"

    corpus = Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)
    run = TrainingRun.objects.create(corpus=corpus, status="training", worker="w:3", started_at=stale,
                                     heartbeat_at=stale, attempt=1, texts_total=10, texts_embedded=4)
    answer = staff_client.post(f"/api/v1/training/runs/{run.pk}/stop", content_type="application/json").json()
    assert (answer["status"], answer["error_type"]) == ("training_failed", "CANCELLED")
    assert staff_client.delete(f"/api/v1/training/runs/{run.pk}").status_code in (200, 204)


@pytest.mark.django_db
def test_a_lost_worker_that_ended_the_job_does_not_promise_another_automatic_retry(staff_client, make_extraction):
    waiting = make_extraction("queued", error_type="WORKER_LOST", error_message="The worker went silent.", attempt=1)
    ended = make_extraction("failed", error_type="WORKER_LOST", error_message="The worker went silent.", attempt=3)
    url = f"/api/v1/models/{ended.model_id}/extractions"
    assert staff_client.get(f"{url}/{waiting.pk}").json()["next_step"].startswith("Retried automatically")
    assert staff_client.get(f"{url}/{ended.pk}").json()["next_step"] == (
        "Its automatic attempts are used up (attempt 3); Retry starts a new extraction, which keeps the samples "
        "already done.")
