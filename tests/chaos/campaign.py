"""Kill campaigns: real workers SIGKILLed at random points of each workload.

Used by tests/chaos (a few kills, in CI) and bench/chaos.py (long campaigns). `start_worker`
is a callable that starts a real `qcluster` with extra environment and returns a Service.
"""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass, field

from tests.conftest import wait_for

FAST = dict(JOBSITE_HEARTBEAT_S=0.3, JOBSITE_STALL_AFTER_S=4, JOBSITE_WATCHDOG_EVERY_S=0.5, JOBSITE_RETRY_BASE_S=0.2,
            JOBSITE_RETRY_MAX_S=1, JOBSITE_QUEUE_POLL_S=0.2, JOBSITE_MAX_ATTEMPTS=1000)


@dataclass
class Campaign:
    kills: int = 0
    kill_points: list[str] = field(default_factory=list)


def _kill_after_claim(start_worker, env: dict, claimed, describe, rng: random.Random, campaign: Campaign,
                      max_delay_s: float) -> bool:
    """Start a worker, let it claim the job, kill it at a random moment; False if the job
    finished before the kill."""
    worker = start_worker(**env)
    wait_for(claimed, timeout=90, message=f"a claim\n{worker.output()[-3000:]}")
    time.sleep(rng.uniform(0, max_delay_s))
    point = describe()
    worker.kill(signal.SIGKILL)
    if point is None:
        return False
    campaign.kills += 1
    campaign.kill_points.append(point)
    return True


def extraction_campaign(job_pk: int, start_worker, kills: int, rng: random.Random, *, batch_sleep_s: float = 0.15,
                        env: dict | None = None) -> Campaign:
    """Kill the worker `kills` times; the machinery resumes it by itself each time."""
    from extraction.models import Extraction

    env = {**FAST, **(env or {}),
           "JOBSITE_FAILPOINTS": json.dumps({"extraction.batch": {"action": "sleep", "seconds": batch_sleep_s}})}
    campaign = Campaign()
    for attempt in range(1, kills + 1):
        def claimed(attempt=attempt):
            job = Extraction.objects.get(pk=job_pk)
            return job.status == "completed" or (job.attempt >= attempt and job.status in Extraction.RUNNING)

        def describe():
            job = Extraction.objects.get(pk=job_pk)
            return None if job.status == "completed" else f"{job.status} {job.samples_processed}/{job.total_samples}"

        if not _kill_after_claim(start_worker, env, claimed, describe, rng, campaign, max_delay_s=2.0):
            break
    start_worker(**{**FAST, **(env or {})})
    wait_for(lambda: Extraction.objects.get(pk=job_pk).status == "completed", timeout=180,
             message="the extraction to complete after the campaign")
    return campaign


def generation_campaign(run_pk: int, start_worker, kills: int, rng: random.Random, *, env: dict) -> Campaign:
    """Kill the worker mid-generation; the next worker's watchdog finds it lost and the run is
    retried automatically, from the chunks it has not done."""
    from training_runs.models import TrainingRun

    slow = {**FAST, **env, "JOBSITE_FAILPOINTS": json.dumps({"training.generate": {"action": "sleep", "seconds": 0.05}})}
    campaign = Campaign()
    for attempt in range(1, kills + 1):
        def claimed(attempt=attempt):
            run = TrainingRun.objects.get(pk=run_pk)
            return run.status != "generating" or (run.attempt >= attempt and run.worker != "")

        def describe():
            run = TrainingRun.objects.get(pk=run_pk)
            return None if run.status != "generating" else f"generating {run.processed_chunks}/{run.total_chunks}"

        if not _kill_after_claim(start_worker, slow, claimed, describe, rng, campaign, max_delay_s=1.5):
            break
    start_worker(**{**FAST, **env})
    wait_for(lambda: TrainingRun.objects.get(pk=run_pk).status == "generated", timeout=180,
             message="generation to finish after the campaign")
    return campaign


def training_campaign(run_pk: int, start_worker, kills: int, rng: random.Random, *, env: dict) -> Campaign:
    """Kill the worker mid-training; the automatic retry resumes from the last epoch checkpoint."""
    from training_runs.models import TrainingRun

    campaign = Campaign()
    for attempt in range(1, kills + 1):
        def claimed(attempt=attempt):
            run = TrainingRun.objects.get(pk=run_pk)
            return run.status != "training" or (run.attempt >= attempt and run.worker != "")

        def describe():
            run = TrainingRun.objects.get(pk=run_pk)
            return None if run.status != "training" else f"training epoch {run.epochs_done}/{run.epochs}"

        if not _kill_after_claim(start_worker, {**FAST, **env}, claimed, describe, rng, campaign, max_delay_s=4.0):
            break
    start_worker(**{**FAST, **env})
    wait_for(lambda: TrainingRun.objects.get(pk=run_pk).status == "completed", timeout=240,
             message="training to complete after the campaign")
    return campaign


def running_without_heartbeat() -> list[str]:
    """Jobs left running whose heartbeat is older than the stall limit: must be none."""
    from jobsite.watchdog import job_models

    return [job.topic for model in job_models()
            for job in model.objects.filter(status__in=model.RUNNING).exclude(worker="") if job.is_stalled]
