"""Finds running jobs whose worker is gone or which ran too long, and fails them.

It runs as a django-q2 Schedule, in a thread of every worker process (so a crash is noticed
within seconds, not at the next scheduler tick), at worker start-up, and on demand. Every
change goes through transition() with a compare-and-set, so any number of watchdogs may
run at once.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from jobsite.clusters import job_models, live_workers
from jobsite.errors import ErrorType
from jobsite.lifecycle import TransitionError, transition_cancelled
from jobsite.models import Job
from jobsite.services import job_enqueue, job_fail

logger = logging.getLogger(__name__)

_thread_started = threading.Lock()
_thread: threading.Thread | None = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # A killed process whose parent has not reaped it yet is a zombie: gone for us.
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def diagnose(job: Job, now) -> tuple[str, str] | None:
    """Why this running job must be taken from its worker, or None while it is healthy."""
    if job.worker_host == settings.JOBSITE_HOSTNAME and job.worker_pid and job.worker_pid != os.getpid():
        if not pid_alive(job.worker_pid):
            return ErrorType.WORKER_LOST, f"The worker process ({job.worker}) is gone."
    if job.is_stalled:
        return ErrorType.WORKER_LOST, f"No heartbeat from worker {job.worker} for {job.heartbeat_age_s:.0f} s."
    if job.started_at and (now - job.started_at).total_seconds() > settings.JOBSITE_TIMEOUT_S:
        return ErrorType.TIMEOUT, f"The attempt ran longer than the {settings.JOBSITE_TIMEOUT_S:.0f} s limit."
    return None


def run() -> list[str]:
    """One pass over every job kind; returns a line per job it changed."""
    changed = []
    now = timezone.now()
    free = None  # worker processes holding no job, asked once a pass and only when a job waits
    for model in job_models():
        for job in model.objects.filter(model.live(), status__in=model.RUNNING).exclude(worker=""):
            verdict = diagnose(job, now)
            if verdict is None:
                continue
            error_type, message = verdict
            try:
                if job.cancel_requested:
                    transition_cancelled(job, payload={"reason": message})
                    changed.append(f"{job.topic}: cancelled ({message})")
                else:
                    job_fail(job, error_type=error_type, message=message)
                    changed.append(f"{job.topic}: {error_type} ({message}) -> {job.status}")
            except TransitionError as exc:
                logger.info("watchdog left %s alone: %s", job.topic, exc)
        lost_before = now - timedelta(seconds=settings.JOBSITE_STALL_AFTER_S)
        unsent = model.objects.filter(model.awaiting_worker(), enqueued_at__isnull=True, queued_at__lt=lost_before)
        for job in unsent:
            job_enqueue(job)
            changed.append(f"{job.topic}: queued since {job.queued_at:%H:%M:%S} but never handed to the queue; sent again")
        waiting = list(model.objects.filter(model.awaiting_worker(), enqueued_at__lt=lost_before)
                       .exclude(next_attempt_at__gt=now))
        if waiting and free is None:
            free = free_workers()
        if waiting and free > 0:
            for job in waiting:
                job_enqueue(job)
                changed.append(f"{job.topic}: waited since {job.enqueued_at:%H:%M:%S} while a worker was free (its task "
                               "went with a cluster that died); sent again")
    for model in job_models():
        changed += model.watch()
    for line in changed:
        logger.warning("watchdog: %s", line)
    return changed


def free_workers() -> int:
    """Worker processes of the live clusters that hold no job now.

    A cluster takes a task from the queue before a worker is free for it; when that cluster
    dies, the task stays locked in the broker for django-q2's `retry` (hours). A job that has
    waited past the stall limit while a worker is free has lost its task that way: the
    watchdog sends it again (a copy that turns up later finds the job taken and does nothing).
    """
    _clusters, workers = live_workers()
    if not workers:
        return 0
    held = sum(m.objects.filter(status__in=m.RUNNING).exclude(worker="").count() for m in job_models())
    return workers - held


def _loop() -> None:
    while True:
        try:
            close_old_connections()
            run()
        except Exception:  # noqa: BLE001 - keep watching through a database blip
            logger.exception("watchdog pass failed")
        finally:
            connection.close()
        threading.Event().wait(settings.JOBSITE_WATCHDOG_EVERY_S)


def on_worker_start(sender=None, proc_name=None, **kwargs) -> None:
    """django-q2 post_spawn: check at once, then keep checking from a daemon thread."""
    global _thread
    with _thread_started:
        if _thread is not None and _thread.is_alive():
            return
        _thread = threading.Thread(target=_loop, name="jobsite-watchdog", daemon=True)
        _thread.start()


def ensure_schedule(sender=None, **kwargs) -> None:
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name="jobsite watchdog",
        defaults={"func": "jobsite.watchdog.run", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
