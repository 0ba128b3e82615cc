"""One extraction run by 1, 2 and 4 workers (shards = workers), measured side by side in one run.

    .venv/bin/python bench/shards.py            # the full run: 3 rounds of 1, 2, 4 workers (~5 min on 2 CPU cores)
    .venv/bin/python bench/shards.py --quick    # a smoke run: a 64-wide model, 300 lines, seconds per run
    .venv/bin/python bench/shards.py --one-cluster --events   # one cluster of N processes; each run's events
    .venv/bin/python bench/shards.py --shape 6x512 --workers 1,2   # a Pythia-70m-sized model (~15 min)

The same request each time: a GPT-2-shaped model built from a config with a fixed seed (4
layers, 256 wide, random weights, its byte-level BPE tokenizer trained on the words used:
nothing downloaded), a .txt dataset of text lines whose word counts are log-normal (median 32
words, sigma 1.0, 4 to 256 words), residual of layers 1 and 3, batch size 16, float32 files.
Each run gets fresh `manage.py qcluster` processes, one cluster per worker with one worker
process each (JOBSITE_WORKERS=1), each with one torch thread (OMP_NUM_THREADS=1,
MKL_NUM_THREADS=1), on PostgreSQL (DATABASE_URL, default the database bench_shards on
127.0.0.1, created when missing) and the ORM broker. One worker runs the request as one job
(shards=1); N workers run it as N shards. Each cluster imports torch, transformers and the
runner before it forks its worker (as every cluster does: JOBSITE_WORKER_PRELOAD), and here
also loads the model once, as a worker that has run jobs before has: transformers' first load
in a process compiles its patterns, which would be timed inside the first shard.

What it prints, from the event log (jobsite.models.Event, topic "extraction.<id>": every
time is a created_at written by the same database clock):
  extract s     "extraction.extracting" to "extraction.completed": for shards, the planning
                attempt lets go at "extracting", then every shard is claimed by a worker,
                loads the model, runs its rows and the last one writes metadata.json.
  tokens/s      the extraction's real (non-pad) tokens over extract s; the ratios divide
                each by one worker's.
  planning s    "extraction.claimed" to "extraction.extracting": the model read, the lines
                tokenized and (for shards) the cut; "tokenizing s" is the first to the last
                "extraction.tokenizing" event within it.
  shards        per shard: the worker that ran it, and its "extraction_shard.running" to
                "extraction_shard.completed" seconds.
  byte-identical  every data file and metadata.json of each run against one worker's.

  what the machine allows  each round also times bare forward passes (no jobsite code: the
                model called on the request's batches, longest first, stopped after the last
                layer the request reads as the job stops, in processes of one torch thread,
                under the allocator setting the job uses): the whole order in one process, then
                its two halves, cut as two shards are, in two processes started together (the
                slower one's seconds). Their ratio is the most any 2w/1w can reach on this host
                in that round; the job's ratio is printed over it (--no-bare leaves them out).

Every count runs --rounds times (3), the rounds interleaved; each count's median run stands
for it, and every round's ratio is printed too. The goal: 2 workers / 1 worker >= 1.8 on a
2-core machine. Four single-thread workers on two
cores cannot beat two; that row shows the cost of oversubscribing them. The bench leaves the
database as it found it but for the event log and django-q2's task rows: its extractions,
model and dataset records are deleted, and its files live in a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from jobs import Service, wait_for  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/bench_shards"
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "si", "tu", "va", "ze")
         for b in ("n", "r", "s", "t", "l", "m", "k", "d", "ba", "go", "fi", "ru")]
REQUEST = {"layers": [1, 3], "hooks": ["residual"], "batch_size": 16, "max_length": 256}
MODEL = {"n_layer": 4, "hidden": 256, "n_head": 4, "vocab_size": 512}
QUICK_MODEL = {"n_layer": 4, "hidden": 64, "n_head": 4, "vocab_size": 512}
# A cluster imports torch, transformers and the runner before it forks its worker
# (JOBSITE_WORKER_PRELOAD). A worker that has run jobs has also loaded a model before:
# transformers compiles its weight-name patterns at a process's first load (0.4 s here), which
# each shard would pay inside the timed window and the one-worker run outside it. The cluster's
# main process loads the bench's model once before it starts.
WARM_CLUSTER = """
import os
from extraction.runner.model import load_model
load_model(os.environ["BENCH_WARM_MODEL"], dtype="float32", device="cpu")
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", "qcluster"])
"""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ensure_database(url: str) -> str:
    """Create the database of a PostgreSQL URL when it is missing; returns its name for the output."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not parts.scheme.startswith("postgres"):
        sys.exit(f"DATABASE_URL must be a PostgreSQL URL (the workers share it): got {url!r}.")
    import psycopg

    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        sys.exit(f"PostgreSQL at {parts.hostname}:{parts.port or 5432} cannot be reached ({exc}); start it or set "
                 "DATABASE_URL.")
    return f"PostgreSQL ({name} on {parts.hostname}:{parts.port or 5432})"


def write_lines(path: Path, count: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(32 * np.exp(rng.normal(0, 1.0, count))), 4, 256).astype(int)
    lines = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) for n in lengths]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


class Bench:
    def __init__(self, workdir: Path, db_url: str):
        self.workdir, self.services, self.model_dir = workdir, [], ""
        data = workdir / "data"
        (data / "models").mkdir(parents=True)
        self.env = {
            **os.environ, "DATABASE_URL": db_url, "JOBSITE_DATA_DIR": str(data),
            "JOBSITE_MODEL_ROOTS": str(data / "models"), "PYTHONUNBUFFERED": "1", "JOBSITE_LOG_LEVEL": "INFO",
            "DJANGO_SETTINGS_MODULE": "jobsite.settings", "JOBSITE_WORKERS": "1", **ONE_THREAD,
        }
        os.environ.update({k: v for k, v in self.env.items() if k != "JOBSITE_LOG_LEVEL"})
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        call_command("createcachetable", verbosity=0)

    def clusters(self, count: int, one_cluster: bool = False) -> list[Service]:
        """count clusters of one worker process each (or one cluster of count processes), once
        every one of them says it runs."""
        env = {**self.env, "BENCH_WARM_MODEL": self.model_dir}
        if one_cluster:
            env["JOBSITE_WORKERS"] = str(count)
        started = [Service([sys.executable, "-c", WARM_CLUSTER], env,
                           self.workdir / f"qcluster-{len(self.services) + i}.log")
                   for i in range(1 if one_cluster else count)]
        self.services += started

        def running() -> bool:
            for service in started:
                if service.process.poll() is not None:
                    raise RuntimeError(f"a qcluster exited: {service.log_path.read_text()[-3000:]}")
            return all("running." in service.log_path.read_text(errors="replace") for service in started)

        wait_for(running, 120, interval=0.1, what=f"{count} qcluster processes to run")
        return started

    def stop(self, services: list[Service]) -> None:
        for service in services:
            service.stop()
            self.services.remove(service)

    def stop_all(self) -> None:
        self.stop(list(self.services))


BARE = """
import sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
model_dir, data, first, end, batch, max_length, last_layer, start_at = sys.argv[1:]
first, end, batch, max_length, last_layer, start_at = (int(first), int(end), int(batch), int(max_length),
                                                       int(last_layer), float(start_at))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
class Stop(Exception):
    pass
def stop(*_):
    raise Stop
# As the job does: the layers after the last one it reads are not run.
model.transformer.h[last_layer].register_forward_hook(stop)
lines = open(data, encoding="utf-8").read().splitlines()
ids = tokenizer(lines, truncation=True, max_length=max_length)["input_ids"]
order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))[first:end]
batches = []
for s in range(0, len(order), batch):
    rows = [ids[i] for i in order[s : s + batch]]
    width = max(map(len, rows))
    batches.append((torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                    torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])))
time.sleep(max(0.0, start_at - time.time()))
started = time.perf_counter()
with torch.inference_mode():
    for input_ids, mask in batches:
        try:
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except Stop:
            pass
print(time.perf_counter() - started)
"""


def bare(model_dir: str, data: Path, lines: list[str], hidden: int, parts: int, env: dict) -> float:
    """Seconds of bare forward passes (no jobsite code: the model called on the request's batches,
    longest first) over the whole order cut into `parts` ranges as the job's shards are cut, each
    range in its own process with one torch thread, all started together: the slowest one's.
    They keep glibc's heap as the job does (HEAP_KEPT_ENV): without it each batch maps and zeroes
    its activations afresh, and two processes doing that at once slow each other down (on a
    2-core VM, 1.6 against 1.8-1.9 with it), which would understate what the host allows."""
    from transformers import AutoTokenizer

    from extraction.runner.native import HEAP_KEPT_ENV
    from extraction.runner.shards import bounds

    import numpy as np

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = np.array(sorted((len(i) for i in tokenizer(lines, truncation=True, max_length=REQUEST["max_length"])[
        "input_ids"]), reverse=True))
    start_at = time.time() + 10  # after every process has loaded the model and built its batches
    processes = [subprocess.Popen([sys.executable, "-c", BARE, model_dir, str(data), str(first), str(end),
                                   str(REQUEST["batch_size"]), str(REQUEST["max_length"]), str(max(REQUEST["layers"])),
                                   str(start_at)],
                                  env={**env, **ONE_THREAD, **HEAP_KEPT_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for first, end in bounds(lengths, REQUEST["batch_size"], parts, hidden)]
    outs = [process.communicate(timeout=600) for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a bare forward process failed: {[err[-2000:] for _, err in outs]}")
    return max(float(out.strip().splitlines()[-1]) for out, _ in outs)


def run(bench: Bench, model, dataset, workers: int, timeout: float, one_cluster: bool) -> dict:
    from extraction.models import Extraction
    from extraction.services import extraction_start
    from jobsite.models import Event

    clusters = bench.clusters(workers, one_cluster)
    try:
        job, created = extraction_start(model=model, dataset=dataset, shards=workers, **REQUEST)
        if not created:
            raise RuntimeError(f"extraction {job.pk}, the same request, is still active: let it end first.")
        job = wait_for(lambda: Extraction.objects.filter(pk=job.pk, status__in=Extraction.TERMINAL).first(),
                       timeout, interval=0.2, what=f"extraction {job.pk} to finish")
    finally:
        bench.stop(clusters)
    if job.status != Extraction.Status.COMPLETED:
        raise RuntimeError(f"extraction {job.pk} with {workers} workers ended {job.status}: "
                           f"{job.error_type} {job.error_message}")
    events = list(Event.objects.filter(topic=job.topic).order_by("seq").values_list("type", "created_at", "payload"))
    first = {}
    for kind, at, _ in events:
        first.setdefault(kind, at)
    tokenizing = [at for kind, at, _ in events if kind == "extraction.tokenizing"]
    shards = {}
    for kind, at, payload in events:
        if kind in ("extraction_shard.running", "extraction_shard.completed"):
            shard = payload["shard"]
            shards.setdefault(shard["index"], {})[kind.split(".")[1]] = at
            shards[shard["index"]].setdefault("worker", shard["worker"])
    timeline = [(kind, (at - first["extraction.extracting"]).total_seconds(), (payload.get("shard") or {}))
                for kind, at, payload in events if kind not in ("extraction.progress", "extraction_shard.progress")]
    extract = (first["extraction.completed"] - first["extraction.extracting"]).total_seconds()
    claimed = first.get("extraction.claimed") or first["extraction.loading"]
    return {
        "workers": workers, "job": job, "tokens": job.tokens_processed, "extract_s": extract,
        "planning_s": (first["extraction.extracting"] - claimed).total_seconds(),
        "tokenizing_s": (tokenizing[-1] - tokenizing[0]).total_seconds() if len(tokenizing) > 1 else 0.0,
        "timeline": timeline,
        "shards": {i: (s.get("worker", "?"), (s["completed"] - s["running"]).total_seconds())
                   for i, s in sorted(shards.items()) if "running" in s and "completed" in s},
    }


def compared(one: Path, other: Path) -> list[str]:
    """The names of the files (data files and metadata.json) that differ or exist in one run only."""
    def names(directory: Path) -> set[str]:
        return {p.name for p in directory.iterdir() if p.suffix == ".npy" or p.name == "metadata.json"}

    left, right = names(one), names(other)
    differ = sorted(left ^ right)
    differ += [n for n in sorted(left & right) if not filecmp.cmp(one / n, other / n, shallow=False)]
    return differ if left else ["(no data files)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a smaller model and dataset")
    parser.add_argument("--samples", type=int, help="text lines in the dataset (default 2000, --quick 300)")
    parser.add_argument("--workers", default="1,2,4", help="the worker counts, the first one the base (default 1,2,4)")
    parser.add_argument("--one-cluster", action="store_true",
                        help="one cluster of N worker processes (JOBSITE_WORKERS=N) instead of N clusters of one")
    parser.add_argument("--events", action="store_true",
                        help="also print each run's events (progress left out), in seconds from its extracting")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--shape", metavar="LAYERSxHIDDEN",
                        help="the model's layers and width, e.g. 6x512 (Pythia-70m's); default 4x256, --quick 4x64")
    parser.add_argument("--no-bare", action="store_true",
                        help="leave out the bare forward passes (1 and 2 processes) that show what the machine allows")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every worker count, interleaved; the ratios divide medians (default 3)")
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers is a comma-separated list of whole numbers, e.g. 1,2,4; got {args.workers!r}")
    if not counts or min(counts) < 1:
        parser.error(f"--workers counts must be at least 1; got {args.workers!r}")
    samples = args.samples or (300 if args.quick else 2000)
    if samples < max(counts):
        parser.error(f"--samples must be at least the largest worker count ({max(counts)}); got {samples}")
    model_shape = dict(QUICK_MODEL if args.quick else MODEL)
    if args.shape:
        try:
            layers, hidden = (int(x) for x in args.shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shape is LAYERSxHIDDEN, e.g. 6x512; got {args.shape!r}")
        if layers < 4 or hidden < 8 or hidden % 8:
            parser.error(f"--shape needs at least 4 layers (the request reads layer 3) and a width that is a "
                         f"multiple of 8; got {args.shape!r}")
        model_shape.update(n_layer=layers, hidden=hidden, n_head=hidden // 64 or 4)
    db_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    db_name = ensure_database(db_url)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jobsite-bench-shards-") as tmp:
        workdir = Path(tmp)
        bench = Bench(workdir, db_url)
        made = []
        try:
            import django
            import torch

            from django.conf import settings

            from extraction.services import dataset_register, model_register
            from jobsite.demo import build_tiny_causal_lm

            data = settings.JOBSITE_DATA_DIR / "datasets" / "bench-shards.txt"
            data.parent.mkdir(parents=True, exist_ok=True)
            lines = write_lines(data, samples, seed=samples)
            model_dir = settings.JOBSITE_MODEL_ROOTS[0] / "bench-shards-gpt2"
            build_tiny_causal_lm(str(model_dir), lines[:2000], **model_shape)
            bench.model_dir = str(model_dir)
            model = model_register(path=str(model_dir), name=f"bench-shards-{os.getpid()}")
            dataset = dataset_register(path=str(data), name=f"bench-shards-{os.getpid()}")
            made += [model, dataset]

            with open("/proc/loadavg") as f:
                load = " ".join(f.read().split()[:3])
            print(f"# Shards benchmark, {datetime.date.today()}")
            print()
            print(f"Machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}); database {db_name}; "
                  f"Django {django.get_version()}; torch {torch.__version__}; load average at the start {load}.")
            print(f"Request: {samples:,} text lines (log-normal word counts, median 32), GPT-2 shape "
                  f"{model_shape['n_layer']} layers x {model_shape['hidden']}, layers {REQUEST['layers']}, "
                  f"hooks {REQUEST['hooks']}, batch size {REQUEST['batch_size']}, max length {REQUEST['max_length']}, "
                  f"float32; " + ("one cluster of N worker processes" if args.one_cluster else
                                   "one cluster per worker, one worker process each") + ", one torch thread each.")
            print()
            runs: dict[int, list[dict]] = {workers: [] for workers in counts}
            machine: dict[int, list[float]] = {workers: [] for workers in counts if workers <= 2}
            for round_ in range(1, max(1, args.rounds) + 1):
                # Rounds interleave the counts, so a slow spell of a shared machine touches each alike.
                for workers in counts:
                    result = run(bench, model, dataset, workers, args.timeout, args.one_cluster)
                    made.append(result["job"])
                    runs[workers].append(result)
                    print(f"  round {round_}, {workers} worker(s): {result['extract_s']:.2f} s", flush=True)
                    if args.events:
                        for kind, offset, shard in result["timeline"]:
                            where = f" shard {shard['index']} on {shard['worker']}" if shard else ""
                            print(f"    {offset:+8.2f} {kind}{where}")
                if not args.no_bare:
                    for parts in machine:
                        machine[parts].append(bare(str(model_dir), data, lines, model_shape["hidden"], parts, bench.env))
                        print(f"  round {round_}, bare forward passes in {parts} process(es): "
                              f"{machine[parts][-1]:.2f} s", flush=True)
            # Each count's median run (by extract s) stands for it.
            results = [sorted(runs[w], key=lambda r: r["extract_s"])[len(runs[w]) // 2] for w in counts]
            print()
            for workers in counts[1:]:
                ratios = [runs[counts[0]][i]["extract_s"] / r["extract_s"] for i, r in enumerate(runs[workers])]
                print(f"  {workers}w/{counts[0]}w by round: " + ", ".join(f"{x:.2f}" for x in ratios))
            print()
            base = results[0]
            rows = []
            for r in results:
                rate = r["tokens"] / r["extract_s"]
                ratio = rate / (base["tokens"] / base["extract_s"])
                shards = "; ".join(f"{i}: {w.rsplit(':', 1)[-1] or '?'} {s:.1f} s" for i, (w, s) in r["shards"].items())
                rows.append([r["workers"], r["job"].shards, f"{r['tokens']:,}", f"{r['extract_s']:.2f}", f"{rate:,.0f}",
                             f"{ratio:.2f}", f"{r['planning_s']:.2f}", f"{r['tokenizing_s']:.2f}", shards or "-"])
            print(table(["workers", "shards", "tokens", "extract s", "tokens/s", f"÷ {base['workers']} worker",
                         "planning s", "tokenizing s", "shard: worker pid, seconds"], rows))
            print()
            for r in results[1:]:
                ratio = (r["tokens"] / r["extract_s"]) / (base["tokens"] / base["extract_s"])
                goal = " (goal >= 1.8)" if r["workers"] == 2 and base["workers"] == 1 else ""
                print(f"ratio {r['workers']}w/{base['workers']}w: {ratio:.2f}{goal}")
            differ = {w: sorted({name for r in runs[w] for name in compared(base["job"].output_dir, r["job"].output_dir)})
                      for w in counts[1:]}
            print(f"byte-identical: {'-, one run' if not differ else 'yes' if not any(differ.values()) else 'no'}"
                  + "".join(f"; {w} workers differ in {', '.join(names)}" for w, names in differ.items() if names))
            if not args.no_bare and 1 in machine and 2 in machine and 2 in counts and counts[0] == 1:
                allowed = [one / two for one, two in zip(machine[1], machine[2], strict=True)]
                job = [one["extract_s"] / two["extract_s"] for one, two in zip(runs[1], runs[2], strict=True)]
                print(f"what the machine allows: bare forward passes of the same batches, the whole order in one "
                      f"process against its two halves (cut as the shards are) in two, one torch thread each: "
                      f"{statistics.median(machine[1]):.2f} s against {statistics.median(machine[2]):.2f} s, by round "
                      + ", ".join(f"{x:.2f}" for x in allowed) + f" (median {statistics.median(allowed):.2f}); the job's "
                      f"2w/1w over the machine's, by round: "
                      + ", ".join(f"{j / a:.2f}" for j, a in zip(job, allowed, strict=True))
                      + f" (median {statistics.median(j / a for j, a in zip(job, allowed, strict=True)):.2f}).")
            print(f"planning (model read, tokenizing, cut), median of the runs: "
                  f"{statistics.median(r['planning_s'] for r in results):.2f} s, of which tokenizing events span "
                  f"{statistics.median(r['tokenizing_s'] for r in results):.2f} s; not in extract s.")
            print()
            print(f"Took {time.perf_counter() - started:.0f} s.")
        finally:
            bench.stop_all()
            from extraction.models import Dataset, Extraction

            # A run cut short (Ctrl-C) leaves its extraction out of `made`: it goes with its dataset.
            Extraction.objects.filter(dataset__in=[r.pk for r in made if isinstance(r, Dataset)]).delete()
            for record in reversed(made):
                type(record).objects.filter(pk=record.pk).delete()
            from django.db import connections

            connections.close_all()


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


if __name__ == "__main__":
    main()
