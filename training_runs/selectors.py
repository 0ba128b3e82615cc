from __future__ import annotations

import os

from django.conf import settings
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionNotAllowed
from training_runs.models import Corpus, TrainingPair, TrainingRun


def training_run_list(*, status: str | None = None) -> QuerySet[TrainingRun]:
    runs = TrainingRun.objects.select_related("corpus")
    return runs.filter(status=status) if status else runs


def training_run_get(*, run_id: int) -> TrainingRun:
    return get_object_or_404(training_run_list(), pk=run_id)


def training_run_open() -> TrainingRun | None:
    """The run that is not completed, if any: the database allows at most one."""
    return training_run_list().exclude(status=TrainingRun.Status.COMPLETED).order_by("pk").first()


def corpus_list() -> QuerySet[Corpus]:
    return Corpus.objects.all()


def pair_list(*, run: TrainingRun, review: str | None = None) -> QuerySet[TrainingPair]:
    pairs = run.pairs.select_related("chunk")
    return pairs.filter(review=review) if review else pairs


def training_run_search(*, run: TrainingRun, query: str, k: int = 5) -> list[dict]:
    """The k chunks nearest to `query` through the run's trained adapter."""
    import numpy as np  # noqa: PLC0415

    from training_runs.trainer import ADAPTER, apply_adapter, embed, load_adapter  # noqa: PLC0415

    if run.status != TrainingRun.Status.COMPLETED:  # the run's state, not the query, is what is wrong
        raise TransitionNotAllowed(f"Training run {run.pk} {run.state_phrase}; search needs a completed run.")
    adapter_path = os.path.join(run.output_dir, ADAPTER)
    index_path = os.path.join(run.output_dir, "index.npy")
    if not (os.path.exists(adapter_path) and os.path.exists(index_path)):
        raise JobInputError(f"Training run {run.pk} has no saved adapter; train it again.")
    if not query.strip():
        raise JobInputError("The query is empty.", field="query")
    chunks = np.load(index_path)
    vector = apply_adapter(load_adapter(adapter_path), embed(settings.JOBSITE_ENCODER_PATH, [query]))
    scores = (vector @ chunks.T)[0]
    best = np.argsort(-scores)[:k]
    by_position = list(run.corpus.chunks.order_by("index").values("pk", "index", "document", "text"))
    return [{**by_position[i], "score": round(float(scores[i]), 4)} for i in best]
