import math
from dataclasses import dataclass

from django.db.models import BooleanField, Exists, ExpressionWrapper, OuterRef, Q, QuerySet
from django.shortcuts import get_object_or_404

from extraction.models import Dataset, Extraction, ModelRecord
from jobsite.errors import JobInputError, check_text

# A page of the history or of the API's list: 20 rows unless asked, at most MAX_PAGE_SIZE.
PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Failed jobs nobody has retried or dismissed, newest first, shown above the history.
ATTENTION_FAILED_LIMIT = 10


def extraction_list(*, model_id: int | None = None, status: str | None = None) -> QuerySet[Extraction]:
    # original_deleted: the original's number is kept after it is deleted ("retry of #12 (deleted)").
    extractions = Extraction.objects.select_related("model", "dataset", "dismissed_by").annotate(
        original_deleted=ExpressionWrapper(
            Q(original_extraction_id__isnull=False)
            & ~Exists(Extraction.objects.filter(pk=OuterRef("original_extraction_id"))),
            output_field=BooleanField(),
        ))
    if model_id is not None:
        extractions = extractions.filter(model_id=model_id)
    if status:
        extractions = extractions.filter(status=status)
    return extractions


def extraction_attention(*, selected: int | None = None) -> list[Extraction]:
    """"Active and needing attention": active jobs, failed ones nobody has retried or dismissed
    yet, and the one a person opened (a cancelled, completed or dismissed job's card holds its
    Retry and its files), newest first."""
    active = list(extraction_list().filter(status__in=Extraction.ACTIVE))
    failed = list(extraction_list().filter(status=Extraction.Status.FAILED, retries__isnull=True,
                                           dismissed_at__isnull=True)[:ATTENTION_FAILED_LIMIT])
    jobs = active + failed
    if selected is not None and all(job.pk != selected for job in jobs):
        jobs += list(extraction_list().filter(pk=selected))
    return sorted(jobs, key=lambda e: (e.created_at, e.pk), reverse=True)


@dataclass
class Page:
    items: list
    count: int
    page: int
    pages: int
    limit: int


def _whole(value, name: str, default: int) -> int:
    """A page number or size as a query string gives it ("2"), or as the API already typed it."""
    if value is None or value == "":
        return default
    text = str(value).strip()
    if not text.isdecimal() or len(text) > 9:  # isdecimal: "²" is not a page anyone means
        raise JobInputError(f"{name} must be a whole number of at least 1, not {str(value)[:40]!r}.", field=name)
    return int(text)


def extraction_page(*, page=None, limit=None, status: str | None = None, model: str | int | None = None) -> Page:
    """One page of extractions, newest first, with totals; filtered by status and by model (its
    id or name). Bad values are refused with a sentence (JobInputError), never clamped in silence."""
    number, size = _whole(page, "page", 1), _whole(limit, "limit", PAGE_SIZE)
    if number < 1:
        raise JobInputError(f"page must be at least 1, not {number}.", field="page")
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise JobInputError(f"limit must be between 1 and {MAX_PAGE_SIZE}, not {size}; ask for the next page "
                            "(?page=2) for more.", field="limit")
    if status and status not in Extraction.Status.values:
        raise JobInputError(f"status must be one of {', '.join(Extraction.Status.values)}, not {str(status)[:40]!r}.",
                            field="status")
    model_id = None
    if isinstance(model, int):
        model_id = model
    elif model not in (None, ""):
        record = model_find(check_text(str(model), "model", 200, field="model"))
        if record is None:
            raise JobInputError(f"No model named or numbered {str(model)[:100]!r} is registered; "
                                "GET /api/v1/models lists them.", field="model")
        model_id = record.pk
    rows = extraction_list(model_id=model_id, status=status or None)
    count = rows.count()
    pages = max(1, math.ceil(count / size))
    if number > pages:
        raise JobInputError(f"Page {number} does not exist: {count:,} extraction{'s' if count != 1 else ''} make "
                            f"{pages} page{'s' if pages != 1 else ''} of {size}.", field="page")
    return Page(items=list(rows[(number - 1) * size: number * size]), count=count, page=number, pages=pages,
                limit=size)


def extraction_get(*, extraction_id: int, model_id: int | None = None) -> Extraction:
    return get_object_or_404(extraction_list(model_id=model_id), pk=extraction_id)


def model_list() -> QuerySet[ModelRecord]:
    return ModelRecord.objects.all()


def dataset_list() -> QuerySet[Dataset]:
    return Dataset.objects.all()


def model_find(name_or_id: str) -> ModelRecord | None:
    """By id first, then by name: "2" is model 2 even when another model is named "2"."""
    if name_or_id.isdecimal():  # isdigit() also takes "²", which int() refuses
        found = ModelRecord.objects.filter(pk=int(name_or_id)).first()
        if found is not None:
            return found
    return ModelRecord.objects.filter(name=name_or_id).first()


def dataset_find(name_or_id: str) -> Dataset | None:
    query = Dataset.objects.filter(name=name_or_id)
    if name_or_id.isdecimal():  # isdigit() also takes "²", which int() refuses
        query = query | Dataset.objects.filter(pk=int(name_or_id))
    return query.first()
