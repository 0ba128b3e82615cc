"""A model directory, read as untrusted input: config, weights and tokenizer checked, and the
module tree built on the meta device to learn its shape, without loading a single weight."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from extraction.runner.families import HookPoints, hook_points
from jobsite.errors import JobInputError

# Worker logs are read by people: no weight-loading progress bars or load reports there.
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHIPPED = "use a model whose architecture transformers ships"


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int  # rows of the input embedding: ids at or above it are clamped
    points: HookPoints  # the hook points offered, their widths, and why the others are not
    # The most tokens a sample may have (the config's max_position_embeddings); None: it names none.
    max_positions: int | None = None

    @property
    def supported_hooks(self) -> tuple[str, ...]:
        return self.points.supported


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


def inspect(path: str) -> tuple[ModelInfo, PretrainedConfig, PreTrainedTokenizerBase]:
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
    points = hook_points(skeleton, config)
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
        points=points,
        max_positions=_max_positions(config),
    )
    return info, config, tokenizer


def _max_positions(config: PretrainedConfig) -> int | None:
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def inspect_model(path: str) -> ModelInfo:
    return inspect(path)[0]


def load_model(path: str, *, dtype: str, device: str) -> torch.nn.Module:
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=MODEL_DTYPES[dtype])
    return model.to(device).eval()
