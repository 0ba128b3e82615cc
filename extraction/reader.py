"""Reads an extraction's output directory (docs/output-format.md, format 2) with numpy alone.

No Django and no torch: a notebook, or a training job on a machine that never ran jobsite, reads
a run from its directory. transformers is imported only when tokens are decoded. A partial run
(failed, cancelled, still running) is read too, but only its checkpointed samples: its other
rows are zeros on disk, and zeros passed off as activations would poison whatever reads them.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from extraction.constants import (
    HOOK_TYPES,
    TRANSFORMERLENS_NAMES,
    HookNameError,
    parse_file_name,
    parse_hook,
    transformerlens_name,
)

FORMAT_VERSION = 2  # the newest format this reader knows
OFFSETS, TOKENS, TOKENIZER = "offsets.npy", "tokens.npy", "tokenizer"
CHECKPOINT, METADATA = "checkpoint.json", "metadata.json"
WHERE = "give the directory an extraction wrote (JOBSITE_DATA_DIR/activations/<id>)"
DAMAGED = "the directory is damaged: run the extraction again"


class OutputError(ValueError):
    """Every refusal of the reader and the loader; its message is one sentence naming the fix."""


def open_output(path) -> Output:
    return Output(path)


def resolve_point(layer, hook=None) -> tuple[int, str]:
    """(layer, hook) from every spelling people use: (5, 'mlp'), (5, 'hook_mlp_out'),
    'blocks.5.hook_mlp_out', or the tuple (5, 'mlp') as one argument."""
    if hook is None and isinstance(layer, tuple) and len(layer) == 2:
        layer, hook = layer
    if hook is None and isinstance(layer, str):
        layer, hook = None, layer
    try:
        named_layer, name = parse_hook(hook)
    except HookNameError as exc:
        raise OutputError(str(exc)) from None
    if layer is not None:
        if not _whole(layer):
            raise OutputError(f"A layer must be a whole number, not {layer!r}; "
                              "write (5, 'mlp') or 'blocks.5.hook_mlp_out'.")
        layer = int(layer)
    if named_layer is not None and layer is not None and named_layer != layer:
        raise OutputError(f"Layer {layer} disagrees with {hook!r}, which names layer {named_layer}; "
                          "give the layer once.")
    layer = named_layer if layer is None else layer
    if layer is None:
        raise OutputError(f"{hook!r} names no layer; give one, as in (5, {hook!r}) "
                          f"or '{transformerlens_name(5, name)}'.")
    return layer, name


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        raise OutputError(f"{path} is not readable JSON; if its run is writing it, open the output again.") from None
    if not isinstance(value, dict):
        raise OutputError(f"{path} holds no JSON object, so {DAMAGED}.")
    return value


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} cannot be read as .npy ({exc}), so {DAMAGED}.") from None


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _and(items) -> str:
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Output:
    """One extraction's output directory, opened read-only. Row files are memory-mapped, so
    opening costs nothing however large the run is; only what is indexed is read."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise OutputError(f"{self.path} is not a directory; {WHERE}.")
        names = {p.name for p in self.path.iterdir()}
        files = {parse_file_name(n): n for n in names if parse_file_name(n)}
        if OFFSETS not in names or not (files or names & {CHECKPOINT, METADATA, TOKENS}):
            lacks = f"no {OFFSETS}" if OFFSETS not in names else f"{OFFSETS} and no other file of one"
            raise OutputError(f"{self.path} is no extraction output (it has {lacks}); {WHERE}.")
        self.metadata = _read_json(self.path / METADATA)
        checkpoint = _read_json(self.path / CHECKPOINT)
        stated = (self.metadata or checkpoint or {}).get("format_version")
        if stated is None and TOKENS in names and not (self.metadata or checkpoint):
            raise OutputError(f"{self.path} has neither {CHECKPOINT} nor {METADATA}, so no run vouches for its rows; "
                              "open it once its run has started, or run the extraction again.")
        if stated is None or (_whole(stated) and stated < 2):
            raise OutputError(f"{self.path} was written before format 2 (it has no {TOKENS} or format_version), "
                              "which this reader does not read; run the extraction again to get format 2.")
        if not _whole(stated) or stated > FORMAT_VERSION:
            raise OutputError(f"{self.path} is in format {stated!r}, newer than the format {FORMAT_VERSION} "
                              "this jobsite reads; upgrade jobsite to read it.")
        if TOKENS not in names:
            raise OutputError(f"{self.path} has no {TOKENS}, so {DAMAGED}.")
        self.format_version = stated
        self.complete = self.metadata is not None

        self.offsets = np.array(_load(self.path / OFFSETS), dtype=np.int64)
        self.tokens = _load(self.path / TOKENS)
        if self.offsets.ndim != 1 or not len(self.offsets) or self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any():
            raise OutputError(f"{self.path / OFFSETS} is no ascending list of row offsets from 0, so {DAMAGED}.")
        self.num_samples, self.num_tokens = len(self.offsets) - 1, int(self.offsets[-1])
        if self.tokens.shape != (self.num_tokens,):
            raise OutputError(f"{self.path / TOKENS} has shape {self.tokens.shape} where {OFFSETS} counts "
                              f"{self.num_tokens} tokens, so {DAMAGED}.")
        done = self.num_samples if self.complete else checkpoint.get("samples_done")
        if not _whole(done) or not 0 <= done <= self.num_samples:
            raise OutputError(f"{self.path / CHECKPOINT} counts {done!r} samples done of {self.num_samples}, "
                              f"so {DAMAGED}.")
        self.samples_done = done

        self.points = sorted(files, key=lambda point: (point[0], HOOK_TYPES.index(point[1])))
        self._files = {point: _load(self.path / files[point]) for point in self.points}
        for point, array in self._files.items():
            if array.ndim != 2 or array.shape[0] != self.num_tokens:
                raise OutputError(f"{self.path / files[point]} has shape {array.shape} where {OFFSETS} counts "
                                  f"{self.num_tokens} rows, so {DAMAGED}.")
        self.layers = sorted({layer for layer, _ in self.points})
        self.hooks = [hook for hook in HOOK_TYPES if any(h == hook for _, h in self.points)]
        dtypes = sorted({str(array.dtype) for array in self._files.values()})
        self.storage_dtype = (self.metadata or {}).get("storage_dtype") or "/".join(dtypes)
        self._decoded: dict[int, str] = {}

    def __reduce__(self):
        # DataLoader workers started by spawn get the path, not a copy of every mapped row.
        return Output, (str(self.path),)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial, {self.samples_done} of {self.num_samples} samples"
        return f"<Output {self.path} ({state})>"

    @cached_property
    def _done(self) -> np.ndarray:
        if self.complete:
            return np.arange(self.num_samples)
        # Samples run longest first, ties in dataset order; the checkpoint counts a prefix of that order.
        order = np.argsort(-np.diff(self.offsets), kind="stable")
        return np.sort(order[: self.samples_done])

    @cached_property
    def _done_mask(self) -> np.ndarray:
        mask = np.zeros(self.num_samples, dtype=bool)
        mask[self._done] = True
        return mask

    def done_samples(self) -> np.ndarray:
        return self._done.copy()

    def is_done(self, i) -> bool:
        return bool(self._done_mask[self._sample(i)])

    def stored(self, layer, hook=None) -> np.memmap:
        """Every row of (layer, hook) as stored, a partial run's zeros included: for callers that
        index the rows of done samples only (the files page, the export)."""
        point = resolve_point(layer, hook)
        if point not in self._files:
            present = _and(transformerlens_name(*p) for p in self.points) if self.points else "no activation files"
            raise OutputError(f"{transformerlens_name(*point)} was not extracted in {self.path}; it has {present}.")
        return self._files[point]

    def width(self, layer, hook=None) -> int:
        return int(self.stored(layer, hook).shape[1])

    def rows(self, layer, hook=None) -> np.memmap:
        array = self.stored(layer, hook)
        if not self.complete:
            raise OutputError(
                f"{self.path} is a partial run ({self.samples_done} of {self.num_samples} samples done) whose other "
                "rows are zeros, so rows() refuses it; use sample_rows() on done_samples(), or ActivationLoader, "
                "which read only done samples."
            )
        return array

    def _sample(self, i) -> int:
        if not _whole(i):
            raise OutputError(f"A sample index must be a whole number, not {i!r}.")
        if not 0 <= i < self.num_samples:
            raise OutputError(f"Sample {i} is out of range; {self.path} has samples 0 to {self.num_samples - 1}.")
        return int(i)

    def sample_rows(self, i, layer, hook=None) -> np.ndarray:
        array, index = self.stored(layer, hook), self._sample(i)
        if not self._done_mask[index]:
            raise OutputError(
                f"Sample {index} is not done in this partial run ({self.samples_done} of {self.num_samples} "
                "samples), so its rows are zeros on disk; pick a sample from done_samples()."
            )
        return np.asarray(array[self.offsets[index] : self.offsets[index + 1]])

    def sample_tokens(self, i) -> np.ndarray:
        # The runner writes every id before its first batch, so a sample not done yet has its tokens.
        index = self._sample(i)
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]])

    @cached_property
    def _tokenizer(self):
        folder = self.path / ((self.metadata or {}).get("tokenizer") or {}).get("path", TOKENIZER)
        if not folder.is_dir():
            raise OutputError(f"{self.path} has no {folder.name}/ to decode its tokens with; run the extraction "
                              f"again, or decode {TOKENS} with the model's own tokenizer.")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def token_strings(self, i) -> list[str]:
        ids = [int(t) for t in self.sample_tokens(i)]
        new = sorted(set(ids) - self._decoded.keys())
        if new:
            strings = self._tokenizer.batch_decode([[t] for t in new], clean_up_tokenization_spaces=False)
            self._decoded.update(zip(new, strings))
        return [self._decoded[t] for t in ids]

    def text(self, i) -> str:
        ids = [int(t) for t in self.sample_tokens(i)]
        return self._tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def describe(self) -> str:
        if self.complete:
            state = (f"Complete extraction output in {self.path} (format {self.format_version}): "
                     f"{self.num_samples:,} samples, {self.num_tokens:,} tokens")
        else:
            done_tokens = int(np.diff(self.offsets)[self._done].sum())
            state = (f"Partial extraction output in {self.path} (format {self.format_version}): "
                     f"{self.samples_done:,} of {self.num_samples:,} samples done ({done_tokens:,} of "
                     f"{self.num_tokens:,} tokens; only those are read, the other rows are zeros on disk)")
        if not self.points:
            return state + "; it holds no activation files."
        hooks = []
        for hook in self.hooks:
            layers = [layer for layer, h in self.points if h == hook]
            widths = "/".join(str(w) for w in sorted({self.width(layer, hook) for layer in layers}))
            where = f"layer{'s' if len(layers) > 1 else ''} {_and(layers)}"
            hooks.append(f"{hook} (blocks.L.{TRANSFORMERLENS_NAMES[hook]}, width {widths}) at {where}")
        return f"{state}; layers {_and(self.layers)}; hooks {'; '.join(hooks)}; stored as {self.storage_dtype}."
