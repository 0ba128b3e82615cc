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
