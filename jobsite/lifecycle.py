"""The one way a job's status changes.

transition() checks the job kind's table of allowed transitions, updates the row with a
compare-and-set on the status it expects (`UPDATE ... WHERE status = <from>`), and appends
the event in the same transaction. Zero rows updated means another process changed the
job first: the caller gets TransitionConflict and nothing is written.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models.expressions import Combinable
from django.utils import timezone

from jobsite.events import publish
from jobsite.models import Job


class TransitionError(Exception):
    """Base of the errors transition() raises; the message is a sentence for the user."""


class TransitionNotAllowed(TransitionError):
    pass


class TransitionConflict(TransitionError):
    pass


def transition(job: Job, to: str, *, event_type: str | None = None, payload: dict | None = None, **fields) -> Job:
    model = type(job)
    source = job.status
    label = model._meta.verbose_name
    if to not in model.TRANSITIONS.get(source, ()):
        raise TransitionNotAllowed(f"This {label} is {source}; it cannot become {to}.")
    now = timezone.now()
    fields["updated_at"] = now
    if to in model.TERMINAL:
        fields.setdefault("finished_at", now)
    else:
        fields["finished_at"] = None
    if to not in model.RUNNING:
        # A stop concerns the phase that runs: one that came as the phase ended must not stop the next.
        fields.setdefault("cancel_requested", False)
    with transaction.atomic():
        # A removed job (kept as history) changes no more, whatever a stale caller still holds.
        updated = model.objects.filter(model.live(), pk=job.pk, status=source).update(status=to, **fields)
        if updated == 0:
            current = model.objects.filter(pk=job.pk).values_list("status", flat=True).first()
            if current is None:
                raise TransitionConflict(f"This {label} no longer exists.")
            if not model.objects.filter(model.live(), pk=job.pk).exists():
                raise TransitionConflict(f"This {label} was removed; it cannot become {to}.")
            raise TransitionConflict(
                f"This {label} changed to {current} while you were changing it to {to}; reload it and try again."
            )
        expressions = [name for name, value in fields.items() if isinstance(value, Combinable)]
        for name, value in fields.items():
            if name not in expressions:
                setattr(job, name, value)
        job.status = to
        if expressions:
            job.refresh_from_db(fields=expressions)
        publish(job.topic, event_type or f"{model.KIND}.{to}", {**job.event_payload(), **(payload or {})})
    return job


def transition_claimed(job: Job, **fields) -> Job:
    """A worker takes the job, writing `fields` (its identity, start and heartbeat times).

    A kind with a claimed status moves there by transition(). A kind without one (CLAIMED is
    "": a training run keeps its phase status while it waits and while it runs) is taken by a
    compare-and-set on its empty `worker` field instead: of two workers, one wins and the
    other gets TransitionConflict, as with a status.
    """
    if job.CLAIMED:
        return transition(job, job.CLAIMED, **fields)
    model = type(job)
    with transaction.atomic():
        if not model.objects.filter(model.awaiting_worker(), pk=job.pk, status=job.status).update(**fields):
            raise TransitionConflict(f"This {model._meta.verbose_name} is already held by another worker.")
        job.refresh_from_db()
        publish(job.topic, f"{model.KIND}.claimed", job.event_payload())
    return job


def transition_cancelled(job: Job, *, payload: dict | None = None) -> Job:
    """A cancellation takes effect: the kind's cancelled status, or its failed one (kinds
    without a cancelled status say there that the job was stopped on request)."""
    to, fields = job.cancelled_outcome()
    return transition(job, to, payload=payload, **fields)
