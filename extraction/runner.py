"""Activation extraction: the pure workload behind an extraction job (no Django here).

Output, readable without jobsite: `offsets.npy` (int64, samples + 1) and one
`layer_{L}_{hook}.npy` per requested (layer, hook) holding the non-pad tokens of every
sample in dataset order (sample i is rows offsets[i]:offsets[i + 1]); `metadata.json` last.

Samples are computed in one global order, longest first (ties by dataset index), cut into
batches. Whatever the batch size, the completed samples are therefore a prefix of that
order and the checkpoint only counts them: a resume cuts the pending suffix with the
recorded batch size, which reproduces the uninterrupted run's batches and so its bytes.

Writing costs next to nothing over the forward pass: a writer thread writes batch k (rows
by position with pwrite) while batch k + 1 runs forward, and every SYNC_EVERY_S it
fdatasyncs the files and only then writes the checkpoint that counts those batches.
On cuda the real tokens are gathered and cast on the device and copied into pinned host
memory on a side stream, so the copy overlaps compute too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

# Cancelled is re-exported from jobsite.errors: the worker tells a cancel from a failure by it.
from extraction.constants import BATCH_SIZES_SENTENCE, HOOK_TYPES, VALID_BATCH_SIZES
from jobsite.errors import Cancelled, JobInputError, StorageError, is_oom


_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ATTENTION_NAMES = ("attn", "attention", "self_attn")
_SHIPPED = "use a model whose architecture transformers ships"
OFFSETS, CHECKPOINT, METADATA = "offsets.npy", "checkpoint.json", "metadata.json"
_TOKENIZE_CHUNK = 4096
# Rows are synced and counted at most this often (and always at the end, on cancel and on
# the way out by an error): a crash redoes at most this much work, and a fast device is
# not held to nine fdatasyncs a batch.
SYNC_EVERY_S = 1.0

# Worker logs are read by people: no weight-loading progress bars or load reports there.
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()


class _StopForward(Exception):
    """Raised by a hook once the last requested layer is captured: later blocks never run."""


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int  # rows of the input embedding: ids at or above it are clamped
    supported_hooks: tuple[str, ...]
    # The most tokens a sample may have (the config's max_position_embeddings); None: it names none.
    max_positions: int | None = None


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    num_samples: int
    size_bytes: int


@dataclass(frozen=True)
class ExtractionSpec:
    model_path: str
    dataset_path: str
    output_dir: str
    layers: tuple[int, ...]
    hooks: tuple[str, ...]
    batch_size: int  # a resume keeps the batch size its checkpoint recorded (smaller after OOM)
    max_length: int = 512
    max_samples: int | None = None
    storage_dtype: str = "float32"
    auto_retry_on_oom: bool = False
    device: str = "cpu"
    model_dtype: str = "float32"


@dataclass
class ExtractionResult:
    samples: int
    tokens: int
    clamped_tokens: int
    truncated_samples: int
    batch_size: int
    files: list[str]
    inf_values: int = 0  # values stored as +-inf; counted in float16 files, where beyond +-65504 is inf


# --- model ---------------------------------------------------------------------------


def _find_blocks(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise JobInputError(f"{type(model).__name__} has no list of {num_layers} blocks to hook; {_SHIPPED}.")


def _hook_points(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    points = {"residual": block}
    named = (getattr(block, name, None) for name in _ATTENTION_NAMES)
    attention = next((m for m in named if isinstance(m, torch.nn.Module)), None)
    mlp = getattr(block, "mlp", None)
    # Only in an attention + `mlp` block are the sublayer outputs their contributions to the
    # residual stream; encoder layers such as BERT's fold the residual and LayerNorm into
    # their attention module, so there only the residual is offered.
    if attention is not None and isinstance(mlp, torch.nn.Module):
        points.update(attention=attention, mlp=mlp)
    return points


def _check_weights(path: str) -> None:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = _index_shards(index)
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    elif any(name.endswith(".bin") for name in os.listdir(path)):
        raise JobInputError(
            "The model weights are a pickle (.bin) file, which jobsite refuses; "
            "re-save them with save_pretrained as model.safetensors."
        )
    else:
        raise JobInputError(f"No model weights (model.safetensors) found in {path}.")
    for shard in shards:
        try:
            # Parses the header and checks that it covers the whole file; reads no tensor.
            with safe_open(os.path.join(path, shard), framework="pt"):
                pass
        except Exception as exc:
            raise JobInputError(f"The model weights file is corrupt: {shard}: {exc}.") from exc


def _index_shards(index: str) -> list[str]:
    """The weight files a sharded checkpoint's index names: file names beside the index."""
    try:
        with open(index, "rb") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        shards = None
    if not shards or not all(isinstance(s, str) and s == os.path.basename(s) and s not in (".", "..") for s in shards):
        raise JobInputError(
            f"{os.path.basename(index)} is not a valid weights index: it needs a \"weight_map\" of tensor names "
            "to weight files in the same directory; re-save the model with save_pretrained."
        )
    return shards


def _read_config(config_path: str) -> dict:
    try:
        with open(config_path, "rb") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested beyond reason
        raise JobInputError(f"config.json is not valid JSON ({exc}); re-save the model with save_pretrained.") from None
    if not isinstance(config, dict):
        raise JobInputError("config.json must hold a JSON object; re-save the model with save_pretrained.")
    return config


MAX_LAYERS = 1024  # the deepest published models have fewer than 200 blocks


def _said(exc: BaseException) -> str:
    """An exception's message on one line, kept short enough for a form error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _check_sizes(config: PretrainedConfig) -> None:
    """Refuses sizes no model has before a skeleton is built from them: a config claiming a
    million layers would otherwise keep the request busy for hours."""
    for field, limit in (("num_hidden_layers", MAX_LAYERS), ("hidden_size", 1 << 20)):
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise JobInputError(f"The config's {field} is {value!r}; it must be a whole number from 1 to {limit}.")


def _inspect(path: str) -> tuple[ModelInfo, PretrainedConfig, PreTrainedTokenizerBase]:
    """ModelInfo plus the config and tokenizer, without loading a single weight."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise JobInputError(f"No config.json found in {path}; give the directory save_pretrained wrote.")
    if "auto_map" in _read_config(config_path):
        raise JobInputError(f"The config asks for trust_remote_code, which jobsite refuses; {_SHIPPED}.")
    # The files are the user's: whatever transformers raises on them (its own validation
    # errors, a TypeError from a string where a size belongs, a division by zero heads) is a
    # fault in the input, said as such, not a crash.
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - see above
        raise JobInputError(f"transformers cannot read this config ({_said(exc)}); {_SHIPPED}.") from exc
    _check_sizes(config)
    _check_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - see above
        raise JobInputError(
            f"No usable tokenizer found in {path} ({_said(exc)}); save one next to the model."
        ) from exc
    try:
        # Built on the meta device: the real module tree, with no memory behind it.
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    except ValueError as exc:
        raise JobInputError(f"transformers has no base model for {config.model_type!r}; {_SHIPPED}.") from exc
    except Exception as exc:  # noqa: BLE001 - see above
        raise JobInputError(f"transformers cannot build a model from this config ({_said(exc)}).") from exc
    blocks = _find_blocks(skeleton, config.num_hidden_layers)
    vocab_size = skeleton.get_input_embeddings().num_embeddings
    if vocab_size < 1:
        raise JobInputError(f"The config gives a vocabulary of {vocab_size} tokens; it needs at least one.")
    architectures = config.architectures
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        architectures = [type(skeleton).__name__]
    info = ModelInfo(
        architecture=architectures[0],
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=vocab_size,
        supported_hooks=tuple(h for h in HOOK_TYPES if h in _hook_points(blocks[0])),
        max_positions=_max_positions(config),
    )
    return info, config, tokenizer


def _max_positions(config: PretrainedConfig) -> int | None:
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def inspect_model(path: str) -> ModelInfo:
    return _inspect(path)[0]


# --- dataset -------------------------------------------------------------------------


def _read_dataset(path: str) -> tuple[str, list[str | list[int]]]:
    """(format, samples): a sample is a text or, from .jsonl, a list of token ids."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("txt", "jsonl"):
        raise JobInputError("The dataset must be a .txt or .jsonl file.")
    if not os.path.isfile(path):
        raise JobInputError(f"The dataset {path} does not exist.")
    samples: list[str | list[int]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise JobInputError(f"The dataset is not valid UTF-8 (line {number}).") from None
            if fmt == "txt":
                # Every line is a sample, an empty one too (it has no tokens): sample i is line i + 1,
                # so whatever a user keeps per line (labels) lines up with the output.
                samples.append(line)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise JobInputError(f"Line {number} of the dataset is not JSON.") from None
            except RecursionError:
                raise JobInputError(f"Line {number} of the dataset nests JSON too deeply to read.") from None
            record = record if isinstance(record, dict) else {}
            text, ids = record.get("text"), record.get("input_ids")
            if isinstance(text, str):
                samples.append(text)
            elif isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                huge = next((i for i in ids if not -2**63 <= i < 2**63), None)
                if huge is not None:
                    raise JobInputError(f"Line {number} of the dataset has a token id that is not a 64-bit integer: "
                                        f"{str(huge)[:30]}.")
                samples.append(ids)
            else:
                fields = '"text" string or an "input_ids" list of integers'
                raise JobInputError(f"Line {number} of the dataset needs a {fields}.")
    if not any(s if isinstance(s, list) else s.strip() for s in samples):
        raise JobInputError("The dataset is empty.")
    return fmt, samples


def inspect_dataset(path: str) -> DatasetInfo:
    fmt, samples = _read_dataset(path)
    return DatasetInfo(format=fmt, num_samples=len(samples), size_bytes=os.path.getsize(path))


# --- preparation ---------------------------------------------------------------------


@dataclass
class _Prepared:
    info: ModelInfo
    layers: list[int]
    hooks: list[str]
    ids: np.ndarray  # every sample's token ids, truncated, clamped and concatenated
    offsets: np.ndarray  # sample i is ids[offsets[i]:offsets[i + 1]]: also the output's offsets
    clamped_tokens: int
    truncated_samples: int
    fingerprint: str  # what a checkpoint must match to be resumed; the batch size is not in it

    def file_names(self) -> list[str]:
        return [f"layer_{layer}_{hook}.npy" for layer in self.layers for hook in self.hooks]


def _validate(spec: ExtractionSpec, info: ModelInfo, config: PretrainedConfig) -> tuple[list[int], list[str]]:
    """The layers (sorted) and hooks (in HOOK_TYPES order) to extract, once spec is checked."""
    if spec.batch_size not in VALID_BATCH_SIZES:
        raise JobInputError(f"{BATCH_SIZES_SENTENCE}; got {spec.batch_size}.", field="batch_size")
    supported = ", ".join(info.supported_hooks)
    for hook in spec.hooks:
        if hook not in HOOK_TYPES:
            raise JobInputError(f"Hook {hook!r} is unknown; choose from {', '.join(HOOK_TYPES)}.")
        if hook not in info.supported_hooks:
            raise JobInputError(f"Hook {hook!r} is not available for {info.architecture}; choose from {supported}.")
    if not spec.hooks:
        raise JobInputError(f"Choose at least one hook from {supported}.")
    last = info.num_layers - 1
    for layer in spec.layers:
        if not 0 <= layer <= last:
            raise JobInputError(f"Layer {layer} does not exist: this model has layers 0-{last}.")
    if not spec.layers:
        raise JobInputError(f"Choose at least one layer: this model has layers 0-{last}.")
    positions = getattr(config, "max_position_embeddings", None)
    if spec.max_length < 1 or (positions and spec.max_length > positions):
        raise JobInputError(f"Max length must be between 1 and {positions or 'the model context'} tokens; "
                            f"got {spec.max_length}.", field="max_length")
    if spec.max_samples is not None and spec.max_samples < 1:
        raise JobInputError("Max samples must be at least 1, or empty for every sample.", field="max_samples")
    if spec.storage_dtype not in _STORAGE_DTYPES:
        raise JobInputError("The storage dtype must be float32 or float16.", field="storage_dtype")
    if spec.model_dtype not in _MODEL_DTYPES:
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


def _prepare(spec: ExtractionSpec) -> _Prepared:
    info, config, tokenizer = _inspect(spec.model_path)
    layers, hooks = _validate(spec, info, config)
    samples = _read_dataset(spec.dataset_path)[1][: spec.max_samples]
    lengths = np.zeros(len(samples), dtype=np.int64)
    chunks, truncated = [], 0
    # In chunks: the tokenizer's Python lists of ints (~36 bytes a token) live for one chunk
    # only; what stays is 8 bytes a token.
    for start in range(0, len(samples), _TOKENIZE_CHUNK):
        part = samples[start : start + _TOKENIZE_CHUNK]
        texts = [s for s in part if isinstance(s, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        sequences = [next(encoded) if isinstance(s, str) else s for s in part]
        lengths[start : start + len(part)] = [min(len(seq), spec.max_length) for seq in sequences]
        truncated += sum(len(seq) > spec.max_length for seq in sequences)
        kept = (i for seq in sequences for i in seq[: spec.max_length])
        chunks.append(np.fromiter(kept, dtype=np.int64, count=int(lengths[start : start + len(part)].sum())))
    if not lengths.any():
        raise JobInputError("The dataset is empty: no sample has a single token.")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate(chunks)
    del chunks
    clamped = int(((ids < 0) | (ids >= info.vocab_size)).sum())
    np.clip(ids, 0, info.vocab_size - 1, out=ids)
    request = [os.path.abspath(spec.model_path), layers, hooks, spec.storage_dtype, spec.model_dtype, spec.max_length]
    digest = hashlib.sha256(json.dumps(request).encode())
    digest.update(offsets.tobytes())
    digest.update(memoryview(ids))  # the bytes of ids.tobytes(), without a copy of them
    return _Prepared(info, layers, hooks, ids, offsets, clamped, truncated, digest.hexdigest())


# --- output files --------------------------------------------------------------------


def _write_atomic(path: str, write: Callable) -> None:
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
            raise _naming(exc, path) from exc
        raise


def _naming(exc: OSError, path: str) -> OSError:
    """The same error, naming the file it happened on (a write's own error names none)."""
    return OSError(exc.errno, exc.strerror, path)


def _write_json(path: str, obj: dict) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def _read_checkpoint(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, CHECKPOINT)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_stale(directory: str) -> None:
    """A checkpoint or metadata left by an earlier request must not vouch for new files."""
    for name in (CHECKPOINT, METADATA):
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def _require_space(out: str, names: list[str], data_bytes: int) -> None:
    """Refuses, with what it needs and what is free, an output the disk cannot hold."""
    needed = len(names) * (data_bytes + 4096)
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


def _open_outputs(spec: ExtractionSpec, prep: _Prepared) -> tuple[dict[str, int], dict]:
    """{layer file: byte offset of its row 0} and the checkpoint to go on from: the existing
    files and checkpoint if they match, else new preallocated files."""
    out = spec.output_dir
    shape, dtype = (int(prep.offsets[-1]), prep.info.hidden_size), np.dtype(spec.storage_dtype)
    checkpoint = _read_checkpoint(out)
    if checkpoint and checkpoint.get("fingerprint") == prep.fingerprint:
        try:
            arrays = {n: np.lib.format.open_memmap(os.path.join(out, n), mode="r+") for n in prep.file_names()}
            offsets_match = np.array_equal(np.load(os.path.join(out, OFFSETS)), prep.offsets)
            if offsets_match and all(a.shape == shape and a.dtype == dtype for a in arrays.values()):
                return {name: array.offset for name, array in arrays.items()}, checkpoint
        except (OSError, ValueError):
            pass
    os.makedirs(out, exist_ok=True)
    _remove_stale(out)
    names = prep.file_names()
    _require_space(out, names, shape[0] * shape[1] * dtype.itemsize)
    starts = {}
    for name in names:
        # The .npy header, then the full size reserved on disk: rows are written by position,
        # and a disk that fills up fails here, before any compute, not in the middle.
        array = np.lib.format.open_memmap(os.path.join(out, name), mode="w+", dtype=dtype, shape=shape)
        starts[name] = array.offset
        del array
        _reserve(os.path.join(out, name))
    _write_atomic(os.path.join(out, OFFSETS), lambda f: np.save(f, prep.offsets))
    checkpoint = {"fingerprint": prep.fingerprint, "batch_size": spec.batch_size, "samples_done": 0, "batches_done": 0}
    _write_json(os.path.join(out, CHECKPOINT), checkpoint)
    return starts, checkpoint


# --- the run -------------------------------------------------------------------------


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages, without waiting for it (Linux)
try:
    _LIBC = ctypes.CDLL(None)  # the C library the process already has
except OSError:
    _LIBC = None
# glibc's allocator knobs (musl and macOS lack them: their allocator is left as it is), and
# Linux's writeback hint (elsewhere the sync does all the writing back).
_MALLOPT, _MALLOC_TRIM, _SYNC_FILE_RANGE = (getattr(_LIBC, name, None)
                                           for name in ("mallopt", "malloc_trim", "sync_file_range"))
if _MALLOC_TRIM is None:
    _MALLOPT = None
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


@contextlib.contextmanager
def heap_reuse(device: str):
    """On the cpu, freed activations stay in the heap for the next batch, for the run's length.

    torch takes host memory from glibc's malloc, which maps every block over 128 KB-32 MB
    fresh from the kernel and unmaps it when freed, so each batch page-faults and zeroes
    all of its activations again (GPT-2 small at batch 16: ~3.6 GB of new pages per 6,400
    tokens, 10-15 % of the forward pass on two cores). Inside this block large blocks come
    from the heap and are not given back; on the way out the defaults return and the heap
    is trimmed, so an idle worker does not keep the run's peak.
    """
    if _MALLOPT is None or device != "cpu":
        yield
        return
    _MALLOPT(_M_MMAP_THRESHOLD, 1 << 30)
    _MALLOPT(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _MALLOPT(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _MALLOPT(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _MALLOC_TRIM(0)  # what is free by now: tensors go as their last reference does


def _register_hooks(blocks: torch.nn.ModuleList, prep: _Prepared, captured: dict) -> list:
    def capture(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def stop(module, args, output):
        raise _StopForward

    handles = []
    for layer in prep.layers:
        points = _hook_points(blocks[layer])
        handles += [points[h].register_forward_hook(capture(f"layer_{layer}_{h}.npy")) for h in prep.hooks]
    # Forward hooks run in registration order, so this one fires after the last captures.
    handles.append(blocks[prep.layers[-1]].register_forward_hook(stop))
    return handles


@dataclass
class _Rows:
    """One batch's activations on the host, in storage dtype, and where each sample goes."""

    values: dict[str, np.ndarray]  # [batch, width, hidden] on cpu; real tokens only, packed, on cuda
    packed: bool
    starts: list[int]  # first output row of each sample of the batch
    lengths: list[int]
    ready: Callable[[], None]  # returns once the device-to-host copies into `values` are complete

    def pieces(self, name: str):
        """(first output row, that sample's rows): contiguous slices, no copy."""
        value, position = self.values[name], 0
        for row, (start, length) in enumerate(zip(self.starts, self.lengths)):
            yield start, value[position : position + length] if self.packed else value[row, :length]
            position += length


def _forward(
    model: torch.nn.Module, spec: ExtractionSpec, prep: _Prepared, batch: list[int], captured: dict,
    copy_stream: torch.cuda.Stream | None,
) -> _Rows:
    """One right-padded batch through the model."""
    lengths = np.diff(prep.offsets)
    counts = [int(lengths[i]) for i in batch]
    rows = _Rows({}, copy_stream is not None, [int(prep.offsets[i]) for i in batch], counts, lambda: None)
    if not batch:
        return rows
    input_ids = torch.zeros((len(batch), counts[0]), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, i in enumerate(batch):
        # Right padding: real tokens keep positions 0..n-1 and, causally, never see a pad.
        input_ids[row, : counts[row]] = torch.from_numpy(prep.ids[prep.offsets[i] : prep.offsets[i + 1]])
        attention_mask[row, : counts[row]] = 1
    storage, on_device = _STORAGE_DTYPES[spec.storage_dtype], copy_stream is not None
    if on_device:
        # From pinned memory the copies are queued without waiting for the device to be idle.
        input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
    with torch.inference_mode():
        try:
            model(input_ids=input_ids.to(spec.device, non_blocking=on_device),
                  attention_mask=attention_mask.to(spec.device, non_blocking=on_device), use_cache=False)
        except _StopForward:
            pass
        if copy_stream is None:
            # On the cpu the writer reads each sample's rows straight out of these tensors.
            rows.values = {name: t.to(storage).contiguous().numpy() for name, t in captured.items()}
        else:
            rows.values, rows.ready = _to_host(captured, attention_mask.numpy().astype(bool), storage, copy_stream)
    captured.clear()
    return rows


def _gather(captured: dict, mask: np.ndarray, storage: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor's real tokens, sample after sample, as [tokens, hidden] in storage dtype,
    computed where the tensor lives."""
    device = next(iter(captured.values())).device
    # The index is known on the host, so no boolean-mask nonzero() waits for the device.
    index = torch.from_numpy(np.flatnonzero(mask))
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    return {name: t.reshape(-1, t.shape[-1]).index_select(0, index).to(storage) for name, t in captured.items()}


def _to_host(captured: dict, mask: np.ndarray, storage: torch.dtype, copy_stream: torch.cuda.Stream):
    """Real tokens only, gathered and cast on the device, then copied into pinned host memory
    on a side stream: the copy overlaps the next batch's forward instead of waiting for it."""
    packed = _gather(captured, mask, storage)
    copy_stream.wait_stream(torch.cuda.current_stream(next(iter(packed.values())).device))
    host = {}
    with torch.cuda.stream(copy_stream):
        for name, value in packed.items():
            host[name] = torch.empty(value.shape, dtype=storage, pin_memory=True)
            host[name].copy_(value, non_blocking=True)
    copied = torch.cuda.Event(blocking=True)  # the writer sleeps on it rather than spins
    copied.record(copy_stream)

    def ready() -> None:
        copied.synchronize()
        # Device memory of the gathered tensors is reused only once the copy has read it.
        packed.clear()

    return {name: value.numpy() for name, value in host.items()}, ready


class _Writer:
    """Writes finished batches on a thread of its own while the next batch runs forward.

    Rows are written as batches arrive; every SYNC_EVERY_S (and on flush) the files are
    fdatasynced and only then the checkpoint counts the batches written, so it never counts
    a row that is not on disk. The main thread hands a batch over only once the previous one
    is written (double buffering): at most two batches of activations are alive. `written`
    is the checkpoint of the rows written, `counted` the one on disk.
    """

    def __init__(self, output_dir: str, starts: dict[str, int], row_bytes: int, counted: dict,
                 sync_every_s: float, count_inf: bool = False):
        self._files: dict[str, tuple[int, int]] = {}  # name -> (descriptor, byte offset of row 0)
        try:
            for name, start in starts.items():
                self._files[name] = (os.open(os.path.join(output_dir, name), os.O_WRONLY), start)
        except OSError:
            self._close_files()
            raise
        self._row_bytes = row_bytes
        self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
        self.counted = self.written = counted  # checkpoints: the one on disk, and the one of the rows written
        # float16 holds +-65504 at most: a value beyond it is stored as inf, so the rows written
        # are counted for it (the count travels in the checkpoint, so a resume keeps it).
        self._count_inf, self.inf_values = count_inf, int(counted.get("inf_values", 0))
        self._output_dir = output_dir
        self._checkpoint_path = os.path.join(output_dir, CHECKPOINT)
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="extraction-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: _Rows, checkpoint: dict) -> None:
        """Hands a batch over; `checkpoint` is the one to write once its rows are synced."""
        self._jobs.put((rows, checkpoint))

    def wait(self) -> None:
        """Returns once every batch handed over is written; raises the writer's error if one failed."""
        self._jobs.join()
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """wait(), then sync and count every batch written."""
        self.submit(None, None)
        self.wait()

    def close(self) -> None:
        """Finishes, syncs and counts the batches handed over (an error, if any, stays unraised),
        then the thread."""
        self._jobs.put((None, None))
        self._jobs.put(None)
        self._thread.join()
        self._close_files()

    def _close_files(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def _work(self) -> None:
        while True:
            try:
                # Batches written while the main thread is busy (a long batch, a hang) are still
                # synced and counted when due.
                job = self._jobs.get(timeout=self._due())
            except queue.Empty:
                try:
                    self._sync()
                except BaseException as exc:  # noqa: BLE001 - raised again in the main thread by wait()
                    self._error = exc
                continue
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure nothing more is written or counted
                    self._write(*job)
            except BaseException as exc:  # noqa: BLE001 - raised again in the main thread by wait()
                self._error = exc
            finally:
                job = None  # the batch's memory goes now, not when the next batch arrives
                self._jobs.task_done()

    def _write(self, rows: _Rows | None, checkpoint: dict | None) -> None:
        if rows is not None:
            rows.ready()
            try:
                infs = self._write_rows(rows)
            except BaseException:
                # The batches written before this one are still counted, as a sync per batch would.
                with contextlib.suppress(OSError):
                    self._sync()
                raise
            if self._count_inf:
                self.inf_values += infs
                checkpoint = {**checkpoint, "inf_values": self.inf_values}
            self.written = checkpoint
            if _SYNC_FILE_RANGE is not None:
                # The disk starts on these rows now, while the next batch runs forward, so the
                # sync (and the last one, which the run waits for) finds little left to write.
                for fd, _ in self._files.values():
                    _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        if rows is None or time.monotonic() - self._synced_at >= self._sync_every_s:
            self._sync()

    def _due(self) -> float | None:
        """Seconds until the rows written are due to be synced; None while there are none."""
        if self.written is self.counted or self._error is not None:
            return None
        return max(0.0, self._sync_every_s - (time.monotonic() - self._synced_at))

    def _write_rows(self, rows: _Rows) -> int:
        """Writes each sample's rows where they belong; returns the infinite values among them
        (counted only when asked)."""
        infs = 0
        for name, (fd, base) in self._files.items():
            try:
                for start, piece in rows.pieces(name) if name in rows.values else ():
                    _pwrite_all(fd, memoryview(piece).cast("B"), base + start * self._row_bytes)
                    if self._count_inf:
                        infs += int(np.count_nonzero(np.isinf(piece)))
            except OSError as exc:
                raise _naming(exc, os.path.join(self._output_dir, name)) from exc
        return infs

    def _sync(self) -> None:
        if self.written is self.counted:
            return
        for name, (fd, _) in self._files.items():
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise _naming(exc, os.path.join(self._output_dir, name)) from exc
        # Only once its rows are on disk may the checkpoint count a batch.
        _write_json(self._checkpoint_path, self.written)
        self.counted, self._synced_at = self.written, time.monotonic()


def _release_pinned() -> None:
    """torch keeps a cuda run's pinned host blocks cached (torch.cuda.empty_cache() does not
    free them); they go back once the run is over, so an idle worker does not hold its peak."""
    release = getattr(torch._C, "_host_emptyCache", None)
    if release is not None:
        release()


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


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
    progress = progress or (lambda *args: None)
    heartbeat = heartbeat or (lambda: None)
    should_cancel = should_cancel or (lambda: False)
    on_event = on_event or (lambda *args: None)
    failpoint = failpoint or (lambda *args: None)

    prep = _prepare(spec)
    model = AutoModel.from_pretrained(spec.model_path, local_files_only=True, dtype=_MODEL_DTYPES[spec.model_dtype])
    model.to(spec.device).eval()
    starts, checkpoint = _open_outputs(spec, prep)
    checkpoint_path = os.path.join(spec.output_dir, CHECKPOINT)
    lengths = np.diff(prep.offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in dataset order
    total_samples, total_tokens = len(order), int(prep.offsets[-1])
    batch_size, done, batch_index = checkpoint["batch_size"], checkpoint["samples_done"], checkpoint["batches_done"]
    tokens_upto = np.concatenate([[0], np.cumsum(lengths[order])])  # tokens of the first k samples of order
    on_event("phase", {
        "phase": "extracting", "total_tokens": total_tokens,
        "clamped_tokens": prep.clamped_tokens, "truncated_samples": prep.truncated_samples,
    })
    progress(done, total_samples, int(tokens_upto[done]), total_tokens)

    copy_stream = torch.cuda.Stream(spec.device) if spec.device.startswith("cuda") else None
    row_bytes = prep.info.hidden_size * np.dtype(spec.storage_dtype).itemsize
    writer = _Writer(spec.output_dir, starts, row_bytes, checkpoint, SYNC_EVERY_S,
                     count_inf=spec.storage_dtype == "float16")
    captured: dict[str, torch.Tensor] = {}
    handles = _register_hooks(_find_blocks(model, prep.info.num_layers), prep, captured)
    reported = checkpoint

    def report() -> None:
        """Progress counts the samples written; the checkpoint counts them within SYNC_EVERY_S."""
        nonlocal reported
        if writer.written is not reported:
            reported = writer.written
            progress(reported["samples_done"], total_samples, int(tokens_upto[reported["samples_done"]]), total_tokens)

    with heap_reuse(spec.device):
        try:
            while done < total_samples:
                heartbeat()
                if should_cancel():
                    writer.flush()
                    report()
                    raise Cancelled(f"Cancelled after {done} of {total_samples} samples.")
                # Longest first, so empty samples only ever share a batch with each other.
                batch = [int(i) for i in order[done : done + batch_size] if lengths[i] > 0]
                rows = failure = None
                try:
                    rows = _forward(model, spec, prep, batch, captured, copy_stream)
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
                    failpoint("extraction.batch", {"index": batch_index, "batch_size": batch_size, "samples_done": done})
                except Exception as exc:
                    if not (spec.auto_retry_on_oom and batch_size > 1 and is_oom(exc)):
                        raise
                    rows = None  # memory is freed below: until this block ends, the traceback pins it
                failure = None
                if rows is None:
                    writer.flush()  # the checkpoint below counts every sample done: they are synced first
                    report()
                    captured.clear()
                    gc.collect()
                    if spec.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    message = f"Out of memory at batch size {batch_size}; retrying with {batch_size // 2}."
                    reduced = {"from": batch_size, "to": batch_size // 2, "batch_index": batch_index, "message": message}
                    on_event("batch_size_reduced", reduced)
                    batch_size //= 2
                    # From the writer's checkpoint: it is this one, plus what the writer counts.
                    checkpoint = {**writer.counted, "batch_size": batch_size}
                    _write_json(checkpoint_path, checkpoint)  # the writer is idle: it was flushed above
                    continue
                done = min(done + batch_size, total_samples)
                batch_index += 1
                checkpoint = {**checkpoint, "samples_done": done, "batches_done": batch_index}
                writer.submit(rows, checkpoint)
                del rows
            writer.flush()
            report()
        finally:
            # On the way out by an exception too, the batches handed over are written, synced,
            # counted, and reported.
            writer.close()
            for handle in handles:
                handle.remove()
            report()
            if copy_stream is not None:
                _release_pinned()

    on_event("phase", {"phase": "saving"})
    files = {OFFSETS: {"dtype": "int64", "shape": [total_samples + 1]}}
    for name in prep.file_names():
        files[name] = {"dtype": spec.storage_dtype, "shape": [total_tokens, prep.info.hidden_size]}
    result = ExtractionResult(
        total_samples, total_tokens, prep.clamped_tokens, prep.truncated_samples, batch_size, [*files, METADATA],
        writer.inf_values,
    )
    metadata = {
        "model_path": spec.model_path,
        "architecture": prep.info.architecture,
        "model_type": prep.info.model_type,
        "layers": prep.layers,
        "hooks": prep.hooks,
        "storage_dtype": spec.storage_dtype,
        "hidden_size": prep.info.hidden_size,
        "max_length": spec.max_length,
        "files": files,
        **{key: getattr(result, key)
           for key in ("samples", "tokens", "clamped_tokens", "truncated_samples", "inf_values")},
    }
    _write_json(os.path.join(spec.output_dir, METADATA), metadata)
    return result


def seed_from_checkpoint(src_output_dir: str, dst_output_dir: str, spec: ExtractionSpec) -> int:
    """Start dst from src's completed samples when only the batch size changed; 0 if not."""
    prep = _prepare(spec)
    checkpoint = _read_checkpoint(src_output_dir)
    names = [OFFSETS, *prep.file_names()]
    if (
        not checkpoint
        or checkpoint.get("fingerprint") != prep.fingerprint
        or not checkpoint.get("samples_done")
        or not all(os.path.isfile(os.path.join(src_output_dir, name)) for name in names)
    ):
        return 0
    if os.path.realpath(src_output_dir) != os.path.realpath(dst_output_dir):
        os.makedirs(dst_output_dir, exist_ok=True)
        _remove_stale(dst_output_dir)
        for name in names:
            shutil.copyfile(os.path.join(src_output_dir, name), os.path.join(dst_output_dir, name))
    # Written last: dst is resumable only once every data file is in place.
    _write_json(os.path.join(dst_output_dir, CHECKPOINT), {**checkpoint, "batch_size": spec.batch_size})
    return checkpoint["samples_done"]
