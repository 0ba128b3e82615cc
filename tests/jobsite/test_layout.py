"""The shared machinery's modules import no app, and none of them imports another one back.

Read from the source (every import, those inside functions too): an import that works only
because of load order is found the day it is written, not the day the order changes.
"""

import ast
from pathlib import Path

import pytest

from jobsite.lifecycle import TransitionConflict, transition_claimed
from jobsite.models import Event

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("jobsite", "extraction", "training_runs")


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "migrations" not in path.parts:
                name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                modules[name] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {c for c in candidates if c in modules and c != name}
        graph[name] = imported
    return graph


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


GRAPH = import_graph()


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("jobsite.")))
def test_no_jobsite_module_imports_itself_back(module):
    assert module not in reachable(GRAPH, module)


def test_the_api_imports_no_app_and_the_url_conf_mounts_the_apps_routers():
    assert not {m for m in reachable(GRAPH, "jobsite.api") if not m.startswith("jobsite.")}
    assert {"extraction.api", "training_runs.api"} <= GRAPH["jobsite.urls"]


def test_health_and_watchdog_share_worker_detection_without_importing_each_other():
    assert "jobsite.watchdog" not in reachable(GRAPH, "jobsite.health")
    assert "jobsite.health" not in reachable(GRAPH, "jobsite.watchdog")
    assert "jobsite.clusters" in GRAPH["jobsite.health"] & GRAPH["jobsite.watchdog"]


# -- claims: lifecycle.transition_claimed ------------------------------------------------------------

def worker_fields(worker: str) -> dict:
    return {"worker": worker, "worker_host": worker.split(":")[0], "worker_pid": int(worker.split(":")[1])}


@pytest.mark.django_db
def test_a_kind_without_a_claimed_status_is_claimed_once_by_its_worker_field():
    from training_runs.models import Corpus, TrainingRun

    corpus = Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)
    run = TrainingRun.objects.create(corpus=corpus, status="generating", total_chunks=3)
    stale = TrainingRun.objects.get(pk=run.pk)
    transition_claimed(run, **worker_fields("a:1"))
    assert (run.status, run.worker) == ("generating", "a:1")
    with pytest.raises(TransitionConflict, match="already held by another worker"):
        transition_claimed(stale, **worker_fields("b:2"))
    assert TrainingRun.objects.get(pk=run.pk).worker == "a:1"
    assert list(Event.objects.filter(topic=run.topic).values_list("type", flat=True)) == ["training.claimed"]


@pytest.mark.django_db
def test_a_kind_with_a_claimed_status_is_claimed_by_transition(make_extraction):
    job = make_extraction("queued")
    stale = type(job).objects.get(pk=job.pk)
    transition_claimed(job, **worker_fields("a:1"))
    assert (job.status, job.worker) == ("loading", "a:1")
    with pytest.raises(TransitionConflict):
        transition_claimed(stale, **worker_fields("b:2"))
    assert list(Event.objects.filter(topic=job.topic).values_list("type", flat=True)) == ["extraction.loading"]
