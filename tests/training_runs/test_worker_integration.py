"""A real qcluster worker SIGKILLed mid-generation, retried automatically, then training to the end."""

import json
import signal

import pytest

from jobsite.models import Event
from tests.conftest import wait_for
from training_runs.generator import LocalGenerator
from training_runs.models import TrainingRun
from training_runs.services import training_run_generate, training_run_review, training_run_train

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FAST = dict(JOBSITE_HEARTBEAT_S=0.3, JOBSITE_STALL_AFTER_S=4, JOBSITE_WATCHDOG_EVERY_S=0.5, JOBSITE_QUEUE_POLL_S=0.2,
            JOBSITE_RETRY_BASE_S=0.5)


def run_of(pk):
    return TrainingRun.objects.get(pk=pk)


def test_worker_killed_mid_generation_is_retried_automatically_and_completes_every_chunk_once(
    small_corpus, encoder, settings, start_worker
):
    worker_env = dict(FAST, JOBSITE_ENCODER_PATH=settings.JOBSITE_ENCODER_PATH, JOBSITE_MIN_APPROVED_PAIRS=4)
    slow = json.dumps({"training.generate": {"action": "sleep", "seconds": 0.05}})
    run = training_run_generate(corpus=small_corpus)
    first = start_worker(JOBSITE_FAILPOINTS=slow, **worker_env)
    wait_for(lambda: run_of(run.pk).processed_chunks >= 8, timeout=90, message=f"generation\n{first.output()}")
    first.kill(signal.SIGKILL)
    killed_at = run_of(run.pk)
    assert killed_at.status == "generating" and 8 <= killed_at.processed_chunks < killed_at.total_chunks

    second = start_worker(**worker_env)
    # The watchdog of the new worker finds the dead one; the run is retried without a Proceed.
    wait_for(lambda: run_of(run.pk).status == "generated", timeout=90,
             message=f"the automatic retry to finish the generation\n{second.output()}")
    failed = Event.objects.filter(topic=run.topic, type="training.generating_failed").get()
    assert failed.payload["error_type"] == "WORKER_LOST"
    assert failed.payload["processed_chunks"] == killed_at.processed_chunks  # the counts survive the crash
    assert Event.objects.filter(topic=run.topic, type="training.retry_started").get().payload["automatic"] is True
    generated = run_of(run.pk)
    assert generated.auto_retried and generated.attempt == 2
    assert generated.processed_chunks == generated.total_chunks == small_corpus.chunks.count()
    chunks = list(small_corpus.chunks.order_by("index"))
    uninterrupted = LocalGenerator(queries_per_chunk=2).generate([chunk.text for chunk in chunks])
    for chunk, queries in zip(chunks, uninterrupted, strict=True):
        stored = sorted(generated.pairs.filter(chunk=chunk).values_list("query", flat=True))
        assert stored == sorted(queries), f"chunk {chunk.index} processed more than once"

    training_run_review(run=generated, decision="approved")
    training_run_train(run=run_of(run.pk), epochs=2)
    wait_for(lambda: run_of(run.pk).status == "completed", timeout=120, message=f"training\n{second.output()}")
    assert run_of(run.pk).metrics["after"]["recall@10"] > 0
