"""Job machinery latencies, measured with real processes: daphne, qcluster workers, a WebSocket client.

    .venv/bin/python bench/jobs.py             # PostgreSQL database jobsite_bench when reachable, else SQLite
    .venv/bin/python bench/jobs.py --sqlite    # a throwaway SQLite file
    .venv/bin/python bench/jobs.py --quick     # fewer events and kills

What it measures:
  event latency    publish() in this process -> the event arrives at a WebSocket client of a
                   real daphne server (session-cookie login), p50/p99; once with the Redis
                   channel layer (the server and this process both on REDIS_URL) and once
                   with the database tail alone (no REDIS_URL: the consumer reads the table
                   every JOBSITE_EVENT_POLL_S).
  enqueue -> run   extraction_start() -> a real qcluster worker claims the job: the
                   `extraction.queued` and `extraction.loading` events' created_at, same clock.
  worker SIGKILL   SIGKILL of the worker process that runs an extraction -> the job leaves its
                   running status (the watchdog of the respawned worker finds the dead pid),
                   default knobs; and SIGKILL of a whole cluster on another host (pid checks do
                   not apply there) -> the heartbeat goes stale and a watchdog on this host
                   fails the job, with the knobs named in the output.

Every process it starts is stopped by its pid (its own process group). The PostgreSQL
database is created fresh and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN = "postgres://postgres@127.0.0.1:5432/postgres"
PG_DB = "jobsite_bench"
TEXTS = [" ".join(f"word{(i * 13 + k) % 89}" for k in range(4 + (i * 7) % 40)) for i in range(64)]
# The cluster on "another host" and its watcher, with short knobs so the stall shows in seconds.
STALL_KNOBS = dict(JOBSITE_HEARTBEAT_S=1, JOBSITE_STALL_AFTER_S=5, JOBSITE_WATCHDOG_EVERY_S=1)


class Service:
    """A process of our own, in its own session: stopped by its pid (the whole group)."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log_path = log
        self.log = open(log, "wb")
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group is ours: what the leader left behind
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def database_url(force_sqlite: bool, workdir: Path) -> tuple[str, str]:
    if not force_sqlite:
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {PG_DB}")
            return f"postgres://postgres@127.0.0.1:5432/{PG_DB}", f"PostgreSQL ({PG_DB} on 127.0.0.1:5432)"
        except Exception as exc:  # noqa: BLE001 - fall back, and say so
            print(f"PostgreSQL unavailable ({exc}); using SQLite.")
    return f"sqlite:///{workdir / 'bench.sqlite3'}", "SQLite (throwaway file, WAL)"


def drop_database(url: str) -> None:
    if url.startswith("postgres"):
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")


class Bench:
    def __init__(self, args, workdir: Path, db_url: str):
        self.args, self.workdir, self.db_url = args, workdir, db_url
        self.services: list[Service] = []
        data = workdir / "data"
        (data / "models").mkdir(parents=True)
        self.base_env = {
            **os.environ, "DATABASE_URL": db_url, "JOBSITE_DATA_DIR": str(data),
            "JOBSITE_MODEL_ROOTS": str(data / "models"), "PYTHONUNBUFFERED": "1", "JOBSITE_LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "jobsite.settings",
        }
        self.base_env.pop("REDIS_URL", None)
        os.environ.update({k: v for k, v in self.base_env.items() if k != "REDIS_URL"})
        os.environ.pop("REDIS_URL", None)
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)

    def start(self, args: list[str], name: str, **env) -> Service:
        service = Service(args, {**self.base_env, **{k: str(v) for k, v in env.items()}},
                          self.workdir / f"{name}-{len(self.services)}.log")
        self.services.append(service)
        return service

    def stop(self, service: Service, sig=signal.SIGTERM) -> None:
        service.stop(sig)
        self.services.remove(service)

    def stop_all(self) -> None:
        for service in list(self.services):
            self.stop(service)

    def daphne(self, **env) -> tuple[Service, int]:
        port = free_port()
        service = self.start([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                              "jobsite.asgi:application"], "daphne", **env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return service, port
            if service.process.poll() is not None:
                raise RuntimeError(f"daphne exited: {service.log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError("daphne did not start listening")

    def worker(self, **env) -> Service:
        return self.start([sys.executable, "manage.py", "qcluster"], "qcluster", **env)

    # --- events --------------------------------------------------------------------------

    def event_latency(self, *, redis_url: str | None, count: int) -> list[float]:
        import websockets
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.test import Client, override_settings

        from jobsite.events import publish

        env = {"REDIS_URL": redis_url} if redis_url else {}
        daphne, port = self.daphne(**env)
        user, _ = get_user_model().objects.get_or_create(username="bench", defaults={"is_staff": True})
        client = Client()
        client.force_login(user)
        cookie = f"sessionid={client.cookies['sessionid'].value}"
        layer = ({"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_url]}}
                 if redis_url else {"BACKEND": "channels.layers.InMemoryChannelLayer"})
        topic = f"bench.{'redis' if redis_url else 'tail'}.{time.time_ns()}"
        warmup, poll = 10, settings.JOBSITE_EVENT_POLL_S

        async def scenario() -> list[float]:
            from jobsite.models import Event

            after = await asyncio.to_thread(lambda: Event.objects.order_by("-seq").values_list("seq", flat=True).first())
            url = f"ws://127.0.0.1:{port}/ws/events/?after={after or 0}&topic={topic}"
            latencies = []
            async with websockets.connect(url, additional_headers={"Cookie": cookie},
                                          origin=f"http://127.0.0.1:{port}") as ws:
                for i in range(count + warmup):
                    sent = time.perf_counter()
                    await asyncio.to_thread(publish, topic, "bench.ping", {"i": i})
                    while True:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        if message.get("payload", {}).get("i") == i:
                            break
                    if i >= warmup:
                        latencies.append(time.perf_counter() - sent)
                    # Anywhere in the consumer's poll interval, as real events are (right after a
                    # delivery would always land at the start of the tail's sleep).
                    await asyncio.sleep(random.uniform(0, poll))
            return latencies

        try:
            with override_settings(CHANNEL_LAYERS={"default": layer}):
                return asyncio.run(scenario())
        finally:
            self.stop(daphne)

    # --- workers -------------------------------------------------------------------------

    def register_inputs(self):
        from django.conf import settings
        from transformers.utils import logging as transformers_logging

        from jobsite.demo import build_tiny_causal_lm

        transformers_logging.disable_progress_bar()

        from extraction.services import dataset_register, model_register

        model_dir = settings.JOBSITE_MODEL_ROOTS[0] / "tiny-gpt2"
        build_tiny_causal_lm(str(model_dir), TEXTS, n_layer=3, hidden=32, n_head=2, vocab_size=300)
        data = settings.JOBSITE_DATA_DIR / "datasets" / "bench.txt"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("\n".join(TEXTS) + "\n")
        return model_register(path=str(model_dir), name="tiny-gpt2"), dataset_register(path=str(data), name="bench")

    def enqueue_to_running(self, model, dataset, count: int) -> list[float]:
        from extraction.models import Extraction
        from extraction.services import extraction_start
        from jobsite.models import Event

        worker = self.worker()
        latencies = []
        try:
            # The first job pays the worker's start-up (Django, torch import): not counted.
            for i in range(count + 1):
                job, _ = extraction_start(model=model, dataset=dataset, layers=[0], hooks=["residual"],
                                          batch_size=16, max_samples=i + 1)
                wait_for(lambda: Extraction.objects.get(pk=job.pk).status in Extraction.TERMINAL, 120,
                         interval=0.05, what=f"extraction {job.pk} to finish")
                times = dict(Event.objects.filter(topic=job.topic, type__in=["extraction.queued", "extraction.loading"])
                             .values_list("type", "created_at"))
                if i:
                    latencies.append((times["extraction.loading"] - times["extraction.queued"]).total_seconds())
                time.sleep(random.uniform(0, 0.5))  # land anywhere in the worker's poll interval
        finally:
            self.stop(worker)
        return latencies

    def _start_slow_job(self, model, dataset, layers: list[int]):
        from extraction.models import Extraction
        from extraction.services import extraction_start

        job, _ = extraction_start(model=model, dataset=dataset, layers=layers, hooks=["residual"], batch_size=1)
        job = wait_for(lambda: Extraction.objects.filter(pk=job.pk, status=Extraction.Status.EXTRACTING,
                                                         samples_processed__gte=2).first(),
                       120, interval=0.05, what=f"extraction {job.pk} to run")
        return job

    def _wait_not_running(self, job, killed_at: float) -> tuple[float, str]:
        from extraction.models import Extraction

        left = wait_for(lambda: Extraction.objects.filter(pk=job.pk).exclude(status__in=Extraction.RUNNING).first(),
                        120, interval=0.01, what=f"extraction {job.pk} to leave its running status")
        return time.monotonic() - killed_at, f"{left.status} ({left.error_type}: {left.error_message})"

    def _cancel(self, job) -> None:
        from extraction.models import Extraction
        from extraction.services import extraction_cancel

        job = Extraction.objects.get(pk=job.pk)
        if job.status not in Extraction.TERMINAL:
            extraction_cancel(extraction=job)

    def sigkill_same_host(self, model, dataset, kills: int) -> list[tuple[float, str]]:
        slow = json.dumps({"extraction.batch": {"action": "sleep", "seconds": 0.2}})
        worker = self.worker(JOBSITE_FAILPOINTS=slow)
        results = []
        try:
            for k in range(kills):
                job = self._start_slow_job(model, dataset, layers=[k % 3])
                os.kill(job.worker_pid, signal.SIGKILL)
                killed_at = time.monotonic()
                results.append(self._wait_not_running(job, killed_at))
                self._cancel(job)
        finally:
            self.stop(worker)
        return results

    def sigkill_other_host(self, model, dataset) -> tuple[float, str]:
        slow = json.dumps({"extraction.batch": {"action": "sleep", "seconds": 0.2}})
        remote = self.worker(JOBSITE_FAILPOINTS=slow, JOBSITE_HOSTNAME="bench-other-host", **STALL_KNOBS)
        try:
            job = self._start_slow_job(model, dataset, layers=[0, 1])
            watcher = self.worker(**STALL_KNOBS)
            time.sleep(2)  # the watcher is up and watching; the remote job is healthy
            self.stop(remote, signal.SIGKILL)
            killed_at = time.monotonic()
            result = self._wait_not_running(job, killed_at)
            self._cancel(job)
            self.stop(watcher)
            return result
        finally:
            if remote in self.services:
                self.stop(remote)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sqlite", action="store_true", help="a throwaway SQLite database instead of PostgreSQL")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few events, one kill")
    args = parser.parse_args()
    events = 30 if args.quick else 200
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jobsite-bench-jobs-") as tmp:
        workdir = Path(tmp)
        db_url, db_name = database_url(args.sqlite, workdir)
        bench = None
        try:
            bench = Bench(args, workdir, db_url)
            import django

            from django.conf import settings

            print(f"# Job machinery benchmark, {datetime.date.today()}")
            print()
            with open("/proc/loadavg") as f:
                load = " ".join(f.read().split()[:3])
            print(f"Machine: nproc {len(os.sched_getaffinity(0))}; database {db_name}; Redis {args.redis_url}; "
                  f"Django {django.get_version()}; load average at the start {load}.")
            print()
            rows = []
            for label, redis_url in (("Redis channel layer", args.redis_url), ("database tail only", None)):
                latencies = bench.event_latency(redis_url=redis_url, count=events if redis_url else events // 2)
                rows.append([label, len(latencies), ms(percentile(latencies, 50)), ms(percentile(latencies, 99)),
                             ms(max(latencies))])
            print(f"### Event latency: publish() -> WebSocket client (daphne, JOBSITE_EVENT_POLL_S="
                  f"{settings.JOBSITE_EVENT_POLL_S})")
            print()
            print(table(["path", "events", "p50 ms", "p99 ms", "max ms"], rows))
            print()

            model, dataset = bench.register_inputs()
            queued = bench.enqueue_to_running(model, dataset, 4 if args.quick else 10)
            poll = settings.Q_CLUSTER["poll"]
            print(f"### Enqueue -> running (a real qcluster worker, ORM broker, poll {poll} s)")
            print()
            print(table(["jobs", "p50 ms", "max ms"], [[len(queued), ms(percentile(queued, 50)), ms(max(queued))]]))
            print()

            same_host = bench.sigkill_same_host(model, dataset, 1 if args.quick else 3)
            other_host = bench.sigkill_other_host(model, dataset)
            knobs = ", ".join(f"{k}={v}" for k, v in STALL_KNOBS.items())
            defaults = (f"JOBSITE_HEARTBEAT_S={settings.JOBSITE_HEARTBEAT_S:g}, JOBSITE_STALL_AFTER_S="
                        f"{settings.JOBSITE_STALL_AFTER_S:g}, JOBSITE_WATCHDOG_EVERY_S={settings.JOBSITE_WATCHDOG_EVERY_S:g}")
            print("### SIGKILL of a worker -> the job leaves its running status")
            print()
            rows = [
                ["the worker process running the job (same host: its pid is gone)", defaults,
                 ", ".join(f"{s:.2f}" for s, _ in same_host), same_host[-1][1]],
                ["the whole cluster, on another host (its heartbeat goes stale)", knobs, f"{other_host[0]:.2f}",
                 other_host[1]],
            ]
            print(table(["SIGKILL of", "knobs", "seconds to detection", "the job then"], rows))
            print()
            print("'queued' is the automatic retry (with backoff) that resumes from the checkpoint. With the default "
                  "knobs a stale heartbeat is found JOBSITE_STALL_AFTER_S after the last beat, plus up to one "
                  "JOBSITE_WATCHDOG_EVERY_S.")
            print()
            print(f"Took {time.perf_counter() - started:.0f} s.")
        finally:
            if bench is not None:
                bench.stop_all()
                from django.db import connections

                connections.close_all()
            drop_database(db_url)


if __name__ == "__main__":
    main()
