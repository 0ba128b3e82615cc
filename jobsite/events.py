"""Durable events, pushed after commit.

`publish` writes the Event row inside the caller's transaction and pushes it to the
channel layer only once that transaction commits: a client never sees an event that
rolls back, and a client that was away reads it from the table later.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from jobsite.models import Event

logger = logging.getLogger(__name__)

GROUP = "jobsite.events"


def publish(topic: str, type: str, payload: dict) -> Event:
    event = Event.objects.create(topic=topic, type=type, payload=payload)
    transaction.on_commit(lambda: push(event))
    return event


def push(event: Event) -> None:
    """Best effort: the table is the truth and consumers also read it, so a push that
    fails (Redis down, or another process's in-memory layer) loses nothing."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(GROUP, {"type": "event.message", "event": event.as_message()})
    except Exception:  # noqa: BLE001 - the push is an optimisation over the table tail
        logger.warning("live push of event %s failed; consumers will read it from the table", event.seq)
