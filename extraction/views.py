"""The extractions page: server-rendered, refreshed piece by piece by the live module.

Views are thin callers of extraction.services (and jobsite.views.resume_with_message); a service's
JobInputError becomes a form error or a message, a TransitionError a message. Reading needs a
login, every POST its action's permission (jobsite.permissions).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from extraction import output_page, selectors, services
from extraction.forms import ExtractionStartForm, RegisterForm, RetryForm
from extraction.constants import BLOCK_ORDER
from extraction.models import Extraction, ModelRecord
from jobsite.errors import ErrorType, JobInputError
from jobsite.forms import add_refusal
from jobsite.health import workers_missing
from jobsite.lifecycle import TransitionError
from jobsite.models import Event, silent_too_long
from jobsite.permissions import check, permission_required
from jobsite.selectors import last_event_seq
from jobsite.views import (
    duration, form_problems, id_param, iso, live_context, post_only, resume_with_message,
)

TOPIC = "extraction."
ERROR_LABELS = dict(ErrorType.CHOICES)
PHASES = {
    "queued": "Waiting for a worker",
    "loading": "Loading the model",
    "extracting": "Extracting",
    "saving": "Saving the files",
}


# -- presentation --------------------------------------------------------------------------

def job_view(extraction: Extraction, *, seq: int = 0) -> dict:
    """Everything a card shows, computed once here so the template only lays it out."""
    e, now = extraction, timezone.now()
    active, running = e.status in e.ACTIVE, e.status in e.RUNNING
    shards = e.parts()  # read once: the heartbeat, the stall, the phase and the rows come from them
    heartbeat_age = e.heartbeat_age_with(shards)
    stalled = silent_too_long(heartbeat_age)
    last_move = max(m for m in (e.queued_at, e.started_at, e.progress_at, e.next_attempt_at) if m)
    idle_s = (now - last_move).total_seconds() if active else None
    slow = bool(active and not stalled and idle_s is not None and idle_s > settings.JOBSITE_SLOW_AFTER_S)
    rate = None
    # The rate is this attempt's own: a resumed attempt's counts include the work of the ones before
    # it (the page measures its rate from the progress it sees). A stalled job, or one without
    # progress past the slow limit, has none, and no time left: its last pace says nothing now.
    resumed = e.attempt > 1 or e.resumed_samples or e.releases
    if (e.status in (e.Status.EXTRACTING, e.Status.SAVING) and e.started_at and e.progress_at and e.tokens_processed
            and not resumed and not stalled and not slow):
        elapsed = (e.progress_at - e.started_at).total_seconds()
        rate = e.tokens_processed / elapsed if elapsed > 0 else None
    eta = None
    if rate and e.total_tokens and e.samples_processed and e.total_samples:
        # Longest samples run first: the token rate alone promises too little time, the sample
        # rate too much; the page refines this from the progress it sees (live.js timeLeft).
        elapsed = e.tokens_processed / rate
        eta = elapsed * ((e.total_tokens - e.tokens_processed) / e.tokens_processed
                         + (e.total_samples - e.samples_processed) / e.samples_processed) / 2
    retry_in = (e.next_attempt_at - now).total_seconds() if e.status == e.Status.QUEUED and e.next_attempt_at else None
    percent = 100.0 if e.status in (e.Status.SAVING, e.Status.COMPLETED) else e.percent
    phase = PHASES.get(e.status, "")
    if e.status == e.Status.LOADING and e.started_at:
        # A large dataset takes a while to tokenize: the card says how far it is.
        tokenizing = (Event.objects.filter(topic=e.topic, type="extraction.tokenizing", created_at__gte=e.started_at)
                      .order_by("-seq").values_list("payload", flat=True).first())
        if tokenizing and tokenizing.get("message"):
            phase = tokenizing["message"]
    if e.sharded and shards:
        # No worker holds a job its shards run: the card says what each part is doing instead.
        counts = defaultdict(int)
        for shard in shards:
            counts[shard.status] += 1
        doing = f"Tokenizing in {len(shards)} parts" if e.status == e.Status.LOADING else \
            f"Extracting with {len(shards)} shards"
        phase = f"{doing}: " + ", ".join(
            f"{counts[status]} {status}" for status in ("running", "queued", "completed", "failed", "cancelled")
            if counts[status])
    if e.cancel_requested and running:
        phase = "Cancelling: the worker stops after the current batch"
    elif retry_in is not None and retry_in > 0:
        phase = f"Automatic retry in {duration(retry_in)}"
    return {
        "job": e,
        "seq": seq,
        "active": active,
        "running": running,
        "label": "cancelling" if e.cancel_requested and running else e.status,
        "phase": phase,
        # The page counts an automatic retry's wait down to this moment (live.js tick).
        "retry_at": iso(e.next_attempt_at) if retry_in is not None and retry_in > 0 and not e.cancel_requested else "",
        "percent": f"{percent:.1f}".removesuffix(".0"),
        "bar_width": f"{percent:.1f}",
        "rate": f"{rate:,.0f}" if rate else "—",
        "eta": duration(eta) if eta is not None else "—",
        "eta_s": eta,
        "heartbeat_age": f"{heartbeat_age:.0f}" if heartbeat_age is not None else "",
        "stalled": stalled,
        "slow": slow,
        "idle": duration(idle_s),
        "error_label": ERROR_LABELS.get(e.error_type, e.error_type),
        "suggested": json.dumps(e.suggested_retry_params, sort_keys=True) if e.suggested_retry_params else "",
        "auto_retry_pending": e.status == e.Status.QUEUED and bool(e.error_type),
        "layers": ", ".join(map(str, e.layers)),
        "hooks": ", ".join(e.hooks),
        "api_url": f"/api/v1/extractions/{e.pk}",
        # Annotated by selectors.extraction_list; asked here for a row read elsewhere.
        "original_deleted": e.original_deleted if hasattr(e, "original_deleted") else bool(
            e.original_extraction_id) and not Extraction.objects.filter(pk=e.original_extraction_id).exists(),
        "dismissible": e.status in services.DISMISSABLE and e.dismissed_at is None,
        "heartbeat_at": _heartbeat_at(e, shards) if running else "",
        "shard_rows": [_shard_row(shard) for shard in shards],
        "progress_at": iso(last_move),
        "max_attempts": settings.JOBSITE_MAX_ATTEMPTS,
        "has_files": e.output_dir.is_dir(),
        "took": duration((e.finished_at - e.started_at).total_seconds()) if e.finished_at and e.started_at else "",
    }


def _heartbeat_at(e: Extraction, shards: list) -> str:
    """When its worker last spoke; for a job its shards run, its most silent running shard's (the
    page calls it stalled as the server does), and nothing while no shard runs."""
    if not e.sharded:
        return iso(e.heartbeat_at or e.started_at)
    beat = e.oldest_shard_beat(shards)
    return iso(beat) if beat else ""


def _shard_row(shard) -> dict:
    said = shard.describe()
    percent = 100.0 if shard.status == shard.Status.COMPLETED else shard.percent
    age = said["heartbeat_age_s"]
    return {
        **said,
        "percent": f"{percent:.1f}".removesuffix(".0"),
        "heartbeat_age": f"{age:.0f}" if age is not None else "",
        "refusals": sorted(said["refusals"].items()),
    }


def _lineage_rows(extractions: list[Extraction]) -> list[dict]:
    """Originals newest first, each followed by its retries (depth-first, oldest retry first)."""
    by_id = {e.pk: e for e in extractions}
    children = defaultdict(list)
    roots = []
    for e in extractions:
        if e.original_extraction_id in by_id:
            children[e.original_extraction_id].append(e)
        else:
            roots.append(e)
    rows = []

    def walk(e: Extraction, depth: int):
        rows.append({"job": e, "depth": depth, "indent": depth * 1.5, "has_files": e.output_dir.is_dir()})
        for child in sorted(children[e.pk], key=lambda c: (c.created_at, c.pk)):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return rows


def _attention_context(request, seq: int) -> dict:
    """The "Active and needing attention" panel: its cards, the job a person opened from the
    history (?job=<id>), and why nothing moves when jobs wait and no worker runs."""
    selected = id_param(request, "job")
    jobs = selectors.extraction_attention(selected=selected)
    waiting = any(job.status in Extraction.ACTIVE for job in jobs)
    return {
        "attention": [job_view(e, seq=seq) for e in jobs], "selected": selected,
        "no_worker": workers_missing() if waiting else "",
        "retry_batch_sizes": RetryForm.base_fields["batch_size"].choices,
    }


def _history(request) -> dict:
    """The history panel: one page of extractions (?page=, ?limit=), filtered by ?status= and
    ?model=, each retry under its original when both are on the page. A bad value is said in
    the panel (and the answer is a 400), never clamped in silence."""
    asked = {key: request.GET.get(key, "").strip() for key in ("status", "model", "page", "limit")}
    filters = {key: asked[key] for key in ("status", "model") if asked[key]}
    try:
        page = selectors.extraction_page(**{key: value or None for key, value in asked.items()})
        error = ""
    except JobInputError as exc:
        page, error = selectors.Page(items=[], count=0, page=1, pages=1, limit=selectors.PAGE_SIZE), str(exc)
    keep = {**filters, **({"limit": page.limit} if asked["limit"] and not error else {})}
    shown = sorted({page.page, 1, page.pages, *range(max(1, page.page - 2), min(page.pages, page.page + 2) + 1)})
    links, previous = [], 0
    for number in shown:
        if number - previous > 1:
            links.append({"gap": True})
        links.append({"number": number, "query": urlencode({**keep, "page": number}), "current": number == page.page})
        previous = number
    return {
        "rows": _lineage_rows(page.items), "page": page, "error": error, "filters": filters,
        "query": urlencode({**keep, **({"page": page.page} if page.page > 1 else {})}),
        "links": links if page.pages > 1 else [],
        "newer": urlencode({**keep, "page": page.page - 1}) if page.page > 1 else "",
        "older": urlencode({**keep, "page": page.page + 1}) if page.page < page.pages else "",
        "first": (page.page - 1) * page.limit + 1 if page.items else 0,
        "last": (page.page - 1) * page.limit + len(page.items),
        "statuses": Extraction.Status.values, "models": list(selectors.model_list()),
    }


def _page_context(request, form=None, register_form: RegisterForm | None = None) -> dict:
    context = live_context(topic=TOPIC)  # the seq first: an event written meanwhile is replayed
    # What the cards show, as their fragments say it: every event up to here is in the rows read
    # below (a replayed one is not drawn over them: its older payload would take a bar back).
    seq = last_event_seq()
    # ?model= and ?dataset= (set after one is registered) pick it in the start form.
    picked = {key: id_param(request, key) for key in ("model", "dataset")}
    last = request.session.get(LAST_START) or {}
    form = form or ExtractionStartForm(initial={**_initial_from(last), **{key: pk for key, pk in picked.items() if pk}})
    register = {"model": RegisterForm(kind="model"), "dataset": RegisterForm(kind="dataset")}
    if register_form is not None:
        register[register_form.prefix] = register_form
    context.update(
        form=form,
        history=_history(request),
        datasets=selectors.dataset_list(),
        register_pairs=[(register["model"], "A model"), (register["dataset"], "A dataset")],
        model_roots=[str(root) for root in settings.JOBSITE_MODEL_ROOTS],
        data_dir=str(settings.JOBSITE_DATA_DIR),
        **_attention_context(request, seq),
    )
    return context


LAST_START = "extraction_last_start"


def _initial_from(last: dict) -> dict:
    """The start form's initial values from the last start's (as posted): a value the form
    would now refuse (a model deleted since, say) is left to the field's default."""
    if not last:
        return {}
    bound = ExtractionStartForm(last)
    bound.is_valid()
    initial = {name: last[name] for name in bound.fields if name in last and name not in bound.errors}
    initial["auto_retry_on_oom"] = last.get("auto_retry_on_oom") in ("on", "true", "1")
    return initial


def _back_to(extraction_id: int | None = None):
    url = reverse("extraction:list")
    # ?job= keeps the card on the page whatever its status (a cancel, a refused retry).
    return redirect(f"{url}?job={extraction_id}#extraction-{extraction_id}" if extraction_id else url)


def _add_service_problems(form: ExtractionStartForm) -> None:
    """A form refused for one field is checked by the service for the others as well (a layer the
    model does not have, a max length past its positions), so that every error shows at once."""
    values = form.service_values()
    if values is None:
        return
    problems, _, _ = services.parameter_problems(**values)
    for problem in problems:
        if problem.field not in form.errors:
            add_refusal(form, problem)


# -- pages and fragments ---------------------------------------------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def extraction_page(request):
    if request.method == "GET":
        asked = id_param(request, "job")
        if asked and not Extraction.objects.filter(pk=asked).exists():  # a link to a deleted job, say
            messages.error(request, f"Extraction {asked} does not exist (it may have been deleted).")
        context = _page_context(request)
        status = 400 if context["history"]["error"] else 200
        return render(request, "extraction/extractions.html", context, status=status)
    check(request.user, "extraction.add_extraction")
    form = ExtractionStartForm(request.POST)
    if not form.is_valid():
        _add_service_problems(form)
    else:
        data = form.cleaned_data
        try:
            extraction, created = services.extraction_start(
                model=data["model"], dataset=data["dataset"], layers=data["layers"], hooks=data["hooks"],
                batch_size=data["batch_size"], max_samples=data["max_samples"], max_length=data["max_length"],
                storage_dtype=data["storage_dtype"], auto_retry_on_oom=data["auto_retry_on_oom"],
                shards=data["shards"], user=request.user,
            )
        except JobInputError as exc:
            for problem in getattr(exc, "problems", [exc]):
                add_refusal(form, problem)
        except TransitionError as exc:  # the same request failed before: its retry is the way on
            form.add_error(None, str(exc))
        else:
            # The form shows these values again after the start: the next one is often a neighbour.
            request.session[LAST_START] = {
                name: request.POST.getlist(name) if name == "hooks" else request.POST.get(name, "")
                for name in form.fields
            }
            if created:
                messages.success(request, f"Extraction {extraction.pk} is queued.")
            else:
                asked = extraction.identical_sentence(batch_size=data["batch_size"],
                                                      auto_retry_on_oom=data["auto_retry_on_oom"])
                messages.info(request, f"{asked} Here it is; no second copy was started.")
            return _back_to(extraction.pk)
    return render(request, "extraction/extractions.html", _page_context(request, form), status=400)


@login_required
@post_only(lambda request: f"{reverse('extraction:list')}#register")
def register(request):
    """A model or a dataset by its path on the server; a refusal shows the page again with the
    form's error, and a path already registered names the record it already is."""
    kind = request.POST.get("kind", "")
    # Each kind has its own permission; a kind that is neither is refused as a model would be.
    check(request.user, "extraction.add_dataset" if kind == "dataset" else "extraction.add_modelrecord")
    if kind not in ("model", "dataset"):
        messages.error(request, "Register a model or a dataset.")
        return _back_to()
    form = RegisterForm(request.POST, request.FILES, kind=kind)
    if form.is_valid():
        path, name, upload = form.cleaned_data["path"], form.cleaned_data["name"], form.cleaned_data.get("upload")
        try:
            if kind == "model":
                record, created = services.registered(services.model_register, path=path, name=name)
            elif upload:
                record, created = services.registered(services.dataset_upload, upload=upload, name=name)
            else:
                record, created = services.registered(services.dataset_register, path=path, name=name)
        except JobInputError as exc:
            add_refusal(form, exc, default="upload" if upload else "path", renamed={"file": "upload"})
        else:
            if not created:
                messages.info(request, f"{record.path} is already registered as the {kind} {record.name}.")
            elif kind == "model":
                messages.success(request, f"Model {record.name} is registered: {record.architecture}, "
                                          f"{record.num_layers} layers, hidden size {record.hidden_size}.")
            else:
                messages.success(request, f"Dataset {record.name} is registered: {record.num_samples:,} "
                                          f"sample{'s' if record.num_samples != 1 else ''}.")
            return redirect(f"{reverse('extraction:list')}?{kind}={record.pk}#start")
    return render(request, "extraction/extractions.html", _page_context(request, register_form=form), status=400)


@login_required
@require_GET
def attention_fragment(request):
    return render(request, "extraction/_attention.html", _attention_context(request, last_event_seq()))


@login_required
@require_GET
def history_fragment(request):
    history = _history(request)
    return render(request, "extraction/_history.html", {"history": history}, status=400 if history["error"] else 200)


@login_required
@require_GET
def card_fragment(request, pk: int):
    seq = last_event_seq()
    return render(request, "extraction/_card.html", {
        "v": job_view(selectors.extraction_get(extraction_id=pk), seq=seq),
        "retry_batch_sizes": RetryForm.base_fields["batch_size"].choices,
    })


# -- actions -----------------------------------------------------------------------------------

def _confirm(request, extraction: Extraction, *, action: str, title: str, sentence: str, button: str):
    """Django's delete_selected way: a POST without `confirmed` (or a GET) shows a confirmation page."""
    return render(request, "extraction/confirm.html", {
        "job": extraction, "action": action, "title": title, "sentence": sentence, "button": button,
    })


@permission_required("extraction.cancel_extraction")
@require_http_methods(["GET", "POST"])
def extraction_cancel(request, pk: int):
    extraction = selectors.extraction_get(extraction_id=pk)
    if request.method == "GET" or request.POST.get("confirmed") != "1":
        return _confirm(
            request, extraction, action=reverse("extraction:cancel", args=[pk]), title=f"Cancel extraction {pk}?",
            sentence="A queued extraction stops at once; a running one stops after its current batch. "
                     "Completed samples are kept, and a retry continues from them.",
            button="Yes, cancel it",
        )
    try:
        extraction = services.extraction_cancel(extraction=extraction)
    except TransitionError as exc:
        messages.error(request, str(exc))
    else:
        if extraction.status == Extraction.Status.CANCELLED:
            messages.success(request, f"Extraction {pk} is cancelled.")
        else:
            messages.success(request, f"Extraction {pk} is stopping; its worker stops after the current batch.")
    return _back_to(pk)


@permission_required("extraction.retry_extraction")
@post_only(lambda request, pk: f"{reverse('extraction:list')}?job={pk}#extraction-{pk}")
def extraction_retry(request, pk: int):
    extraction = selectors.extraction_get(extraction_id=pk)
    form = RetryForm(request.POST)
    if not form.is_valid():
        problems = form_problems(form)
        messages.error(request, f"Extraction {pk} was not retried. {problems}")
        return _back_to(pk)
    try:
        retry = services.extraction_retry(
            extraction=extraction, batch_size=form.cleaned_data["batch_size"],
            max_samples=form.cleaned_data["max_samples"], max_length=form.cleaned_data["max_length"],
            shards=form.cleaned_data["shards"], reason="retried from the page", user=request.user,
        )
    except (JobInputError, TransitionError) as exc:
        messages.error(request, f"Extraction {pk} was not retried: {exc}")
        return _back_to(pk)
    messages.success(request, f"Extraction {retry.pk} retries extraction {pk}. "
                              f"{services.retry_starts_from(original=extraction, retry=retry)}")
    return _back_to(retry.pk)


@permission_required("extraction.retry_extraction")
@require_POST
def extraction_retry_suggested(request, pk: int):
    extraction = selectors.extraction_get(extraction_id=pk)
    try:
        retry = services.extraction_retry_suggested(extraction=extraction, user=request.user, via="from the page")
    except (JobInputError, TransitionError) as exc:
        messages.error(request, f"Extraction {pk} was not retried: {exc}")
        return _back_to(pk)
    params = json.dumps(extraction.suggested_retry_params, sort_keys=True) if extraction.suggested_retry_params else ""
    with_params = f" with {params}" if params else ""
    messages.success(request, f"Extraction {retry.pk} retries extraction {pk}{with_params}. "
                              f"{services.retry_starts_from(original=extraction, retry=retry)}")
    return _back_to(retry.pk)


@permission_required("extraction.dismiss_extraction")
@require_POST
def extraction_dismiss(request, pk: int):
    """A failed or cancelled job seen: out of the attention panel, into the history."""
    try:
        services.extraction_dismiss(extraction=selectors.extraction_get(extraction_id=pk), user=request.user)
    except TransitionError as exc:
        messages.error(request, f"Extraction {pk} was not dismissed: {exc}")
        return _back_to(pk)
    messages.success(request, f"Extraction {pk} is dismissed; it stays in the history, with its files and Retry.")
    return redirect(f"{reverse('extraction:list')}#row-{pk}")


@permission_required("extraction.resume_extraction")
@require_POST
def extraction_resume(request, pk: int):
    resume_with_message(request, selectors.extraction_get(extraction_id=pk), f"Extraction {pk}")
    return _back_to(pk)


@permission_required("extraction.cancel_extraction")
@permission_required("extraction.retry_extraction")
@require_http_methods(["GET", "POST"])
def extraction_restart(request, pk: int):
    """'Taking longer than expected' → Retry: cancel, then retry from the checkpoint once stopped."""
    extraction = selectors.extraction_get(extraction_id=pk)
    if request.method == "GET" or request.POST.get("confirmed") != "1":
        return _confirm(
            request, extraction, action=reverse("extraction:restart", args=[pk]), title=f"Retry extraction {pk}?",
            sentence="It is cancelled, then started again as a new extraction that continues from the samples "
                     "already completed.",
            button="Yes, cancel and retry",
        )
    try:
        retry = services.extraction_restart(
            extraction=extraction, reason="retried from the page: it was taking longer than expected",
            user=request.user,
        )
    except services.StillStopping as exc:
        messages.warning(request, str(exc))
        return _back_to(pk)
    except (JobInputError, TransitionError) as exc:
        messages.error(request, f"Extraction {pk} was not retried: {exc}")
        return _back_to(pk)
    messages.success(request, f"Extraction {pk} is cancelled; extraction {retry.pk} retries it.")
    return _back_to(retry.pk)


@login_required
@require_GET
def model_page(request, pk: int):
    """A model's hook points: what each one is, its width, and why the others are not offered."""
    model = ModelRecord.objects.filter(pk=pk).first()
    if model is None:
        raise Http404(f"Model {pk} does not exist.")
    model = services.model_hook_points(model=model)
    points = [{"name": hook, "layer_name": f"blocks.L.{model.hook_points[hook]['transformerlens']}",
               **model.hook_points[hook]} for hook in BLOCK_ORDER if hook in model.hook_points]
    refused = [{"name": hook, "why": model.hook_refusals[hook]} for hook in BLOCK_ORDER if hook in model.hook_refusals]
    return render(request, "extraction/model.html", {"model": model, "points": points, "refused": refused,
                                                     "extractions": model.extractions.count()})


# -- output files ------------------------------------------------------------------------------

def _output_files(extraction: Extraction) -> dict[str, os.DirEntry]:
    """The regular files directly inside this extraction's output_dir, by name.

    The request only ever picks a name from this listing; no path from it reaches the file
    system, and a symlink (or anything resolving elsewhere) is left out.
    """
    directory = extraction.output_dir
    try:
        root = directory.resolve(strict=True)
        entries = list(os.scandir(directory))
    except OSError:
        return {}
    files = {}
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and Path(entry.path).resolve().parent == root:
            files[entry.name] = entry
    return dict(sorted(files.items()))


@login_required
@require_GET
def extraction_files(request, pk: int):
    extraction = selectors.extraction_get(extraction_id=pk)
    files = _output_files(extraction)
    metadata = None
    if "metadata.json" in files:
        try:
            metadata = json.dumps(json.loads(Path(files["metadata.json"].path).read_text()), indent=2)
        except (OSError, ValueError):
            metadata = None
    # A run that did not complete: its files hold the samples its checkpoint counts, and zeros elsewhere.
    samples_done = None
    if metadata is None and "checkpoint.json" in files:
        try:
            samples_done = int(json.loads(Path(files["checkpoint.json"].path).read_text())["samples_done"])
        except (OSError, ValueError, KeyError, TypeError):
            samples_done = None
    rows = [{"name": name, "size": entry.stat(follow_symlinks=False).st_size} for name, entry in files.items()]
    context = {
        "job": extraction, "files": rows, "metadata": metadata, "total": sum(r["size"] for r in rows),
        "samples_done": samples_done,
        "partial_state": "is still running" if extraction.status in Extraction.ACTIVE
        else "was cancelled before it finished" if extraction.status == Extraction.Status.CANCELLED
        else "failed before it finished",
    }
    if files:
        output, unreadable = output_page.open_for_page(extraction.output_dir)
        context["unreadable"] = unreadable
        if output is not None:
            context.update(
                snippets=output_page.snippets(output, str(extraction.output_dir), extraction.pk),
                viewer=output_page.sample_view(output, id_param(request, "sample"),
                                               request.GET.get("point")),
                histograms=output_page.histograms(output),
            )
    return render(request, "extraction/files.html", context)


@login_required
@require_GET
def extraction_file(request, pk: int, name: str):
    extraction = selectors.extraction_get(extraction_id=pk)
    entry = _output_files(extraction).get(name)
    if entry is None:
        raise Http404(f"Extraction {pk} has no file named {name}.")
    is_json = name.endswith(".json")
    return FileResponse(
        open(entry.path, "rb"), as_attachment=not is_json, filename=name,
        content_type="application/json" if is_json else "application/octet-stream",
    )
