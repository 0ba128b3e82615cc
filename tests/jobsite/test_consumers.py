import asyncio
import json

import pytest
import websockets
from channels.testing import WebsocketCommunicator
from django.test import Client

from jobsite.consumers import EventConsumer
from jobsite.events import publish


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


async def receive(ws, count: int, timeout: float = 10) -> list[dict]:
    messages = []
    while len(messages) < count:
        messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return messages


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_client_replays_events_after_its_seq_then_receives_live_ones(start_daphne, staff_user):
    first = publish("extraction.7", "extraction.progress", {"samples_processed": 1})
    second = publish("extraction.7", "extraction.progress", {"samples_processed": 2})
    publish("training.1", "training.generating", {})
    third = publish("extraction.7", "extraction.completed", {"samples_processed": 3})
    _, port = start_daphne()
    cookie = session_cookie(staff_user)

    async def scenario():
        url = f"ws://127.0.0.1:{port}/ws/events/?after={first.seq}&topic=extraction."
        headers = {"Cookie": cookie}
        async with websockets.connect(url, additional_headers=headers, origin=f"http://127.0.0.1:{port}") as ws:
            replayed = await receive(ws, 2)
            live_event = await asyncio.to_thread(publish, "extraction.7", "extraction.cancelled", {"samples_processed": 3})
            live = await receive(ws, 1)
            return replayed, live, live_event

    replayed, live, live_event = asyncio.run(scenario())
    assert [m["seq"] for m in replayed] == [second.seq, third.seq]
    assert [m["type"] for m in replayed] == ["extraction.progress", "extraction.completed"]
    assert live[0]["seq"] == live_event.seq and live[0]["type"] == "extraction.cancelled"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_anonymous_websocket_is_refused(start_daphne):
    _, port = start_daphne()

    async def scenario():
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/events/", origin=f"http://127.0.0.1:{port}") as ws:
            await ws.recv()

    with pytest.raises((websockets.exceptions.InvalidStatus, websockets.exceptions.ConnectionClosed)):
        asyncio.run(scenario())


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_websocket_from_a_foreign_origin_is_refused(start_daphne, staff_user):
    _, port = start_daphne()
    cookie = session_cookie(staff_user)

    async def scenario():
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/events/", additional_headers={"Cookie": cookie},
                                      origin="http://evil.example") as ws:
            await ws.recv()

    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(scenario())


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_with_redis_down_the_socket_still_delivers_every_event_from_the_table(start_daphne, staff_user):
    """REDIS_URL points at a port where nothing listens: live pushes fail, the tail delivers."""
    before = publish("extraction.9", "extraction.progress", {"samples_processed": 1})
    _, port = start_daphne(REDIS_URL="redis://127.0.0.1:9/0")
    cookie = session_cookie(staff_user)

    async def scenario():
        url = f"ws://127.0.0.1:{port}/ws/events/?after={before.seq - 1}"
        async with websockets.connect(url, additional_headers={"Cookie": cookie}, origin=f"http://127.0.0.1:{port}") as ws:
            replayed = await receive(ws, 1)
            events = [await asyncio.to_thread(publish, "extraction.9", "extraction.progress", {"n": i}) for i in range(3)]
            live = await receive(ws, 3)
            return replayed, live, events

    replayed, live, events = asyncio.run(scenario())
    assert replayed[0]["seq"] == before.seq
    assert [m["seq"] for m in live] == [e.seq for e in events]


async def communicator(user, query_string: bytes = b"") -> WebsocketCommunicator:
    ws = WebsocketCommunicator(EventConsumer.as_asgi(), "/ws/events/")
    ws.scope["user"] = user
    ws.scope["query_string"] = query_string
    return ws


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("frame", [{"text_data": "{"}, {"text_data": "[1]"}, {"text_data": "5"}, {"text_data": "null"},
                                   {"text_data": "\x00"}, {"text_data": "[" * 100_000},
                                   {"bytes_data": b"\x00\x01"}])
async def test_a_frame_that_is_not_a_json_object_is_ignored_and_the_socket_stays_open(staff_user, frame):
    ws = await communicator(staff_user)
    connected, _ = await ws.connect()
    assert connected
    await ws.send_to(**frame)
    await ws.send_json_to({"type": "ping"})
    assert (await ws.receive_json_from(timeout=5))["type"] == "pong"
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_query_string_that_is_not_utf8_is_refused_with_4400(staff_user):
    ws = await communicator(staff_user, b"after=\xff")
    connected, code = await ws.connect()
    assert not connected and code == 4400
    await ws.disconnect()
