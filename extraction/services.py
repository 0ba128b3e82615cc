"""Writes for extractions. Every entry point (API, admin, pages, commands, tasks) calls these."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from extraction.constants import (
    BATCH_SIZES_SENTENCE, HOOK_TYPES, VALID_BATCH_SIZES, HookNameError, parse_hook, refusal_sentence,
)
from extraction.models import Dataset, Extraction, ModelRecord
from jobsite.errors import JobInputError, check_record_name, check_text, not_kept
from jobsite.lifecycle import TransitionError
from jobsite.paths import resolve_under
from jobsite.permissions import check
from jobsite.services import job_delete, job_enqueue, job_request_cancel

logger = logging.getLogger(__name__)

# What extraction_retry takes as max_samples to mean every sample of the dataset: None there
# already means "the original's", which may be a limit.
ALL_SAMPLES = "all"
# The max length a start that names none gets, unless the model reads fewer tokens.
DEFAULT_MAX_LENGTH = 512


def model_register(*, path: str, name: str = "") -> ModelRecord:
    from extraction.runner import inspect_model  # noqa: PLC0415 - keeps torch out of web start-up

    resolved = resolve_under(path, settings.JOBSITE_MODEL_ROOTS, "model")
    if not resolved.is_dir():
        raise JobInputError(f"The model path {path} is a file; give the directory save_pretrained wrote.", field="path")
    existing = ModelRecord.objects.filter(path=str(resolved)).first()
    if existing:
        return existing
    name = check_record_name(name.strip() or _name_from(resolved.name, "model"), "The model name")
    try:
        info = inspect_model(str(resolved))
    except JobInputError as exc:  # about what the directory holds
        exc.field = "path"
        raise
    return _register(ModelRecord, "model", name, resolved, dict(
        architecture=info.architecture,
        model_type=info.model_type,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        max_positions=info.max_positions or 0,
        **_hook_fields(info),
    ))


def _hook_fields(info) -> dict:
    return dict(supported_hooks=list(info.supported_hooks), family=info.points.family or "",
                hook_points=info.points.describe(), hook_refusals=dict(info.points.refusals))


def _read_directory_once(model: ModelRecord) -> None:
    """A record registered before jobsite kept its hook points (what it offered then was guessed
    from attribute names) or its position limit reads its directory once, for both, and keeps
    them. When the directory no longer reads, the record stays as it is and the runner's own check
    says what is wrong."""
    if model.hook_points and model.max_positions is not None:
        return
    from extraction.runner import inspect_model  # noqa: PLC0415 - keeps torch out of web start-up

    try:
        info = inspect_model(model.path)
    except (JobInputError, OSError):
        return
    fields = {} if model.hook_points else _hook_fields(info)
    if model.max_positions is None:
        fields["max_positions"] = info.max_positions or 0
    ModelRecord.objects.filter(pk=model.pk).update(**fields)
    for name, value in fields.items():
        setattr(model, name, value)


def model_hook_points(*, model: ModelRecord) -> ModelRecord:
    """The record with its hook points read (see _read_directory_once)."""
    _read_directory_once(model)
    return model


def model_max_positions(*, model: ModelRecord) -> int | None:
    """The most tokens a sample may have for this model, None when its config names no limit."""
    _read_directory_once(model)
    return model.max_positions or None


def default_max_length(*, model: ModelRecord) -> int:
    """The max length of a start that names none: 512, or the model's position limit when it
    reads fewer tokens, so a start with defaults is never refused for its default."""
    return min(DEFAULT_MAX_LENGTH, model_max_positions(model=model) or DEFAULT_MAX_LENGTH)


def registered(register, **kwargs):
    """(record, made now?) from model_register, dataset_register or dataset_upload: False when
    the service handed back the record the path already had."""
    asked_at = timezone.now()
    record = register(**kwargs)
    return record, record.created_at >= asked_at


def _name_from(file_name: str, kind: str) -> str:
    """A name for a record registered without one: its folder's or file's name, with what a
    name may not hold ("model (copy)", "a..b") written as '-'."""
    return re.sub(r"[^\w.-]+|\.{2,}", "-", file_name).strip("-._")[:100] or kind


def _register(model_class, what: str, name: str, resolved, fields: dict):
    """Creates the record, or returns the one a concurrent request made for the same path
    (as a second request would have found it); a name another path holds is refused."""
    try:
        with transaction.atomic():
            return model_class.objects.create(name=name, path=str(resolved), **fields)
    except IntegrityError:
        record = model_class.objects.filter(path=str(resolved)).first()
        if record is not None:
            return record
        raise JobInputError(f"A {what} named {name!r} already exists; choose another name.", field="name") from None


def dataset_register(*, path: str, name: str = "") -> Dataset:
    from extraction.runner import inspect_dataset  # noqa: PLC0415

    resolved = resolve_under(path, [settings.JOBSITE_DATA_DIR], "dataset")
    if resolved.suffix not in (".txt", ".jsonl"):
        raise JobInputError(f"The dataset {path} must be a .txt (one sample a line) or .jsonl file.", field="path")
    existing = Dataset.objects.filter(path=str(resolved)).first()
    if existing:
        return existing
    name = check_record_name(name.strip() or _name_from(resolved.stem, "dataset"), "The dataset name")
    try:
        info = inspect_dataset(str(resolved))
    except JobInputError as exc:  # about what the file holds
        exc.field = "path"
        raise
    except OSError as exc:
        raise JobInputError(f"The dataset {path} cannot be read: {exc.strerror}.", field="path") from None
    return _register(Dataset, "dataset", name, resolved, dict(
        format=info.format, num_samples=info.num_samples, size_bytes=info.size_bytes
    ))


def dataset_recount(dataset: Dataset) -> Dataset:
    """The dataset as its file is now: a file whose size changed since it was registered (lines
    appended, say) is read and counted again, so a start checks its limits against, and shows,
    the samples the worker will read."""
    from extraction.runner import inspect_dataset  # noqa: PLC0415

    try:
        size = os.path.getsize(dataset.path)
    except OSError:
        raise JobInputError(f"The file of dataset {dataset.name} ({dataset.path}) is gone; register it again.",
                            field="dataset") from None
    if size == dataset.size_bytes:
        return dataset
    try:
        info = inspect_dataset(dataset.path)
    except JobInputError as exc:
        raise JobInputError(f"Dataset {dataset.name} changed since it was registered and cannot be read now: {exc}",
                            field="dataset") from None
    Dataset.objects.filter(pk=dataset.pk).update(num_samples=info.num_samples, size_bytes=info.size_bytes)
    dataset.num_samples, dataset.size_bytes = info.num_samples, info.size_bytes
    return dataset


MAX_DATASET_UPLOAD_BYTES = 200 * 2**20
UPLOADS = "datasets/uploaded"  # under JOBSITE_DATA_DIR


def dataset_upload(*, upload, name: str = "") -> Dataset:
    """A dataset file sent by a person (an uploaded file with .name, .size and .read(), from the
    page or the API), kept under the data directory as datasets/uploaded/<name><suffix> and
    registered like any other. It is checked from its size before it is read, and read and
    checked before it takes its place, so a refused upload leaves no file behind; a name
    already in use, as a dataset or as an uploaded file, is refused rather than replaced."""
    from extraction.runner import inspect_dataset  # noqa: PLC0415

    filename = Path(upload.name).name
    suffix = Path(filename).suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise JobInputError(f"{filename}: upload a .txt (one sample a line) or .jsonl file.", field="file")
    if upload.size > MAX_DATASET_UPLOAD_BYTES:
        raise JobInputError(f"{filename} is larger than {MAX_DATASET_UPLOAD_BYTES // 2**20} MB; "
                            "put it under the data directory and register it by its path.", field="file")
    # Named as by path (spaces, "team/notes" allowed); its file takes that name written as a file name.
    name = check_record_name(name.strip() or _name_from(Path(filename).stem, "dataset"), "The dataset name")
    if Dataset.objects.filter(name=name).exists():
        raise JobInputError(f"A dataset named {name!r} already exists; choose another name.", field="name")
    folder = settings.JOBSITE_DATA_DIR / UPLOADS
    stem = _name_from(name, "dataset")
    target = folder / f"{stem}{suffix}"
    staging = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{stem}.", suffix=suffix, delete=False) as staging:
            staging.write(upload.read())
        try:
            info = inspect_dataset(staging.name)
        except JobInputError as exc:  # named after the file sent, not the staging copy
            raise JobInputError(f"{filename}: {exc}", field="file") from None
        os.link(staging.name, target)  # never over a file that is there already
    except FileExistsError:
        raise JobInputError(f"The file {UPLOADS}/{target.name} already exists in the data directory; "
                            "choose another name, or register that file by its path.", field="name") from None
    except OSError as exc:
        raise not_kept(exc, field="file") from None
    finally:
        if staging is not None:
            os.unlink(staging.name)
    try:
        return _register(Dataset, "dataset", name, target, dict(
            format=info.format, num_samples=info.num_samples, size_bytes=info.size_bytes
        ))
    except BaseException:
        target.unlink(missing_ok=True)  # a concurrent upload took the name: nothing points at it
        raise


# The most tokens a sample may have when the model's config names no position limit.
MAX_LENGTH_CEILING = 131_072


class ParameterErrors(JobInputError):
    """Every problem of a request at once (`problems`, in the order of its fields); the message
    says each, and `field` is the first one's, so a client that shows one still shows the first."""

    def __init__(self, problems: list[JobInputError]):
        super().__init__(" ".join(str(problem) for problem in problems), field=problems[0].field)
        self.problems = problems


def parameter_problems(
    *, model: ModelRecord, dataset: Dataset | None, layers: list[int] | None, hooks: list[str] | None,
    batch_size: int | None, max_samples: int | None, max_length: int | None, storage_dtype: str | None,
    shards: int | str | None = None,
) -> tuple[list[JobInputError], list[int], list[str]]:
    """(problems, layers, hooks): each input checked against the model on its own, so that one
    wrong field does not hide another. None is an input a page form already refused (or, for
    max_samples and max_length, left to its default): it is not checked again."""
    model_hook_points(model=model)
    problems: list[JobInputError] = []
    if layers is not None and hooks is not None:
        try:
            layers, hooks = resolve_hook_names(model=model, layers=layers, hooks=hooks)
        except JobInputError as exc:
            problems.append(exc)
            bad_layers = [layer for layer in layers if not 0 <= layer < model.num_layers]
            if exc.field != "layers" and bad_layers:  # a hook's problem was said first; the layers have theirs
                problems.append(JobInputError(f"Layer {bad_layers[0]} does not exist: {_layer_sentence(model)}.",
                                              field="layers"))
        else:
            unsupported = [hook for hook in hooks if hook not in model.supported_hooks]
            if unsupported:
                why = model.hook_refusals.get(unsupported[0], "it is not offered")
                named = f"{model.name} ({model.architecture})"
                problems.append(JobInputError(refusal_sentence(unsupported[0], why, model.supported_hooks, named),
                                              field="hooks"))
    if batch_size is not None and batch_size not in VALID_BATCH_SIZES:
        problems.append(JobInputError(f"{BATCH_SIZES_SENTENCE}; got {batch_size}.", field="batch_size"))
    if max_samples is not None and dataset is not None and not 1 <= max_samples <= dataset.num_samples:
        problems.append(JobInputError(
            f"Max samples must be between 1 and {dataset.num_samples:,} (the samples in {dataset.name}); "
            "leave it empty (or out) for all.", field="max_samples",
        ))
    if max_length is not None:
        positions = model_max_positions(model=model)
        if max_length < 1:
            problems.append(JobInputError("Max length must be a positive number of tokens, e.g. 512.",
                                          field="max_length"))
        elif positions and max_length > positions:
            problems.append(JobInputError(
                f"Max length {max_length:,} is beyond {model.name}'s position limit: "
                f"it reads at most {positions:,} tokens.", field="max_length",
            ))
        elif max_length > MAX_LENGTH_CEILING:
            problems.append(JobInputError(
                f"Max length {max_length:,} is more than the {MAX_LENGTH_CEILING:,} tokens jobsite takes per sample.",
                field="max_length"))
    if storage_dtype is not None and storage_dtype not in Extraction.StorageDtype.values:
        problems.append(JobInputError(
            f"The storage dtype must be one of {', '.join(Extraction.StorageDtype.values)}.", field="storage_dtype"))
    if shards is not None and shards != AUTO_SHARDS:
        samples = max_samples if max_samples is not None and dataset is not None and 1 <= max_samples <= \
            dataset.num_samples else (dataset.num_samples if dataset is not None else None)
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1 or (samples and shards > samples):
            limit = f" and {samples:,} (the samples it reads)" if samples else ""
            problems.append(JobInputError(
                f"Shards must be a whole number between 1{limit}, or {AUTO_SHARDS} (one per live worker); got "
                f"{shards!r}.", field="shards"))
    return problems, layers, hooks


# Shards asked as "auto": one per worker process of the live clusters, at most one per sample.
AUTO_SHARDS = "auto"


def resolve_shards(shards: int | str, *, samples: int) -> int:
    """The shard count a start records: `auto` is the live worker processes (at least 1), capped by the samples."""
    if shards == AUTO_SHARDS:
        from jobsite.clusters import live_workers  # noqa: PLC0415

        shards = live_workers()[1]
    return max(1, min(int(shards), samples))


def validate_parameters(
    *, model: ModelRecord, dataset: Dataset, layers: list[int], hooks: list[str], batch_size: int,
    max_samples: int | None, max_length: int, storage_dtype: str, shards: int | str | None = None,
) -> tuple[list[int], list[str]]:
    """Check a request against the model; each error names the fix, and all of them are said."""
    problems, layers, hooks = parameter_problems(
        model=model, dataset=dataset, layers=layers, hooks=hooks, batch_size=batch_size, max_samples=max_samples,
        max_length=max_length, storage_dtype=storage_dtype, shards=shards,
    )
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ParameterErrors(problems)
    return layers, hooks


def _layer_sentence(model: ModelRecord) -> str:
    return f"{model.name} has layers 0-{model.num_layers - 1}"


def resolve_hook_names(*, model: ModelRecord, layers: list[int], hooks: list[str]) -> tuple[list[int], list[str]]:
    """(layers, hooks) from what a person wrote: our hook names or TransformerLens's, a
    `blocks.5.hook_mlp_out` naming its layer as well. A plain hook applies to every layer given.
    An extraction takes every hook at every layer, so names that ask for different hooks at
    different layers are refused with the request that would hold them, never widened quietly."""
    plain, layered = [], []
    for name in hooks:
        try:
            layer, hook = parse_hook(name)
        except HookNameError as exc:
            raise JobInputError(str(exc), field="hooks") from None
        if layer is not None and not 0 <= layer < model.num_layers:
            raise JobInputError(f"{name.strip()} names layer {layer}, which does not exist: {_layer_sentence(model)}.",
                                field="hooks")
        (plain.append(hook) if layer is None else layered.append((layer, hook)))
    bad_layers = [layer for layer in layers if not 0 <= layer < model.num_layers]
    if bad_layers:
        raise JobInputError(f"Layer {bad_layers[0]} does not exist: {_layer_sentence(model)}.", field="layers")
    all_layers = sorted(set(layers) | {layer for layer, _ in layered})
    all_hooks = [hook for hook in HOOK_TYPES if hook in plain or any(hook == h for _, h in layered)]
    if not all_hooks:
        raise JobInputError(f"Choose at least one hook point from {', '.join(model.supported_hooks)}.", field="hooks")
    if not all_layers:
        raise JobInputError(f"Choose at least one layer: {_layer_sentence(model)} (or name it in each hook, e.g. "
                            "blocks.0.hook_mlp_out).", field="layers")
    if layered:
        asked = {(layer, hook) for layer in layers for hook in plain} | set(layered)
        if len(asked) != len(all_layers) * len(all_hooks):
            bare = [layer for layer in layers if not plain and all(at != layer for at, _ in layered)]
            if bare:
                raise JobInputError(f"Layer {bare[0]} has no hook point: choose one for it, or leave the layers "
                                    "out when every hook names its layer (blocks.N.…).", field="hooks")
            files = len(all_layers) * len(all_hooks)
            raise JobInputError(
                "These names ask for different hook points at different layers, and one extraction takes every "
                f"hook point at every layer it has: ask for layers {', '.join(map(str, all_layers))} with "
                f"{', '.join(all_hooks)} ({files} files), or start one extraction per layer.", field="hooks")
    return all_layers, all_hooks


def request_fingerprint(*, dataset: Dataset, layers, hooks, max_samples, max_length, storage_dtype) -> str:
    identity = {
        "dataset": dataset.pk, "layers": layers, "hooks": hooks, "max_samples": max_samples,
        "max_length": max_length, "storage_dtype": storage_dtype,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def extraction_start(
    *, model: ModelRecord, dataset: Dataset, layers: list[int], hooks: list[str], batch_size: int = 8,
    max_samples: int | None = None, max_length: int | None = None, storage_dtype: str = "float32",
    auto_retry_on_oom: bool = False, user=None, original: Extraction | None = None, retry_reason: str = "",
    shards: int | str = 1,
) -> tuple[Extraction, bool]:
    """Queue an extraction, or return the identical one already active (created=False). No
    max_length is default_max_length's; max_samples None is all of the dataset. shards: how many
    workers run it at once (AUTO_SHARDS: one per live worker process)."""
    check(user, "extraction.retry_extraction" if original is not None else "extraction.add_extraction")
    if max_length is None:
        max_length = default_max_length(model=model)
    dataset = dataset_recount(dataset)
    layers, hooks = validate_parameters(
        model=model, dataset=dataset, layers=layers, hooks=hooks, batch_size=batch_size,
        max_samples=max_samples, max_length=max_length, storage_dtype=storage_dtype, shards=shards,
    )
    shards = resolve_shards(shards, samples=max_samples or dataset.num_samples)
    fingerprint = request_fingerprint(
        dataset=dataset, layers=layers, hooks=hooks, max_samples=max_samples, max_length=max_length,
        storage_dtype=storage_dtype,
    )
    if original is None:
        _refuse_repeat_of_a_failure(model=model, fingerprint=fingerprint)
    else:
        _refuse_what_a_retry_completed(original=original, fingerprint=fingerprint)
    try:
        with transaction.atomic():
            extraction = Extraction.objects.create(
                model=model, dataset=dataset, layers=layers, hooks=hooks, batch_size=batch_size,
                max_samples=max_samples, max_length=max_length, storage_dtype=storage_dtype,
                auto_retry_on_oom=auto_retry_on_oom, fingerprint=fingerprint, created_by=user,
                total_samples=max_samples or dataset.num_samples, shards=shards,
                original_extraction=original, retry_count=(original.retry_count + 1) if original else 0,
                retry_reason=retry_reason,
            )
            from jobsite.events import publish  # noqa: PLC0415

            if shards > 1:
                # Made here, on the data directory the workers share: a worker that does not see it
                # neither plans nor runs a shard of it (extraction_refusal).
                try:
                    extraction.output_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise JobInputError(f"The extraction's folder cannot be made in the data directory "
                                        f"({extraction.output_dir}): {exc.strerror}.", field="shards") from None
            publish(extraction.topic, "extraction.queued", extraction.event_payload())
            if original is not None:
                said = {"automatic": False, "reason": retry_reason,
                        "starts_from": retry_starts_from(original=original, retry=extraction)}
                # Each topic's payload is its own job (a page following the original draws the
                # original), with the other one named.
                publish(original.topic, "extraction.retry_started",
                        {**original.event_payload(), **said, "retry_id": extraction.pk})
                publish(extraction.topic, "extraction.retry_started", {**extraction.event_payload(), **said})
            job_enqueue(extraction)
    except IntegrityError:
        active = Extraction.objects.filter(
            model=model, fingerprint=fingerprint, status__in=Extraction.ACTIVE
        ).first()
        if active is None:  # the other request finished in between; ours is welcome now
            return extraction_start(
                model=model, dataset=dataset, layers=layers, hooks=hooks, batch_size=batch_size,
                max_samples=max_samples, max_length=max_length, storage_dtype=storage_dtype,
                auto_retry_on_oom=auto_retry_on_oom, user=user, original=original, retry_reason=retry_reason,
                shards=shards,
            )
        return active, False
    return extraction, True


def _refuse_repeat_of_a_failure(*, model: ModelRecord, fingerprint: str) -> None:
    """Starting an identical request again after it failed would pile up identical failed
    jobs; the failure names its next step, which is a retry of that job."""
    latest = Extraction.objects.filter(model=model, fingerprint=fingerprint).order_by("-created_at", "-pk").first()
    if latest is not None and latest.status == Extraction.Status.FAILED:
        hint = f" with {latest.suggested_retry_params}" if latest.suggested_retry_params else ""
        raise TransitionError(
            f"An identical extraction ({latest.pk}) failed ({latest.error_type}: {latest.error_message[:200]}); "
            f"retry it{hint} instead of starting it again."
        )


def _refuse_what_a_retry_completed(*, original: Extraction, fingerprint: str) -> None:
    """A retry of this extraction that completed the same request (on the dataset as it is now)
    holds its results: another would compute them again."""
    done = original.retries.filter(status=Extraction.Status.COMPLETED, fingerprint=fingerprint).first()
    if done is not None:
        raise TransitionError(
            f"Extraction {done.pk}, a retry of extraction {original.pk}, completed this same request: its "
            f"results are in {done.output_dir}. Delete it first to compute them again.")


# Until it extracts, a retry that starts from the original's finished samples still reads them.
COPYING_STATUSES = (Extraction.Status.QUEUED, Extraction.Status.LOADING)


def extraction_check_deletable(*, extraction: Extraction) -> None:
    """A queued or running extraction is cancelled first: deleting its row under its worker
    would leave files that no job owns."""
    if extraction.status in Extraction.ACTIVE:
        raise TransitionError(f"Extraction {extraction.pk} is {extraction.status}; cancel it first, then delete it.")
    # A retry that starts from this one's finished samples copies them from its files as it loads
    # (it counts them in resumed_samples only once the copy is done).
    copying = extraction.retries.filter(
        Q(resumed_samples__gt=0) | Q(fingerprint=extraction.fingerprint), status__in=COPYING_STATUSES).first()
    done = copying and (copying.resumed_samples or extraction.reusable_samples())  # reads the checkpoint once
    if done:
        raise TransitionError(
            f"Extraction {copying.pk}, a retry of extraction {extraction.pk}, starts from its "
            f"{done:,} finished samples and is {copying.status}: delete extraction "
            f"{extraction.pk} once {copying.pk} is extracting.")


def extraction_delete(*, extraction: Extraction, user=None) -> None:
    """Delete a finished extraction and its output files; the deletion stays in the event log
    (a retry of it keeps its own row and files, and its original_extraction_id: "retry of #12
    (deleted)")."""
    check(user, "extraction.delete_extraction")
    extraction_check_deletable(extraction=extraction)
    job_delete(extraction, verb="deleted", user=user)


def extraction_cancel(*, extraction: Extraction) -> Extraction:
    """A job run by its shards is stopped through them: each stops at its next batch (a queued or
    stalled one at once), and the extraction is cancelled once none is active."""
    if not extraction.sharded:
        return job_request_cancel(extraction)
    from jobsite.events import publish  # noqa: PLC0415

    with transaction.atomic():
        current = Extraction.objects.select_for_update().get(pk=extraction.pk)
        if not current.sharded:
            return extraction_cancel(extraction=current)
        if not current.cancel_requested:
            Extraction.objects.filter(pk=current.pk).update(cancel_requested=True, updated_at=timezone.now())
            current.cancel_requested = True
            publish(current.topic, "extraction.cancel_requested", current.event_payload())
    extraction_settle(extraction_id=current.pk, finish=False)
    current.refresh_from_db()
    return current


def extraction_check_cancellable(*, extraction: Extraction) -> None:
    """Before a confirmation is asked: a finished job is refused now, in the words the cancel would use."""
    if extraction.status not in Extraction.ACTIVE:
        raise TransitionError(f"Extraction {extraction.pk} is {extraction.status}; only a queued or running "
                              "extraction can be cancelled.")


DISMISSABLE = (Extraction.Status.FAILED, Extraction.Status.CANCELLED)


def extraction_dismiss(*, extraction: Extraction, user=None) -> Extraction:
    """A failed or cancelled job a person has seen: out of "Active and needing attention", into
    the history, with who and when. Its row, files and Retry stay; dismissing it again changes
    nothing. Open pages learn it from the `extraction.dismissed` event."""
    check(user, "extraction.dismiss_extraction")
    with transaction.atomic():
        current = Extraction.objects.select_for_update().filter(pk=extraction.pk).first()
        if current is None:
            raise TransitionError(f"Extraction {extraction.pk} was deleted meanwhile.")
        if current.status not in DISMISSABLE:
            raise TransitionError(
                f"Extraction {current.pk} is {current.status}; only a failed or cancelled extraction can be "
                "dismissed" + (" (cancel it first)." if current.status in Extraction.ACTIVE else "."))
        if current.dismissed_at is not None:
            return current
        current.dismissed_at, current.dismissed_by = timezone.now(), user
        Extraction.objects.filter(pk=current.pk).update(dismissed_at=current.dismissed_at, dismissed_by=user,
                                                        updated_at=current.dismissed_at)
        from jobsite.events import publish  # noqa: PLC0415

        publish(current.topic, "extraction.dismissed", {
            **current.event_payload(), "dismissed_by": getattr(user, "username", "") or "",
            "dismissed_at": current.dismissed_at.isoformat(),
        })
    return current


# A running extraction stops within one batch; a person's cancel waits this long for it, so that
# the answer can say "cancelled" rather than "stopping", and a restart can retry at once.
CANCEL_WAIT_S = 5.0


class StillStopping(TransitionError):
    """A restart's cancel was asked for, but the worker had not stopped within CANCEL_WAIT_S."""


def extraction_cancel_and_wait(*, extraction: Extraction, user=None) -> Extraction:
    """Cancel, then give a running job's worker up to CANCEL_WAIT_S to stop; the extraction as it
    then stands (cancelled, or still running with its stop requested)."""
    check(user, "extraction.cancel_extraction")
    extraction = extraction_cancel(extraction=extraction)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while extraction.status in Extraction.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
        extraction.refresh_from_db()
    return extraction


def extraction_restart(*, extraction: Extraction, reason: str, user=None) -> Extraction:
    """'Taking longer than expected': cancel, wait for the worker to stop, then retry as a new
    extraction that continues from the samples already completed; returns the retry.

    Both permissions are checked first: a person who may cancel but not retry must not be left
    with a cancelled job and no retry. A worker that has not stopped within CANCEL_WAIT_S keeps
    its stop request, and StillStopping says to retry once it shows cancelled.
    """
    check(user, "extraction.cancel_extraction")
    check(user, "extraction.retry_extraction")
    stopped = extraction_cancel_and_wait(extraction=extraction, user=user)
    if stopped.status != Extraction.Status.CANCELLED:
        raise StillStopping(f"Extraction {stopped.pk} is stopping but has not stopped yet; press Retry on it once "
                            "it shows cancelled.")
    return extraction_retry(extraction=stopped, reason=reason, user=user)


def extraction_retry(
    *, extraction: Extraction, batch_size: int | None = None, max_samples: int | str | None = None,
    max_length: int | None = None, reason: str = "", user=None, shards: int | str | None = None,
) -> Extraction:
    """A person's retry: a new extraction linked to this one. A parameter left None keeps this
    one's; max_samples=ALL_SAMPLES asks for the whole dataset. When only the batch size
    changes, the new one starts from the samples this one already completed; a sharded one cut
    the same way (same shards and batch size) keeps the shards this one finished."""
    check(user, "extraction.retry_extraction")
    if not extraction.retry_available:
        raise TransitionError(
            f"Extraction {extraction.pk} is {extraction.status}; only a failed or cancelled extraction can be retried."
        )
    reason = check_text(reason.strip(), "The retry reason", Extraction._meta.get_field("retry_reason").max_length,
                        field="reason")
    # `is None`, not `or`: a 0 given is refused by the checks, never silently replaced.
    if max_samples is None:
        max_samples = extraction.max_samples
    elif max_samples == ALL_SAMPLES:
        max_samples = None
    retry, created = extraction_start(
        model=extraction.model, dataset=extraction.dataset, layers=extraction.layers, hooks=extraction.hooks,
        batch_size=extraction.batch_size if batch_size is None else batch_size,
        max_samples=max_samples, max_length=extraction.max_length if max_length is None else max_length,
        storage_dtype=extraction.storage_dtype,
        auto_retry_on_oom=extraction.auto_retry_on_oom, user=user, original=extraction,
        # An inherited count is capped by the samples the retry reads; one a person gives is checked.
        shards=min(extraction.shards, max_samples or extraction.dataset.num_samples) if shards is None else shards,
        retry_reason=reason or (f"{extraction.error_type}: {extraction.error_message}"[:500] if extraction.error_type else "retry"),
    )
    if not created:
        raise TransitionError(f"{retry.identical_sentence()} Follow that one; no second copy was started.")
    return retry


def retry_starts_from(*, original: Extraction, retry: Extraction) -> str:
    """Where a retry starts, in the words every caller shows: after the samples its original
    finished while they are there and it asks for the same samples (only the batch size may
    change), else from the first sample (cleanup removed them, say)."""
    same = retry.fingerprint == original.fingerprint
    done = original.reusable_samples(sharded=retry.shards > 1) if same else 0
    if done:
        kept = ""
        if retry.shards > 1 and retry.shards != original.shards:
            kept = f" It keeps extraction {original.pk}'s cut into {original.shards} shards, not {retry.shards}."
        return f"Extraction {retry.pk} starts after the {done:,} samples extraction {original.pk} finished.{kept}"
    if same and original.reusable_samples():
        why = (f"it runs as {retry.shards} shards and extraction {original.pk} ran on one worker"
               if retry.shards > 1 else f"it runs on one worker and extraction {original.pk} ran as shards")
    else:
        why = (f"none of extraction {original.pk}'s samples are left to reuse" if same
               else f"it asks for other samples, lengths or storage than extraction {original.pk}")
    return f"Extraction {retry.pk} {Extraction.FIRST_SAMPLE}: {why}."


def extraction_retry_suggested(
    *, extraction: Extraction, batch_size: int | None = None, max_samples: int | str | None = None,
    max_length: int | None = None, user=None, via: str,
) -> Extraction:
    """Retry with the parameters the failure suggested (half the batch size after an OOM); a
    parameter given as well is what the person asked for, so it overrides the suggestion."""
    check(user, "extraction.retry_extraction")
    suggested = extraction.suggested_retry_params or {}
    asked = {"batch_size": batch_size, "max_samples": max_samples, "max_length": max_length}
    given = {name: value for name, value in asked.items() if value is not None}
    if not suggested and not given and extraction.retry_available:
        # Retrying unchanged what failed for a reason of its own (VALIDATION, say) would fail again.
        failure = f" ({extraction.error_type})" if extraction.error_type else ""
        raise TransitionError(f"Extraction {extraction.pk}'s failure{failure} suggests no parameters; retry it with "
                              "the parameters you choose, or fix what its message names first.")
    params = {**suggested, **given}
    reason = f"retried {via}" + (f" with suggested parameters {suggested}" if suggested else "")
    if given:
        reason += f" overridden by {given}" if suggested else f" with {given}"
    return extraction_retry(
        extraction=extraction, batch_size=params.get("batch_size"), max_samples=params.get("max_samples"),
        max_length=params.get("max_length"), user=user, reason=reason,
    )


def _spec(extraction: Extraction):
    from extraction import runner  # noqa: PLC0415

    return runner.ExtractionSpec(
        model_path=extraction.model.path,
        dataset_path=extraction.dataset.path,
        output_dir=str(extraction.output_dir),
        layers=tuple(extraction.layers),
        hooks=tuple(extraction.hooks),
        # The size asked for: the checkpoint says which one is in force, and the runner grows back to this.
        batch_size=extraction.batch_size,
        max_length=extraction.max_length,
        max_samples=extraction.max_samples,
        storage_dtype=extraction.storage_dtype,
        auto_retry_on_oom=extraction.auto_retry_on_oom,
        device=settings.JOBSITE_DEVICE,
    )


def _original(extraction: Extraction) -> Extraction | None:
    # By its number: an original deleted since keeps its number here, and its files are gone with it.
    return Extraction.objects.filter(pk=extraction.original_extraction_id).first() \
        if extraction.original_extraction_id else None


def _publish_tokenizing(extraction: Extraction, kind: str, payload: dict) -> None:
    if kind == "tokenizing":
        # "Tokenizing 120,000 of 300,000 samples": at most once a second, before the first batch.
        from jobsite.events import publish  # noqa: PLC0415

        publish(extraction.topic, "extraction.tokenizing", {**extraction.event_payload(), **payload})


def extraction_run(extraction: Extraction, lease) -> None:
    """The work of one attempt, called by the worker once it holds the claim."""
    from extraction import runner  # noqa: PLC0415
    from jobsite import failpoints  # noqa: PLC0415

    if extraction.shards > 1:
        return _plan_shards(extraction, lease)
    spec = _spec(extraction)
    original = _original(extraction)
    if extraction.attempt == 1 and original is not None and not extraction.output_dir.exists():
        seeded = runner.seed_from_checkpoint(str(original.output_dir), str(extraction.output_dir), spec)
        if seeded:
            lease.report(resumed_samples=seeded)

    def progress(samples_done, total_samples, tokens_done, total_tokens):
        lease.progress(
            samples_processed=samples_done, total_samples=total_samples,
            tokens_processed=tokens_done, total_tokens=total_tokens,
            final=samples_done == total_samples,
        )

    def on_event(kind: str, payload: dict):
        if kind == "phase" and payload.get("phase") == "extracting":
            # The batch size and its changes as the checkpoint has them: a resume goes on from there.
            lease.set_status(
                Extraction.Status.EXTRACTING, total_tokens=payload["total_tokens"],
                clamped_tokens=payload["clamped_tokens"], truncated_samples=payload["truncated_samples"],
                current_batch_size=payload["batch_size"], batch_size_changes=payload["batch_size_changes"],
            )
        elif kind == "phase" and payload.get("phase") == "saving":
            lease.set_status(Extraction.Status.SAVING)
        elif kind in ("batch_size_reduced", "batch_size_grown"):
            lease.report(current_batch_size=payload["to"], batch_size_changes=payload["batch_size_changes"])
            from jobsite.events import publish  # noqa: PLC0415

            publish(extraction.topic, f"extraction.{kind}", {**extraction.event_payload(), **payload})
        else:
            _publish_tokenizing(extraction, kind, payload)

    try:
        result = runner.run_extraction(
            spec,
            progress=progress,
            heartbeat=lease.heartbeat,
            should_cancel=lease.should_cancel,
            on_event=on_event,
            failpoint=failpoints.make(settings.JOBSITE_FAILPOINTS, attempt=extraction.attempt),
        )
    except JobInputError as exc:
        if exc.field == "max_length":  # queued before its model's limit was kept: the failure suggests it
            model_max_positions(model=extraction.model)
        raise
    if extraction.status != Extraction.Status.SAVING:
        lease.set_status(Extraction.Status.SAVING)
    lease.set_status(
        Extraction.Status.COMPLETED,
        samples_processed=result.samples, total_samples=result.samples, tokens_processed=result.tokens,
        total_tokens=result.tokens, clamped_tokens=result.clamped_tokens,
        truncated_samples=result.truncated_samples, inf_values=result.inf_values, current_batch_size=result.batch_size,
        error_type="", error_message="", suggested_retry_params={}, progress_at=timezone.now(),
    )


# -- one extraction, several workers ----------------------------------------------------------------
def _plan_shards(extraction: Extraction, lease) -> None:
    """The planning attempt of a sharded extraction: tokenize, make the files, cut the shards,
    queue those not done, and let the extraction go (its shards are claimed, each by a worker).
    A large dataset is tokenized in parts instead, one per shard, by as many workers; the last
    part to finish makes the plan from them (_tokenized_part)."""
    from extraction import runner  # noqa: PLC0415
    from extraction.models import ExtractionShard  # noqa: PLC0415

    if extraction.refused_since is not None:
        Extraction.objects.filter(pk=extraction.pk).update(refused_since=None)
    spec = _spec(extraction)
    if extraction.total_samples >= settings.JOBSITE_TOKENIZE_PARTS_FROM:
        return _tokenize_in_parts(extraction, lease, runner.split_dataset(spec, extraction.shards))
    planned = runner.plan_shards(spec, extraction.shards, heartbeat=lease.heartbeat,
                                 should_cancel=lease.should_cancel,
                                 on_event=lambda kind, payload: _publish_tokenizing(extraction, kind, payload),
                                 seed_from=_seed_from(extraction))
    with transaction.atomic():
        # The extraction is its shards' now: no worker holds it, and none heartbeats for it.
        _queue_shards(extraction, planned, lambda **fields: lease.set_status(
            Extraction.Status.EXTRACTING, worker="", worker_host="", worker_pid=None, **fields))
    # Handed over: this worker's heartbeat no longer speaks for the extraction, and nothing that
    # fails from here fails it (the watchdog's pass settles it as well).
    lease.stopped.set()
    try:
        _sum_shards(extraction.pk)
        # Every shard done already (a retry that kept them all), or a stop asked while it planned.
        extraction_settle(extraction_id=extraction.pk)
    except Exception:  # noqa: BLE001
        logger.exception("extraction %s: settling after its plan failed", extraction.pk)


def _seed_from(extraction: Extraction) -> str | None:
    """The folder of the extraction this one retries, on its first plan (the folder its start
    made holds nothing yet): its finished shards are kept when it was cut the same way."""
    from extraction.runner.outputs import CHECKPOINT, LAYOUT  # noqa: PLC0415

    original = _original(extraction)
    fresh = not any((extraction.output_dir / name).exists() for name in (CHECKPOINT, LAYOUT))
    return str(original.output_dir) if extraction.attempt == 1 and original is not None and fresh else None


def _queue_shards(extraction: Extraction, planned, move) -> None:
    """The extracting shards of a plan, those not done queued, and the extraction moved to
    extracting by `move(**fields)`; in the caller's transaction."""
    from extraction.models import ExtractionShard  # noqa: PLC0415

    existing = set(extraction.part_set.filter(phase=ExtractionShard.Phase.EXTRACT).values_list("index", flat=True))
    made = []
    for part, done in zip(planned.shards, planned.done):
        if part["index"] in existing:  # an earlier planning attempt made it: it goes on as it is
            continue
        finished = done == part["samples"]
        made.append(ExtractionShard.objects.create(
            extraction=extraction, index=part["index"], first_sample=part["first_sample"],
            end_sample=part["end_sample"], total_tokens=part["tokens"], samples_processed=done,
            tokens_processed=part["tokens"] if finished else 0, current_batch_size=extraction.batch_size,
            status=ExtractionShard.Status.COMPLETED if finished else ExtractionShard.Status.QUEUED,
            finished_at=timezone.now() if finished else None,
        ))
    done_before = sum(planned.done)
    seeded = extraction.original_extraction_id and done_before and not existing
    move(shards=len(planned.shards), total_samples=planned.samples, total_tokens=planned.tokens,
         clamped_tokens=planned.clamped_tokens, truncated_samples=planned.truncated_samples,
         samples_processed=done_before, current_batch_size=extraction.batch_size,
         **({"resumed_samples": done_before} if seeded else {}))
    extraction_enqueue_shards(shards=[shard for shard in made if shard.status == ExtractionShard.Status.QUEUED])


def _tokenize_in_parts(extraction: Extraction, lease, cut: list[dict]) -> None:
    """A tokenizing part per shard, queued for any worker; the extraction stays loading, held
    by none of them."""
    from extraction.models import ExtractionShard  # noqa: PLC0415
    from jobsite.events import publish  # noqa: PLC0415

    with transaction.atomic():
        parts = [ExtractionShard.objects.create(
            extraction=extraction, phase=ExtractionShard.Phase.TOKENIZE, index=part["index"],
            first_sample=part["first_sample"], end_sample=part["end_sample"], source=part,
        ) for part in cut]
        if not Extraction.objects.filter(pk=extraction.pk, worker=extraction.worker,
                                         status=Extraction.Status.LOADING).update(
                worker="", worker_host="", worker_pid=None, updated_at=timezone.now()):
            raise TransitionError(f"Extraction {extraction.pk} changed while it was planned.")
        extraction.worker, extraction.worker_host, extraction.worker_pid = "", "", None
        publish(extraction.topic, "extraction.tokenizing", {
            **extraction.event_payload(), "samples_tokenized": 0, "total_samples": extraction.total_samples,
            "tokens_tokenized": 0, "message": f"Tokenizing {extraction.total_samples:,} samples in {len(parts)} "
                                              "parts, one per worker"})
        extraction_enqueue_shards(shards=parts)


def _tokenized_part(shard, lease, spec) -> None:
    """A tokenizing part done: counted, and, when it is the last one, the plan made from all of
    them under this part's lease (its heartbeat and cancel hold), the shards queued."""
    from extraction import runner  # noqa: PLC0415
    from extraction.models import ExtractionShard  # noqa: PLC0415
    from jobsite.lifecycle import transition  # noqa: PLC0415

    with transaction.atomic():
        extraction = Extraction.objects.select_for_update().get(pk=shard.extraction_id)
        parts = list(extraction.part_set.filter(phase=ExtractionShard.Phase.TOKENIZE).order_by("index"))
        last = extraction.status == Extraction.Status.LOADING and all(
            part.status == ExtractionShard.Status.COMPLETED for part in parts if part.pk != shard.pk)
        if not last:
            lease.set_status(ExtractionShard.Status.COMPLETED, progress_at=timezone.now())
            return
    planned = runner.plan_shards(spec, extraction.shards, heartbeat=lease.heartbeat, should_cancel=lease.should_cancel,
                                 seed_from=_seed_from(extraction), parts=[part.source for part in parts])
    with transaction.atomic():
        extraction = Extraction.objects.select_for_update().get(pk=shard.extraction_id)
        _queue_shards(extraction, planned, lambda **fields: transition(extraction, Extraction.Status.EXTRACTING,
                                                                        **fields))
        lease.set_status(ExtractionShard.Status.COMPLETED, progress_at=timezone.now())
    _sum_shards(extraction.pk)
    extraction_settle(extraction_id=extraction.pk)


def extraction_enqueue_shards(*, shards: list) -> None:
    """A task per shard, and two spare ones per live cluster: a task whose shard is taken runs
    the next queued one (tasks.run_extraction_shard). A busy cluster takes up to two tasks from
    the queue before its worker is free (django-q2's pusher fills the cluster's queue, whose
    size is at least one, then waits to put the next one in): without spares, the shards
    those tasks name would wait there while another cluster idles. A spare that finds nothing
    queued ends at once."""
    from jobsite.clusters import live_workers  # noqa: PLC0415

    for shard in shards:
        job_enqueue(shard)
    if shards:
        for i in range(2 * live_workers()[0]):
            job_enqueue(shards[i % len(shards)])


def next_queued_shard(*, extraction_id: int):
    """The first shard of the extraction that a worker may claim now (none in backoff)."""
    from django.db.models import Q as Where  # noqa: PLC0415

    from extraction.models import ExtractionShard  # noqa: PLC0415

    return ExtractionShard.objects.filter(
        ExtractionShard.awaiting_worker(), Where(next_attempt_at__isnull=True) | Where(next_attempt_at__lte=timezone.now()),
        extraction_id=extraction_id).order_by("phase", "index").first()


def _sums(extraction_id: int, phase: str = "extract") -> dict:
    from django.db.models import Sum  # noqa: PLC0415

    from extraction.models import ExtractionShard  # noqa: PLC0415

    sums = ExtractionShard.objects.filter(extraction_id=extraction_id, phase=phase).aggregate(
        samples=Sum("samples_processed"), tokens=Sum("tokens_processed"), inf=Sum("inf_values"))
    return {"samples_processed": sums["samples"] or 0, "tokens_processed": sums["tokens"] or 0,
            "inf_values": sums["inf"] or 0}


def _sum_shards(extraction_id: int) -> dict:
    """The extraction's progress counters, summed from its shards' rows."""
    sums = _sums(extraction_id)
    Extraction.objects.filter(pk=extraction_id).update(**sums, progress_at=timezone.now(), updated_at=timezone.now())
    return sums


def extraction_shard_run(shard, lease) -> None:
    """The work of one attempt of a shard, called by the worker once it holds the shard's claim."""
    from extraction import runner  # noqa: PLC0415
    from extraction.models import ExtractionShard  # noqa: PLC0415
    from jobsite import failpoints  # noqa: PLC0415
    from jobsite.events import publish  # noqa: PLC0415

    extraction = shard.extraction
    spec = _spec(extraction)
    if shard.refused_since is not None:
        ExtractionShard.objects.filter(pk=shard.pk).update(refused_since=None)

    if shard.phase == ExtractionShard.Phase.TOKENIZE:
        def tokenized(done, total, tokens):
            lease.report(samples_processed=done, tokens_processed=tokens)
            sums = _sums(extraction.pk, phase=ExtractionShard.Phase.TOKENIZE)
            publish(shard.topic, "extraction.tokenizing", {
                **shard.event_payload(), "samples_tokenized": sums["samples_processed"],
                "total_samples": extraction.total_samples, "tokens_tokenized": sums["tokens_processed"],
                "message": f"Tokenizing {sums['samples_processed']:,} of {extraction.total_samples:,} samples "
                           f"({extraction.shards} parts)"})

        runner.tokenize_part(spec, shard.source, progress=tokenized, heartbeat=lease.heartbeat,
                             should_cancel=lease.should_cancel)
        return _tokenized_part(shard, lease, spec)

    def progress(samples_done, total_samples, tokens_done, total_tokens):
        # Summed into the extraction once the shard's row holds them, before the shard's progress
        # event, which carries the extraction.
        lease.progress(samples_processed=samples_done, tokens_processed=tokens_done,
                       final=samples_done == total_samples, after_write=lambda: _sum_shards(extraction.pk))

    def on_event(kind: str, payload: dict):
        if kind == "phase" and payload.get("phase") == "extracting":
            lease.report(current_batch_size=payload["batch_size"], batch_size_changes=payload["batch_size_changes"])
        elif kind in ("batch_size_reduced", "batch_size_grown"):
            lease.report(current_batch_size=payload["to"], batch_size_changes=payload["batch_size_changes"])
            publish(shard.topic, f"extraction.{kind}", {
                **shard.event_payload(), **payload, "shard_index": shard.index,
                "message": f"Shard {shard.index}: {payload['message']}"})

    result = runner.run_shard(
        spec, shard.index, progress=progress, heartbeat=lease.heartbeat, should_cancel=lease.should_cancel,
        on_event=on_event, failpoint=failpoints.make(settings.JOBSITE_FAILPOINTS, attempt=shard.attempt),
    )
    lease.set_status(
        ExtractionShard.Status.COMPLETED, samples_processed=result.samples, tokens_processed=result.tokens,
        inf_values=result.inf_values, current_batch_size=result.batch_size, error_type="", error_message="",
        suggested_retry_params={}, progress_at=timezone.now(),
    )


def extraction_settle(*, extraction_id: int, finish: bool = True) -> str:
    """The extraction as its shards decide it, once it is theirs; returns what changed ("" for nothing).

    - a shard failed for good (not retried automatically): the others are asked to stop at their
      next batch, keeping their work, and once none is active the extraction fails with that
      shard's error (not before: a Retry copies their files and must find them still);
    - a stop was asked: every shard still active is asked too, and once none is active the
      extraction is cancelled;
    - every shard completed: metadata.json is written (by a process that sees the files, and
      only when `finish`: a person's cancel in the web process leaves it to a worker) and the
      extraction completes; a finish that cannot be done fails it with the reason.
    Safe to call any number of times, from any process."""
    from extraction.models import ExtractionShard  # noqa: PLC0415
    from jobsite.lifecycle import transition, transition_cancelled  # noqa: PLC0415

    with transaction.atomic():
        extraction = Extraction.objects.select_for_update().filter(pk=extraction_id).first()
        if extraction is None or not extraction.sharded:
            return ""
        shards = list(extraction.shard_set.all())
        if not shards:
            return ""
        failed = [shard for shard in shards if shard.status == ExtractionShard.Status.FAILED]
        active = [shard for shard in shards if shard.status in ExtractionShard.ACTIVE]
        running = (Extraction.Status.LOADING, Extraction.Status.EXTRACTING)
        done = all(shard.status == ExtractionShard.Status.COMPLETED for shard in shards)
        if (failed or extraction.cancel_requested) and extraction.status in running and not done:
            for shard in active:
                _stop_shard(shard)
            shards = list(extraction.shard_set.all())
            active = [shard for shard in shards if shard.status in ExtractionShard.ACTIVE]
            if active:
                return ""  # decided once the last of them has stopped, its rows and checkpoint synced
        if failed and extraction.status in running:
            first = failed[0]
            where = f" on {first.worker}" if first.worker else ""
            transition(
                extraction, Extraction.Status.FAILED, error_type=first.error_type or "UNKNOWN",
                error_message=f"Shard {first.index} of {len(shards)}{where}: {first.error_message}",
                suggested_retry_params=extraction.suggest_retry_params(first.error_type),
                **_sums(extraction.pk),
            )
            return f"{extraction.topic}: failed with shard {first.index}"
        if active:
            return ""
        if not done:
            # Stopped, none failed, and none left to run: whoever stopped them, the extraction is stopped.
            transition_cancelled(extraction, payload=_sums(extraction.pk))
            return f"{extraction.topic}: cancelled with its shards"
        if extraction.status == Extraction.Status.LOADING:
            return ""  # every part tokenized: the last one makes the plan, under its lease
        if not finish:
            return ""
        if extraction.status == Extraction.Status.EXTRACTING:
            transition(extraction, Extraction.Status.SAVING)
        # Under the row's lock: two shards that complete together both find every shard done, and
        # a second finisher reading the files while the first removes them would find a shard
        # "not done" and fail a finished extraction. The second waits here, then finds it completed.
        return _finish_shards(extraction)


def _stop_shard(shard) -> None:
    try:
        job_request_cancel(shard)
    except TransitionError:
        pass  # it ended meanwhile


def _finish_shards(extraction: Extraction) -> str:
    """Every shard completed: metadata.json, then the extraction completes. A process that does
    not see the files leaves it to a worker's watchdog pass that does; files that say a shard the
    database calls completed is not done fail the extraction with that sentence (no worker
    would ever go on with it)."""
    from extraction import runner  # noqa: PLC0415
    from extraction.runner import shards as shard_files  # noqa: PLC0415
    from jobsite.errors import ErrorType  # noqa: PLC0415
    from jobsite.lifecycle import transition  # noqa: PLC0415

    directory = str(extraction.output_dir)
    if not (shard_files.sees(directory) or (extraction.output_dir / "metadata.json").exists()):
        logger.warning("%s: its shards completed, but this process (%s) sees neither its plan nor its metadata in "
                       "%s; left to a worker that does", extraction.topic, settings.JOBSITE_HOSTNAME, directory)
        return ""
    try:
        metadata = runner.finish_shards(_spec(extraction))
    except (JobInputError, OSError, ValueError, KeyError) as exc:
        with transaction.atomic():
            current = Extraction.objects.select_for_update().filter(pk=extraction.pk).first()
            if current is None or current.status != Extraction.Status.SAVING:
                return ""
            transition(current, Extraction.Status.FAILED, error_type=ErrorType.STORAGE,
                       error_message=f"Its shards completed, but their files could not be finished: {exc}")
        return f"{extraction.topic}: failed to finish ({exc})"
    with transaction.atomic():
        current = Extraction.objects.select_for_update().filter(pk=extraction.pk).first()
        if current is None or current.status != Extraction.Status.SAVING:
            return ""
        batch_sizes = [size for size in current.shard_set.values_list("current_batch_size", flat=True) if size]
        transition(
            current, Extraction.Status.COMPLETED, samples_processed=metadata["samples"],
            total_samples=metadata["samples"], tokens_processed=metadata["tokens"], total_tokens=metadata["tokens"],
            clamped_tokens=metadata["clamped_tokens"], truncated_samples=metadata["truncated_samples"],
            inf_values=metadata["inf_values"], current_batch_size=min(batch_sizes) if batch_sizes else None,
            error_type="", error_message="", suggested_retry_params={}, progress_at=timezone.now(),
        )
    return f"{extraction.topic}: completed with its {extraction.shards} shards"


def extraction_settle_all() -> list[str]:
    """The watchdog's pass: every extraction run by its shards is settled (a worker that died
    between its shard's end and the extraction's gave that up). One that cannot be settled now
    (a database blip) is left for the next pass, never the others with it."""
    changed = []
    for pk in Extraction.objects.filter(
            status__in=(Extraction.Status.LOADING, Extraction.Status.EXTRACTING, Extraction.Status.SAVING), worker="",
            shards__gt=1,
    ).values_list("pk", flat=True):
        try:
            line = extraction_settle(extraction_id=pk)
        except Exception:  # noqa: BLE001 - the next pass tries again
            logger.exception("extraction %s could not be settled", pk)
            continue
        if line:
            changed.append(line)
    return changed


def extraction_refusal(*, extraction: Extraction, planned: bool) -> str:
    """Why this worker cannot take part in a sharded extraction: it does not see (or cannot
    write) the folder its start made, where its own data directory says it is, nor, once
    planned, the plan in it; or it lacks the model's files."""
    from extraction.runner.outputs import LAYOUT, SHARDS_DIR  # noqa: PLC0415 - numpy only, no torch

    host = settings.JOBSITE_HOSTNAME
    directory = extraction.output_dir
    seen = directory.is_dir() and os.access(directory, os.W_OK)
    if seen and planned:
        seen = (directory / LAYOUT).is_file() and os.access(directory / SHARDS_DIR, os.W_OK)
    if not seen:
        return f"worker {host} cannot write {directory}: mount the shared data directory there"
    model_path = Path(extraction.model.path)
    if not (model_path / "config.json").is_file():
        return f"worker {host} has no model files at {model_path}: put the model's directory there, at the same path"
    return ""


def extraction_leave(*, job, reason: str) -> None:
    """This worker does not take the job (a sharded extraction to plan, or a shard): the
    extraction hears it once per host, the job goes back to the queue for another worker, and
    after the stall limit with no worker able to take it (no extraction or shard runs on a host
    that did not refuse) it fails with the reason."""
    from extraction.models import ExtractionShard  # noqa: PLC0415
    from jobsite.errors import ErrorType  # noqa: PLC0415
    from jobsite.events import publish  # noqa: PLC0415
    from jobsite.services import job_fail  # noqa: PLC0415

    model = type(job)
    host, now = settings.JOBSITE_HOSTNAME, timezone.now()
    with transaction.atomic():
        current = model.objects.select_for_update().filter(model.awaiting_worker(), pk=job.pk).first()
        if current is None:
            return
        new = host not in current.refusals
        current.refusals = {**current.refusals, host: reason}
        current.refused_since = current.refused_since or now
        model.objects.filter(pk=current.pk).update(refusals=current.refusals, refused_since=current.refused_since)
        shard = getattr(current, "index", None)
        said = f"Shard {shard}: {reason}." if shard is not None else f"{reason[0].upper()}{reason[1:]}."
        if new:
            publish(current.topic, "extraction.shard_refused", {
                **current.event_payload(), "shard_index": shard, "host": host, "message": said})
        able = [m.objects.filter(status__in=m.RUNNING).exclude(worker="").exclude(worker_host__in=list(
            current.refusals)).exists() for m in (Extraction, ExtractionShard)]
        waited = (now - current.refused_since).total_seconds()
        give_up = waited > settings.JOBSITE_STALL_AFTER_S and not any(able)
        if give_up:
            job_fail(current, error_type=ErrorType.STORAGE if "data directory" in reason else ErrorType.VALIDATION,
                     message=f"No worker could take it for {waited:.0f} s: {reason}.")
    if give_up:
        extraction_settle(extraction_id=getattr(current, "extraction_id", current.pk))
        return
    # Another worker may take it meanwhile; this one waits a little before it could see it again.
    time.sleep(min(2.0, settings.JOBSITE_STALL_AFTER_S / 5))
    job_enqueue(current)
