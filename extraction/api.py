import json
from datetime import datetime
from typing import Literal

from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Field, File, Form, Query, Router, Schema, Status
from ninja.files import UploadedFile
from ninja.errors import HttpError
from pydantic import field_validator

from extraction import selectors, services
from extraction.constants import BATCH_SIZES_SENTENCE, VALID_BATCH_SIZES
from extraction.models import Dataset, Extraction, ModelRecord
from jobsite.api import Input, JobOut, Message, Refusal, refuse_unknown_form_fields
from jobsite.errors import JobInputError
from jobsite.permissions import require
from jobsite.services import job_resume

router = Router(tags=["extraction"])


def _check_batch_size(value):
    if value is not None and value not in VALID_BATCH_SIZES:
        raise ValueError(f"{BATCH_SIZES_SENTENCE}; got {value}.")
    return value


class HookPointOut(Schema):
    definition: str = Field(description="what it is in the residual stream, the same on every family")
    width: int = Field(description="values per token: the hidden size, or the MLP's width for mlp_hidden")
    transformerlens: str = Field(description="TransformerLens's name, after blocks.N.")


class ModelOut(Schema):
    id: int
    name: str
    path: str
    architecture: str
    model_type: str
    family: str = Field(description="the family adapter its hook points come from; empty: a family jobsite "
                                    "does not know, which offers residual only")
    num_layers: int
    hidden_size: int
    vocab_size: int
    supported_hooks: list[str]
    hook_points: dict[str, HookPointOut]
    hook_refusals: dict[str, str] = Field(description="hook points not offered, each with why")


class ModelIn(Input):
    path: str = Field(description="a save_pretrained directory under JOBSITE_MODEL_ROOTS")
    name: str = ""


class DatasetOut(Schema):
    id: int
    name: str
    path: str
    format: str
    num_samples: int
    size_bytes: int


class DatasetIn(Input):
    path: str = Field(description="a .txt or .jsonl file under JOBSITE_DATA_DIR")
    name: str = ""


class ExtractionIn(Input):
    dataset_id: int
    layers: list[int] = Field(default_factory=list, examples=[[0, 1]],
                              description="block indices; may be left out when every hook names its layer")
    hooks: list[str] = Field(min_length=1, examples=[["residual", "blocks.1.hook_mlp_out"]], description=(
        "hook points at every layer given: residual (resid_post), mlp, attention, resid_pre, resid_mid, "
        "mlp_hidden, or TransformerLens's names (hook_mlp_out; blocks.5.hook_mlp_out names layer 5 too)"))
    batch_size: int = 8
    max_samples: int | None = Field(None, gt=0)
    max_length: int | None = Field(None, gt=0,
                                   description="tokens; omitted: 512, or the model's position limit when smaller")
    storage_dtype: Literal["float32", "float16"] = "float32"
    auto_retry_on_oom: bool = False
    shards: int | str = Field(1, examples=[1, 4, "auto"], description=(
        "workers that run it at once, each on its own part of the samples (auto: one per live worker); the files "
        "are the same bytes whatever the count"))

    @field_validator("batch_size", mode="before")
    @classmethod
    def batch_size_is_valid(cls, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{BATCH_SIZES_SENTENCE} (a JSON number, not {json.dumps(value)}).")
        return value  # which sizes: the service says, with every other problem of the request


class RetryIn(Input):
    """A key left out keeps the original's value; "max_samples": null asks for all samples."""

    batch_size: int | None = None
    max_samples: int | None = Field(None, gt=0, description="null: all samples; omitted: the original's")
    max_length: int | None = Field(None, gt=0, description="tokens, at most the model's position limit")
    shards: int | str | None = Field(None, description="a number or auto; omitted: the original's")
    reason: str = ""

    _batch_size = field_validator("batch_size")(_check_batch_size)


class ShardOut(Schema):
    index: int
    status: str
    samples_processed: int
    total_samples: int
    worker: str = Field(description="the worker that holds it; empty: none holds it now")
    attempt: int
    heartbeat_at: datetime | None
    stalled: bool = Field(description="running, but its worker silent past JOBSITE_STALL_AFTER_S")
    current_batch_size: int | None
    error_type: str
    error_message: str
    refusals: dict[str, str] = Field(description="host: why its workers do not take this shard")


class ExtractionOut(JobOut):
    id: int
    model_id: int
    dataset_id: int
    status: str
    layers: list[int]
    hooks: list[str]
    batch_size: int
    current_batch_size: int | None
    max_samples: int | None
    max_length: int
    storage_dtype: str
    auto_retry_on_oom: bool
    shards: int = Field(description="workers that run it at once, each on its own part of the samples")
    shard_list: list[ShardOut] = Field(description="each shard once it is planned; empty for one worker")
    samples_processed: int
    total_samples: int
    tokens_processed: int
    total_tokens: int
    clamped_tokens: int
    truncated_samples: int
    inf_values: int
    attempt: int
    heartbeat_at: datetime | None
    heartbeat_seq: int
    cancel_requested: bool
    error_type: str
    error_message: str
    suggested_retry_params: dict
    next_step: str
    retry_available: bool
    cancel_available: bool
    original_extraction_id: int | None = Field(description="the extraction this one retries; kept after that one "
                                                           "is deleted (original_deleted is then true)")
    original_deleted: bool = False
    dismissed_at: datetime | None = Field(description="when a person moved this failed or cancelled job out of "
                                                      "the jobs needing attention; null: not dismissed")
    dismissed_by: str | None = None
    retry_count: int
    retry_reason: str
    resumed_samples: int
    output_dir: str
    created_at: datetime

    @staticmethod
    def resolve_shard_list(obj) -> list[dict]:
        return obj.shard_list()

    @staticmethod
    def resolve_heartbeat_at(obj):
        """A job its shards run: its most silent running shard's, as its events and its card say."""
        return obj.oldest_shard_beat() if obj.sharded else obj.heartbeat_at

    @staticmethod
    def resolve_output_dir(obj) -> str:
        return str(obj.output_dir)

    @staticmethod
    def resolve_original_deleted(obj) -> bool:
        if hasattr(obj, "original_deleted"):  # annotated by selectors.extraction_list
            return bool(obj.original_deleted)
        original = obj.original_extraction_id
        return bool(original) and not Extraction.objects.filter(pk=original).exists()

    @staticmethod
    def resolve_dismissed_by(obj) -> str | None:
        return obj.dismissed_by.get_username() if obj.dismissed_by_id else None
    started_at: datetime | None
    finished_at: datetime | None


class ExtractionPageOut(Schema):
    items: list[ExtractionOut]
    count: int = Field(description="extractions that match the filters, on every page")
    page: int
    pages: int = Field(description="pages of `limit` rows (1 when none match)")
    limit: int


class CancelOut(Schema):
    extraction_id: int
    status: str
    message: str



def _model(model_id: int) -> ModelRecord:
    try:
        return get_object_or_404(ModelRecord, pk=model_id)
    except Http404:
        raise HttpError(404, f"Model {model_id} does not exist; GET /api/v1/models lists them.") from None


def _extraction(model_id: int, extraction_id: int) -> Extraction:
    _model(model_id)
    try:
        return selectors.extraction_get(model_id=model_id, extraction_id=extraction_id)
    except Http404:
        raise HttpError(404, f"Extraction {extraction_id} of model {model_id} does not exist.") from None


@router.get("/models", response=list[ModelOut])
def list_models(request):
    return [services.model_hook_points(model=model) for model in selectors.model_list()]


@router.get("/models/{model_id}", response={200: ModelOut, 404: Message},
            summary="A model, with each hook point it offers (definition, width) and why it offers no others")
def get_model(request, model_id: int):
    return services.model_hook_points(model=_model(model_id))


def _registered(register, **kwargs):
    """201 with the record made now; 200 with the one the path already had."""
    record, created = services.registered(register, **kwargs)
    return Status(201 if created else 200, record)


@router.post("/models", response={201: ModelOut, 200: ModelOut, 422: Refusal},
             summary="Register a model directory (200 with its record when the path is registered already)")
def register_model(request, payload: ModelIn):
    require(request.user, "extraction.add_modelrecord")
    return _registered(services.model_register, path=payload.path, name=payload.name)


@router.get("/datasets", response=list[DatasetOut])
def list_datasets(request):
    return selectors.dataset_list()


@router.post("/datasets", response={201: DatasetOut, 200: DatasetOut, 422: Refusal},
             summary="Register a dataset file (200 with its record when the path is registered already)")
def register_dataset(request, payload: DatasetIn):
    require(request.user, "extraction.add_dataset")
    return _registered(services.dataset_register, path=payload.path, name=payload.name)


@router.post("/datasets/upload", response={201: DatasetOut, 422: Refusal},
             summary="Upload a .txt or .jsonl dataset (kept under the data directory) and register it")
def upload_dataset(request, file: File[UploadedFile], name: Form[str] = ""):
    require(request.user, "extraction.add_dataset")
    refuse_unknown_form_fields(request, "file", "name")
    return Status(201, services.dataset_upload(upload=file, name=name))


class StartOut(ExtractionOut):
    message: str = Field(description="what the request did: queued a new extraction, or found the same one active")


@router.post(
    "/models/{model_id}/extractions",
    response={201: StartOut, 200: StartOut, 404: Message, 422: Refusal},
    summary="Start an extraction (an identical active request returns the existing job with 200)",
)
def start_extraction(request, model_id: int, payload: ExtractionIn):
    require(request.user, "extraction.add_extraction")
    model = _model(model_id)
    dataset = Dataset.objects.filter(pk=payload.dataset_id).first()  # an id, never a name
    if dataset is None:
        raise HttpError(404, f"Dataset {payload.dataset_id} does not exist; GET /api/v1/datasets lists them.")
    extraction, created = services.extraction_start(
        model=model, dataset=dataset, user=request.user,
        **payload.dict(exclude={"dataset_id"}),
    )
    if created:
        extraction.message = f"Extraction {extraction.pk} is queued."
    else:
        asked = extraction.identical_sentence(batch_size=payload.batch_size, auto_retry_on_oom=payload.auto_retry_on_oom)
        extraction.message = f"{asked} No second copy was started."
    return Status(201 if created else 200, extraction)


def _page(**asked) -> selectors.Page:
    try:
        return selectors.extraction_page(**asked)
    except JobInputError as exc:
        # A page past the last one is not there; any other value is a bad request, naming its field.
        if exc.field == "page" and str(exc).startswith("Page "):
            raise HttpError(404, str(exc)) from None
        raise


@router.get("/extractions", response={200: ExtractionPageOut, 404: Message, 422: Refusal},
            summary="Extractions, newest first, a page at a time, with totals; filtered by status and model")
def list_all_extractions(request, status: Extraction.Status | None = None,
                         model: str | None = Query(None, description="a model's id or name"),
                         page: int = Query(1, ge=1),
                         limit: int = Query(selectors.PAGE_SIZE, ge=1, le=selectors.MAX_PAGE_SIZE)):
    found = _page(page=page, limit=limit, status=status, model=model)
    return {"items": found.items, "count": found.count, "page": found.page, "pages": found.pages,
            "limit": found.limit}


@router.get("/models/{model_id}/extractions", response={200: list[ExtractionOut], 404: Message, 422: Refusal},
            summary="A model's extractions, newest first: every one, or a page of them with ?page= and ?limit= "
                    "(the totals are in X-Total-Count and X-Page-Count; GET /extractions?model= answers them in "
                    "the body)")
def list_extractions(request, response: HttpResponse, model_id: int, status: Extraction.Status | None = None,
                     page: int | None = Query(None, ge=1),
                     limit: int | None = Query(None, ge=1, le=selectors.MAX_PAGE_SIZE)):
    _model(model_id)
    if page is None and limit is None:  # as before pages: the whole list
        rows = selectors.extraction_list(model_id=model_id, status=status)
        response["X-Total-Count"] = str(rows.count())
        return rows
    found = _page(page=page, limit=limit, status=status, model=model_id)
    response["X-Total-Count"], response["X-Page-Count"] = str(found.count), str(found.pages)
    return found.items


@router.get("/models/{model_id}/extractions/{extraction_id}", response={200: ExtractionOut, 404: Message})
def get_extraction(request, model_id: int, extraction_id: int):
    return _extraction(model_id, extraction_id)


@router.get("/extractions/{extraction_id}", response={200: ExtractionOut, 404: Message},
            summary="An extraction by its number alone, whichever model it belongs to")
def get_extraction_by_id(request, extraction_id: int):
    try:
        return selectors.extraction_get(extraction_id=extraction_id)
    except Http404:
        raise HttpError(404, f"Extraction {extraction_id} does not exist; GET /api/v1/models/{{id}}/extractions "
                             "lists a model's.") from None


@router.post(
    "/models/{model_id}/extractions/{extraction_id}/cancel",
    response={200: CancelOut, 404: Message, 409: Message},
)
def cancel_extraction(request, model_id: int, extraction_id: int):
    require(request.user, "extraction.cancel_extraction")
    extraction = services.extraction_cancel_and_wait(extraction=_extraction(model_id, extraction_id), user=request.user)
    if extraction.status == Extraction.Status.CANCELLED:
        message = f"Extraction {extraction.pk} is cancelled."
    else:
        message = f"Extraction {extraction.pk} is stopping; its worker stops after the current batch."
    return {"extraction_id": extraction.pk, "status": extraction.status if extraction.is_terminal else "cancelling",
            "message": message}


@router.post(
    "/models/{model_id}/extractions/{extraction_id}/retry",
    response={201: ExtractionOut, 404: Message, 409: Message, 422: Refusal},
)
def retry_extraction(request, model_id: int, extraction_id: int, payload: RetryIn | None = None):
    require(request.user, "extraction.retry_extraction")
    payload = payload or RetryIn()
    extraction = _extraction(model_id, extraction_id)
    max_samples = payload.max_samples
    if max_samples is None and "max_samples" in payload.model_fields_set:
        max_samples = services.ALL_SAMPLES
    retry = services.extraction_retry(
        extraction=extraction, batch_size=payload.batch_size,
        max_samples=max_samples, max_length=payload.max_length, shards=payload.shards, reason=payload.reason,
        user=request.user,
    )
    return Status(201, retry)


@router.post(
    "/models/{model_id}/extractions/{extraction_id}/resume",
    response={200: ExtractionOut, 404: Message, 409: Message},
    summary="Re-queue a stalled extraction (no heartbeat past the stall limit); it continues from its checkpoint",
)
def resume_extraction(request, model_id: int, extraction_id: int):
    require(request.user, "extraction.resume_extraction")
    return job_resume(_extraction(model_id, extraction_id))


@router.post(
    "/extractions/{extraction_id}/dismiss",
    response={200: ExtractionOut, 403: Message, 404: Message, 409: Message},
    summary="Dismiss a failed or cancelled extraction: out of the jobs needing attention, into the history "
            "(again: no change); its files and Retry stay",
)
def dismiss_extraction(request, extraction_id: int):
    require(request.user, "extraction.dismiss_extraction")
    try:
        extraction = selectors.extraction_get(extraction_id=extraction_id)
    except Http404:
        raise HttpError(404, f"Extraction {extraction_id} does not exist.") from None
    services.extraction_dismiss(extraction=extraction, user=request.user)
    return selectors.extraction_get(extraction_id=extraction_id)
