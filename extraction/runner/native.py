"""What the run asks of the C library and the allocators: glibc's heap kept for the run's
length, Linux's writeback hint, and torch's pinned host blocks handed back at the end."""

from __future__ import annotations

import contextlib
import ctypes

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
# What heap_reuse sets: no block under 1 GB is mapped apart, and nothing is given back while it lasts.
_MMAP_THRESHOLD_KEPT, _TRIM_THRESHOLD_KEPT = 1 << 30, 2**31 - 1
# The same setting through glibc's environment, for a process started with it (bench/shards.py's
# bare forward passes, timed as the job runs).
HEAP_KEPT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_KEPT), "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD_KEPT)}
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages, without waiting for it (Linux)
try:
    _LIBC = ctypes.CDLL(None)  # the C library the process already has
except OSError:
    _LIBC = None
# glibc's allocator knobs (musl and macOS lack them: their allocator is left as it is), and
# Linux's writeback hint (elsewhere the sync does all the writing back).
_MALLOPT, _MALLOC_TRIM, SYNC_FILE_RANGE = (getattr(_LIBC, name, None)
                                           for name in ("mallopt", "malloc_trim", "sync_file_range"))
if _MALLOC_TRIM is None:
    _MALLOPT = None
if SYNC_FILE_RANGE is not None:
    SYNC_FILE_RANGE.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


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
    _MALLOPT(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_KEPT)
    _MALLOPT(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_KEPT)
    try:
        yield
    finally:
        _MALLOPT(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _MALLOPT(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _MALLOC_TRIM(0)  # what is free by now: tensors go as their last reference does


def release_pinned() -> None:
    """torch keeps a cuda run's pinned host blocks cached (torch.cuda.empty_cache() does not
    free them); they go back once the run is over, so an idle worker does not hold its peak."""
    release = getattr(torch._C, "_host_emptyCache", None)
    if release is not None:
        release()
