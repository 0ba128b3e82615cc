from jobsite.models import Event


def events_after(seq: int, *, topic: str = "", limit: int = 500) -> list[dict]:
    events = Event.objects.filter(seq__gt=seq)
    if topic:
        events = events.filter(topic__startswith=topic)
    return [event.as_message() for event in events.order_by("seq")[:limit]]


def last_event_seq() -> int:
    return Event.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
