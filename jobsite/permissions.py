"""Who may do what: one Django model permission per action, checked the same way everywhere.

Reading needs a login. Each write needs its own permission (`ACTIONS`), held by superusers
and by the "job operators" group (a migration creates it). A staff user without them sees
every page, list and admin changelist read-only: the buttons are hidden, and a write sent
anyway is refused with 403 and the sentence `refusal(perm)` says.

Entry points check with:
- pages: `@permission_required("extraction.cancel_extraction")` (login first, then the 403);
- the API: `require(request.user, "extraction.cancel_extraction")` (raises ninja's HttpError 403);
- the admin: `@admin.action(permissions=["cancel"])` with `has_cancel_permission` from `ActionPermissions`;
- services: `check(by, perm)` when a person is named (`by=None` is a command run on the host).
Templates read `perms.extraction.cancel_extraction` (Django's auth context processor).
"""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied

OPERATORS_GROUP = "job operators"

# permission -> what it lets a person do, as the refusal says it.
ACTIONS = {
    "extraction.add_extraction": "start extractions",
    "extraction.cancel_extraction": "cancel extractions",
    "extraction.retry_extraction": "retry extractions",
    "extraction.resume_extraction": "resume extractions",
    "extraction.dismiss_extraction": "dismiss extractions",
    "extraction.delete_extraction": "delete extractions",
    "extraction.add_modelrecord": "register models",
    "extraction.add_dataset": "add datasets",
    "training_runs.add_trainingrun": "start training runs",
    "training_runs.train_trainingrun": "start training",
    "training_runs.stop_trainingrun": "stop training runs",
    "training_runs.proceed_trainingrun": "proceed with failed training runs",
    "training_runs.resume_trainingrun": "resume training runs",
    "training_runs.remove_trainingrun": "remove training runs",
    "training_runs.adopt_trainingrun": "adopt adapters",
    "training_runs.change_trainingpair": "review training pairs",
    "training_runs.add_corpus": "add corpora",
}


def refusal(perm: str) -> str:
    what = ACTIONS.get(perm, "do this")
    return (f"You may view jobs but not {what}: that needs the '{perm.split('.', 1)[1]}' permission, "
            f"which the '{OPERATORS_GROUP}' group has; ask an administrator.")


def can(user, perm: str) -> bool:
    assert perm in ACTIONS, f"unknown action permission {perm}"
    return bool(user and user.is_authenticated and user.is_active and user.has_perm(perm))


def check(user, perm: str) -> None:
    """Services: refuse a named person without the permission (PermissionDenied with the sentence)."""
    if user is not None and not can(user, perm):
        raise PermissionDenied(refusal(perm))


def require(user, perm: str) -> None:
    """The API: a 403 whose message is the sentence."""
    from ninja.errors import HttpError

    if not can(user, perm):
        raise HttpError(403, refusal(perm))


def permission_required(perm: str):
    """Pages: login first (a redirect), then the permission (403 with the sentence)."""
    assert perm in ACTIONS, f"unknown action permission {perm}"

    def decorator(view):
        @wraps(view)
        @login_required
        def wrapped(request, *args, **kwargs):
            if not can(request.user, perm):
                raise PermissionDenied(refusal(perm))
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
