from __future__ import annotations

import os
from functools import lru_cache

from django.conf import settings
from django.db.models import Avg, Count, QuerySet
from django.db.models.functions import Length
from django.shortcuts import get_object_or_404

from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionNotAllowed
from training_runs.models import Corpus, TrainingPair, TrainingRun


def training_run_list(*, status: str | None = None) -> QuerySet[TrainingRun]:
    runs = TrainingRun.objects.select_related("corpus", "removed_by")
    return runs.filter(status=status) if status else runs


def training_run_get(*, run_id: int) -> TrainingRun:
    return get_object_or_404(training_run_list(), pk=run_id)


def training_run_open() -> TrainingRun | None:
    """The run that is not completed nor removed, if any: the database allows at most one."""
    return training_run_list().filter(TrainingRun.live()).exclude(status=TrainingRun.Status.COMPLETED).order_by(
        "pk").first()


def corpus_list() -> QuerySet[Corpus]:
    return Corpus.objects.all()


def pair_list(*, run: TrainingRun, review: str | None = None) -> QuerySet[TrainingPair]:
    pairs = run.pairs.select_related("chunk")
    return pairs.filter(review=review) if review else pairs


def embedding_text_sizes(*, run: TrainingRun) -> dict:
    """What the training phase embeds, in its order: the corpus's chunks, then the approved
    queries; with the mean length in characters of each."""
    chunks = run.corpus.chunks.aggregate(count=Count("pk"), chars=Avg(Length("text")))
    queries = run.pairs.filter(review=TrainingPair.Review.APPROVED).aggregate(chars=Avg(Length("query")))
    return {"chunks": chunks["count"], "chunk_chars": chunks["chars"] or 0.0, "query_chars": queries["chars"] or 0.0}


@lru_cache(maxsize=4)
def _keyword_index(texts: tuple[str, ...]):
    """The chunks' keyword index, built once per process for the same texts (a search then costs
    its query, not a pass over the corpus), for a few corpora at a time."""
    from training_runs.trainer import KeywordIndex  # noqa: PLC0415

    return KeywordIndex(texts)


def training_run_search(*, run: TrainingRun, query: str, k: int = 5) -> list[dict]:
    """The k chunks nearest to `query`: through the run's adapter, with keyword matching at the
    weight its validation chose, where it was adopted; through the encoder alone where it was not
    (a worse adapter is never the result)."""
    import numpy as np  # noqa: PLC0415

    from training_runs.trainer import (ADAPTER, adapter_keyword_weight, apply_adapter, embed,  # noqa: PLC0415
                                       load_adapter, search_scores)

    if run.status != TrainingRun.Status.COMPLETED or run.is_removed:  # the run's state, not the query, is wrong
        raise TransitionNotAllowed(f"Training run {run.pk} {run.state_phrase}; search needs a completed run.")
    adapter_path = os.path.join(run.output_dir, ADAPTER)
    index_path = os.path.join(run.output_dir, "index.npy")
    uses_adapter = run.adopted is not False
    if not os.path.exists(index_path) or (uses_adapter and not os.path.exists(adapter_path)):
        raise JobInputError(f"Training run {run.pk}'s adapter or index is missing from {run.output_dir}; generate and "
                            "train a new run.")
    if not query.strip():
        raise JobInputError("The query is empty.", field="query")
    if not 1 <= k <= 100:
        raise JobInputError(f"k must be between 1 and 100; got {k}.", field="k")
    from training_runs.services import training_availability  # noqa: PLC0415

    available, reason = training_availability()
    if not available:  # said as a sentence, before the model library answers in its own words
        raise JobInputError(f"Search is unavailable: {reason}")
    chunks = np.load(index_path)
    from jobsite.paths import resolve_under  # noqa: PLC0415

    # The encoder as training resolved it, under the model roots, not the setting read as it stands.
    encoder = resolve_under(settings.JOBSITE_ENCODER_PATH, settings.JOBSITE_MODEL_ROOTS, "encoder", field=None)
    vector = embed(str(encoder), [query])
    by_position = list(run.corpus.chunks.order_by("index").values("pk", "index", "document", "text"))
    weight, keyword = 0.0, None
    if uses_adapter:
        vector = apply_adapter(load_adapter(adapter_path), vector)
        weight = adapter_keyword_weight(adapter_path)
        if weight:
            keyword = _keyword_index(tuple(chunk["text"] for chunk in by_position)).scores([query])
    scores = search_scores(vector, chunks, keyword, weight)[0]
    best = np.argsort(-scores, kind="stable")[:k]
    return [{**by_position[i], "score": round(float(scores[i]), 4)} for i in best]
