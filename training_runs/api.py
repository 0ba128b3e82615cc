from datetime import datetime
from typing import Literal

from django.conf import settings
from django.http import Http404
from django.shortcuts import get_object_or_404
from ninja import Field, File, Form, Query, Router, Schema, Status
from ninja.errors import HttpError
from ninja.files import UploadedFile

from jobsite.api import Input, JobOut, Message, Refusal, refuse_unknown_form_fields
from jobsite.permissions import require
from training_runs import selectors, services
from training_runs.models import Corpus, TrainingPair, TrainingRun

router = Router(tags=["training"])


class SettingsOut(Schema):
    is_available: bool
    reason: str
    encoder_path: str
    generators: list[str] = Field(description="the generators a new run can use now")
    generator_model_path: str
    generator_reason: str = Field(description="why the causal_lm generator is not offered; empty when it is")
    min_approved_pairs: int
    blocking_run_id: int | None
    blocking_sentence: str


class CorpusOut(Schema):
    id: int
    name: str
    source: str
    chunk_size: int
    chunk_overlap: int
    num_documents: int
    num_chunks: int

    @staticmethod
    def resolve_num_chunks(obj) -> int:
        return obj.chunks.count()


class CorpusIn(Input):
    name: str
    path: str = Field(description="a file or directory under JOBSITE_DATA_DIR")
    chunk_size: int = Field(500, ge=50, le=20000)
    chunk_overlap: int = Field(50, ge=0)


class RunIn(Input):
    corpus_id: int
    generator: Literal["local", "causal_lm"] = "local"
    queries_per_chunk: int = Field(2, ge=1, le=20)


class TrainIn(Input):
    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int | None = Field(None, ge=2, le=4096)
    learning_rate: float | None = Field(None, gt=0, le=0.1)
    patience: int | None = Field(None, ge=1, le=1000, description="epochs without a better validation recall@5 "
                                                                   "before training stops (default 3)")


class RunOut(JobOut):
    id: int
    corpus_id: int
    status: str
    status_label: str = Field(description="the status as the page, the admin and `training status` say it: "
                                          "\"stopped\", \"removed\", \"generating failed\", ...")
    progress: str
    generator: str
    queries_per_chunk: int
    total_chunks: int
    processed_chunks: int
    pair_count: int
    queries_dropped: int = Field(description="generated queries the filter dropped: empty, too short or long, not "
                                             "text, or a copy of the chunk")
    review_counts: dict
    epochs: int
    epochs_done: int
    texts_total: int = Field(description="chunks and approved queries the training phase embeds before its epochs")
    texts_embedded: int
    is_embedding: bool = Field(description="the training phase embeds its texts: its epochs have not started, and it cannot tell its time left yet")
    progress_done: int = Field(description="what `progress` counts now: chunks, texts embedded, or epochs")
    progress_total: int
    metrics: dict = Field(description="test recall@1/5/10 of the encoder alone (`before`) and of the chosen epoch "
                                       "(`after`), validation recall of both, and the split sizes")
    loss_curve: list[float]
    validation_curve: list[dict] = Field(description="validation recall@1/5/10 after every epoch")
    best_epoch: int | None = Field(description="the epoch whose adapter was kept: the best on validation")
    patience: int
    adopted: bool | None = Field(description="whether search uses the adapter; false when no epoch beat the encoder "
                                             "alone on validation; null until the run completes")
    keyword_weight: float | None = Field(description="the weight of keyword matching (BM25, 1 at the query's best "
                                                    "chunk) that goes with the chosen epoch's adapter, chosen on "
                                                    "validation with it; search adds it to the adapter's cosine "
                                                    "score once the adapter is adopted (the encoder alone has "
                                                    "none); 0: the adapter alone; null until the run completes")
    verdict: str = Field(description="the result in one sentence, with what to try when it was not adopted")
    error_type: str
    error_label: str = Field(description="the error type in words, e.g. \"Stopped on request\" for CANCELLED")
    error_message: str
    next_step: str
    removed_at: datetime | None = Field(description="set once the run was removed; its row stays as history")
    removed_by: str | None = Field(description="who removed it (null: not removed, or removed by a command)")
    worker: str
    attempt: int
    heartbeat_at: datetime | None
    retry_available: bool
    created_at: datetime
    generating_started_at: datetime | None
    generated_at: datetime | None
    training_started_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def resolve_progress(obj) -> str:
        return obj.progress_label

    @staticmethod
    def resolve_removed_by(obj) -> str | None:
        return obj.removed_by.get_username() if obj.removed_by_id else None

    @staticmethod
    def resolve_progress_done(obj) -> int:
        return obj.progress_counts[0]

    @staticmethod
    def resolve_progress_total(obj) -> int:
        return obj.progress_counts[1]

    @staticmethod
    def resolve_review_counts(obj) -> dict:
        return services.review_counts(obj)


class PairOut(Schema):
    id: int
    chunk_id: int
    chunk_index: int
    document: str
    chunk_text: str
    query: str
    review: str

    @staticmethod
    def resolve_chunk_index(obj) -> int:
        return obj.chunk.index

    @staticmethod
    def resolve_document(obj) -> str:
        return obj.chunk.document

    @staticmethod
    def resolve_chunk_text(obj) -> str:
        return obj.chunk.text


class ReviewIn(Input):
    decision: Literal["approved", "rejected"]
    pair_ids: list[int] | None = Field(None, description="omit to decide every pending pair")


class PairEditIn(Input):
    query: str = Field(description="the new query, one line of at most 200 characters; the pair is then approved")


class ReviewOut(Schema):
    updated: int
    review_counts: dict
    message: str = Field(description="what the review did, and what Proceed does now for a failed training")


class RunActionOut(RunOut):
    message: str = Field(description="what the request did, as the page says it")


class SearchHit(Schema):
    pk: int
    index: int
    document: str
    text: str
    score: float



def _run(run_id: int) -> TrainingRun:
    try:
        return get_object_or_404(TrainingRun, pk=run_id)
    except Http404:
        raise HttpError(404, f"Training run {run_id} does not exist; GET /api/v1/training/runs lists them.") from None


@router.get("/training/settings", response=SettingsOut)
def training_settings(request):
    available, reason = services.training_availability()
    generator_available, generator_reason = services.generator_availability()
    blocking = selectors.training_run_open()
    return {
        "is_available": available, "reason": reason, "encoder_path": settings.JOBSITE_ENCODER_PATH,
        "generators": TrainingRun.Generator.values if generator_available else [TrainingRun.Generator.LOCAL.value],
        "generator_model_path": settings.JOBSITE_GENERATOR_MODEL_PATH, "generator_reason": generator_reason,
        "min_approved_pairs": settings.JOBSITE_MIN_APPROVED_PAIRS,
        "blocking_run_id": blocking.pk if blocking else None,
        "blocking_sentence": services.blocking_sentence(blocking) if blocking else "",
    }


@router.get("/training/corpora", response=list[CorpusOut])
def list_corpora(request):
    return selectors.corpus_list()


@router.post("/training/corpora", response={201: CorpusOut, 422: Refusal})
def create_corpus(request, payload: CorpusIn):
    require(request.user, "training_runs.add_corpus")
    return Status(201, services.corpus_create(name=payload.name, path=payload.path, chunk_size=payload.chunk_size,
                                              chunk_overlap=payload.chunk_overlap))


@router.post("/training/corpora/upload", response={201: CorpusOut, 422: Refusal})
def upload_corpus(request, name: Form[str], files: File[list[UploadedFile]],
                  chunk_size: int = Form(500, ge=50, le=20000), chunk_overlap: int = Form(50, ge=0)):
    require(request.user, "training_runs.add_corpus")
    refuse_unknown_form_fields(request, "name", "files", "chunk_size", "chunk_overlap")
    return Status(201, services.corpus_create(name=name, uploads=files, chunk_size=chunk_size,
                                              chunk_overlap=chunk_overlap))


@router.post("/training/runs", response={201: RunOut, 404: Message, 409: Message, 422: Refusal})
def start_run(request, payload: RunIn):
    require(request.user, "training_runs.add_trainingrun")
    corpus = Corpus.objects.filter(pk=payload.corpus_id).first()
    if corpus is None:
        raise HttpError(404, f"Corpus {payload.corpus_id} does not exist; GET /api/v1/training/corpora lists them.")
    return Status(201, services.training_run_generate(
        corpus=corpus, generator=payload.generator, queries_per_chunk=payload.queries_per_chunk, user=request.user,
    ))


@router.get("/training/runs", response=list[RunOut])
def list_runs(request, status: TrainingRun.Status | None = None):
    return selectors.training_run_list(status=status)


@router.get("/training/runs/{run_id}", response={200: RunOut, 404: Message})
def get_run(request, run_id: int):
    return _run(run_id)


@router.post("/training/runs/{run_id}/train", response={200: RunOut, 404: Message, 409: Message, 422: Refusal})
def train_run(request, run_id: int, payload: TrainIn | None = None):
    require(request.user, "training_runs.train_trainingrun")
    payload = payload or TrainIn()
    return services.training_run_train(run=_run(run_id), epochs=payload.epochs, batch_size=payload.batch_size,
                                       learning_rate=payload.learning_rate, patience=payload.patience)


@router.post("/training/runs/{run_id}/adopt", response={200: RunActionOut, 404: Message, 409: Message})
def adopt_run(request, run_id: int):
    """Adopt by hand the adapter a completed run did not adopt (its best epoch, which did not beat the encoder
    alone on validation): search then goes through it. Callers confirm first."""
    require(request.user, "training_runs.adopt_trainingrun")
    run = services.training_run_adopt(run=_run(run_id), user=request.user)
    run.message = run.adopted_sentence
    return run


@router.post("/training/runs/{run_id}/stop", response={200: RunActionOut, 404: Message, 409: Message})
def stop_run(request, run_id: int):
    """Stop a generating or training run; it then waits in its failed status for Proceed or Delete."""
    require(request.user, "training_runs.stop_trainingrun")
    run = services.training_run_stop(run=_run(run_id))
    run.message = run.stop_sentence
    return run


@router.post("/training/runs/{run_id}/proceed",
             response={200: RunActionOut, 404: Message, 409: Message, 422: Refusal})
def proceed_run(request, run_id: int):
    require(request.user, "training_runs.proceed_trainingrun")
    run = services.training_run_proceed(run=_run(run_id))
    run.message = run.proceeds_sentence
    return run


@router.delete("/training/runs/{run_id}", response={200: Message, 404: Message, 409: Message})
def remove_run(request, run_id: int):
    """Remove a failed, stopped, unreviewed or completed run: its pairs and files are deleted, its row stays in
    the history (`removed_at`, `removed_by`); a running one must be stopped first."""
    require(request.user, "training_runs.remove_trainingrun")
    services.training_run_remove(run=_run(run_id), user=request.user)
    return {"message": f"Training run {run_id} is removed: its pairs and files are deleted; its row stays in the "
                       "history."}


@router.get("/training/runs/{run_id}/pairs", response={200: list[PairOut], 404: Message})
def list_pairs(request, run_id: int, review: TrainingPair.Review | None = None,
               limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=10**9)):
    return selectors.pair_list(run=_run(run_id), review=review)[offset : offset + limit]


@router.post("/training/runs/{run_id}/pairs/review",
             response={200: ReviewOut, 404: Message, 409: Message, 422: Refusal})
def review_pairs(request, run_id: int, payload: ReviewIn):
    require(request.user, "training_runs.change_trainingpair")
    run = _run(run_id)
    updated = services.training_run_review(run=run, decision=payload.decision, pair_ids=payload.pair_ids)
    return {"updated": updated, "review_counts": services.review_counts(run),
            "message": services.review_sentence(run, updated=updated, decision=payload.decision)}


@router.patch("/training/runs/{run_id}/pairs/{pair_id}",
              response={200: PairOut, 404: Message, 409: Message, 422: Refusal})
def edit_pair(request, run_id: int, pair_id: int, payload: PairEditIn):
    """Rewrite a pair's query; the pair is approved (a person wrote it)."""
    require(request.user, "training_runs.change_trainingpair")
    run = _run(run_id)
    pair = services.training_run_pair_edit(run=run, pair_id=pair_id, query=payload.query)
    return selectors.pair_list(run=run).get(pk=pair.pk)


@router.get("/training/runs/{run_id}/search", response={200: list[SearchHit], 404: Message, 409: Message, 422: Refusal})
def search_run(request, run_id: int, query: str = Query(..., min_length=1, max_length=2000),
               k: int = Query(5, ge=1, le=100)):
    """The k chunks nearest to the query through the run's trained adapter."""
    return selectors.training_run_search(run=_run(run_id), query=query, k=k)
