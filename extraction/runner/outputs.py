"""The output directory: preallocated row files written by position, the token ids and the
tokenizer that decode them, and the small JSON files, each written to a temp file and renamed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable

import numpy as np

from extraction.runner.plan import FORMAT_VERSION, ExtractionSpec, Plan
from jobsite.errors import JobInputError, StorageError

OFFSETS, TOKENS, TOKENIZER = "offsets.npy", "tokens.npy", "tokenizer"
CHECKPOINT, METADATA = "checkpoint.json", "metadata.json"
# A sharded run's plan and its shards' checkpoints (module `shards`).
LAYOUT, SHARDS_DIR = "shards.json", "shards"


def write_atomic(path: str, write: Callable) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        # A full disk leaves the previous file as it was, and no half-written one beside it.
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise naming(exc, path) from exc
        raise


def naming(exc: OSError, path: str) -> OSError:
    """The same error, naming the file it happened on (a write's own error names none)."""
    return OSError(exc.errno, exc.strerror, path)


def write_json(path: str, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def read_checkpoint(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, CHECKPOINT)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_stale(directory: str) -> None:
    """A checkpoint, metadata or shard plan left by an earlier request must not vouch for new files."""
    for name in (CHECKPOINT, METADATA, LAYOUT):
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    shutil.rmtree(os.path.join(directory, SHARDS_DIR), ignore_errors=True)


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def _require_space(out: str, data_bytes: list[int]) -> None:
    """Refuses, with what it needs and what is free, an output the disk cannot hold."""
    needed = sum(size + 4096 for size in data_bytes)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise StorageError(
            errno.ENOSPC,
            f"The activations need {_size(needed)} in {out} but only {_size(free)} is free: free space there "
            "(or extract fewer samples, layers or hook points, or store float16), then retry.",
        )


def _reserve(path: str) -> None:
    """Allocates the file's blocks now, so that writing rows later cannot run out of space."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # A file system without fallocate keeps the sparse file: space is then taken as rows land.
    finally:
        os.close(fd)


def matching(out: str, plan: Plan, shapes: dict[str, tuple[int, int]], dtype: np.dtype) -> dict[str, int] | None:
    """{file: byte offset of its row 0} when the files in `out` are the ones this plan writes."""
    try:
        arrays = {n: np.lib.format.open_memmap(os.path.join(out, n), mode="r+") for n in shapes}
        tokens = np.load(os.path.join(out, TOKENS), mmap_mode="r")
        same = (np.array_equal(np.load(os.path.join(out, OFFSETS)), plan.offsets)
                and tokens.shape == plan.ids.shape and os.path.isdir(os.path.join(out, TOKENIZER))
                and all(a.shape == shapes[n] and a.dtype == dtype for n, a in arrays.items()))
        return {name: array.offset for name, array in arrays.items()} if same else None
    except (OSError, ValueError):
        return None


def _save_tokenizer(out: str, plan: Plan) -> None:
    """The tokenizer beside the rows, so that the output decodes without the model's directory."""
    target, staging = os.path.join(out, TOKENIZER), os.path.join(out, TOKENIZER + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    plan.tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def open_outputs(spec: ExtractionSpec, plan: Plan) -> tuple[dict[str, int], dict]:
    """{layer file: byte offset of its row 0} and the checkpoint to go on from: the existing
    files and checkpoint if they match, else new preallocated files."""
    out = spec.output_dir
    rows, dtype = int(plan.offsets[-1]), np.dtype(spec.storage_dtype)
    shapes = {name: (rows, width) for name, width in plan.widths().items()}
    checkpoint = read_checkpoint(out)
    if checkpoint and checkpoint.get("fingerprint") == plan.fingerprint:
        starts = matching(out, plan, shapes, dtype)
        if starts is not None:
            plan.save_ids(os.path.join(out, TOKENS))  # the same bytes as the file it replaces
            return starts, checkpoint
    if checkpoint:
        _refuse_changed_dataset(checkpoint, plan)
    os.makedirs(out, exist_ok=True)
    remove_stale(out)
    # The ids are on disk already, written as they were tokenized.
    _require_space(out, [rows * width * dtype.itemsize for _, width in shapes.values()])
    starts = {}
    for name, shape in shapes.items():
        # The .npy header, then the full size reserved on disk: rows are written by position,
        # and a disk that fills up fails here, before any compute, not in the middle.
        array = np.lib.format.open_memmap(os.path.join(out, name), mode="w+", dtype=dtype, shape=shape)
        starts[name] = array.offset
        del array
        _reserve(os.path.join(out, name))
    # Every id is known before the first batch, in the file the plan wrote: the same bytes on every resume.
    plan.save_ids(os.path.join(out, TOKENS))
    write_atomic(os.path.join(out, OFFSETS), lambda f: np.save(f, plan.offsets))
    _save_tokenizer(out, plan)
    checkpoint = {"format_version": FORMAT_VERSION, "fingerprint": plan.fingerprint, "batch_size": spec.batch_size,
                  "samples_done": 0, "batches_done": 0, "dataset": plan.dataset}
    write_json(os.path.join(out, CHECKPOINT), checkpoint)
    return starts, checkpoint


def _refuse_changed_dataset(checkpoint: dict, plan: Plan) -> None:
    """A checkpoint whose dataset file is not the one read now is never resumed: its samples
    would mix with other ones, or be counted against other ones. (A checkpoint that differs
    for another reason, or says nothing of its dataset, is replaced by a fresh start.)"""
    then, now = checkpoint.get("dataset"), plan.dataset
    if not isinstance(then, dict) or then.get("sha256") in (None, now["sha256"]):
        return
    changes = [f"{label}: {show(then.get(key))} then, {show(now[key])} now" for key, label, show in (
        ("samples", "samples", _count), ("tokens", "tokens", _count), ("size_bytes", "size", _bytes),
        ("modified", "modified", str),
    ) if then.get(key) != now[key]]
    raise JobInputError(
        f"The dataset file changed since this extraction was planned ({'; '.join(changes) or 'its content differs'})"
        ": its completed samples came from the file as it was, so it is not resumed; retry it to extract the "
        "file as it is now.", field="dataset")


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "unknown"


def _bytes(n) -> str:
    return f"{n:,} bytes" if isinstance(n, int) else "unknown"


def seed_from_checkpoint(src_output_dir: str, dst_output_dir: str, spec: ExtractionSpec, plan: Plan) -> int:
    """Start dst from src's completed samples when only the batch size changed; 0 if not."""
    checkpoint = read_checkpoint(src_output_dir)
    names = [OFFSETS, TOKENS, *plan.file_names()]
    if (
        not checkpoint
        or checkpoint.get("fingerprint") != plan.fingerprint
        or not checkpoint.get("samples_done")
        or not all(os.path.isfile(os.path.join(src_output_dir, name)) for name in names)
    ):
        return 0
    if os.path.realpath(src_output_dir) != os.path.realpath(dst_output_dir):
        os.makedirs(dst_output_dir, exist_ok=True)
        remove_stale(dst_output_dir)
        for name in names:
            shutil.copyfile(os.path.join(src_output_dir, name), os.path.join(dst_output_dir, name))
        _save_tokenizer(dst_output_dir, plan)
    # Written last: dst is resumable only once every data file is in place. dst starts at the size
    # it asks for: src's halvings and growth budget were src's.
    write_json(os.path.join(dst_output_dir, CHECKPOINT), {
        **checkpoint, "batch_size": spec.batch_size, "batch_fit_tokens": None, "batch_size_changes": [],
    })
    return checkpoint["samples_done"]
