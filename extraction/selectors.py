from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from extraction.models import Dataset, Extraction, ModelRecord


def extraction_list(*, model_id: int | None = None, status: str | None = None) -> QuerySet[Extraction]:
    extractions = Extraction.objects.select_related("model", "dataset")
    if model_id is not None:
        extractions = extractions.filter(model_id=model_id)
    if status:
        extractions = extractions.filter(status=status)
    return extractions


def extraction_get(*, extraction_id: int, model_id: int | None = None) -> Extraction:
    return get_object_or_404(extraction_list(model_id=model_id), pk=extraction_id)


def model_list() -> QuerySet[ModelRecord]:
    return ModelRecord.objects.all()


def dataset_list() -> QuerySet[Dataset]:
    return Dataset.objects.all()


def model_find(name_or_id: str) -> ModelRecord | None:
    query = ModelRecord.objects.filter(name=name_or_id)
    if name_or_id.isdecimal():  # isdigit() also takes "²", which int() refuses
        query = query | ModelRecord.objects.filter(pk=int(name_or_id))
    return query.first()


def dataset_find(name_or_id: str) -> Dataset | None:
    query = Dataset.objects.filter(name=name_or_id)
    if name_or_id.isdecimal():  # isdigit() also takes "²", which int() refuses
        query = query | Dataset.objects.filter(pk=int(name_or_id))
    return query.first()
