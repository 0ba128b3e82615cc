"""The plan's memory and start-up against the dataset's size: N and 8N text lines through a tiny model.

    .venv/bin/python bench/plan.py              # N = 20,000 lines (< 3 min on 2 CPU cores)
    .venv/bin/python bench/plan.py --lines 2000 # a smoke run

A GPT-2-shaped model built from a config (1 layer, 8 wide: the model costs little, so the
pipeline's own costs show) and a byte-level BPE tokenizer trained on the words used. The
datasets are .txt files of N and 8N lines whose word counts are log-normal (median 16 words,
sigma 1.0, 1 to 400 words). Each size runs the whole extraction (residual of layer 0,
float32, batch size 64) in a child process of its own, so that its peak RSS is its own:

  peak RSS       the child's ru_maxrss at the end; "added" is that minus the RSS after the
                 imports and before the run (the interpreter, torch and transformers).
  first progress seconds from the call of run_extraction to its first "tokenizing" event
                 (the model read, the request checked, the lines counted).
  tokenizing     seconds from the first "tokenizing" event to the last, and its tokens/s.

Ratios 8N / N: peak RSS should stay <= 1.1, and the seconds to the first progress should grow
no faster than the tokenizing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the a quick brown fox jumps over lazy dog river stone light shadow market garden numbers "
         "tokenizer sample window memory stream chunk offset plan").split()


MAX_LENGTH = 64


def write_lines(path: Path, count: int, seed: int) -> None:
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(16 * np.exp(rng.normal(0, 1.0, count))), 1, 400).astype(int)
    with open(path, "w", encoding="utf-8") as f:
        for n in lengths:
            f.write(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) + "\n")


def child(model: str, data: str, out: str) -> None:
    if os.environ.get("BENCH_RUNNER_FROM"):
        sys.path.insert(0, os.environ["BENCH_RUNNER_FROM"])
    from extraction.runner import ExtractionSpec, run_extraction  # noqa: PLC0415

    base_kb = _rss_kb()
    told: list[tuple[float, dict]] = []
    start = time.monotonic()
    spec = ExtractionSpec(model, data, out, (0,), ("residual",), 64, max_length=MAX_LENGTH)
    planned_kb = 0

    def on_event(kind: str, payload: dict) -> None:
        nonlocal planned_kb
        if kind == "tokenizing":
            told.append((time.monotonic(), payload))
        elif kind == "phase" and payload["phase"] == "extracting":
            planned_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    result = run_extraction(spec, progress=None, heartbeat=None, should_cancel=None, on_event=on_event)
    end = time.monotonic()
    first, last = (told[0], told[-1]) if told else ((end, {}), (end, {}))  # a runner that tells nothing
    print(json.dumps({
        "samples": result.samples, "tokens": result.tokens, "events": len(told),
        "first_progress_s": first[0] - start, "tokenizing_s": last[0] - first[0], "total_s": end - start,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_rss_kb": base_kb,
        "plan_peak_rss_kb": planned_kb,
    }))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000, help="N; the second dataset has 8N lines")
    parser.add_argument("--runner-from", metavar="DIR",
                        help="run the extraction package found in DIR instead (an export of another commit, "
                             "e.g. `git archive HEAD~1 extraction jobsite | tar -x -C DIR`), for a before/after")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from jobsite.demo import build_tiny_causal_lm  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        root = Path(tmp)
        model = build_tiny_causal_lm(str(root / "model"), [" ".join(WORDS)] * 4, n_layer=1, hidden=8, n_head=2,
                                     vocab_size=300)
        runs = {}
        for label, count in (("N", args.lines), ("8N", 8 * args.lines)):
            data = root / f"{label}.txt"
            write_lines(data, count, seed=count)
            env = {**os.environ, "BENCH_RUNNER_FROM": os.path.abspath(args.runner_from or "")} if args.runner_from \
                else None
            done = subprocess.run([sys.executable, __file__, "--child", model, str(data), str(root / f"out-{label}")],
                                  cwd=REPO, capture_output=True, text=True, check=False, env=env)
            if done.returncode:
                sys.exit(f"the {label} run failed:\n{done.stderr[-3000:]}")
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
            runs[label]["file_mb"] = data.stat().st_size / 1e6
            shutil_rmtree(root / f"out-{label}")
    print(f"plan benchmark: {args.lines:,} and {8 * args.lines:,} text lines, tiny GPT-2 (1 layer x 8), batch 64, "
          f"max length {MAX_LENGTH}, {os.cpu_count()} cpus, python {sys.version.split()[0]}"
          + (f", runner from {args.runner_from}" if args.runner_from else ""))
    header = (f"{'':4} {'lines':>9} {'file MB':>8} {'tokens':>11} {'events':>6} {'first progress s':>16} "
              f"{'tokenizing s':>12} {'tokens/s':>10} {'total s':>8} {'plan peak RSS MB':>16} {'peak RSS MB':>11} "
              f"{'added MB':>9}")
    print(header)
    for label, r in runs.items():
        # A runner that tells no tokenizing progress (an older one) shows dashes there.
        first, tokenizing, rate = ("---",) * 3
        if r["events"]:
            first, tokenizing = f"{r['first_progress_s']:.2f}", f"{r['tokenizing_s']:.2f}"
            rate = f"{r['tokens'] / max(r['tokenizing_s'], 1e-9):,.0f}"
        added = (r["peak_rss_kb"] - r["base_rss_kb"]) / 1024
        print(f"{label:4} {r['samples']:>9,} {r['file_mb']:>8.1f} {r['tokens']:>11,} {r['events']:>6} {first:>16} "
              f"{tokenizing:>12} {rate:>10} {r['total_s']:>8.1f} {r['plan_peak_rss_kb'] / 1024:>16.1f} "
              f"{r['peak_rss_kb'] / 1024:>11.1f} {added:>9.1f}")
    n, big = runs["N"], runs["8N"]
    print(f"peak RSS 8N / N: {big['peak_rss_kb'] / n['peak_rss_kb']:.3f} (target <= 1.1); through the plan: "
          f"{big['plan_peak_rss_kb'] / n['plan_peak_rss_kb']:.3f}; "
          f"added RSS 8N / N: {(big['peak_rss_kb'] - big['base_rss_kb']) / (n['peak_rss_kb'] - n['base_rss_kb']):.2f}")
    if n["events"]:
        print(f"seconds to the first progress 8N / N: {big['first_progress_s'] / n['first_progress_s']:.2f}; "
              f"tokenizing seconds 8N / N: {big['tokenizing_s'] / n['tokenizing_s']:.2f}")


def shutil_rmtree(path: Path) -> None:
    import shutil  # noqa: PLC0415

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
