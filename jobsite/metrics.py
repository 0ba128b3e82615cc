"""GET /metrics: Prometheus text, read from the rows and the event log at scrape time.

Counters come from the durable event log, so every process's work is counted (not only
this web process's) and a restart does not reset them.
"""

from __future__ import annotations

from django.db.models import Count, Max, Min
from django.http import HttpResponse
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jobsite.models import Event
from jobsite.watchdog import job_models

# Event types counted as outcomes and machinery actions, per job kind.
COUNTED_EVENTS = ("completed", "failed", "cancelled", "retry_started", "batch_size_reduced", "batch_size_grown",
                  "generating_failed", "training_failed", "proceeded", "removed")


class JobsCollector:
    def collect(self):
        jobs = GaugeMetricFamily("jobsite_jobs", "Jobs by kind and status", labels=["kind", "status"])
        failures = GaugeMetricFamily("jobsite_job_failures", "Failed jobs by kind and error type",
                                     labels=["kind", "error_type"])
        oldest = GaugeMetricFamily("jobsite_oldest_heartbeat_age_seconds",
                                   "Age of the oldest heartbeat among running jobs", labels=["kind"])
        now = timezone.now()
        for model in job_models():
            # A removed job kept as history is neither in a status nor failing any more.
            live = model.objects.filter(model.live())
            counts = dict(live.values_list("status").annotate(n=Count("pk")))
            for status in model.Status.values:
                jobs.add_metric([model.KIND, status], counts.get(status, 0))
            for error_type, n in live.exclude(error_type="").values_list("error_type").annotate(n=Count("pk")):
                failures.add_metric([model.KIND, error_type], n)
            beat = model.objects.filter(status__in=model.RUNNING).exclude(worker="").aggregate(b=Min("heartbeat_at"))["b"]
            oldest.add_metric([model.KIND], (now - beat).total_seconds() if beat else 0.0)
        yield jobs
        yield failures
        yield oldest

        events = CounterMetricFamily("jobsite_events", "Events written, by kind and type", labels=["kind", "type"])
        for type_, n in Event.objects.exclude(type__endswith=".retry_started").values_list("type").annotate(
                n=Count("seq")):
            kind, _, name = type_.partition(".")
            if name in COUNTED_EVENTS:
                events.add_metric([kind, name], n)
        for model in job_models():
            # A person's retry tells the old job's topic (naming the new one in `retry_id`) and the
            # new job's: counted once, on the new job's (an automatic retry has only that one).
            retries = Event.objects.filter(type=f"{model.KIND}.retry_started").exclude(payload__has_key="retry_id")
            events.add_metric([model.KIND, "retry_started"], retries.count())
        yield events

        last = Event.objects.aggregate(last=Max("created_at"))["last"]
        lag = GaugeMetricFamily("jobsite_last_event_age_seconds", "Seconds since the newest event was written")
        lag.add_metric([], (now - last).total_seconds() if last else 0.0)
        yield lag


def metrics_view(request):
    registry = CollectorRegistry()
    registry.register(JobsCollector())
    return HttpResponse(generate_latest(registry), content_type="text/plain; version=0.0.4; charset=utf-8")
