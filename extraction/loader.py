"""Shuffled batches of activation rows from extraction outputs, for training sparse autoencoders.

Django-free, like the reader. A run's files are often larger than memory, so rows are shuffled
in blocks: the eligible rows (done samples only, across every run given) are cut into
contiguous chunks, the chunks are permuted every epoch, consecutive chunks of that permutation
fill a buffer (read sequentially, in file order, each row written straight to its place in the
buffer's shuffled order), and the buffer is served as batches: consecutive slices of it, handed
out without a copy. A batch is a uniform random draw of the buffer's rows; inside a batch the
rows keep their file order (what a batch computes, a mean loss or a gradient, does not depend on
it; shuffle a batch yourself, `batch[torch.randperm(len(batch))]`, before cutting it into parts
that are used apart). Memory is the buffer, never the run: `buffer_bytes` holds two buffers, one
being read by a background thread while the other is served, so reading overlaps serving. A
buffer is refilled only once no batch of it is still held; while the consumer keeps batches,
new buffers are allocated instead, so a kept batch never changes under it.

Every random choice is a pure function of (seed, epoch, buffer), and a buffer holds a whole
number of batches, so the stream is fixed by (seed, batch_size, buffer_bytes, the outputs and
hooks): a batch's rows never depend on timing or on how many DataLoader workers share the work,
and a resume can jump to any batch without reading what comes before it.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import numpy as np
import torch

from extraction.constants import transformerlens_name
from extraction.reader import Output, OutputError, open_output, resolve_point

CHUNKS_PER_BUFFER = 16  # a buffer mixes rows of this many places in the runs
FILL_ROWS = 4096  # rows a filling thread copies at a time
FILL_THREADS = min(4, os.cpu_count() or 1)  # threads that fill a buffer (one in each DataLoader worker)


def _unreferenced(arrays: list[np.ndarray]) -> bool:
    """No batch served from these arrays is alive: each is held only by its buffer's list, by
    `array` here and by getrefcount's argument (a batch is a view, which holds its base)."""
    return all(sys.getrefcount(array) <= 3 for array in arrays)


def _single_hook(hooks) -> bool:
    """'blocks.5.hook_mlp_out' and (5, 'mlp') are one hook; any other list or tuple lists several."""
    return isinstance(hooks, str) or (
        isinstance(hooks, tuple) and len(hooks) == 2 and not isinstance(hooks[0], (str, tuple, list))
    )


def _whole(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise OutputError(f"{name} must be a whole number of at least {least}, not {value!r}.")
    return int(value)


def _resume(start: int, totals: list[float]) -> list[tuple[int, int]]:
    """(role, batches it skips) for each DataLoader worker, so that the workers' combined stream
    is the uninterrupted one from batch `start` on. A role is the buffers one worker serves, and
    totals[role] its batch count. The DataLoader takes a batch from each worker in turn, drops a
    worker once it is exhausted and always asks worker 0 first, so a resume that falls in the
    middle of a turn hands the role whose turn comes next to worker 0."""
    skips, active, rounds, extra = [0] * len(totals), [r for r, total in enumerate(totals) if total > 0], 0, 0
    while active:
        span = min(totals[r] for r in active) - rounds
        if start < span * len(active):
            full, extra = divmod(start, len(active))
            for i, role in enumerate(active):
                skips[role] = rounds + full + (i < extra)
            break
        start, rounds = start - span * len(active), rounds + span
        for role in active:
            skips[role] = rounds
        active = [r for r in active if totals[r] > rounds]
    order = active[extra:] + active[:extra]
    return [(role, skips[role]) for role in order + [r for r in range(len(totals)) if r not in order]]


class ActivationLoader(torch.utils.data.IterableDataset):
    """Batches of rows of `hooks` from one output or several (their rows concatenated).

    `hooks` is one hook ('blocks.5.hook_mlp_out' or (5, 'mlp')), which yields tensors
    [batch_size, width], or a list of them, which yields {TransformerLens name: tensor} with the
    rows of the same tokens (and 'token_ids', int64, with with_tokens=True, which always yields
    a dict). A partial run contributes its checkpointed samples only. `epochs=None` is endless;
    epoch e is shuffled by (seed, e). Iterating again replays the same stream.

    start_batch=k yields batches k, k+1, ... of the uninterrupted stream. With DataLoader
    workers (batch_size=None), each worker serves its own buffers (w, w + n, ...): the same
    batches as one process, in another order, since the DataLoader takes a batch from each
    worker in turn. k then counts batches of that combined order, which is fixed for a given
    num_workers: resume with the same num_workers, seed, batch_size and buffer_bytes (and the
    DataLoader's default in_order=True).

    Memory: buffer_bytes of rows (in each DataLoader worker), plus about 24 bytes a buffered row
    of indexes and the batches in flight. The buffers stay allocated between passes.
    """

    def __init__(self, outputs, hooks, *, batch_size=4096, buffer_bytes=1 << 30, seed=0, epochs=1,
                 skip_first_token=False, start_batch=0, drop_last=True, with_tokens=False, dtype=None):
        many = [outputs] if isinstance(outputs, (str, os.PathLike, Output)) else list(outputs)
        if not many:
            raise OutputError("No output was given; give an extraction's output directory, or a list of them.")
        self.outputs = [o if isinstance(o, Output) else open_output(o) for o in many]
        paths = [o.path.resolve() for o in self.outputs]
        for path in paths:
            if paths.count(path) > 1:
                raise OutputError(f"{path} is given twice, so its rows would be read twice an epoch; give it once.")

        self.single = _single_hook(hooks)
        given = [hooks] if self.single else list(hooks)
        if not given:
            raise OutputError("No hook was given; name one, as in 'blocks.5.hook_mlp_out' or (5, 'mlp').")
        self.points = [resolve_point(hook) for hook in given]
        self.keys = [transformerlens_name(*point) for point in self.points]
        for key in self.keys:
            if self.keys.count(key) > 1:
                raise OutputError(f"{key} is named twice among the hooks; name each hook once.")
        self.widths, self._dtypes = [], []
        for point, key in zip(self.points, self.keys):
            widths = [o.width(*point) for o in self.outputs]  # refuses a run without the hook, naming what it has
            if len(set(widths)) > 1:
                sizes = ", ".join(f"{w} in {o.path}" for w, o in zip(widths, self.outputs))
                raise OutputError(f"{key} has different widths ({sizes}); read together only runs of one model.")
            self.widths.append(widths[0])
            self._dtypes.append(np.result_type(*[o.stored(*point).dtype for o in self.outputs]))

        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise OutputError(f"dtype must be None (the stored dtype) or a torch floating dtype such as "
                              f"torch.float32, not {dtype!r}.")
        self.batch_size = _whole(batch_size, "batch_size", 1)
        self.buffer_bytes = _whole(buffer_bytes, "buffer_bytes", 1)
        self.seed = _whole(seed, "seed", 0)
        self.epochs = None if epochs is None else _whole(epochs, "epochs", 1)
        self.skip_first_token, self.drop_last = bool(skip_first_token), bool(drop_last)
        self.with_tokens, self.dtype = bool(with_tokens), dtype

        self._index_rows()
        self.row_bytes = sum(w * d.itemsize for w, d in zip(self.widths, self._dtypes)) + 4 * self.with_tokens
        # Two buffers (one read while the other is served), each a whole number of batches.
        self.buffer_rows = self.buffer_bytes // (2 * self.row_bytes) // self.batch_size * self.batch_size
        if self.buffer_rows < self.batch_size:
            raise OutputError(
                f"buffer_bytes={self.buffer_bytes:,} holds fewer than two batches of {self.batch_size:,} rows of "
                f"{self.row_bytes:,} bytes (one is read while the other is served); give at least "
                f"{2 * self.batch_size * self.row_bytes:,}, or a smaller batch_size."
            )
        self.chunk_rows = max(1, self.buffer_rows // CHUNKS_PER_BUFFER)
        self.num_chunks = -(-self.num_rows // self.chunk_rows)
        self.num_buffers = -(-self.num_rows // self.buffer_rows)
        self.num_batches = self.num_rows // self.batch_size if self.drop_last else -(-self.num_rows // self.batch_size)
        total = math.inf if self.epochs is None else self.num_batches * self.epochs
        self.start_batch = _whole(start_batch, "start_batch", 0)
        if self.start_batch > total:
            epochs = f"{self.epochs} epoch{'s' if self.epochs > 1 else ''}"
            raise OutputError(f"start_batch={self.start_batch:,} is past the end of the stream, which has "
                              f"{total:,} batches in {epochs}; resume with the start_batch, seed and sizes of "
                              "the run you resume.")
        self._spare = self._epoch_order = None

    def __getstate__(self):
        # A worker started by spawn gets the plan, not the buffers of an earlier pass.
        return {**self.__dict__, "_spare": None, "_epoch_order": None}

    def _index_rows(self) -> None:
        """The eligible rows as segments: (output, first file row, position in the concatenated row space)."""
        segment_outputs, segment_starts, lengths = [], [], []
        for index, output in enumerate(self.outputs):
            done = output.done_samples()
            starts, ends = output.offsets[done] + self.skip_first_token, output.offsets[done + 1]
            starts, ends = starts[ends > starts], ends[ends > starts]
            if len(starts):
                cuts = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # merge samples that touch
                starts, ends = starts[np.r_[0, cuts]], ends[np.r_[cuts - 1, len(ends) - 1]]
            segment_outputs.append(np.full(len(starts), index))
            segment_starts.append(starts)
            lengths.append(ends - starts)
        self._segment_output = np.concatenate(segment_outputs)
        self._segment_start = np.concatenate(segment_starts)
        self._segment_position = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        self.num_rows = int(self._segment_position[-1])
        if not self.num_rows:
            states = "; ".join(f"{o.path}: {o.samples_done} of {o.num_samples} samples done" for o in self.outputs)
            raise OutputError(f"There are no done rows to read ({states}); wait for a checkpoint, or give a run "
                              "that has one.")

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("An endless ActivationLoader (epochs=None) has no length; see num_batches for an epoch.")
        return self.num_batches * self.epochs - self.start_batch

    def _buffer_batches(self, buffer: int) -> int:
        rows = min(self.buffer_rows, self.num_rows - buffer * self.buffer_rows)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _plan(self, worker: int, workers: int):
        """(epoch, buffer, first batch) of each buffer this worker serves, from its first batch on."""
        totals = [sum(self._buffer_batches(b) for b in range(r, self.num_buffers, workers)) for r in range(workers)]
        totals = [t * (math.inf if self.epochs is None else self.epochs) for t in totals]
        role, skip = _resume(self.start_batch, totals)[worker]
        mine = list(range(role, self.num_buffers, workers))
        batches = [self._buffer_batches(b) for b in mine]
        per_epoch = sum(batches)
        if not per_epoch or skip >= totals[role]:
            return
        epoch, skip = divmod(skip, per_epoch)
        for epoch in count(epoch) if self.epochs is None else range(epoch, self.epochs):
            for buffer, n in zip(mine, batches):
                if skip < n:
                    yield epoch, buffer, skip
                skip = max(0, skip - n)

    def _ranges(self, epoch: int, buffer: int) -> list[tuple[int, int]]:
        """The row-space ranges a buffer holds, in file order: its share of the epoch's permuted chunks."""
        cached = self._epoch_order
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng((self.seed, epoch, 0)).permutation(self.num_chunks)
            sizes = np.minimum(self.chunk_rows, self.num_rows - order * self.chunk_rows)
            cached = self._epoch_order = epoch, order, sizes, np.cumsum(sizes)
        _, order, sizes, ends = cached
        low, high = buffer * self.buffer_rows, min((buffer + 1) * self.buffer_rows, self.num_rows)
        ranges = []
        for j in range(np.searchsorted(ends, low, "right"), np.searchsorted(ends - sizes, high, "left")):
            start = order[j] * self.chunk_rows - (ends[j] - sizes[j])
            ranges.append((int(start + max(low, ends[j] - sizes[j])), int(start + min(high, ends[j]))))
        merged = []
        for a, b in sorted(ranges):
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def _pieces(self, ranges):
        """(output, first file row, rows) of each contiguous read the ranges take."""
        for a, b in ranges:
            s = int(np.searchsorted(self._segment_position, a, "right")) - 1
            while a < b:
                end = min(b, int(self._segment_position[s + 1]))
                first = int(self._segment_start[s] + a - self._segment_position[s])
                yield int(self._segment_output[s]), first, end - a
                a, s = end, s + 1

    def _allocate(self) -> list[np.ndarray]:
        rows = min(self.buffer_rows, self.num_rows)
        arrays = [np.empty((rows, width), dtype) for width, dtype in zip(self.widths, self._dtypes)]
        return arrays + ([np.empty(rows, np.int32)] if self.with_tokens else [])

    def _fill(self, epoch: int, buffer: int, arrays: list[np.ndarray]) -> None:
        """Reads the buffer's rows into `arrays`, one file at a time, each row straight to its
        place in the serving order, so that batch b is rows [b * batch_size, (b + 1) * batch_size).

        The serving order is a uniform permutation drawn from (seed, epoch, buffer). Writing the
        rows in place costs one copy, as a plain read does; storing them in file order and
        gathering each batch from them cost two (the loader then read at about half a plain
        read's speed)."""
        pieces = list(self._pieces(self._ranges(epoch, buffer)))
        rows = sum(piece[2] for piece in pieces)
        # Batch b holds the rows a uniform shuffle puts at [b * batch_size, (b + 1) * batch_size),
        # in file order: a batch is the same random draw, and the copy writes one sequential run
        # per batch instead of a row at a random place (at about the speed of a plain read, where
        # the random places ran at 0.7 of it).
        drawn = np.random.default_rng((self.seed, epoch, 1, buffer)).permutation(rows)
        batch_of = np.empty(rows, np.min_scalar_type(-(-rows // self.batch_size)))
        batch_of[drawn] = np.arange(rows) // self.batch_size
        places = np.empty(rows, np.intp)
        places[np.argsort(batch_of, kind="stable")] = np.arange(rows)
        sources = [[o.stored(*point) for o in self.outputs] for point in self.points]
        if self.with_tokens:
            sources.append([o.tokens for o in self.outputs])
        copies, position = [], 0
        for output, first, count in pieces:
            for start in range(0, count, FILL_ROWS):
                rows = min(FILL_ROWS, count - start)
                copies += [(array, places[position + start : position + start + rows], files[output],
                            first + start) for files, array in zip(sources, arrays)]
            position += count

        def copy(task) -> None:
            array, where, file, first = task
            array[where] = file[first : first + len(where)]

        # numpy lets go of the GIL while it copies: the scattered writes of one thread reach about
        # 6 GB/s, two threads' about 8 on a 2-core VM.
        threads = 1 if torch.utils.data.get_worker_info() is not None else FILL_THREADS
        if threads == 1:
            for task in copies:
                copy(task)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="activation-loader-fill") as pool:
                list(pool.map(copy, copies))

    def _batch(self, arrays: list[np.ndarray], start: int, end: int, copy: bool):
        """Rows [start, end) of the buffer: views of it, or copies where `copy`
        (a DataLoader worker sends its batches to the main process, which copies a view's whole
        buffer)."""
        tensors = []
        for array in arrays:
            rows = array[start:end]
            tensors.append(torch.from_numpy(rows.copy() if copy else rows))
        if self.dtype is not None:
            tensors[: len(self.points)] = [t.to(self.dtype) for t in tensors[: len(self.points)]]
        if self.with_tokens:
            tensors[-1] = tensors[-1].long()
        if self.single and not self.with_tokens:
            return tensors[0]
        return dict(zip(self.keys + ["token_ids"] * self.with_tokens, tensors))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self._plan(worker, workers)
        first = next(plan, None)
        if first is None:
            return
        # The buffers are kept for the next pass: allocating a gigabyte costs more than reading it.
        spare, self._spare = self._spare, None
        buffers = [b if b is not None and _unreferenced(b) else None for b in (spare or [None, None])]
        buffers[0] = buffers[0] or self._allocate()

        def refill(turn: int, job):
            # A buffer whose batches the consumer still holds is left to them; a new one is read.
            if buffers[turn] is None or not _unreferenced(buffers[turn]):
                buffers[turn] = self._allocate()
            return reader.submit(self._fill, *job[:2], buffers[turn])

        try:
            with ThreadPoolExecutor(1, thread_name_prefix="activation-loader") as reader:
                job, turn = first, 0
                pending = refill(0, job)
                while job is not None:
                    pending.result()
                    following = next(plan, None)
                    started = False
                    rows = min(self.buffer_rows, self.num_rows - job[1] * self.buffer_rows)
                    for b in range(job[2], self._buffer_batches(job[1])):
                        start = b * self.batch_size
                        yield self._batch(buffers[turn], start, min(start + self.batch_size, rows),
                                          copy=info is not None)
                        if not started and following is not None:
                            # After the first batch of this buffer: the consumer has let go of the
                            # last batch of the other one, which can then be read into.
                            pending, started = refill(1 - turn, following), True
                    job, turn = following, 1 - turn
        finally:
            self._spare = buffers
