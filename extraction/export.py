"""Writes an extraction's output as a Hugging Face `datasets` dataset laid out as SAELens's cached
activations, so a sparse autoencoder trains on a run without the model that produced it.

The layout is the one SAELens's CacheActivationsRunner writes and its ActivationsStore reads
(`cached_activations_path`, model=None): a plain `Dataset` saved with `save_to_disk`, one row per
sequence of exactly `context_size` tokens, one `Array2D((context_size, width))` column per hook
point named by its TransformerLens name (`blocks.5.hook_mlp_out`), and `token_ids`
(`int32 x context_size`). Our rows are one per real token with no padding, so every done sample's
rows are concatenated in dataset order and cut into sequences; a sequence may therefore span two
samples, as SAELens's own token packing does, and the rows that fill no whole sequence are left out.

No Django and no torch. Memory stays bounded whatever the run's size: the rows are taken from the
memory-mapped files a shard (SHARD_BYTES) at a time (a partial run's done samples copied into one
buffer, a complete run's rows used in place) into Arrow arrays that share those buffers, each
shard written once with `save_to_disk`, and the shards' files are then gathered into one
dataset directory without being rewritten (as SAELens consolidates its own shards). Everything is
written into a hidden directory beside the target and renamed into place at the end, so a failure
or Ctrl-C leaves no half-written dataset that would load.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.features.features import Array2DExtensionType
from datasets.table import InMemoryTable

from extraction.constants import transformerlens_name
from extraction.reader import Output, OutputError, open_output, resolve_point

FORMAT = "hf-datasets"
TOKEN_IDS = "token_ids"
# Activation bytes held in memory at once. SAELens reads the result memory-mapped, so the shard
# size only sets this process's memory and the number of files.
SHARD_BYTES = 256 * 2**20
# Arrow stores float16 as halffloat; bfloat16 has no Arrow type, and our runs never store it.
STORABLE_DTYPES = ("float32", "float16")
STATE_JSON, INFO_JSON = "state.json", "dataset_info.json"


class ExportError(OutputError):
    """A refusal to export; its message is one sentence naming the fix. An OutputError too, so one
    `except OutputError` catches every refusal about an output, the reader's included."""


@dataclass
class ExportResult:
    path: Path
    columns: list[str]  # the hook columns in order (TransformerLens names), then token_ids
    context_size: int
    sequences: int
    tokens: int  # sequences x context_size: the rows exported
    rows_left_over: int  # the done rows after the last whole sequence, not exported
    samples: int  # the done samples the rows came from
    complete: bool  # False: a partial run, of which only the checkpointed samples were exported
    dtype: str
    shards: int

    @property
    def hook_columns(self) -> list[str]:
        return [name for name in self.columns if name != TOKEN_IDS]


def export_hf_datasets(
    output_dir,
    target_dir,
    *,
    context_size: int = 128,
    hooks: Iterable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Export output_dir's done samples into target_dir (new, or empty) for SAELens and
    `datasets.load_from_disk`. hooks: TransformerLens names or (layer, hook) pairs; None exports
    every hook point the output holds. progress(sequences written, sequences in all) is called
    after each shard."""
    output = open_output(output_dir)
    target = Path(target_dir)
    _check_target(target)
    points = _points(output, hooks)
    if not isinstance(context_size, (int, np.integer)) or isinstance(context_size, bool) or context_size < 1:
        raise ExportError(f"The context size must be a whole number of at least 1, not {context_size!r}.")
    context_size = int(context_size)

    samples = output.done_samples()
    lengths = np.diff(output.offsets)[samples]
    rows = int(lengths.sum())
    if not len(samples):
        raise ExportError(f"{output.path} is a partial run with no samples done yet, so there is nothing to export; "
                          "export it once its run has checkpointed some samples.")
    if context_size > rows:
        raise ExportError(f"{output.path} has {rows:,} rows (tokens) in its {len(samples):,} done samples, fewer than "
                          f"one sequence of {context_size:,}; choose a context size of at most {rows:,}.")

    dtype = output.storage_dtype
    if dtype not in STORABLE_DTYPES:
        raise ExportError(f"{output.path} stores {dtype}, which this export does not write; it writes "
                          f"{' or '.join(STORABLE_DTYPES)} files, so run the extraction again storing one of them.")
    widths = {point: output.width(*point) for point in points}
    columns = [transformerlens_name(*point) for point in points]
    features = datasets.Features({
        **{name: datasets.Array2D(shape=(context_size, widths[point]), dtype=dtype)
           for name, point in zip(columns, points)},
        TOKEN_IDS: datasets.Sequence(datasets.Value("int32"), length=context_size),
    })
    state = "complete" if output.complete else f"partial: {len(samples):,} of {output.num_samples:,} samples done"
    info = datasets.DatasetInfo(
        description=f"Activations exported by jobsite from {output.path.resolve()} ({state}), the done samples' "
                    f"rows in dataset order cut into sequences of {context_size} tokens.",
        features=features,
    )

    sequences = rows // context_size
    per_sequence = context_size * sum(widths.values()) * np.dtype(dtype).itemsize
    per_shard = max(1, SHARD_BYTES // per_sequence)
    shards = -(-sequences // per_shard)
    source = _Rows(output, samples, lengths)

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".exporting", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"Nothing can be written beside {target} ({exc.strerror or exc}); choose a directory you "
                          "can write to.") from None
    try:
        with _quiet_datasets():
            _write(work, source, points, features, info, sequences, per_shard, progress)
        os.replace(work, target)  # an empty target directory is replaced as well
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.fspath(exc.filename or "") == str(work):
            raise ExportError(f"{target} was filled while the export ran, so nothing was written there: choose a new "
                              "directory or empty it, then export again.") from None
        raise ExportError(f"Writing the export to {target} failed ({exc.strerror or exc}) and left nothing behind; "
                          "free some space or choose a directory you can write to, then export again.") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(
        path=target.resolve(), columns=[*columns, TOKEN_IDS], context_size=context_size, sequences=sequences,
        tokens=sequences * context_size, rows_left_over=rows - sequences * context_size, samples=len(samples),
        complete=output.complete, dtype=dtype, shards=shards,
    )


def _write(work: Path, source: _Rows, points, features: datasets.Features, info: datasets.DatasetInfo,
           sequences: int, per_shard: int, progress) -> None:
    """Each shard saved by save_to_disk, its one data file moved up into `work`; then one state.json
    (save_to_disk's own, listing every file) makes them one dataset, mapped by load_from_disk as one
    table, without a second write of the rows."""
    context_size = info.features[TOKEN_IDS].length
    shards = -(-sequences // per_shard)
    data_files, state, info_json = [], None, None
    if progress:
        progress(0, sequences)
    for shard in range(shards):
        first, stop = shard * per_shard, min(sequences, (shard + 1) * per_shard)
        table = _table(source, points, features, first * context_size, stop * context_size, context_size)
        shard_dir = work / f"shard-{shard:05d}"
        part = datasets.Dataset(InMemoryTable(table), info=info, fingerprint=secrets.token_hex(8))
        part.save_to_disk(str(shard_dir), num_shards=1)
        del part, table
        shard_state = json.loads((shard_dir / STATE_JSON).read_text())
        (name,) = [entry["filename"] for entry in shard_state["_data_files"]]
        data_file = f"data-{shard:05d}-of-{shards:05d}.arrow"
        os.replace(shard_dir / name, work / data_file)
        data_files.append({"filename": data_file})
        if state is None:
            state, info_json = shard_state, (shard_dir / INFO_JSON).read_text()
        shutil.rmtree(shard_dir)
        if progress:
            progress(stop, sequences)
    state.update(_data_files=data_files, _fingerprint=secrets.token_hex(8))
    (work / STATE_JSON).write_text(json.dumps(state, indent=2, sort_keys=True))
    (work / INFO_JSON).write_text(info_json)
    written = datasets.load_from_disk(str(work))
    if not isinstance(written, datasets.Dataset) or written.num_rows != sequences or written.features != features:
        raise ExportError(f"The dataset written in {work} does not read back as written, so it was removed; "
                          f"report this with the datasets version installed ({datasets.__version__}).")


def _check_target(target: Path) -> None:
    if target.is_dir():
        if any(target.iterdir()):
            raise ExportError(f"{target} is not empty: choose a new directory or empty it.")
    elif target.exists():
        raise ExportError(f"{target} is a file, not a directory: choose a new directory.")


def _points(output: Output, hooks) -> list[tuple[int, str]]:
    if hooks is None:
        if not output.points:
            raise ExportError(f"{output.path} holds no activation files, so there is nothing to export.")
        return list(output.points)
    if isinstance(hooks, str):
        hooks = [hooks]
    points = []
    for hook in hooks:
        point = resolve_point(hook)
        output.width(*point)  # refuses a point the run did not extract, naming those it did
        if point not in points:
            points.append(point)
    if not points:
        raise ExportError("No hook was given; name at least one, as in blocks.5.hook_mlp_out, or give none for all.")
    return points


class _Rows:
    """The done samples' rows, concatenated in dataset order: `pieces(start, stop)` says which
    sample's rows make up that stretch of the concatenation."""

    def __init__(self, output: Output, samples: np.ndarray, lengths: np.ndarray):
        self.output, self.samples = output, samples
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # where each done sample begins

    def pieces(self, start: int, stop: int):
        """(sample, first row within it, end row within it) covering rows start:stop."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            sample_start, sample_stop = int(self.starts[k]), int(self.starts[k + 1])
            end = min(stop, sample_stop)
            if end > start:
                yield int(self.samples[k]), start - sample_start, end - sample_start
            start, k = end, k + 1

    def gather(self, start: int, stop: int, point, width: int, dtype) -> np.ndarray:
        if self.output.complete:  # every row is done and in place: one contiguous read
            return np.ascontiguousarray(self.output.rows(*point)[start:stop])
        out = np.empty((stop - start, width), dtype=dtype)
        at = 0
        for sample, lo, hi in self.pieces(start, stop):
            out[at : at + hi - lo] = self.output.sample_rows(sample, *point)[lo:hi]
            at += hi - lo
        return out

    def tokens(self, start: int, stop: int) -> np.ndarray:
        if self.output.complete:
            return np.ascontiguousarray(self.output.tokens[start:stop], dtype=np.int32)
        return np.concatenate([self.output.sample_tokens(sample)[lo:hi] for sample, lo, hi in self.pieces(start, stop)]
                              ).astype(np.int32, copy=False)


def _table(source: _Rows, points, features: datasets.Features, start: int, stop: int, context_size: int) -> pa.Table:
    """Rows start:stop as Arrow arrays over the copied numpy buffers (no second copy): Array2D is
    stored as list<list<value>>, so only the two offset arrays are built."""
    arrays = {}
    for name, point in zip(features, points):  # the hook columns come first, in the order of points
        shape, dtype = features[name].shape, features[name].dtype
        values = source.gather(start, stop, point, shape[1], dtype)
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, values.size + 1, shape[1], dtype=np.int32)),
                                         pa.array(values.reshape(-1)))
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, stop - start + 1, context_size, dtype=np.int32)),
                                         inner)
        arrays[name] = pa.ExtensionArray.from_storage(Array2DExtensionType(shape, dtype), outer)
        del values
    arrays[TOKEN_IDS] = pa.FixedSizeListArray.from_arrays(pa.array(source.tokens(start, stop)), context_size)
    return pa.table(arrays, schema=features.arrow_schema)


@contextlib.contextmanager
def _quiet_datasets():
    """datasets draws a bar per save_to_disk; the caller's one bar says how far the export is."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
