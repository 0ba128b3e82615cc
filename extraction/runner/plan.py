"""The plan of a run: the request checked against the model, every sample tokenized, and the
fingerprint a checkpoint must match to be resumed.

The plan streams: the dataset is read a chunk of samples at a time, and each chunk's ids are
written, truncated and clamped, straight into the output's `tokens.npy` (as its temp file
until the outputs take it). Only the offsets (8 bytes a sample) stay in memory; batches read
their ids from the file, memory-mapped."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import mmap
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from extraction.constants import BATCH_SIZES_SENTENCE, HOOK_TYPES, HOOKS_SENTENCE, VALID_BATCH_SIZES, file_name
from extraction.runner.dataset import count_samples, iter_samples
from extraction.runner.families import refusal
from extraction.runner.model import MODEL_DTYPES, ModelInfo, inspect
from jobsite.errors import Cancelled, JobInputError

# Written into checkpoint.json and metadata.json, and part of the fingerprint: a checkpoint of an
# older format (whose hook points meant something else on some families) is never resumed.
FORMAT_VERSION = 2
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOKENIZE_CHUNK = 4096
FINGERPRINT_SLICE = 1 << 16  # ids hashed at a time (as int64: 512 KB)
# Tokenizing progress is told at most this often (and always at its start and end).
TOKENIZE_PROGRESS_EVERY_S = 1.0
# Where the ids are written while the plan is made: renamed to tokens.npy by the outputs.
IDS_TEMP = "tokens.npy.tmp"
IDS_DTYPE = np.dtype("<i4")  # tokens.npy's: docs/output-format.md


def _npy_header(count: int) -> bytes:
    """np.save's header for `count` ids: its length does not depend on the count (numpy pads
    the shape to 21 digits), so the ids can be written after it before the count is known."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(IDS_DTYPE), "fortran_order": False, "shape": (count,)})
    return header.getvalue()


IDS_AT = len(_npy_header(0))
# The pages of the mapped ids that batches have read are let go once this many bytes of pages
# may have been touched: longest first, batches read all over the file, and the mapping would
# otherwise soon keep all of it resident (4 bytes a token of the whole dataset).
RELEASE_IDS_EVERY = 16 << 20
FAULT_AROUND = 64 << 10


@dataclass(frozen=True)
class ExtractionSpec:
    model_path: str
    dataset_path: str
    output_dir: str
    layers: tuple[int, ...]
    hooks: tuple[str, ...]
    # The size asked for. A resume starts at the size its checkpoint had in force (smaller after
    # out-of-memory halving) and grows back toward this one as the samples get shorter.
    batch_size: int
    max_length: int = 512
    max_samples: int | None = None
    storage_dtype: str = "float32"
    auto_retry_on_oom: bool = False
    device: str = "cpu"
    model_dtype: str = "float32"


@dataclass
class Plan:
    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase
    layers: list[int]
    hooks: list[str]
    ids: np.ndarray  # every sample's token ids, truncated, clamped and concatenated: int32, memory-mapped
    offsets: np.ndarray  # sample i is ids[offsets[i]:offsets[i + 1]]: also the output's offsets
    clamped_tokens: int
    truncated_samples: int
    fingerprint: str  # what a checkpoint must match to be resumed; the batch size is not in it
    # The dataset file as the plan read it (samples, tokens, size_bytes, modified, sha256): a
    # checkpoint keeps it, so a resume of a changed file says what changed.
    dataset: dict
    ids_file: io.BufferedRandom | None = None  # the file `ids` maps: tokens.npy once the outputs take it
    ids_path: str | None = None  # while it is the temp file: removed by close() unless taken
    ids_map: mmap.mmap | None = None
    _ids_touched: int = 0  # bytes of pages read since they were last let go, at most

    def sample_ids(self, i: int) -> np.ndarray:
        """Sample i's ids as int64, read from the mapped file."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[start:end].astype(np.int64)
        # A page fault maps the pages around it too (Linux's fault-around: 64 KB).
        self._ids_touched += (end - start) * IDS_DTYPE.itemsize + FAULT_AROUND
        if self._ids_touched >= RELEASE_IDS_EVERY and self.ids_map is not None:
            self._ids_touched = 0
            self.ids_map.madvise(mmap.MADV_DONTNEED)  # clean file pages: read again from the page cache if needed
        return ids

    def save_ids(self, path: str) -> None:
        """Makes the ids file (header and ids, as np.save writes them) `path`: a rename of the
        temp file, with no byte read again."""
        if self.ids_path is not None:
            os.replace(self.ids_path, path)
            self.ids_path = None
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as out:
            self.ids_file.seek(0)
            shutil.copyfileobj(self.ids_file, out)
        os.replace(tmp, path)

    def close(self) -> None:
        """Lets go of the ids file; a temp one no output took is removed."""
        if self.ids_path is not None and os.path.exists(self.ids_path):
            os.remove(self.ids_path)
        self.ids_path = None
        if self.ids_file is not None:
            self.ids_file.close()

    def file_names(self) -> list[str]:
        return [file_name(layer, hook) for layer in self.layers for hook in self.hooks]

    def widths(self) -> dict[str, int]:
        """{file name: values per row}: the hidden size, or the MLP's width for mlp_hidden."""
        return {file_name(layer, hook): self.info.points.widths[hook] for layer in self.layers for hook in self.hooks}


def validate(spec: ExtractionSpec, info: ModelInfo, config: PretrainedConfig) -> tuple[list[int], list[str]]:
    """The layers (sorted) and hooks (in HOOK_TYPES order) to extract, once spec is checked."""
    if spec.batch_size not in VALID_BATCH_SIZES:
        raise JobInputError(f"{BATCH_SIZES_SENTENCE}; got {spec.batch_size}.", field="batch_size")
    for hook in spec.hooks:
        if hook not in HOOK_TYPES:
            raise JobInputError(f"Hook {hook!r} is unknown; {HOOKS_SENTENCE}.", field="hooks")
        if hook not in info.supported_hooks:
            raise JobInputError(refusal(info.points, hook, info.architecture), field="hooks")
    if not spec.hooks:
        raise JobInputError(f"Choose at least one hook from {', '.join(info.supported_hooks)}.", field="hooks")
    last = info.num_layers - 1
    for layer in spec.layers:
        if not 0 <= layer <= last:
            raise JobInputError(f"Layer {layer} does not exist: this model has layers 0-{last}.", field="layers")
    if not spec.layers:
        raise JobInputError(f"Choose at least one layer: this model has layers 0-{last}.", field="layers")
    positions = getattr(config, "max_position_embeddings", None)
    if spec.max_length < 1 or (positions and spec.max_length > positions):
        raise JobInputError(f"Max length must be between 1 and {positions or 'the model context'} tokens; "
                            f"got {spec.max_length}.", field="max_length")
    if spec.max_samples is not None and spec.max_samples < 1:
        raise JobInputError("Max samples must be at least 1, or empty for every sample.", field="max_samples")
    if spec.storage_dtype not in STORAGE_DTYPES:
        raise JobInputError("The storage dtype must be float32 or float16.", field="storage_dtype")
    if spec.model_dtype not in MODEL_DTYPES:
        raise JobInputError("The model dtype must be float32, bfloat16 or float16.", field="model_dtype")
    if spec.device != "cpu" and not spec.device.startswith("cuda"):
        raise JobInputError(f"This worker's device is {spec.device!r}; set JOBSITE_DEVICE to cpu, cuda or cuda:N "
                            "and restart the worker.")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise JobInputError(f"This worker is set to run on {spec.device} but has no CUDA device: set "
                            "JOBSITE_DEVICE=cpu for it, or run it on a GPU host, then retry.")
    if spec.device == "cpu" and spec.model_dtype != "float32":
        raise JobInputError(f"The model dtype {spec.model_dtype} needs a CUDA device; use float32 on the cpu.",
                            field="model_dtype")
    return sorted(set(spec.layers)), [h for h in HOOK_TYPES if h in spec.hooks]


def prepare(spec: ExtractionSpec, *, directory: str | None = None,
            progress: Callable[[int, int, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> Plan:
    """The plan, its ids written to `directory`/IDS_TEMP, or, when None, to an unnamed temp file
    beside the output directory (on the storage outputs live on, which a tmpfs may not be).

    progress(samples tokenized, samples in all, tokens) is told as chunks are done;
    should_cancel() is asked between chunks, and Cancelled raised when it says so."""
    info, config, tokenizer = inspect(spec.model_path)
    layers, hooks = validate(spec, info, config)
    request = _request(spec, layers, hooks)
    total = count_samples(spec.dataset_path, spec.max_samples)
    stat = os.stat(spec.dataset_path)
    if directory is None:
        beside = os.path.dirname(os.path.abspath(spec.output_dir))
        ids_path, ids_file = None, tempfile.TemporaryFile(dir=beside if os.path.isdir(beside) else None)
    else:
        os.makedirs(directory, exist_ok=True)
        ids_path = os.path.join(directory, IDS_TEMP)
        ids_file = open(ids_path, "w+b")  # noqa: SIM115 - the plan holds it open
    try:
        ids_file.seek(IDS_AT)
        lengths, clamped, truncated, file_digest = _tokenize(
            spec, tokenizer, info.vocab_size, total, ids_file, progress, should_cancel)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
        del lengths
        count = int(offsets[-1])
        if not count:
            raise JobInputError("The dataset is empty: no sample has a single token.")
        ids_file.seek(0)
        ids_file.write(_npy_header(count))
        ids_file.flush()
        ids_map = mmap.mmap(ids_file.fileno(), 0, access=mmap.ACCESS_READ)
        ids = np.frombuffer(ids_map, dtype=IDS_DTYPE, count=count, offset=IDS_AT)
    except BaseException as exc:
        ids_file.close()
        if ids_path is not None and os.path.exists(ids_path):
            os.remove(ids_path)  # half a plan is never left for a later attempt to find
        if isinstance(exc, OSError) and exc.filename is None and ids_path is not None:
            raise OSError(exc.errno, exc.strerror, ids_path) from exc  # a write's own error names no file
        raise
    digest = _fingerprint(request, offsets, ids_file)
    modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc)
    dataset = {"samples": len(offsets) - 1, "tokens": count, "size_bytes": stat.st_size,
               "modified": modified.strftime("%Y-%m-%d %H:%M:%S UTC"), "sha256": file_digest.hexdigest()}
    return Plan(info, tokenizer, layers, hooks, ids, offsets, clamped, truncated, digest.hexdigest(), dataset,
                ids_file, ids_path, ids_map)


def _request(spec: ExtractionSpec, layers: list[int], hooks: list[str]) -> list:
    return [os.path.abspath(spec.model_path), layers, hooks, spec.storage_dtype, spec.model_dtype, spec.max_length,
            FORMAT_VERSION]


# A large dataset of a sharded extraction is tokenized in parts, by as many workers: each writes
# its ids and lengths here, and a json that says it is done (written last).
PARTS_DIR = "tokenizing"


def _part_paths(directory: str, index: int) -> tuple[str, str, str]:
    base = os.path.join(directory, PARTS_DIR, str(index))
    return base + ".ids", base + ".lengths", base + ".json"


def tokenize_part(spec: ExtractionSpec, directory: str, part: dict, *,
                  progress: Callable[[int, int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> dict:
    """Tokenize one run of the dataset's lines (dataset.split_samples's part) into the parts
    folder of `directory`; returns what its json says (samples, tokens, clamped, truncated).
    A part done already is not tokenized again."""
    ids_path, lengths_path, done_path = _part_paths(directory, part["index"])
    try:
        with open(done_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    info, _config, tokenizer = inspect(spec.model_path)
    os.makedirs(os.path.dirname(ids_path), exist_ok=True)
    samples = islice(iter_samples(spec.dataset_path, start=part["start_byte"], end=part["end_byte"],
                                  first_line=part["first_line"]), part["end_sample"] - part["first_sample"])
    with open(ids_path, "wb") as out:
        lengths, clamped, truncated, _digest = _tokenize(
            spec, tokenizer, info.vocab_size, part["end_sample"] - part["first_sample"], out, progress, should_cancel,
            samples=samples)
        out.flush()
        os.fsync(out.fileno())
    with open(lengths_path, "wb") as out:
        out.write(memoryview(lengths))
        out.flush()
        os.fsync(out.fileno())
    told = {"samples": len(lengths), "tokens": int(sum(lengths)), "clamped_tokens": clamped,
            "truncated_samples": truncated}
    tmp = done_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(told, f)
    os.replace(tmp, done_path)
    return told


def prepare_from_parts(spec: ExtractionSpec, directory: str, parts: list[dict]) -> Plan:
    """The plan prepare() makes, from the parts tokenized by several workers: the ids copied
    into one file after the header, the offsets from the lengths, the dataset's digest and the
    fingerprint by the same formulas (so a resume of either kind checks the same thing)."""
    info, config, tokenizer = inspect(spec.model_path)
    layers, hooks = validate(spec, info, config)
    told = []
    for part in parts:
        ids_path, lengths_path, done_path = _part_paths(directory, part["index"])
        with open(done_path) as f:
            told.append(json.load(f))
    lengths = np.concatenate([np.fromfile(_part_paths(directory, p["index"])[1], dtype=np.int64) for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    count = int(offsets[-1])
    if not count:
        raise JobInputError("The dataset is empty: no sample has a single token.")
    ids_path = os.path.join(directory, IDS_TEMP)
    ids_file = open(ids_path, "w+b")  # noqa: SIM115 - the plan holds it open
    try:
        ids_file.write(_npy_header(count))
        for part in parts:
            with open(_part_paths(directory, part["index"])[0], "rb") as source:
                shutil.copyfileobj(source, ids_file, 1 << 20)
        ids_file.flush()
        ids_map = mmap.mmap(ids_file.fileno(), 0, access=mmap.ACCESS_READ)
        ids = np.frombuffer(ids_map, dtype=IDS_DTYPE, count=count, offset=IDS_AT)
    except BaseException:
        ids_file.close()
        os.remove(ids_path)
        raise
    file_digest = hashlib.sha256()
    for _ in islice(iter_samples(spec.dataset_path, digest=file_digest), spec.max_samples):
        pass
    digest = _fingerprint(_request(spec, layers, hooks), offsets, ids_file)
    stat = os.stat(spec.dataset_path)
    modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc)
    dataset = {"samples": len(offsets) - 1, "tokens": count, "size_bytes": stat.st_size,
               "modified": modified.strftime("%Y-%m-%d %H:%M:%S UTC"), "sha256": file_digest.hexdigest()}
    return Plan(info, tokenizer, layers, hooks, ids, offsets, sum(t["clamped_tokens"] for t in told),
                sum(t["truncated_samples"] for t in told), digest.hexdigest(), dataset, ids_file, ids_path, ids_map)


def remove_parts(directory: str) -> None:
    shutil.rmtree(os.path.join(directory, PARTS_DIR), ignore_errors=True)


def _fingerprint(request: list, offsets: np.ndarray, ids_file):
    """sha256 of the request, the offsets, then the ids as 64-bit integers: the formula every
    checkpoint so far was written with, so that a job planned before the ids streamed to disk
    still resumes. The ids are read back in slices (a small fraction of tokenizing's time) by
    read(), not through the mapping, whose pages would then stay in this process's memory."""
    digest = hashlib.sha256(json.dumps(request).encode())
    digest.update(offsets.tobytes())
    ids_file.seek(IDS_AT)
    left = int(offsets[-1]) * IDS_DTYPE.itemsize
    while left:
        chunk = ids_file.read(min(left, FINGERPRINT_SLICE * IDS_DTYPE.itemsize))
        digest.update(memoryview(np.frombuffer(chunk, dtype=IDS_DTYPE).astype(np.int64)))
        left -= len(chunk)
    return digest


def _tokenize(spec: ExtractionSpec, tokenizer: PreTrainedTokenizerBase, vocab_size: int, total: int, out,
              progress: Callable[[int, int, int], None] | None,
              should_cancel: Callable[[], bool] | None, samples=None):
    """Writes every sample's ids (of `samples`, else of the whole request) to `out`, chunk by
    chunk: (lengths, clamped ids, truncated samples, the digest of the dataset's bytes read)."""
    file_digest = hashlib.sha256()
    lengths = array("q")  # 8 bytes a sample: all that stays in memory
    clamped = truncated = tokens = 0
    if samples is None:
        samples = islice(iter_samples(spec.dataset_path, digest=file_digest), spec.max_samples)
    told_at, told = time.monotonic(), (0, total)
    if progress:
        progress(0, total, 0)
    # In chunks: the tokenizer's Python lists of ints (~36 bytes a token) live for one chunk only.
    while part := list(islice(samples, TOKENIZE_CHUNK)):
        texts = [s for s in part if isinstance(s, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        sequences = [next(encoded) if isinstance(s, str) else s for s in part]
        counts = [min(len(seq), spec.max_length) for seq in sequences]
        truncated += sum(len(seq) > spec.max_length for seq in sequences)
        kept = np.fromiter((i for seq in sequences for i in seq[: spec.max_length]), dtype=np.int64,
                           count=sum(counts))
        del part, texts, encoded, sequences
        clamped += int(((kept < 0) | (kept >= vocab_size)).sum())
        np.clip(kept, 0, vocab_size - 1, out=kept)
        chunk = kept.astype(IDS_DTYPE)
        out.write(memoryview(chunk))
        lengths.extend(counts)
        tokens += len(chunk)
        if should_cancel and should_cancel():
            raise Cancelled(f"Cancelled while tokenizing, after {len(lengths)} of {max(total, len(lengths))} samples.")
        if progress and time.monotonic() - told_at >= TOKENIZE_PROGRESS_EVERY_S:
            told_at, told = time.monotonic(), (len(lengths), max(total, len(lengths)))
            progress(*told, tokens)
    if progress and told != (len(lengths), len(lengths)):
        progress(len(lengths), len(lengths), tokens)  # the count from the line breaks may have been off
    return lengths, clamped, truncated, file_digest
