from datetime import timedelta

from django.utils import timezone

from jobsite.models import Event

# A transaction can take its event's seq early and commit late, after an event with a higher seq:
# the event stream waits this long for such a seq before it moves past it.
LATE_COMMIT_S = 5.0


def events_after(seq: int, *, topic: str = "", limit: int = 500) -> list[dict]:
    events = Event.objects.filter(seq__gt=seq)
    if topic:
        events = events.filter(topic__startswith=topic)
    return [event.as_message() for event in events.order_by("seq")[:limit]]


def last_event_seq() -> int:
    return Event.objects.order_by("-seq").values_list("seq", flat=True).first() or 0


def replay_from_seq() -> int:
    """Where the event stream of a page drawn now starts: before every event of the last
    LATE_COMMIT_S. An event whose transaction commits after the page read its rows, with a seq
    below one committed earlier, still reaches the page; the page skips what it already shows."""
    settled = timezone.now() - timedelta(seconds=LATE_COMMIT_S)
    return Event.objects.filter(created_at__lte=settled).order_by("-seq").values_list("seq", flat=True).first() or 0
