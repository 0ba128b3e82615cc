"""What every page shares: the home redirect, the staff rule for actions, and the live context.

A page that shows jobs embeds the last event seq (read before its rows, so an event written
in between is replayed rather than lost) and the delays of the live module, taken from
settings so tests can shrink them.
"""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect
from django.utils import timezone

from jobsite.selectors import last_event_seq

STAFF_ONLY = "Only staff users can start, cancel or retry jobs; ask an administrator."


@login_required
def home(request):
    return redirect("extraction:list")


def staff_required(view):
    """Login first (a redirect), then staff (a 403 with the sentence): for every action."""

    @wraps(view)
    @login_required
    def wrapped(request, *args, **kwargs):
        if not request.user.is_staff:
            raise PermissionDenied(STAFF_ONLY)
        return view(request, *args, **kwargs)

    return wrapped


def live_context(*, topic: str) -> dict:
    """The data attributes of a live page's <body>; call it before reading the job rows."""
    return {
        "live": {
            "after": last_event_seq(),
            "topic": topic,
            "server_now": timezone.now().isoformat(),
            "poll_fallback_s": settings.JOBSITE_POLL_FALLBACK_S,
            "slow_after_s": settings.JOBSITE_SLOW_AFTER_S,
            "stall_after_s": settings.JOBSITE_STALL_AFTER_S,
        },
        "staff_only_sentence": STAFF_ONLY,
    }
