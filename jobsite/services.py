"""Services every job kind shares: enqueue, cancel request, failure and automatic retry."""

from __future__ import annotations

import logging
import random
import shutil
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobsite.errors import RETRYABLE, classify_error, error_sentence
from jobsite.lifecycle import TransitionError, transition, transition_cancelled
from jobsite.models import Job

logger = logging.getLogger(__name__)


def job_enqueue(job: Job) -> None:
    """Hand the job to django-q2 once the surrounding transaction has committed.

    A duplicate task is harmless (the claim is a compare-and-set); a lost one is not, so the
    hand-off is recorded in `enqueued_at` and the watchdog resends what never got there.
    """
    from django_q.tasks import async_task

    model, pk = type(job), job.pk

    def send():
        try:
            async_task(job.TASK, pk, task_name=f"{job.KIND}-{pk}-{timezone.now():%Y%m%d%H%M%S%f}")
        except Exception:  # noqa: BLE001 - the watchdog retries the hand-off
            logger.exception("could not enqueue %s %s; the watchdog will retry", job.KIND, pk)
            return
        model.objects.filter(model.awaiting_worker(), pk=pk).update(enqueued_at=timezone.now())

    transaction.on_commit(send)


def job_request_cancel(job: Job) -> Job:
    """Cancel a job: at once when no worker holds it, cooperatively when one does.

    A running job gets `cancel_requested` (once); its worker stops within one batch, or its
    heartbeat thread ends the process after JOBSITE_CANCEL_GRACE_S. A kind that keeps its
    phase status while it waits (CLAIMED empty) may be in a running status with no worker
    yet: that one is cancelled at once, and so is a stalled one (its worker is silent).
    """
    label = job._meta.verbose_name
    if job.status not in job.ACTIVE:
        raise TransitionError(f"This {label} is {job.status}; only a queued or running {label} can be cancelled.")
    if job.status not in job.RUNNING:
        return transition_cancelled(job)
    model = type(job)
    with transaction.atomic():
        # The row lock keeps a worker from claiming the job while this decides.
        current = model.objects.select_for_update().get(pk=job.pk)
        if current.status in model.RUNNING:
            if not model.CLAIMED and not current.worker:  # its phase status, but no worker yet
                return transition_cancelled(current)
            if current.is_stalled:
                # Its worker is silent past the stall limit: gone, or hung where it cannot read the
                # request. Waiting for it would leave the job "cancelling" until some worker starts;
                # a worker that wakes up finds the job no longer its own and lets it go.
                return transition_cancelled(current, payload={"stalled": True})
            if not current.cancel_requested:
                model.objects.filter(pk=current.pk).update(cancel_requested=True, updated_at=timezone.now())
                current.cancel_requested = True
                from jobsite.events import publish

                publish(current.topic, f"{model.KIND}.cancel_requested", current.event_payload())
            return current
    return job_request_cancel(current)


def job_delete(job: Job, *, verb: str, user=None) -> None:
    """Delete a job that no worker holds (the kind checks that first, in its own words), with
    its output files once the deletion commits; the event `<kind>.<verb>` ("removed", "deleted")
    keeps who did it and when."""
    from jobsite.events import publish

    model, output_dir = type(job), job.output_dir
    with transaction.atomic():
        locked = model.objects.select_for_update().filter(pk=job.pk, status=job.status).first()
        if locked is None:
            raise TransitionError(f"{model._meta.verbose_name.capitalize()} {job.pk} changed while you were "
                                  f"{'removing' if verb == 'removed' else 'deleting'} it; reload it.")
        publish(job.topic, f"{model.KIND}.{verb}", {
            **job.event_payload(), f"{verb}_by": getattr(user, "username", "") or "",
            f"{verb}_at": timezone.now().isoformat(),
        })
        locked.delete()
        transaction.on_commit(lambda: shutil.rmtree(output_dir, ignore_errors=True))


def job_resume(job: Job) -> Job:
    """A person's Resume of a stalled job: take it from its silent worker and queue it again.

    It continues from its checkpoint like an automatic retry, whatever attempts remain.
    """
    parts = job.parts()
    if parts and job.status in job.RUNNING:
        # A job made of parts resumes the parts whose workers went silent; the others go on.
        stalled = [part for part in parts if part.is_stalled]
        if not stalled:
            raise TransitionError(f"No part of this {job._meta.verbose_name} is stalled: each has a live worker or "
                                  "waits for one.")
        for part in stalled:
            job_resume(part)
        return job
    if not job.is_stalled:
        raise TransitionError(_not_stalled(job))
    message = f"Resumed by a person after {job.heartbeat_age_s:.0f} s without a heartbeat."
    with transaction.atomic():
        transition(job, job.failed_status(), error_type="WORKER_LOST", error_message=message)
        job_requeue(job, automatic=False, reason=message)
    return job


def _not_stalled(job: Job) -> str:
    """Why Resume does not apply, as the job stands: only a running job has a worker that lives."""
    label = job._meta.verbose_name
    only = f"only a stalled {label} can be resumed"
    if job.status in job.RUNNING and job.worker:
        return f"This {label} is {job.status} and its worker is alive; {only}."
    if job.status in job.ACTIVE:
        return f"This {label} is {job.status} and waits for a worker; {only}."
    # A kind may say its status as a sentence does ("is waiting for review", "is stopped").
    state = getattr(job, "state_phrase", {"failed": "has failed", "cancelled": "was cancelled"}.get(
        job.status, f"is {job.status}"))
    if job.status == "completed":
        return f"This {label} {state}; there is nothing to resume."
    then = job.next_step or (f"Retry starts a new {label}." if job.retry_available else "")
    return f"This {label} {state} and no worker holds it; Resume is for a stalled {label}." + (
        f" {then}" if then else "")


def job_requeue(job: Job, *, automatic: bool, reason: str, delay_s: float = 0, clear_error: bool = False,
                event_type: str = "") -> Job:
    """A failed job back to where a worker picks it up, continuing from its checkpoint."""
    now = timezone.now()
    cleared = dict(error_type="", error_message="", suggested_retry_params={}) if clear_error else {}
    transition(
        job, job.resume_status(), event_type=event_type or f"{job.KIND}.retry_started",
        payload={"automatic": automatic, "delay_s": round(delay_s, 3), "reason": reason},
        next_attempt_at=now + timedelta(seconds=delay_s) if delay_s else None, queued_at=now, enqueued_at=None,
        worker="", worker_pid=None, auto_retried=automatic or job.auto_retried, **cleared,
    )
    job_enqueue(job)
    return job


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with equal jitter: half the step fixed, half random."""
    step = min(settings.JOBSITE_RETRY_MAX_S, settings.JOBSITE_RETRY_BASE_S * settings.JOBSITE_RETRY_FACTOR ** max(0, attempt - 1))
    return step / 2 + random.uniform(0, step / 2)


def job_fail(job: Job, *, exc: BaseException | None = None, error_type: str | None = None, message: str = "") -> Job:
    """Record a failure with its class and next step, then retry it automatically when the
    failure is transient and attempts remain; everything else waits for a person."""
    error_type = error_type or classify_error(exc)
    message = message or error_sentence(exc)
    fields = dict(
        error_type=error_type,
        error_message=message,
        suggested_retry_params=job.suggest_retry_params(error_type),
    )
    with transaction.atomic():
        transition(job, job.failed_status(), **fields)
        if job.AUTO_RETRY and error_type in RETRYABLE and job.attempt < settings.JOBSITE_MAX_ATTEMPTS:
            job_requeue(job, automatic=True, reason=message, delay_s=backoff_delay(job.attempt))
    logger.info("%s %s failed (%s): %s", job.KIND, job.pk, error_type, message)
    return job
