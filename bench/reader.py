"""Read throughput of an extraction output, measured side by side in one run: the ActivationLoader
and the reader's rows() against a plain numpy read of the same file.

    .venv/bin/python bench/reader.py                  # 3 GB, width 768 float32, 1 GB buffer (< 1 min)
    .venv/bin/python bench/reader.py --gb 1 --reps 3  # a smoke run
    .venv/bin/python bench/reader.py --dir /fast/disk --keep   # another disk; keep the output for a rerun

It writes a synthetic format-2 output (one hook, `layer_0_residual.npy`, float32 rows of
log-normal sample lengths) under --dir, then times full passes over it:

  plain    np.load(path, mmap_mode="r"), copied in 64 MB slices into one reused array: the
           floor any reader of the file pays.
  mapped   the same, over one np.load kept across passes: a mapping that was read once needs
           no page faults again, which is most of plain's cost when the file is cached (the
           loader and the reader keep theirs, as a training process does).
  reader   the same loop over Output.rows(0, "residual") of a new open_output each pass.
  loader   ActivationLoader(batch_size=4096, buffer_bytes=1 GB, dtype=torch.float32): every row
           once, shuffled, as fresh tensors (the consumer only drops them).

All are measured warm: the file is read once first, so it is in the page cache (mincore says
how much of it is resident), and the loader makes one untimed pass first, which allocates its
buffers (that pass is shown apart: fresh memory costs more than reading it on some VMs).
Repetitions are interleaved, their order rotating; each figure is the median. MB/s counts the
file's row bytes (10^6 bytes). The script also reports how busy other processes kept the CPUs
while it measured: on a shared 2-core host the loader's second thread is the first to suffer.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extraction.loader import ActivationLoader  # noqa: E402
from extraction.reader import open_output  # noqa: E402

SLICE_BYTES = 64 << 20


def write_output(directory: Path, gigabytes: float, width: int) -> Path:
    """A complete format-2 output of about `gigabytes` of float32 rows; reused when already there."""
    rows = int(gigabytes * 1e9) // (width * 4)
    name = directory / f"synthetic-{rows}x{width}"
    if (name / "metadata.json").is_file():
        return name
    name.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(256), 0.8, rows // 64), 4, 2048).astype(np.int64)
    lengths = lengths[np.cumsum(lengths) <= rows]
    lengths = np.r_[lengths, rows - lengths.sum()] if lengths.sum() < rows else lengths
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    np.save(name / "offsets.npy", offsets)
    np.save(name / "tokens.npy", (np.arange(rows) % 50_000).astype(np.int32))
    array = np.lib.format.open_memmap(name / "layer_0_residual.npy", mode="w+", dtype=np.float32, shape=(rows, width))
    block = rng.standard_normal((SLICE_BYTES // (width * 4), width), dtype=np.float32)
    for start in range(0, rows, len(block)):
        piece = array[start : start + len(block)]
        piece[:] = block[: len(piece)] + start
    array.flush()
    del array
    meta = {"format_version": 2, "storage_dtype": "float32", "layers": [0], "hooks": ["residual"],
            "samples": len(lengths), "tokens": rows}
    (name / "checkpoint.json").write_text(json.dumps({"format_version": 2, "samples_done": len(lengths)}))
    (name / "metadata.json").write_text(json.dumps(meta))
    return name


def copy_through(array: np.ndarray, target: np.ndarray) -> int:
    step = len(target)
    for start in range(0, len(array), step):
        piece = array[start : start + step]
        np.copyto(target[: len(piece)], piece)
    return array.nbytes


def resident_fraction(path: Path) -> float:
    """How much of the file the page cache holds (mincore over a fresh mapping), NaN where unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            pages = (len(mapped) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            view = np.frombuffer(mapped, np.uint8)
            failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(len(mapped)), vector)
            del view
        return float("nan") if failed else float(np.frombuffer(vector, np.uint8).astype(bool).mean())
    except (OSError, AttributeError, ValueError):
        return float("nan")


def busy_cpus() -> tuple[float, float]:
    """(busy jiffies of the whole host, of this process) so far: their difference is what others took."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    host = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return host / os.sysconf("SC_CLK_TCK"), own.user + own.system


def drop_page_cache() -> None:
    """Every clean cached page leaves memory (Linux, root): the next read comes from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=REPO / ".data" / "bench")
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--buffer-gb", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic output for the next run")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before every timed pass (needs root): read from the disk, as an "
                             "output larger than memory is")
    args = parser.parse_args()
    if args.cold and os.geteuid() != 0:
        parser.error("--cold drops the page cache, which needs root")

    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reader-", dir=args.dir)) if not args.keep else args.dir
    began = time.perf_counter()
    try:
        path = write_output(work, args.gb, args.width)
        made = time.perf_counter() - began
        file = path / "layer_0_residual.npy"
        size = np.load(file, mmap_mode="r").nbytes
        buffer_bytes = int(args.buffer_gb * (1 << 30))
        target = np.empty((SLICE_BYTES // (args.width * 4), args.width), np.float32)

        def plain() -> int:
            return copy_through(np.load(file, mmap_mode="r"), target)

        kept = np.load(file, mmap_mode="r")

        def mapped() -> int:
            return copy_through(kept, target)

        def reader() -> int:
            return copy_through(open_output(path).rows(0, "residual"), target)

        loader = ActivationLoader(path, (0, "residual"), batch_size=args.batch_size, buffer_bytes=buffer_bytes,
                                  dtype=torch.float32, drop_last=False)

        def activation_loader() -> int:
            served = 0
            for batch in loader:
                served += batch.nelement() * batch.element_size()
            return served

        plain()  # into the page cache
        mapped()
        start = time.perf_counter()
        assert activation_loader() == size
        first_loader = size / 1e6 / (time.perf_counter() - start)

        tools = {"plain": plain, "mapped": mapped, "reader": reader, "loader": activation_loader}
        rates = {name: [] for name in tools}
        resident = resident_fraction(file)
        host_before, own_before, wall_before = *busy_cpus(), time.perf_counter()
        for rep in range(args.reps):
            names = list(tools)
            names = names[rep % len(names):] + names[: rep % len(names)]
            for name in names:
                if args.cold:
                    drop_page_cache()
                start = time.perf_counter()
                read = tools[name]()
                rates[name].append(read / 1e6 / (time.perf_counter() - start))
        host_after, own_after = busy_cpus()
        others = ((host_after - host_before) - (own_after - own_before)) / (time.perf_counter() - wall_before)
        median = {name: statistics.median(values) for name, values in rates.items()}

        print(f"output: {path.name}, {size / 1e9:.2f} GB of float32 rows, width {args.width}, "
              f"{loader.num_rows:,} rows (written in {made:.0f} s)")
        cache = ("cold: dropped before every timed pass, so every pass reads the disk" if args.cold else
                 f"warm, the file read once before timing ({resident:.0%} of it resident then)")
        print(f"page cache: {cache}; other processes kept {max(others, 0):.2f} of {os.cpu_count()} CPUs busy while it measured")
        print(f"loader: batch {args.batch_size}, buffer_bytes {buffer_bytes:,} "
              f"(two buffers of {loader.buffer_rows:,} rows, "
              f"chunks of {loader.chunk_rows:,} rows), {loader.num_batches} batches; its first pass, allocating the "
              f"buffers, ran at {first_loader:,.0f} MB/s (not counted)")
        print(f"{args.reps} interleaved repetitions, median (min-max) MB/s:")
        for name, values in rates.items():
            print(f"  {name:7} {median[name]:8,.0f}  ({min(values):,.0f}-{max(values):,.0f})")
        print(f"loader / plain = {median['loader'] / median['plain']:.2f}   reader / plain = "
              f"{median['reader'] / median['plain']:.2f}   loader / mapped = {median['loader'] / median['mapped']:.2f}"
              "   (target: loader / plain >= 0.80)")
        print(f"total {time.perf_counter() - began:.0f} s; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
