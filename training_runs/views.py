"""The training page: one workflow card (generate, review, train) and the run history.

Views are thin callers of training_runs.services (and jobsite.views.resume_with_message for a run
whose worker went silent); a service's JobInputError or TransitionError becomes a message.
Reading needs a login, every POST its action's permission (jobsite.permissions). While training
is unavailable the page says why and lists the corpora, which can still be prepared: no run
could succeed.
"""

from __future__ import annotations

import math
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobsite.errors import JobInputError
from jobsite.forms import add_refusal
from jobsite.health import workers_missing
from jobsite.lifecycle import TransitionError
from jobsite.permissions import permission_required
from jobsite.selectors import last_event_seq
from jobsite.views import (
    OPERATORS_ONLY, duration, form_problems, id_param, iso, live_context, post_only, resume_with_message,
)
from training_runs import selectors, services
from training_runs.forms import CorpusForm, GenerateForm, PairEditForm, ReviewForm, TrainForm
from training_runs.models import TrainingPair, TrainingRun

TOPIC = "training."
HISTORY_LIMIT = 200
PAIRS_SHOWN = 300
KS = (1, 5, 10)
Status = TrainingRun.Status
FAILED = TrainingRun.RETRYABLE_FROM


# -- presentation --------------------------------------------------------------------------

def train_blocked_sentence(run: TrainingRun, approved: int) -> str:
    """Why Train is disabled, in the words the service refuses with; empty when it is not."""
    needed = settings.JOBSITE_MIN_APPROVED_PAIRS
    if approved >= needed:
        return ""
    return (f"Training needs at least {needed} approved pairs; training run {run.pk} has {approved}. "
            "Approve more pairs first.")


def recall_rows(run: TrainingRun) -> list[dict]:
    """Test recall of the encoder alone and of the chosen epoch, with validation's beside them."""
    metrics = run.metrics or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    val_before, val_after = metrics.get("validation_before") or {}, metrics.get("validation_after") or {}
    rows = []
    for k in KS:
        key = f"recall@{k}"
        if key in before and key in after:
            rows.append({"k": k, "before": f"{before[key]:.2f}", "after": f"{after[key]:.2f}",
                         "better": after[key] > before[key], "worse": after[key] < before[key],
                         "val_before": f"{val_before[key]:.2f}" if key in val_before else "",
                         "val_after": f"{val_after[key]:.2f}" if key in val_after else ""})
    return rows


def loss_chart(losses: list[float], validation: list[dict] | None = None, best_epoch: int | None = None,
               baseline: dict | None = None) -> dict | None:
    """The loss curve and validation recall@5 per epoch as SVG coordinates, drawn by the server
    so it shows without JavaScript: loss on the left axis, recall@5 on the right (with the
    encoder alone's as a dashed line), and the chosen epoch marked."""
    if not losses:
        return None
    width, height, left, right, top, bottom = 600, 200, 56, 48, 14, 34
    low, high = min(losses), max(losses)
    span = (high - low) or abs(high) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom
    count = len(losses)

    def x(i: int) -> float:
        return round(left + (plot_w * i / (count - 1) if count > 1 else plot_w / 2), 1)

    def y(value: float) -> float:
        return round(top + plot_h * (high - value) / span, 1)

    # Every loss with the same decimals, enough for 3 significant digits of the smallest:
    # "1.140 → 0.216", not "1.14 → 0.2162".
    smallest = min((abs(v) for v in losses if v), default=1.0)
    decimals = min(8, max(0, 2 - math.floor(math.log10(smallest))))
    points = [{"x": x(i), "y": y(v), "epoch": i + 1, "loss": f"{v:.{decimals}f}"} for i, v in enumerate(losses)]
    step = max(1, round(count / 8))
    x_ticks = [p for i, p in enumerate(points) if i % step == 0 or i == count - 1]
    y_ticks = [{"y": y(v), "label": f"{v:.3g}"} for v in sorted({high, (high + low) / 2, low}, reverse=True)]
    chart = {
        "width": width, "height": height, "left": left, "right": width - right, "top": top,
        "bottom": height - bottom, "mid_x": left + plot_w / 2, "points": points,
        "polyline": " ".join(f"{p['x']},{p['y']}" for p in points),
        "x_ticks": x_ticks, "y_ticks": y_ticks, "first": points[0]["loss"], "last": points[-1]["loss"],
    }
    recalls = [r.get("recall@5", 0.0) for r in (validation or [])][:count]
    if recalls:
        base = (baseline or {}).get("recall@5")
        r_low, r_high = min(recalls + ([base] if base is not None else [])), max(recalls + ([base] if base is not None else []))
        r_span = (r_high - r_low) or 0.1
        r_low, r_high = max(0.0, r_low - r_span * 0.1), min(1.0, r_high + r_span * 0.1)
        r_span = (r_high - r_low) or 0.1

        def ry(value: float) -> float:
            return round(top + plot_h * (r_high - value) / r_span, 1)

        val_points = [{"x": x(i), "y": ry(v), "epoch": i + 1, "recall": f"{v:.2f}"} for i, v in enumerate(recalls)]
        chart.update(
            validation=val_points, val_polyline=" ".join(f"{p['x']},{p['y']}" for p in val_points),
            r_ticks=[{"y": ry(v), "label": f"{v:.2f}"} for v in sorted({r_high, r_low}, reverse=True)],
            r_axis_x=width - right + 6, baseline_y=ry(base) if base is not None else None,
            baseline=f"{base:.2f}" if base is not None else "",
        )
    if best_epoch and 1 <= best_epoch <= count:
        chart["chosen"] = {"x": x(best_epoch - 1), "epoch": best_epoch}
    return chart


def result_chart(run: TrainingRun) -> dict | None:
    return loss_chart(run.loss_curve, run.validation_curve, run.best_epoch, (run.metrics or {}).get("validation_before"))


def embedding_weights(run: TrainingRun) -> dict:
    """How the page tells the time left while texts are embedded: the chunks come first and the
    short queries after, so a text's cost is weighed by its length (a query's relative to a
    chunk's); texts/s measured on chunks would promise the queries several times too long."""
    sizes = selectors.embedding_text_sizes(run=run)
    weight = sizes["query_chars"] / sizes["chunk_chars"] if sizes["chunk_chars"] else 1.0
    return {"chunks": sizes["chunks"], "query": f"{weight:.4f}"}


def run_view(run: TrainingRun, *, seq: int = 0, pairs_page: int = 1) -> dict:
    """Everything the workflow card shows for the open run, computed once here; the pairs to
    review are shown PAIRS_SHOWN at a time, page `pairs_page`."""
    now = timezone.now()
    active = run.status in TrainingRun.ACTIVE
    held = active and bool(run.worker)  # a phase waits for a worker until one takes it
    training = run.status in (Status.TRAINING, Status.TRAINING_FAILED)
    # Training counts texts embedded, then epochs: one pair of fields the live updates follow.
    done, total = run.progress_counts
    percent = min(100.0, 100.0 * done / total) if total else 0.0
    last_move = max(m for m in (run.queued_at, run.started_at, run.progress_at) if m)
    idle_s = (now - last_move).total_seconds() if active else None
    stalled = run.is_stalled
    heartbeat_age = run.heartbeat_age_s
    if not active:
        phase = ""
    elif not held:
        phase = "Waiting for a worker"
    elif training:
        phase = "Training the adapter"
    else:
        phase = "Generating queries"
    view = {
        "run": run,
        "seq": seq,
        "active": active,
        "held": held,
        "failed": run.status in FAILED,
        "training": training,
        "done_field": "progress_done" if training else "processed_chunks",
        "total_field": "progress_total" if training else "total_chunks",
        "done": done,
        "total": total,
        "phase": phase,
        "percent": f"{percent:.1f}".removesuffix(".0"),
        "bar_width": f"{percent:.1f}",
        "stalled": stalled,
        "slow": bool(active and not stalled and idle_s is not None and idle_s > settings.JOBSITE_SLOW_AFTER_S),
        "idle": duration(idle_s),
        "heartbeat_age": f"{heartbeat_age:.0f}" if heartbeat_age is not None else "",
        "heartbeat_at": iso(run.heartbeat_at or run.started_at) if held else "",
        "progress_at": iso(last_move),
        "api_url": f"/api/v1/training/runs/{run.pk}",
        "error_label": run.error_label,
    }
    if active and run.is_embedding:
        view["embedding_weights"] = embedding_weights(run)
    if run.status == Status.GENERATED:
        counts = services.review_counts(run)
        total_pairs = sum(counts.values())
        pages = max(1, -(-total_pairs // PAIRS_SHOWN))
        page = min(max(1, pairs_page), pages)
        first = (page - 1) * PAIRS_SHOWN
        pairs = list(selectors.pair_list(run=run)[first:first + PAIRS_SHOWN])
        view.update(
            counts=counts,
            pairs=pairs,
            pairs_total=total_pairs,
            pairs_page=page,
            pairs_pages=pages,
            pairs_first=first + 1,
            pairs_last=first + len(pairs),
            train_blocked=train_blocked_sentence(run, counts[TrainingPair.Review.APPROVED]),
        )
    return view


def row_view(run: TrainingRun, *, open_id: int | None = None) -> dict:
    """A history row; every row opens (one at a time) into what its status calls for. A removed
    run's row stays, saying who removed it and when, its pair count and its verdict."""
    removed = run.is_removed
    is_completed = run.status == Status.COMPLETED and not removed
    return {
        "run": run,
        "removed": removed,
        "active": run.status in TrainingRun.ACTIVE and not removed,
        "failed": run.status in FAILED and not removed,
        # A failed run can be proceeded elsewhere (another tab, the API): its row reads that too.
        "refreshable": (run.status in TrainingRun.ACTIVE or run.status in FAILED) and not removed,
        "open": run.pk == open_id,
        "recall": recall_rows(run) if is_completed else [],
        "chart": result_chart(run) if is_completed else None,
        "error_label": run.error_label,
        "api_url": f"/api/v1/training/runs/{run.pk}",
    }


def _open_id(request) -> int | None:
    return id_param(request, "open")


def _workflow_context(request, *, seq: int) -> dict:
    current = selectors.training_run_open()
    latest = selectors.training_run_list(status=Status.COMPLETED).filter(TrainingRun.live()).first()
    corpora = selectors.corpus_list()
    # ?corpus= (set after a corpus is created) picks it in the Generate form; ?pairs= is the page
    # of pairs under review. Live redraws ask for the same.
    chosen = id_param(request, "corpus")
    wanted = request.GET.get("pairs", "")
    # Beyond any count (too long for an id): the last page, as any page past the end is.
    pairs_page = id_param(request, "pairs") or (10**18 if wanted.isascii() and wanted.isdigit() else 1)
    query = {"corpus": chosen} if chosen else {}
    if pairs_page > 1:
        query["pairs"] = pairs_page
    return {
        "workflow_url": reverse("training_runs:workflow") + (f"?{urlencode(query)}" if query else ""),
        # Without a choice, the open run's corpus: the form goes on showing what was generated from.
        "form": GenerateForm(initial={"corpus": chosen or current.corpus_id} if chosen or current else None),
        "chosen_corpus": chosen,
        "has_corpora": corpora.exists(),
        "current": run_view(current, seq=seq, pairs_page=pairs_page) if current else None,
        "blocking_sentence": services.blocking_sentence(current) if current else "",
        # A run generating or training with no worker alive does not move: the page says why.
        "no_worker": workers_missing() if current and current.status in TrainingRun.ACTIVE else "",
        "latest": latest,
        "latest_recall": recall_rows(latest) if latest else [],
        "latest_chart": result_chart(latest) if latest else None,
        "staff_only_sentence": OPERATORS_ONLY,
        "min_approved_pairs": settings.JOBSITE_MIN_APPROVED_PAIRS,
    }


def _corpora_context(request, corpus_form: CorpusForm | None = None) -> dict:
    return {
        # order_by again: Meta.ordering does not apply to a query with GROUP BY.
        "corpora": selectors.corpus_list().annotate(num_chunks=Count("chunks")).order_by("name"),
        "corpus_form": corpus_form or CorpusForm(),
    }


def _history_context(request) -> dict:
    open_id = _open_id(request)
    runs = selectors.training_run_list()[:HISTORY_LIMIT]
    return {"rows": [row_view(run, open_id=open_id) for run in runs]}


def _back(run_id: int | None = None, *, pairs_page: str = "", corpus: int | None = None):
    url = reverse("training_runs:page")
    query = {"corpus": corpus} if corpus else {}
    if pairs_page.isdecimal() and pairs_page not in ("0", "1"):
        query["pairs"] = pairs_page
    url += f"?{urlencode(query)}" if query else ""
    return redirect(f"{url}#run-{run_id}" if run_id else url)


def said(request, run: TrainingRun, sentence: str) -> None:
    """A success that tells where the run now stands: the page takes it down once a later event
    of the run says otherwise (a generation that started, then failed)."""
    messages.success(request, sentence, extra_tags=f"{run.topic} {run.status}")


# -- page and fragments -----------------------------------------------------------------------

def _page(request, *, corpus_form: CorpusForm | None = None, status: int = 200):
    available, reason = services.training_availability()
    if not available:  # corpora can be prepared meanwhile; a refused one keeps its sentence
        return render(request, "training_runs/unavailable.html",
                      {"reason": reason, **_corpora_context(request, corpus_form),
                       "rows": _history_context(request)["rows"]}, status=status)
    context = live_context(topic=TOPIC)  # the seq first: an event written meanwhile is replayed
    # The cards' seq as their fragments have it: a replayed event is not drawn over the rows.
    context.update(_workflow_context(request, seq=last_event_seq()))
    context.update(_corpora_context(request, corpus_form))
    context.update(_history_context(request))
    return render(request, "training_runs/training.html", context, status=status)


@login_required
@require_GET
def training_page(request):
    return _page(request)


@login_required
@require_GET
def workflow_fragment(request):
    return render(request, "training_runs/_workflow.html", _workflow_context(request, seq=last_event_seq()))


@login_required
@require_GET
def corpora_fragment(request):
    return render(request, "training_runs/_corpora_list.html", _corpora_context(request))


@login_required
@require_GET
def history_fragment(request):
    return render(request, "training_runs/_history.html", _history_context(request))


@login_required
@require_GET
def row_fragment(request, pk: int):
    run = selectors.training_run_get(run_id=pk)
    return render(request, "training_runs/_row.html", {
        "row": row_view(run, open_id=_open_id(request)),
    })


# -- actions -----------------------------------------------------------------------------------

@permission_required("training_runs.add_corpus")
@post_only(lambda request: f"{reverse('training_runs:page')}#corpora")
def training_corpus_create(request):
    """A corpus from the page's form; a refusal shows the page again with the form's errors."""
    form = CorpusForm(request.POST, request.FILES)
    if form.is_valid():
        data = form.cleaned_data
        try:
            corpus = services.corpus_create(name=data["name"], path=data["path"], uploads=data["files"],
                                            chunk_size=data["chunk_size"], chunk_overlap=data["chunk_overlap"])
        except JobInputError as exc:
            add_refusal(form, exc, default="files" if data["files"] else "path")
        else:
            chunks = corpus.chunks.count()
            messages.success(request, f"Corpus {corpus.name} is ready: {corpus.num_documents:,} "
                                      f"document{'s' if corpus.num_documents != 1 else ''}, {chunks:,} "
                                      f"chunk{'s' if chunks != 1 else ''}. Generate pairs from it below.")
            return redirect(f"{reverse('training_runs:page')}?corpus={corpus.pk}#workflow")
    return _page(request, corpus_form=form, status=400)


@permission_required("training_runs.add_trainingrun")
@post_only(lambda request: f"{reverse('training_runs:page')}#workflow")
def training_generate(request):
    form = GenerateForm(request.POST)
    if not form.is_valid():
        problems = form_problems(form)
        messages.error(request, f"No generation was started. {problems}")
        return _back()
    corpus = form.cleaned_data["corpus"]
    try:
        run = services.training_run_generate(corpus=corpus, generator=form.cleaned_data["generator"],
                                             queries_per_chunk=form.cleaned_data["queries_per_chunk"] or 2,
                                             user=request.user)
    except (JobInputError, TransitionError) as exc:
        messages.error(request, str(exc))
        return _back()
    said(request, run, f"Training run {run.pk} is generating pairs for the {run.total_chunks:,} chunks "
                       f"of {corpus.name}.")
    return _back(run.pk, corpus=corpus.pk)


@permission_required("training_runs.change_trainingpair")
@require_POST
def training_review(request, pk: int):
    run = selectors.training_run_get(run_id=pk)
    page = request.POST.get("pairs", "")[:6]  # the page of pairs the decision was made on
    form = ReviewForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"No pair was reviewed. {form_problems(form)}")
        return _back(pk, pairs_page=page)
    decision, pair_ids = form.cleaned_data["decision"], form.cleaned_data["pair_ids"]
    try:
        updated = services.training_run_review(run=run, decision=decision, pair_ids=pair_ids)
    except (JobInputError, TransitionError) as exc:
        messages.error(request, str(exc))
        return _back(pk, pairs_page=page)
    messages.success(request, services.review_sentence(run, updated=updated, decision=decision))
    return _back(pk, pairs_page=page)


@permission_required("training_runs.change_trainingpair")
@require_http_methods(["GET", "POST"])
def training_pair_edit(request, pk: int, pair_id: int):
    """A page of its own for one pair's query (the review table is one form already): the
    chunk it must answer beside the query; saving approves the pair and goes back to its page."""
    run = selectors.training_run_get(run_id=pk)
    pair = selectors.pair_list(run=run).filter(pk=pair_id).first()
    if pair is None:
        messages.error(request, f"Pair {pair_id} does not belong to training run {pk}.")
        return _back(pk)
    form = PairEditForm(request.POST or None, initial={"query": pair.query, "pairs": request.GET.get("pairs", "")})
    if request.method == "POST" and form.is_valid():
        try:
            services.training_run_pair_edit(run=run, pair_id=pair.pk, query=form.cleaned_data["query"])
        except TransitionError as exc:
            messages.error(request, str(exc))
            return _back(pk)
        except JobInputError as exc:
            add_refusal(form, exc, default="query")
        else:
            messages.success(request, f"Pair {pair.pk} now asks “{' '.join(form.cleaned_data['query'].split())}” "
                                      "and is approved.")
            return _back(pk, pairs_page=form.cleaned_data["pairs"][:6])
    status = 400 if request.method == "POST" else 200
    return render(request, "training_runs/edit_pair.html", {"run": run, "pair": pair, "form": form}, status=status)


@permission_required("training_runs.train_trainingrun")
@require_POST
def training_train(request, pk: int):
    run = selectors.training_run_get(run_id=pk)
    form = TrainForm(request.POST)
    if not form.is_valid():
        errors = "; ".join(f"{name}: {' '.join(problems)}" for name, problems in form.errors.items())
        messages.error(request, f"Training run {pk} was not trained: {errors}")
        return _back(pk)
    try:
        services.training_run_train(run=run, epochs=form.cleaned_data["epochs"], patience=form.cleaned_data["patience"])
    except (JobInputError, TransitionError) as exc:
        messages.error(request, str(exc))
        return _back(pk)
    said(request, run, f"Training run {pk} is training on its approved pairs for at most {run.epochs} "
                       f"epoch{'s' if run.epochs != 1 else ''}; the epoch best on validation is kept.")
    return _back(pk)


@permission_required("training_runs.adopt_trainingrun")
@require_http_methods(["GET", "POST"])
def training_adopt(request, pk: int):
    """Adopt by hand an adapter the run did not adopt: without `confirmed` (or on a GET) a
    confirmation page that says what the run measured."""
    run = selectors.training_run_get(run_id=pk)
    try:
        services.training_run_check_adoptable(run=run)  # nobody confirms what cannot happen
    except TransitionError as exc:
        messages.error(request, str(exc))
        return _back(pk)
    return _once_confirmed(request, run, "training_runs/confirm_adopt.html",
                           act=lambda: services.training_run_adopt(run=run, user=request.user),
                           done=run.adopted_sentence)


@permission_required("training_runs.proceed_trainingrun")
@require_POST
def training_proceed(request, pk: int):
    run = selectors.training_run_get(run_id=pk)
    try:
        services.training_run_proceed(run=run)
    except (JobInputError, TransitionError) as exc:
        messages.error(request, str(exc))
        return _back(pk)
    said(request, run, run.proceeds_sentence)
    return _back(pk)


@permission_required("training_runs.stop_trainingrun")
@require_POST
def training_stop(request, pk: int):
    run = selectors.training_run_get(run_id=pk)
    try:
        run = services.training_run_stop(run=run)
    except TransitionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, run.stop_sentence)
    return _back(pk)


@permission_required("training_runs.resume_trainingrun")
@require_POST
def training_resume(request, pk: int):
    resume_with_message(request, selectors.training_run_get(run_id=pk), f"Training run {pk}")
    return _back(pk)


@permission_required("training_runs.remove_trainingrun")
@require_http_methods(["GET", "POST"])
def training_delete(request, pk: int):
    """Django's delete_selected way: without `confirmed` (or on a GET) a confirmation page."""
    run = selectors.training_run_get(run_id=pk)
    return _once_confirmed(request, run, "training_runs/confirm_delete.html",
                           act=lambda: services.training_run_remove(run=run, user=request.user),
                           done=f"Training run {pk} is removed: its pairs and files are deleted; its row stays in "
                                "the history.")


def _once_confirmed(request, run: TrainingRun, template: str, *, act, done: str):
    """Django's delete_selected way: without `confirmed` (or on a GET) the confirmation page;
    confirmed, the act, then the page with `done` or the refusal."""
    if request.method == "GET" or request.POST.get("confirmed") != "1":
        return render(request, template, {"run": run})
    try:
        act()
    except TransitionError as exc:
        messages.error(request, str(exc))
        return _back(run.pk)
    messages.success(request, done)
    return _back()

