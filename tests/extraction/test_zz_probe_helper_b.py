import pytest
from tests.extraction.test_shards_integration import *  # noqa
from tests.extraction.test_shards_integration import FAST, start_sharded, status, shards_of, wait

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_probe(model_record, dataset, start_worker, tmp_path, settings):
    import time
    elsewhere = tmp_path / "host-b-data"
    elsewhere.mkdir()
    host_b = start_worker(JOBSITE_HOSTNAME="host-b", JOBSITE_DATA_DIR=elsewhere, **{**FAST, "JOBSITE_STALL_AFTER_S": 30, "JOBSITE_FAILPOINTS": slow(0.5)})
    job = start_sharded(model_record, dataset)
    wait(lambda: status(job) != "queued" and Extraction.objects.get(pk=job.pk).worker == "" , [host_b], "planned")
    print("PLANNED status", status(job))
    host_a = start_worker(JOBSITE_HOSTNAME="host-a", **FAST)
    try:
        wait(lambda: status(job) in ("completed", "failed"), [host_a, host_b], "end", timeout=40)
    except AssertionError as e:
        print("NO END", str(e)[:3000])
    j = Extraction.objects.get(pk=job.pk)
    print("STATUS", j.status, j.error_type, j.error_message)
    print("SHARDS", [(p.index, p.status, p.worker_host, p.attempt) for p in shards_of(job)])
    print("B dir", sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))[:20])
    print("A dir exists", j.output_dir, j.output_dir.exists())
    for e in Event.objects.filter(topic=job.topic).order_by("seq"):
        print("EV", e.type, e.payload.get("host"), e.payload.get("message"), e.payload.get("worker"))
