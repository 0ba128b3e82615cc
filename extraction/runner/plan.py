"""The plan of a run: the request checked against the model, every sample tokenized, and the
fingerprint a checkpoint must match to be resumed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from extraction.constants import BATCH_SIZES_SENTENCE, HOOK_TYPES, HOOKS_SENTENCE, VALID_BATCH_SIZES, file_name
from extraction.runner.dataset import read_dataset
from extraction.runner.families import refusal
from extraction.runner.model import MODEL_DTYPES, ModelInfo, inspect
from jobsite.errors import JobInputError

# Written into checkpoint.json and metadata.json, and part of the fingerprint: a checkpoint of an
# older format (whose hook points meant something else on some families) is never resumed.
FORMAT_VERSION = 2
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOKENIZE_CHUNK = 4096


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
    ids: np.ndarray  # every sample's token ids, truncated, clamped and concatenated
    offsets: np.ndarray  # sample i is ids[offsets[i]:offsets[i + 1]]: also the output's offsets
    clamped_tokens: int
    truncated_samples: int
    fingerprint: str  # what a checkpoint must match to be resumed; the batch size is not in it

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


def prepare(spec: ExtractionSpec) -> Plan:
    info, config, tokenizer = inspect(spec.model_path)
    layers, hooks = validate(spec, info, config)
    samples = read_dataset(spec.dataset_path)[1][: spec.max_samples]
    lengths = np.zeros(len(samples), dtype=np.int64)
    chunks, truncated = [], 0
    # In chunks: the tokenizer's Python lists of ints (~36 bytes a token) live for one chunk
    # only; what stays is 8 bytes a token.
    for start in range(0, len(samples), TOKENIZE_CHUNK):
        part = samples[start : start + TOKENIZE_CHUNK]
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
    request = [os.path.abspath(spec.model_path), layers, hooks, spec.storage_dtype, spec.model_dtype, spec.max_length,
               FORMAT_VERSION]
    digest = hashlib.sha256(json.dumps(request).encode())
    digest.update(offsets.tobytes())
    digest.update(memoryview(ids))  # the bytes of ids.tobytes(), without a copy of them
    return Plan(info, tokenizer, layers, hooks, ids, offsets, clamped, truncated, digest.hexdigest())
