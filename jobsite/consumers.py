"""ws/events/?after=<seq>&topic=<prefix>: every event after `seq`, then live ones.

The table is read first (replay) and then tailed; live pushes from the channel layer
arrive sooner when Redis carries them. Both paths go through `_deliver`, which sends each
seq once. The cursor only moves past a missing seq once that gap
has lasted GAP_WAIT_S: a transaction that took its seq early but commits late is still
delivered, and a rolled-back one does not block the stream for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from jobsite.events import GROUP
from jobsite.selectors import LATE_COMMIT_S as GAP_WAIT_S
from jobsite.selectors import events_after

logger = logging.getLogger(__name__)


class EventConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        try:
            self.cursor = max(0, int(query.get("after", ["0"])[0] or 0))
        except ValueError:
            await self.close(code=4400)
            return
        self.topic = query.get("topic", [""])[0]
        self.seen: set[int] = set()
        self.gaps: dict[int, float] = {}
        self.joined = await self._join()
        await self.accept()
        self.tail = asyncio.create_task(self._tail())

    async def disconnect(self, code):
        tail = getattr(self, "tail", None)
        if tail:
            tail.cancel()
        if getattr(self, "joined", False):
            try:
                await self.channel_layer.group_discard(GROUP, self.channel_name)
            except Exception:  # noqa: BLE001 - the layer is down; nothing to leave
                pass

    async def _join(self) -> bool:
        """Live pushes are a shortcut; with the layer down (Redis gone) the table tail
        alone delivers every event, a little later."""
        try:
            await asyncio.wait_for(self.channel_layer.group_add(GROUP, self.channel_name), timeout=2)
        except Exception:  # noqa: BLE001 - any layer failure falls back to the tail
            logger.warning("channel layer unavailable; %s follows the event table only", self.channel_name)
            return False
        return True

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        """A frame that is not a JSON object is ignored: the base class would raise, and an
        exception here closes the socket (and its live stream) with 1011."""
        try:
            content = await self.decode_json(text_data) if text_data else None
        except (ValueError, RecursionError):
            return
        if isinstance(content, dict):
            await self.receive_json(content, **kwargs)

    async def receive_json(self, content, **kwargs):
        # The only message a client sends is a ping; answering proves the socket is alive.
        if content.get("type") == "ping":
            await self.send_json({"type": "pong", "seq": self.cursor})

    async def event_message(self, message):
        await self._deliver(message["event"])

    async def _tail(self):
        fetch = database_sync_to_async(events_after)
        while True:
            # Unfiltered on purpose: every seq must be seen for the gap logic to hold.
            for event in await fetch(self.cursor):
                await self._deliver(event)
            self._advance(force=False)
            await asyncio.sleep(settings.JOBSITE_EVENT_POLL_S)

    async def _deliver(self, event: dict):
        seq = event["seq"]
        if seq <= self.cursor or seq in self.seen:
            return
        self.seen.add(seq)
        if not self.topic or event["topic"].startswith(self.topic):
            await self.send_json(event)

    def _advance(self, *, force: bool) -> None:
        """Move the cursor over contiguous delivered seqs; skip a gap once it is old."""
        now = time.monotonic()
        while self.seen:
            following = self.cursor + 1
            if following in self.seen:
                self.seen.discard(following)
                self.cursor = following
                self.gaps.pop(following, None)
                continue
            first_seen = self.gaps.setdefault(following, now)
            if force or now - first_seen >= GAP_WAIT_S:
                self.gaps.pop(following, None)
                self.cursor = min(self.seen) - 1
                continue
            break
