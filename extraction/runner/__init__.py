"""Activation extraction: the pure workload behind an extraction job (no Django here).

Output (docs/output-format.md), readable without jobsite: `offsets.npy` (int64, samples + 1),
`tokens.npy` (int32, the id the model saw at each row), one `layer_{L}_{hook}.npy` per
requested (layer, hook point) holding the non-pad tokens of every sample in dataset order
(sample i is rows offsets[i]:offsets[i + 1]), the tokenizer in `tokenizer/`, `metadata.json` last.

Samples are computed in one global order, longest first (ties by dataset index), cut into
batches. Whatever the batch size, the completed samples are therefore a prefix of that
order and the checkpoint only counts them: a resume cuts the pending suffix with the
batch size and growth budget it recorded (module `batch_size`), which reproduces the
uninterrupted run's batches and so its bytes.

The modules, in the order a run uses them: `model` (a directory read as untrusted input),
`families` (where each hook point lives in each family's blocks), `dataset` (read line by
line), `plan` (the request checked, the samples tokenized chunk by chunk straight into the
ids file, the fingerprint), `outputs` (preallocated files and the checkpoint), `batch_size`
(halved on out-of-memory, grown back on shorter samples), `forward` (a batch through the
model, with the hooks), `writer` (rows written by position on a thread of its own), `native`
(the allocator and writeback knobs).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from extraction.runner import outputs, shards
from extraction.runner import plan as plan_module
from extraction.runner.batch_size import BatchSize
from extraction.runner.dataset import DatasetInfo, inspect_dataset, split_samples
from extraction.runner.forward import Capture, run_batch
from extraction.runner.model import ModelInfo, inspect_model, load_model
from extraction.runner.native import heap_reuse, release_pinned
from extraction.runner.outputs import CHECKPOINT, METADATA, OFFSETS, TOKENIZER, TOKENS, open_outputs
from extraction.runner.plan import FORMAT_VERSION, ExtractionSpec, Plan, prepare
from extraction.runner.writer import Writer

# Cancelled is re-exported from jobsite.errors: the worker tells a cancel from a failure by it.
from jobsite.errors import Cancelled, JobInputError, is_oom

__all__ = [
    "Cancelled", "DatasetInfo", "ExtractionResult", "ExtractionSpec", "ModelInfo", "heap_reuse", "inspect_dataset",
    "inspect_model", "run_extraction", "seed_from_checkpoint", "plan_shards", "run_shard", "finish_shards",
    "split_dataset", "tokenize_part",
]

# Rows are synced and counted at most this often (and always at the end, on cancel and on
# the way out by an error): a crash redoes at most this much work, and a fast device is
# not held to nine fdatasyncs a batch.
SYNC_EVERY_S = 1.0


@dataclass
class ExtractionResult:
    samples: int
    tokens: int
    clamped_tokens: int
    truncated_samples: int
    batch_size: int
    files: list[str]
    inf_values: int = 0  # values stored as +-inf; counted in float16 files, where beyond +-65504 is inf


@dataclass
class _Callbacks:
    progress: Callable[[int, int, int, int], None]
    heartbeat: Callable[[], None]
    should_cancel: Callable[[], bool]
    on_event: Callable[[str, dict], None]
    failpoint: Callable[[str, dict], None]


def run_extraction(
    spec: ExtractionSpec,
    *,
    progress: Callable[[int, int, int, int], None] | None,
    heartbeat: Callable[[], None] | None,
    should_cancel: Callable[[], bool] | None,
    on_event: Callable[[str, dict], None] | None = None,
    failpoint: Callable[[str, dict], None] | None = None,
) -> ExtractionResult:
    """Extract spec's activations into spec.output_dir, resuming its checkpoint if it matches."""
    calls = _Callbacks(
        progress or (lambda *args: None), heartbeat or (lambda: None), should_cancel or (lambda: False),
        on_event or (lambda *args: None), failpoint or (lambda *args: None),
    )
    plan = prepare(spec, directory=spec.output_dir, progress=lambda *told: _tokenizing(calls, *told),
                   should_cancel=lambda: _between_steps(calls))
    try:
        return _run(spec, plan, calls)
    finally:
        plan.close()


def _tokenizing(calls: _Callbacks, done: int, total: int, tokens: int) -> None:
    calls.on_event("tokenizing", {"samples_tokenized": done, "total_samples": total, "tokens_tokenized": tokens,
                                  "message": f"Tokenizing {done:,} of {total:,} samples"})


def _between_steps(calls: _Callbacks) -> bool:
    calls.heartbeat()
    return calls.should_cancel()


def _run(spec: ExtractionSpec, plan: Plan, calls: _Callbacks) -> ExtractionResult:
    model = load_model(spec.model_path, dtype=spec.model_dtype, device=spec.device)
    starts, checkpoint = open_outputs(spec, plan)
    # A resume goes on with the size its checkpoint had in force, and grows back toward spec's.
    sizer = BatchSize.from_checkpoint(checkpoint, spec.batch_size)
    calls.on_event("phase", {
        "phase": "extracting", "total_tokens": int(plan.offsets[-1]),
        "clamped_tokens": plan.clamped_tokens, "truncated_samples": plan.truncated_samples,
        "batch_size": sizer.current, "batch_size_changes": list(sizer.changes),
    })
    batch_size, inf_values = _extract(spec, plan, model, starts, checkpoint, sizer, calls)
    calls.on_event("phase", {"phase": "saving"})
    result, metadata = _describe(spec, plan, batch_size, inf_values)
    outputs.write_json(os.path.join(spec.output_dir, METADATA), metadata)
    return result


def _extract(spec: ExtractionSpec, plan: Plan, model: torch.nn.Module, starts: dict[str, int], checkpoint: dict,
             sizer: BatchSize, calls: _Callbacks, *, span: tuple[int, int] | None = None,
             checkpoint_name: str = CHECKPOINT) -> tuple[int, int]:
    """Every pending batch of `span` (positions in the global order; all of it when None),
    longest samples first; returns the batch size in force at the end (smaller after
    out-of-memory halving, unless it grew back) and the infinite values stored. The checkpoint
    counts positions in the global order, whatever the span: a shard's batches are the ones a
    single worker cuts there, since shards start at a multiple of the batch size."""
    checkpoint_path = os.path.join(spec.output_dir, checkpoint_name)
    lengths = np.diff(plan.offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in dataset order
    first, end = span or (0, len(order))
    done, batch_index = checkpoint["samples_done"], checkpoint["batches_done"]
    tokens_upto = np.concatenate([[0], np.cumsum(lengths[order])])  # tokens of the first k samples of order
    total_samples, total_tokens = end - first, int(tokens_upto[end] - tokens_upto[first])

    def told(position: int) -> None:
        calls.progress(position - first, total_samples, int(tokens_upto[position] - tokens_upto[first]), total_tokens)

    told(done)

    copy_stream = torch.cuda.Stream(spec.device) if spec.device.startswith("cuda") else None
    itemsize = np.dtype(spec.storage_dtype).itemsize
    layout = {name: (starts[name], width * itemsize) for name, width in plan.widths().items()}
    writer = Writer(spec.output_dir, layout, checkpoint, SYNC_EVERY_S, count_inf=spec.storage_dtype == "float16",
                    checkpoint_name=checkpoint_name)
    capture = Capture(model, model.config, plan)
    reported = checkpoint

    def report() -> None:
        """Progress counts the samples written; the checkpoint counts them within SYNC_EVERY_S."""
        nonlocal reported
        if writer.written is not reported:
            reported = writer.written
            told(reported["samples_done"])

    with heap_reuse(spec.device):
        try:
            while done < end:
                calls.heartbeat()
                if calls.should_cancel():
                    writer.flush()
                    report()
                    raise Cancelled(f"Cancelled after {done - first} of {total_samples} samples.")
                grown = sizer.grow(done, int(lengths[order[done]]))
                if grown is not None:
                    calls.on_event("batch_size_grown", _change_payload(
                        grown, batch_index, sizer,
                        f"Samples are shorter now: back to batch size {grown['to']} from {grown['from']} "
                        f"after {done} samples.",
                    ))
                batch_size = sizer.current
                # Longest first, so empty samples only ever share a batch with each other.
                batch = [int(i) for i in order[done : min(done + batch_size, end)] if lengths[i] > 0]
                tokens = len(batch) * int(lengths[batch[0]]) if batch else 0  # samples x padded length
                rows = failure = None
                try:
                    rows = run_batch(model, spec, plan, batch, capture, copy_stream)
                except Exception as exc:
                    failure = exc
                # While this batch ran forward, the writer wrote the one before (and, if it was
                # time, synced and counted it), or its error is raised here, never mistaken for
                # this batch's.
                writer.wait()
                report()
                try:
                    if failure is not None:
                        raise failure
                    # Here every earlier batch is counted, as if nothing ran concurrently.
                    calls.failpoint("extraction.batch", {"index": batch_index, "batch_size": batch_size,
                                                         "samples_done": done, "tokens": tokens})
                except Exception as exc:
                    if not (spec.auto_retry_on_oom and batch_size > 1 and is_oom(exc)):
                        raise
                    rows = None  # memory is freed below: until this block ends, the traceback pins it
                failure = None
                if rows is None:
                    writer.flush()  # the checkpoint below counts every sample done: they are synced first
                    report()
                    capture.take()
                    gc.collect()
                    if spec.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    reduced = sizer.halve(done)
                    # From the writer's checkpoint: it is this one, plus what the writer counts.
                    checkpoint = {**writer.counted, **sizer.checkpoint_fields()}
                    outputs.write_json(checkpoint_path, checkpoint)  # the writer is idle: it was flushed above
                    # Told once the checkpoint holds it: the job's row never says a size no resume goes on with.
                    calls.on_event("batch_size_reduced", _change_payload(
                        reduced, batch_index, sizer,
                        f"Out of memory at batch size {reduced['from']}; retrying with {reduced['to']}.",
                    ))
                    continue
                sizer.ran(tokens)
                done = min(done + batch_size, end)
                batch_index += 1
                checkpoint = {**checkpoint, **sizer.checkpoint_fields(), "samples_done": done,
                              "batches_done": batch_index}
                writer.submit(rows, checkpoint)
                del rows
            writer.flush()
            report()
        finally:
            # On the way out by an exception too, the batches handed over are written, synced,
            # counted, and reported.
            writer.close()
            capture.close()
            report()
            if copy_stream is not None:
                release_pinned()
    return sizer.current, writer.inf_values


def _change_payload(change: dict, batch_index: int, sizer: BatchSize, message: str) -> dict:
    """A batch size change as the job hears of it: the change, and every change so far."""
    return {**change, "batch_index": batch_index, "message": message, "batch_size_changes": list(sizer.changes)}


def _describe(spec: ExtractionSpec, plan: Plan, batch_size: int, inf_values: int) -> tuple[ExtractionResult, dict]:
    """The result, and the metadata.json that says what every file holds."""
    total_samples, total_tokens = len(plan.offsets) - 1, int(plan.offsets[-1])
    files = {OFFSETS: {"dtype": "int64", "shape": [total_samples + 1]},
             TOKENS: {"dtype": "int32", "shape": [total_tokens]}}
    for name, width in plan.widths().items():
        files[name] = {"dtype": spec.storage_dtype, "shape": [total_tokens, width]}
    result = ExtractionResult(
        total_samples, total_tokens, plan.clamped_tokens, plan.truncated_samples, batch_size, [*files, METADATA],
        inf_values,
    )
    points = plan.info.points
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_path": spec.model_path,
        "architecture": plan.info.architecture,
        "model_type": plan.info.model_type,
        "family": points.family,
        "layers": plan.layers,
        "hooks": plan.hooks,
        "hook_points": {hook: described for hook, described in points.describe().items() if hook in plan.hooks},
        "storage_dtype": spec.storage_dtype,
        "model_dtype": spec.model_dtype,
        "hidden_size": plan.info.hidden_size,
        "max_length": spec.max_length,
        "tokenizer": {"path": TOKENIZER, "class": type(plan.tokenizer).__name__, "source": spec.model_path},
        "order": "longest first, ties in dataset order",
        "files": files,
        **{key: getattr(result, key)
           for key in ("samples", "tokens", "clamped_tokens", "truncated_samples", "inf_values")},
    }
    return result, metadata


def seed_from_checkpoint(src_output_dir: str, dst_output_dir: str, spec: ExtractionSpec) -> int:
    """Start dst from src's completed samples when only the batch size changed; 0 if not."""
    plan = prepare(spec)
    try:
        return outputs.seed_from_checkpoint(src_output_dir, dst_output_dir, spec, plan)
    finally:
        plan.close()


# -- one extraction, several workers (module `shards`) -------------------------------------------
@dataclass
class ShardPlan:
    shards: list[dict]  # {index, first_sample, end_sample, samples, tokens}
    done: list[int]  # samples each shard has done already (a resumed or retried plan)
    samples: int
    tokens: int
    clamped_tokens: int
    truncated_samples: int


def split_dataset(spec: ExtractionSpec, parts: int) -> list[dict]:
    """The request's samples cut into at most `parts` runs of lines, tokenized by as many workers."""
    return split_samples(spec.dataset_path, spec.max_samples, parts)


def tokenize_part(spec: ExtractionSpec, part: dict, *, progress: Callable[[int, int, int], None] | None = None,
                  heartbeat: Callable[[], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> dict:
    """One part of the lines tokenized into the output directory (see plan.tokenize_part)."""
    calls = _Callbacks(lambda *args: None, heartbeat or (lambda: None), should_cancel or (lambda: False),
                       lambda *args: None, lambda *args: None)
    return plan_module.tokenize_part(spec, spec.output_dir, part, progress=progress,
                                     should_cancel=lambda: _between_steps(calls))


def plan_shards(
    spec: ExtractionSpec, count: int, *, heartbeat: Callable[[], None] | None = None,
    should_cancel: Callable[[], bool] | None = None, on_event: Callable[[str, dict], None] | None = None,
    seed_from: str | None = None, parts: list[dict] | None = None,
) -> ShardPlan:
    """Tokenize (or, with `parts`, join the parts several workers tokenized), make the files as
    a one-worker run does, and cut the global order into at most `count` shards (fewer when
    there are fewer batches), each with its checkpoint. With seed_from (the directory of the
    extraction this one retries), the shards it finished are kept when it was cut the same way."""
    calls = _Callbacks(lambda *args: None, heartbeat or (lambda: None), should_cancel or (lambda: False),
                       on_event or (lambda *args: None), lambda *args: None)
    if parts:
        plan = plan_module.prepare_from_parts(spec, spec.output_dir, parts)
    else:
        plan = prepare(spec, directory=spec.output_dir, progress=lambda *told: _tokenizing(calls, *told),
                       should_cancel=lambda: _between_steps(calls))
    try:
        _result, metadata = _describe(spec, plan, spec.batch_size, 0)
        layout = shards.layout_for(spec, plan, count, metadata, seed_from=seed_from)
        if seed_from:
            shards.seed(seed_from, spec.output_dir, layout)
        open_outputs(spec, plan)
        done = shards.write_plan(spec, layout)
    finally:
        plan.close()
    return ShardPlan(layout["shards"], done, layout["samples"], layout["tokens"], layout["clamped_tokens"],
                     layout["truncated_samples"])


def run_shard(
    spec: ExtractionSpec, index: int, *,
    progress: Callable[[int, int, int, int], None] | None,
    heartbeat: Callable[[], None] | None,
    should_cancel: Callable[[], bool] | None,
    on_event: Callable[[str, dict], None] | None = None,
    failpoint: Callable[[str, dict], None] | None = None,
) -> ExtractionResult:
    """Extract shard `index` of the plan in spec.output_dir into the job's files, from its checkpoint.
    progress(done, total) counts the shard's own samples and tokens."""
    calls = _Callbacks(
        progress or (lambda *args: None), heartbeat or (lambda: None), should_cancel or (lambda: False),
        on_event or (lambda *args: None), failpoint or (lambda *args: None),
    )
    plan, layout = shards.load_plan(spec)
    try:
        part = layout["shards"][index]
        name = shards.checkpoint_name(index)
        checkpoint = shards.read_shard_checkpoint(spec.output_dir, index)
        if not shards.valid_checkpoint(checkpoint, layout, part):
            raise JobInputError(f"Shard {index}'s checkpoint in {spec.output_dir} is missing or not this plan's; "
                                "retry the extraction.")
        starts = shards.open_files(spec, plan)
        model = load_model(spec.model_path, dtype=spec.model_dtype, device=spec.device)
        sizer = BatchSize.from_checkpoint(checkpoint, spec.batch_size)
        calls.on_event("phase", {"phase": "extracting", "total_tokens": part["tokens"], "batch_size": sizer.current,
                                 "batch_size_changes": list(sizer.changes)})
        batch_size, inf_values = _extract(spec, plan, model, starts, checkpoint, sizer, calls,
                                          span=(part["first_sample"], part["end_sample"]), checkpoint_name=name)
        shards.mark_done(spec.output_dir, index, shards.read_shard_checkpoint(spec.output_dir, index))
    finally:
        plan.close()
    return ExtractionResult(part["samples"], part["tokens"], 0, 0, batch_size, [name], inf_values)


def finish_shards(spec: ExtractionSpec) -> dict:
    """metadata.json once every shard is done (see shards.finish)."""
    return shards.finish(spec)
