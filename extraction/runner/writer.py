"""The writer thread: rows written by position while the next batch runs forward, synced, and
only then counted by the checkpoint."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

import numpy as np

from extraction.runner.forward import Rows
from extraction.runner.native import SYNC_FILE_RANGE, SYNC_FILE_RANGE_WRITE
from extraction.runner import outputs
from extraction.runner.outputs import CHECKPOINT, naming


class Writer:
    """Writes finished batches on a thread of its own while the next batch runs forward.

    Rows are written as batches arrive; every SYNC_EVERY_S (and on flush) the files are
    fdatasynced and only then the checkpoint counts the batches written, so it never counts
    a row that is not on disk. The main thread hands a batch over only once the previous one
    is written (double buffering): at most two batches of activations are alive. `written`
    is the checkpoint of the rows written, `counted` the one on disk.
    """

    def __init__(self, output_dir: str, layout: dict[str, tuple[int, int]], counted: dict,
                 sync_every_s: float, count_inf: bool = False, checkpoint_name: str = CHECKPOINT):
        """layout: {file name: (byte offset of its row 0, bytes a row)}."""
        self._files: dict[str, tuple[int, int, int]] = {}  # name -> (descriptor, offset of row 0, bytes a row)
        try:
            for name, (start, row_bytes) in layout.items():
                self._files[name] = (os.open(os.path.join(output_dir, name), os.O_WRONLY), start, row_bytes)
        except OSError:
            self._close_files()
            raise
        self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
        self.counted = self.written = counted  # checkpoints: the one on disk, and the one of the rows written
        # float16 holds +-65504 at most: a value beyond it is stored as inf, so the rows written
        # are counted for it (the count travels in the checkpoint, so a resume keeps it).
        self._count_inf, self.inf_values = count_inf, int(counted.get("inf_values", 0))
        self._output_dir = output_dir
        self._checkpoint_path = os.path.join(output_dir, checkpoint_name)
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="extraction-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: Rows, checkpoint: dict) -> None:
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
        for fd, *_ in self._files.values():
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

    def _write(self, rows: Rows | None, checkpoint: dict | None) -> None:
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
            if SYNC_FILE_RANGE is not None:
                # The disk starts on these rows now, while the next batch runs forward, so the
                # sync (and the last one, which the run waits for) finds little left to write.
                for fd, *_ in self._files.values():
                    SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
        if rows is None or time.monotonic() - self._synced_at >= self._sync_every_s:
            self._sync()

    def _due(self) -> float | None:
        """Seconds until the rows written are due to be synced; None while there are none."""
        if self.written is self.counted or self._error is not None:
            return None
        return max(0.0, self._sync_every_s - (time.monotonic() - self._synced_at))

    def _write_rows(self, rows: Rows) -> int:
        """Writes each sample's rows where they belong; returns the infinite values among them
        (counted only when asked)."""
        infs = 0
        for name, (fd, base, row_bytes) in self._files.items():
            try:
                for start, piece in rows.pieces(name) if name in rows.values else ():
                    _pwrite_all(fd, memoryview(piece).cast("B"), base + start * row_bytes)
                    if self._count_inf:
                        infs += int(np.count_nonzero(np.isinf(piece)))
            except OSError as exc:
                raise naming(exc, os.path.join(self._output_dir, name)) from exc
        return infs

    def _sync(self) -> None:
        if self.written is self.counted:
            return
        for name, (fd, *_) in self._files.items():
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise naming(exc, os.path.join(self._output_dir, name)) from exc
        # Only once its rows are on disk may the checkpoint count a batch.
        outputs.write_json(self._checkpoint_path, self.written)
        self.counted, self._synced_at = self.written, time.monotonic()


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written
