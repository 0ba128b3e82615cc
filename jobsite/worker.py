"""The worker side of the job contract: claim, heartbeat lease, cooperative cancel.

A django-q2 task calls `execute(Model, job_id, work)`. The job is claimed by
compare-and-set (a duplicate delivery, a cancelled or a finished job is a quiet no-op),
a heartbeat thread keeps the lease alive and watches for cancellation, and whatever the
work raises is classified and recorded by `job_fail`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from jobsite.errors import Cancelled
from jobsite.events import publish
from jobsite.lifecycle import TransitionConflict, TransitionError, transition, transition_cancelled
from jobsite.models import Job
from jobsite.services import job_fail

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another process (the watchdog, a person) decided this job's fate while we worked."""


class Lease:
    """What a running job's work sees: heartbeat, progress reports, cancellation."""

    def __init__(self, job: Job, *, force_exit: bool):
        self.job = job
        self.model = type(job)
        self.force_exit = force_exit
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.stopped = threading.Event()
        self._cancel_seen_at: float | None = None
        self._last_check = 0.0
        self._last_progress_event = 0.0
        self._thread = threading.Thread(target=self._beat_forever, name=f"heartbeat-{job.topic}", daemon=True)

    # -- for the work -------------------------------------------------------------------
    def _mine(self):
        return self.model.objects.filter(pk=self.job.pk, worker=self.job.worker, status__in=self.model.RUNNING)

    def heartbeat(self) -> None:
        """Called by the work between steps: the cheap way to notice cancel quickly."""
        if time.monotonic() - self._last_check >= 0.5:
            self._check()

    def should_cancel(self) -> bool:
        self.heartbeat()
        return self.cancelled.is_set() or self.lost.is_set()

    def report(self, *, final: bool = False, **counters) -> None:
        """Store progress counters on the row; push a throttled `<kind>.progress` event."""
        now = timezone.now()
        if not self._mine().update(progress_at=now, updated_at=now, **counters):
            self.lost.set()
            raise LeaseLost()
        for name, value in counters.items():
            setattr(self.job, name, value)
        self.job.progress_at = now
        if final or time.monotonic() - self._last_progress_event >= settings.JOBSITE_PROGRESS_EVERY_S:
            self._last_progress_event = time.monotonic()
            # The stop a person asked for since the claim: a progress that said otherwise would
            # turn the page's "cancelling" back into the running status until the job stops.
            self._check()
            self.job.cancel_requested = self.job.cancel_requested or self.cancelled.is_set()
            publish(self.job.topic, f"{self.model.KIND}.progress", self.job.event_payload())

    def set_status(self, status: str, **fields) -> None:
        if self.lost.is_set():
            raise LeaseLost()
        try:
            transition(self.job, status, **fields)
        except TransitionError as exc:
            self.lost.set()
            raise LeaseLost() from exc

    # -- the heartbeat thread -------------------------------------------------------------
    def _check(self) -> None:
        self._last_check = time.monotonic()
        row = self._mine().values_list("cancel_requested", flat=True).first()
        if row is None:
            self.lost.set()
        elif row:
            self.cancelled.set()

    def _beat(self) -> None:
        updated = self._mine().update(heartbeat_at=timezone.now(), heartbeat_seq=F("heartbeat_seq") + 1)
        if not updated:
            self.lost.set()
            return
        self._check()
        if self.cancelled.is_set():
            self._cancel_seen_at = self._cancel_seen_at or time.monotonic()
            if self.force_exit and time.monotonic() - self._cancel_seen_at > settings.JOBSITE_CANCEL_GRACE_S:
                self._end_process_for_cancel()

    def _end_process_for_cancel(self) -> None:
        """The work ignored cancellation past the grace period (a hung call): record the
        cancellation ourselves and end this process; django-q2 starts a fresh worker."""
        logger.warning("%s did not stop within %ss of cancel; ending worker pid %s",
                       self.job.topic, settings.JOBSITE_CANCEL_GRACE_S, os.getpid())
        try:
            self.job.refresh_from_db()
            transition_cancelled(self.job, payload={"forced": True})
        finally:
            os._exit(70)

    def _beat_forever(self) -> None:
        try:
            while not self.stopped.wait(settings.JOBSITE_HEARTBEAT_S):
                try:
                    self._beat()
                except Exception:  # noqa: BLE001 - a database blip must not kill the heartbeat
                    logger.exception("heartbeat of %s failed", self.job.topic)
                    connection.close()
        finally:
            connection.close()

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self._thread.join(timeout=5)


def worker_identity() -> tuple[str, int]:
    return settings.JOBSITE_HOSTNAME, os.getpid()


def claim(job: Job) -> Job:
    host, pid = worker_identity()
    now = timezone.now()
    fields = dict(
        worker=f"{host}:{pid}", worker_host=host, worker_pid=pid, started_at=now, heartbeat_at=now,
        progress_at=now, attempt=F("attempt") + 1, next_attempt_at=None,
    )
    if job.CLAIMED:
        return transition(job, job.CLAIMED, **fields)
    model = type(job)
    with transaction.atomic():
        if not model.objects.filter(model.awaiting_worker(), pk=job.pk, status=job.status).update(**fields):
            raise TransitionConflict(f"This {model._meta.verbose_name} is already held by another worker.")
        job.refresh_from_db()
        publish(job.topic, f"{model.KIND}.claimed", job.event_payload())
    return job


def _wait_for_backoff(model, job_id) -> Job | None:
    """An automatic retry carries next_attempt_at; wait for it (cancel still wins)."""
    while True:
        job = model.objects.filter(pk=job_id).first()
        if job is None or not job.is_claimable or job.next_attempt_at is None:
            return job
        remaining = (job.next_attempt_at - timezone.now()).total_seconds()
        if remaining <= 0:
            return job
        time.sleep(min(remaining, 1.0))


def execute(model: type[Job], job_id: int, work: Callable[[Job, Lease], None]) -> None:
    close_old_connections()
    job = _wait_for_backoff(model, job_id)
    if job is None or not job.is_claimable:
        logger.info("%s %s is %s; nothing to run", model.KIND, job_id, job.status if job else "gone")
        return
    try:
        claim(job)
    except TransitionError as exc:
        logger.info("claim of %s lost: %s", job.topic, exc)
        return
    force_exit = multiprocessing.parent_process() is not None
    with Lease(job, force_exit=force_exit) as lease:
        try:
            work(job, lease)
        except LeaseLost:
            logger.info("%s was decided elsewhere; this worker lets it go", job.topic)
        except BaseException as exc:  # noqa: BLE001 - includes django-q2's TimeoutException (a SystemExit)
            _record_failure(job, lease, exc)
            if not isinstance(exc, Exception):
                raise


RECORD_TRIES = 30


def _record_failure(job: Job, lease: Lease, exc: BaseException) -> None:
    """Record what happened; when the database itself is away, keep trying for a while
    (the watchdog finds the job by its silent heartbeat if this process gives up)."""
    if lease.lost.is_set():
        return
    for attempt in range(RECORD_TRIES):
        try:
            job.refresh_from_db()
            if isinstance(exc, Cancelled) or (lease.cancelled.is_set() and job.cancel_requested):
                transition_cancelled(job)
            else:
                logger.error("%s failed: %s", job.topic, exc, exc_info=exc)
                job_fail(job, exc=exc)
            return
        except TransitionError as conflict:
            logger.info("failure of %s not recorded: %s", job.topic, conflict)
            return
        except (OperationalError, InterfaceError):
            logger.warning("database unavailable while recording the failure of %s (try %d)", job.topic, attempt + 1)
            connection.close()
            time.sleep(1)
