"""What runs jobs: the job kinds, and the django-q2 clusters alive to run them.

The health check, the watchdog and the metrics all ask these questions; they ask them here,
so that none of them imports another.
"""

from __future__ import annotations

from django.apps import apps

from jobsite.models import Job


def job_models() -> list[type[Job]]:
    return [m for m in apps.get_models() if issubclass(m, Job)]


def live_workers() -> tuple[int, int]:
    """(clusters, worker processes) of the django-q2 clusters that run and are not stopping."""
    from django_q.status import Stat

    clusters = [s for s in Stat.get_all() if getattr(s, "status", "") not in ("Stopped", "Stopping")]
    return len(clusters), sum(len(getattr(s, "workers", []) or []) for s in clusters)
