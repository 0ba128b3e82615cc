"""What every page shares: the home redirect, the sentence for people who may only view, and the live context.

A page that shows jobs embeds the last event seq (read before its rows, so an event written
in between is replayed rather than lost) and the delays of the live module, taken from
settings so tests can shrink them.
"""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponseNotAllowed
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils import timezone

from jobsite.lifecycle import TransitionError
from jobsite.permissions import OPERATORS_GROUP
from jobsite.selectors import replay_from_seq
from jobsite.services import job_resume

OPERATORS_ONLY = (f"Only members of the '{OPERATORS_GROUP}' group (and superusers) can start, cancel or retry jobs, "
                  "or add models, datasets and corpora; ask an administrator to add you.")


@login_required
def home(request):
    return redirect("extraction:list")


CSRF_PAGE_SENTENCE = ("This form was not sent: its security token is missing or out of date (the page was open "
                      "across a new login, or its cookies were cleared). Nothing was changed; go back to the page, "
                      "reload it and do it again.")


def csrf_failure(request, reason=""):
    """A form refused by the CSRF check: a page that says so (and links back), not Django's
    debugging page; an htmx form shows it in place of the page's content."""
    referer = request.META.get("HTTP_REFERER", "")
    back = referer if url_has_allowed_host_and_scheme(referer, {request.get_host()}) else ""
    return render(request, "403.html", {"exception": CSRF_PAGE_SENTENCE, "back": back}, status=403)


def post_only(back_to):
    """An address a form posts to: POST does the action; GET (the address bar after a refused
    form was drawn there again, reloaded or bookmarked) goes to the page the form is on, not to
    a bare 405. back_to(request, **kwargs) gives that page's address."""

    def decorate(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if request.method in ("GET", "HEAD"):
                return redirect(back_to(request, **kwargs))
            if request.method != "POST":
                return HttpResponseNotAllowed(["POST"])
            return view(request, *args, **kwargs)

        return wrapped

    return decorate


def form_problems(form) -> str:
    """A refused form's errors as one sentence for a message, each under its field's label
    ("Queries per chunk: Ensure this value is less than or equal to 20."), not its name."""
    return " ".join(f"{form[name].label}: {' '.join(errors)}" if name in form.fields else " ".join(errors)
                    for name, errors in form.errors.items())


def id_param(request, name: str) -> int | None:
    """A job id from the query string (?job=12, ?open=12); anything else is no id.
    isdecimal, not isdigit: isdigit() takes "²", which int() refuses."""
    value = request.GET.get(name, "")
    return int(value) if value.isdecimal() and len(value) <= 18 else None


def live_context(*, topic: str) -> dict:
    """The data attributes of a live page's <body>; call it before reading the job rows."""
    return {
        "live": {
            "after": replay_from_seq(),
            "topic": topic,
            "server_now": timezone.now().isoformat(),
            "poll_fallback_s": settings.JOBSITE_POLL_FALLBACK_S,
            "slow_after_s": settings.JOBSITE_SLOW_AFTER_S,
            "stall_after_s": settings.JOBSITE_STALL_AFTER_S,
        },
        "staff_only_sentence": OPERATORS_ONLY,
    }


def duration(seconds: float | None) -> str:
    """"42 s", "3 min 5 s", "2 h 10 min"; "—" when unknown."""
    if seconds is None:
        return "—"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def iso(moment) -> str:
    return moment.isoformat() if moment else ""


def resume_with_message(request, job, name: str) -> None:
    """A page's Resume of a job whose worker went silent; the outcome as a Django message."""
    try:
        job_resume(job)
    except TransitionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{name} is queued again; it continues from its checkpoint.")
