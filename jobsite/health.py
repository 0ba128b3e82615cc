"""What an operator (or a load balancer) asks first: is every part of jobsite working?"""

from __future__ import annotations

import time

from django.conf import settings
from django.db import connection

from jobsite.clusters import job_models, live_workers


def _database() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return {"ok": True, "detail": connection.vendor}


def _broker() -> dict:
    from django_q.brokers import get_broker

    broker = get_broker()
    return {"ok": True, "detail": broker.info(), "queue_depth": broker.queue_size(), "in_flight": broker.lock_size()}


def _channel_layer() -> dict:
    if not settings.REDIS_URL:
        return {"ok": True, "detail": "in-memory layer; consumers tail the event table"}
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    client.ping()
    return {"ok": True, "detail": "redis"}


def _workers() -> dict:
    clusters, workers = live_workers()
    if not workers:
        detail = ("a worker cluster is starting but has no worker process yet" if clusters
                  else "start one with manage.py qcluster")
        return {"ok": False, "detail": detail, "clusters": clusters, "workers": 0}
    return {"ok": True, "detail": f"{clusters} cluster(s), {workers} worker(s)", "clusters": clusters,
            "workers": workers}


def workers_missing() -> str:
    """'' while a worker runs; else the sentence that says none does (pages show it)."""
    try:
        part = _workers()
    except Exception:  # noqa: BLE001 - a page must render even when the cache is down
        return ""
    return "" if part["ok"] else part["detail"]


def _stalled_jobs() -> dict:
    stalled = [
        job.topic for model in job_models()
        for job in model.objects.filter(model.live(), status__in=model.RUNNING).exclude(worker="") if job.is_stalled
    ]
    if stalled:
        return {"ok": False, "detail": f"{len(stalled)} running job(s) without a heartbeat past "
                                       f"{settings.JOBSITE_STALL_AFTER_S:.0f} s: {', '.join(stalled[:10])}; "
                                       "the watchdog runs in the workers: is one running?", "jobs": stalled}
    return {"ok": True, "detail": "none", "jobs": []}


CHECKS = {
    "database": _database,
    "broker": _broker,
    "channel_layer": _channel_layer,
    "workers": _workers,
    "stalled_jobs": _stalled_jobs,
}


def health() -> tuple[bool, dict]:
    """(healthy, {part: {"ok", "detail", ...}}); a part that raises is failing with its error."""
    parts = {}
    for name, check in CHECKS.items():
        started = time.monotonic()
        try:
            parts[name] = check()
        except Exception as exc:  # noqa: BLE001 - a broken part is reported, not raised
            parts[name] = {"ok": False, "detail": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
        parts[name]["ms"] = round(1000 * (time.monotonic() - started), 1)
    return all(part["ok"] for part in parts.values()), parts
