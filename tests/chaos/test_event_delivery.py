"""A WebSocket client away mid-job gets every event it missed, in order, none twice."""

import asyncio
import json
import os

import pytest
import websockets

from extraction.services import extraction_start
from jobsite.models import Event
from tests.jobsite.test_consumers import session_cookie

from .campaign import FAST

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.django_db(transaction=True)]
AWAY_S = float(os.environ.get("JOBSITE_AWAY_S", 5))  # the mechanism does not depend on it; bench uses 60


def test_client_away_mid_job_receives_every_missed_event(model_record, dataset, start_worker, start_daphne,
                                                          staff_user):
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0], hooks=["residual"], batch_size=1)
    topic = job.topic
    _, port = start_daphne(JOBSITE_PROGRESS_EVERY_S=0)
    start_worker(**{**FAST, "JOBSITE_PROGRESS_EVERY_S": 0,
                    "JOBSITE_FAILPOINTS": json.dumps({"extraction.batch": {"action": "sleep", "seconds": 0.25}})})
    cookie = session_cookie(staff_user)
    received: list[dict] = []

    async def listen(after: int, until) -> None:
        url = f"ws://127.0.0.1:{port}/ws/events/?after={after}&topic={topic}"
        async with websockets.connect(url, additional_headers={"Cookie": cookie},
                                      origin=f"http://127.0.0.1:{port}") as ws:
            while not until():
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))

    async def scenario():
        await listen(0, lambda: sum(m["type"] == "extraction.progress" for m in received) >= 3)
        away_from = received[-1]["seq"]
        await asyncio.sleep(AWAY_S)  # the job goes on; events pile up in the table
        missed = await asyncio.to_thread(lambda: Event.objects.filter(topic=topic, seq__gt=away_from).count())
        await listen(away_from, lambda: received[-1]["type"] == "extraction.completed")
        return away_from, missed

    away_from, missed_while_away = asyncio.run(scenario())
    expected = list(Event.objects.filter(topic=topic).order_by("seq").values_list("seq", flat=True))
    seqs = [m["seq"] for m in received]
    assert missed_while_away > 5, "the client was away while the job made progress"
    assert seqs == expected, "every event of the job, in order, none twice"
    assert received[-1]["payload"]["samples_processed"] == dataset.num_samples
