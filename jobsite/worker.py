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
import signal
import threading
import time
from typing import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from jobsite.errors import Cancelled
from jobsite.events import publish
from jobsite.lifecycle import TransitionError, transition, transition_cancelled, transition_claimed
from jobsite.models import Job
from jobsite.services import job_enqueue, job_fail, job_requeue

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
        self._stop_seen_at: float | None = None
        self._last_check = 0.0
        self._last_progress_event = 0.0
        # Progress counters held back by progress() until the pace lets them be stored; the
        # lock keeps the work and the heartbeat thread from storing older ones over newer.
        self._held: dict = {}
        self._after_write: Callable[[], None] | None = None
        self._last_write = self._last_call = 0.0
        self._writing = threading.Lock()
        self._beat_at = 0.0
        self._thread = threading.Thread(target=self._beat_forever, name=f"heartbeat-{job.topic}", daemon=True)

    # -- for the work -------------------------------------------------------------------
    def _mine(self):
        return self.model.objects.filter(pk=self.job.pk, worker=self.job.worker, status__in=self.model.RUNNING)

    def heartbeat(self) -> None:
        """Called by the work between steps: the cheap way to notice cancel quickly."""
        if time.monotonic() - self._last_check >= 0.5:
            self._check()

    def should_cancel(self) -> bool:
        """True when the work must stop at its next checkpoint: a person's cancel, a lost
        lease, or this worker's cluster stopping (then the job is released, not cancelled)."""
        self.heartbeat()
        if cluster_stopping():
            self._stop_seen_at = self._stop_seen_at or time.monotonic()
            return True
        return self.cancelled.is_set() or self.lost.is_set()

    def progress(self, *, final: bool = False, after_write: Callable[[], None] | None = None, **counters) -> None:
        """Progress counters, stored on the row at most every JOBSITE_PROGRESS_EVERY_S (always when
        final): a job of many small batches does not write its row, and keep the database busy,
        once a batch. The latest ones are held until the work's next due call, report or
        set_status; when the work has made no call for that long (a batch that runs long or
        hangs), the heartbeat thread stores them and pushes their event, so the row and the
        pages say what was done before it. after_write runs after each write of the row (before
        its event)."""
        with self._writing:
            self._held.update(counters)
            self._after_write = after_write
            self._last_call = time.monotonic()
            due = self._last_call - self._last_write >= settings.JOBSITE_PROGRESS_EVERY_S
        if final or due:
            self.report(final=final)

    def flush(self) -> None:
        """Stores the progress counters held back, if any."""
        with self._writing:
            if self._held:
                self._store({})

    def report(self, *, final: bool = False, **counters) -> None:
        """Store counters (and any held back by progress()) on the row; push a throttled
        `<kind>.progress` event."""
        with self._writing:
            self._store(counters)
        self._progress_event(final=final)

    def _progress_event(self, *, final: bool) -> None:
        if final or time.monotonic() - self._last_progress_event >= settings.JOBSITE_PROGRESS_EVERY_S:
            self._last_progress_event = time.monotonic()
            # The stop a person asked for since the claim: a progress that said otherwise would
            # turn the page's "cancelling" back into the running status until the job stops.
            self._check()
            self.job.cancel_requested = self.job.cancel_requested or self.cancelled.is_set()
            publish(self.job.topic, f"{self.model.KIND}.progress", self.job.event_payload())

    def _store(self, counters: dict) -> None:
        """Under _writing: counters and the held ones onto the row, if the job is still ours."""
        counters = {**self._held, **counters}
        now = timezone.now()
        if not self._mine().update(progress_at=now, updated_at=now, **counters):
            self.lost.set()
            raise LeaseLost()
        self._held, self._last_write = {}, time.monotonic()
        for name, value in counters.items():
            setattr(self.job, name, value)
        self.job.progress_at = now
        if self._after_write is not None:
            self._after_write()

    def set_status(self, status: str, **fields) -> None:
        if self.lost.is_set():
            raise LeaseLost()
        with self._writing:
            held, self._held = self._held, {}
        try:
            transition(self.job, status, **{**held, **fields})
        except TransitionError as exc:
            self.lost.set()
            raise LeaseLost() from exc
        except BaseException:
            with self._writing:  # not stored: still held, under any newer ones
                self._held = {**held, **self._held}
            raise

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
        if cluster_stopping():
            self._stop_seen_at = self._stop_seen_at or time.monotonic()
            if self.force_exit and time.monotonic() - self._stop_seen_at > settings.JOBSITE_CANCEL_GRACE_S:
                self._end_process_for_stop()

    def _end_process_for_stop(self) -> None:
        """The cluster stops and the work reached no checkpoint within the grace period (a
        hung call): release the job as it stands (the checkpoint on disk is what the next
        worker continues from) and end this process, so that the cluster's stop can finish."""
        logger.warning("%s did not stop within %ss of its worker's stop; releasing it and ending worker pid %s",
                       self.job.topic, settings.JOBSITE_CANCEL_GRACE_S, os.getpid())
        try:
            self.job.refresh_from_db()
            if self.cancelled.is_set() or self.job.cancel_requested:
                # A person cancelled it meanwhile: that wins over the stop.
                transition_cancelled(self.job, payload={"forced": True})
            else:
                release(self.job, reason=f"{_stop_reason(self.job)} It did not reach a checkpoint within "
                                         f"{settings.JOBSITE_CANCEL_GRACE_S:.0f} s and was taken from its worker.")
        finally:
            os._exit(70)

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
        self._beat_at = time.monotonic() + settings.JOBSITE_HEARTBEAT_S
        try:
            # Woken at least every half second, for the progress held back; it beats at the
            # heartbeat's pace, and while the cluster stops each time, for the grace period.
            # Each step on its own: a failing store does not keep the beat from running.
            while not self.stopped.wait(min(settings.JOBSITE_HEARTBEAT_S, 0.5)):
                for step in (self._store_held_when_due, self._beat_when_due):
                    try:
                        step()
                    except LeaseLost:
                        pass  # lost is set: the work lets the job go at its next step
                    except Exception:  # noqa: BLE001 - a database blip must not kill the heartbeat
                        logger.exception("heartbeat of %s failed", self.job.topic)
                        connection.close()
        finally:
            connection.close()

    def _beat_when_due(self) -> None:
        if cluster_stopping() or time.monotonic() >= self._beat_at:
            self._beat_at = time.monotonic() + settings.JOBSITE_HEARTBEAT_S
            self._beat()

    def _store_held_when_due(self) -> None:
        """The progress held back, once the work has been silent for the progress pace. Never
        waits for the work: while it holds the lock it is storing newer counters itself."""
        if not self._writing.acquire(blocking=False):
            return
        try:
            silent = time.monotonic() - self._last_call >= settings.JOBSITE_PROGRESS_EVERY_S
            stored = bool(self._held) and silent
            if stored:
                self._store({})
        finally:
            self._writing.release()
        if stored:
            self._progress_event(final=False)

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
    return transition_claimed(job, **fields)


def release(job: Job, *, reason: str) -> Job:
    """The reverse of claim, for a worker that stops: the job goes back to the queue and the
    next worker continues it from its checkpoint. Its claim is given back too (a worker's stop
    is not the job's failure), so a deploy does not use up its automatic attempts. The row
    passes through its failed status inside one transaction (the one way back to the queue
    that every kind's transitions allow); nobody reads it there."""
    host, pid = worker_identity()
    with transaction.atomic():
        held = type(job).objects.select_for_update().filter(pk=job.pk, worker=f"{host}:{pid}").first()
        if held is None or held.status != job.status:
            logger.info("%s not released: this worker no longer holds it", job.topic)
            return job
        transition(job, job.failed_status(), event_type=f"{job.KIND}.released", payload={"reason": reason},
                   attempt=F("attempt") - 1, releases=F("releases") + 1)
        job_requeue(job, automatic=False, reason=reason, event_type=f"{job.KIND}.requeued")
    logger.info("%s released: %s", job.topic, reason)
    return job


def _stop_reason(job: Job) -> str:
    return f"Worker {job.worker} stopped; the {job._meta.verbose_name} continues from its checkpoint on the next worker."


def _wait_for_backoff(model, job_id) -> Job | None:
    """An automatic retry carries next_attempt_at; wait for it (cancel and a stop still win)."""
    while True:
        job = model.objects.filter(pk=job_id).first()
        if job is None or not job.is_claimable or job.next_attempt_at is None or cluster_stopping():
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
    if cluster_stopping():
        # The cluster took this task from the queue before its stop: it goes back for the next worker.
        logger.info("%s not started: this worker stops; sent back to the queue", job.topic)
        job_enqueue(job)
        return
    reason = job.refusal_here()
    if reason:
        logger.info("%s left for another worker: %s", job.topic, reason)
        job.leave_here(reason)
        return
    try:
        claim(job)
    except TransitionError as exc:
        logger.info("claim of %s lost: %s", job.topic, exc)
        return
    force_exit = multiprocessing.parent_process() is not None
    try:
        with Lease(job, force_exit=force_exit) as lease:
            try:
                work(job, lease)
            except LeaseLost:
                logger.info("%s was decided elsewhere; this worker lets it go", job.topic)
            except BaseException as exc:  # noqa: BLE001 - includes django-q2's TimeoutException (a SystemExit)
                _record_failure(job, lease, exc)
                if not isinstance(exc, Exception):
                    raise
    finally:
        try:
            job.after_attempt()
        except Exception:  # noqa: BLE001 - the watchdog's pass does it again
            logger.exception("%s: what follows its attempt failed; the watchdog goes on with it", job.topic)


RECORD_TRIES = 30


def _record_failure(job: Job, lease: Lease, exc: BaseException) -> None:
    """Record what happened; when the database itself is away, keep trying for a while
    (the watchdog finds the job by its silent heartbeat if this process gives up)."""
    if lease.lost.is_set():
        return
    try:
        lease.flush()  # the row ends with what was done before the failure or the cancel
    except LeaseLost:
        return
    except Exception:  # noqa: BLE001 - the failure is recorded all the same, below
        logger.exception("%s: its last progress was not stored", job.topic)
        connection.close()
    for attempt in range(RECORD_TRIES):
        try:
            job.refresh_from_db()
            if job.cancel_requested and (lease.cancelled.is_set() or isinstance(exc, Cancelled)):
                # A person's cancel wins over a stop, even one the runner saw first.
                transition_cancelled(job)
            elif isinstance(exc, Cancelled) and cluster_stopping():
                release(job, reason=_stop_reason(job))
            elif isinstance(exc, Cancelled):
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


# -- the cluster stops ------------------------------------------------------------------------
# Set by the sentinel when its cluster stops, whoever was signalled; the worker processes it
# forks share it. None outside a cluster (a job run in-process by a test or a command).
_cluster_stopping = None


def cluster_stopping() -> bool:
    return _cluster_stopping is not None and _cluster_stopping.is_set()


def preload() -> None:
    """The workloads' modules (JOBSITE_WORKER_PRELOAD), imported in the sentinel before it forks
    its processes: every worker, a replaced one too, starts with them, sharing their pages."""
    import importlib  # noqa: PLC0415

    for name in settings.JOBSITE_WORKER_PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a job that needs it fails with the reason; the others run
            logger.exception("JOBSITE_WORKER_PRELOAD: %s could not be imported", name)


def install_cluster_stop() -> None:
    """Make `manage.py qcluster` stop in order however it is signalled; called in its main
    process before the cluster starts.

    django-q2 leaves SIGTERM at its default in the sentinel and every process it forks. SIGTERM
    to the whole process group (systemd's default KillMode, supervisord's stopasgroup) killed
    them mid-job, while the main process, in its own handler, waited forever for the dead
    sentinel to wake on the stop event (multiprocessing's notify_all has no timeout): no exit,
    and the sentinel a zombie. SIGINT (Ctrl-C) the sentinel and its children ignore, and the
    main process's stop waited for the running job to end, however long.

    Here the main process alone acts on SIGTERM and SIGINT: the sentinel and the processes it
    forks ignore both, and the sentinel's orderly stop sets an event its worker processes
    share; a running job sees it at its next checkpoint (`Lease.should_cancel`) and is
    released, one that reaches none within JOBSITE_CANCEL_GRACE_S is released by its heartbeat
    thread, which ends the process. django-q2 offers no hook in the sentinel, hence the subclass.
    """
    from django_q import cluster

    if getattr(cluster.Sentinel, "releases_jobs_on_stop", False):
        return

    class Sentinel(cluster.Sentinel):
        releases_jobs_on_stop = True

        def start(self):
            global _cluster_stopping
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _cluster_stopping = cluster.get_mp_context().Event()
            preload()
            super().start()

        def stop(self):
            _cluster_stopping.set()
            super().stop()

        def reincarnate(self, process):
            # django-q2 ends a worker past its timeout with terminate(), a SIGTERM it now ignores.
            timed_out = process in self.pool and process.timer.value == 0
            super().reincarnate(process)
            if timed_out and process.is_alive():
                process.kill()

    cluster.Sentinel = Sentinel
