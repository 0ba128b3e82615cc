"""Shards through every entry point: the JSON API, the start and retry forms, the commands, the
admin, and the card and history row that show them. The planning attempt runs in this process."""

import json
from datetime import datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from extraction.models import Extraction, ExtractionShard
from extraction.services import extraction_cancel
from extraction.tasks import run_extraction, run_extraction_shard

pytestmark = pytest.mark.django_db(transaction=True)

PAGE = "/extractions/"


@pytest.fixture(autouse=True)
def fast_machinery(settings):
    settings.JOBSITE_HEARTBEAT_S = 0.2
    settings.JOBSITE_PROGRESS_EVERY_S = 0
    settings.JOBSITE_FAILPOINTS = ""


def post(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def start_body(dataset, **overrides):
    return {"dataset_id": dataset.pk, "layers": [0, 1], "hooks": ["residual"], "batch_size": 4, **overrides}


def planned(model_record, dataset, shards=2) -> Extraction:
    """A sharded extraction after its planning attempt: its shards queued, none taken yet."""
    from extraction.services import extraction_start

    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0, 1], hooks=["residual"], batch_size=4,
                              shards=shards)
    run_extraction(job.pk)
    job.refresh_from_db()
    assert job.sharded and job.shard_set.count() == shards
    return job


def held(shard: ExtractionShard, worker: str, *, silent_s: float = 0) -> None:
    """The shard as a worker holds it (the row a claim writes), its last heartbeat silent_s ago."""
    beat = timezone.now() - timedelta(seconds=silent_s)
    ExtractionShard.objects.filter(pk=shard.pk).update(status="running", worker=worker, attempt=1, started_at=beat,
                                                       heartbeat_at=beat)


# -- JSON API -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [0, 101, "many", -1])
def test_api_refuses_a_shard_count_outside_one_to_the_samples_naming_the_field(staff_client, fake_model,
                                                                               fake_dataset, shards):
    response = post(staff_client, f"/api/v1/models/{fake_model.pk}/extractions", start_body(fake_dataset,
                                                                                            shards=shards))
    assert response.status_code == 422
    assert response.json()["field"] == "shards"
    assert response.json()["message"].startswith("Shards must be a whole number between 1 and 100 (the samples it "
                                                  "reads), or auto (one per live worker); got ")
    assert Extraction.objects.count() == 0


def test_api_start_with_two_shards_lists_each_shard_once_planned(staff_client, model_record, dataset):
    response = post(staff_client, f"/api/v1/models/{model_record.pk}/extractions", start_body(dataset, shards=2))
    assert response.status_code == 201, response.json()
    answer = response.json()
    assert answer["shards"] == 2 and answer["shard_list"] == []
    run_extraction(answer["id"])
    first = ExtractionShard.objects.get(extraction_id=answer["id"], index=0)
    run_extraction_shard(first.pk)

    answer = staff_client.get(f"/api/v1/extractions/{answer['id']}").json()
    assert answer["status"] == "extracting" and answer["shards"] == 2
    assert [(s["index"], s["status"]) for s in answer["shard_list"]] == [(0, "completed"), (1, "queued")]
    assert sum(s["total_samples"] for s in answer["shard_list"]) == dataset.num_samples
    done = answer["shard_list"][0]
    assert done["samples_processed"] == done["total_samples"] and done["worker"] and done["attempt"] == 1
    assert set(done) >= {"heartbeat_at", "stalled", "current_batch_size", "error_type", "error_message"}


def test_api_retry_keeps_the_shard_count_or_takes_a_new_one_and_refuses_a_bad_one(staff_client, fake_model,
                                                                                  fake_dataset):
    response = post(staff_client, f"/api/v1/models/{fake_model.pk}/extractions", start_body(fake_dataset, shards=3))
    original = Extraction.objects.get(pk=response.json()["id"])
    extraction_cancel(extraction=original)
    retry_url = f"/api/v1/models/{fake_model.pk}/extractions/{original.pk}/retry"

    refused = post(staff_client, retry_url, {"shards": 0})
    assert refused.status_code == 422 and refused.json()["field"] == "shards"
    assert "Shards must be a whole number between 1 and 100" in refused.json()["message"]

    same = post(staff_client, retry_url, {})
    assert same.status_code == 201 and same.json()["shards"] == 3
    extraction_cancel(extraction=Extraction.objects.get(pk=same.json()["id"]))
    fewer = post(staff_client, f"/api/v1/models/{fake_model.pk}/extractions/{same.json()['id']}/retry", {"shards": 2})
    assert fewer.status_code == 201 and fewer.json()["shards"] == 2


# -- the start form -------------------------------------------------------------------------------------

def start_form(model, dataset, **overrides):
    return {"model": model.pk, "dataset": dataset.pk, "layers": "0,1", "hooks": ["residual"], "batch_size": "8",
            "max_samples": "", "max_length": "512", "storage_dtype": "float32", **overrides}


@pytest.mark.parametrize("shards", ["0", "101", "two", "1.5"])
def test_start_form_shows_a_bad_shard_count_on_its_field(staff_client, fake_model, fake_dataset, shards):
    response = staff_client.post(PAGE, start_form(fake_model, fake_dataset, shards=shards))
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert list(errors) == ["shards"], errors
    assert errors["shards"][0].startswith("Shards must be a whole number between 1 and 100")
    assert Extraction.objects.count() == 0


def test_start_form_offers_shards_and_starts_with_the_count_given(staff_client, fake_model, fake_dataset):
    page = staff_client.get(PAGE).content.decode()
    assert 'name="shards"' in page and "Workers that run it at once (auto: one per live worker)" in page
    response = staff_client.post(PAGE, start_form(fake_model, fake_dataset, shards="4"))
    assert response.status_code == 302
    assert Extraction.objects.get().shards == 4


def test_start_form_left_empty_runs_on_one_worker(staff_client, fake_model, fake_dataset):
    staff_client.post(PAGE, start_form(fake_model, fake_dataset, shards=""))
    assert Extraction.objects.get().shards == 1


def test_retry_form_takes_a_shard_count_and_says_a_bad_one(staff_client, make_extraction):
    original = make_extraction("cancelled", shards=2, total_samples=100)
    response = staff_client.post(f"/extractions/{original.pk}/retry/", {"shards": "0"}, follow=True)
    said = [str(m) for m in response.context["messages"]]
    assert any("was not retried" in m and "Shards must be a whole number between 1 and 100" in m for m in said), said
    staff_client.post(f"/extractions/{original.pk}/retry/", {"shards": "3"})
    assert Extraction.objects.get(original_extraction=original).shards == 3


# -- the commands ---------------------------------------------------------------------------------------

def test_extract_command_refuses_a_bad_shard_count_with_the_sentence(model_record, dataset):
    with pytest.raises(CommandError, match=r"Shards must be a whole number between 1 and 36 \(the samples it "
                                           r"reads\), or auto \(one per live worker\); got 99\.") as refused:
        call_command("extract", "tiny-gpt2", "samples", "--layers", "0", "--shards", "99")
    assert refused.value.returncode == 1
    assert Extraction.objects.count() == 0
    call_command("extract", "tiny-gpt2", "samples", "--layers", "0", "--shards", "3")
    assert Extraction.objects.get().shards == 3


def test_extraction_list_prints_a_line_per_shard_with_its_worker_and_stalls(model_record, dataset, capsys,
                                                                           settings):
    job = planned(model_record, dataset)
    first, second = job.shard_set.order_by("index")
    held(first, "gpu-a:101", silent_s=1)
    held(second, "gpu-b:202", silent_s=settings.JOBSITE_STALL_AFTER_S + 30)
    capsys.readouterr()
    call_command("extraction", "list")
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "shard" in line]
    assert len(lines) == 2
    assert lines[0][:6] == ["shard", "0", "running", f"0/{first.total_samples}", "worker", "gpu-a:101"]
    assert "stalled" not in lines[0] and lines[0][6:8] == ["attempt", "1"]
    assert lines[1][5] == "gpu-b:202" and lines[1][-1] == "stalled"
    assert "heartbeat" in lines[0]

    ExtractionShard.objects.filter(pk=first.pk).update(status="completed", finished_at=timezone.now())
    call_command("extraction", "list")
    done = next(line.split() for line in capsys.readouterr().out.splitlines() if "shard 0" in line)
    assert done[2] == "completed" and "heartbeat" not in done  # a heartbeat only while it runs


def test_api_heartbeat_of_a_sharded_extraction_is_its_most_silent_running_shards(staff_client, model_record,
                                                                                 dataset):
    """What the page's poll reads to call the card stalled: not the freshest shard's beat."""
    job = planned(model_record, dataset)
    first, second = job.shard_set.order_by("index")
    held(first, "gpu-a:1", silent_s=40)
    held(second, "gpu-b:2", silent_s=1)
    answer = staff_client.get(f"/api/v1/extractions/{job.pk}").json()
    silent = ExtractionShard.objects.get(pk=first.pk).heartbeat_at
    assert answer["heartbeat_at"] is not None
    assert abs((datetime.fromisoformat(answer["heartbeat_at"].replace("Z", "+00:00")) - silent).total_seconds()) < 0.01
    assert answer["shard_list"][0]["stalled"] and not answer["shard_list"][1]["stalled"]


# -- the card, the history row, the admin ---------------------------------------------------------------

def test_card_of_a_sharded_extraction_shows_each_shard_its_worker_and_refusals(staff_client, model_record, dataset,
                                                                               settings):
    job = planned(model_record, dataset)
    first, second = job.shard_set.order_by("index")
    held(first, "gpu-a:101", silent_s=2)
    ExtractionShard.objects.filter(pk=second.pk).update(
        refusals={"cpu-9": "cpu-9 does not see this job's files at /data/activations/1."})
    card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert 'data-shard="0"' in card and 'data-shard="1"' in card
    assert "gpu-a:101" in card and "Extracting with 2 shards: 1 running, 1 queued" in card
    assert "Waiting for a worker" not in card
    assert "cpu-9: cpu-9 does not see this job&#x27;s files at /data/activations/1." in card
    assert "data-shard-stalled hidden>" in card and "data-shard-stalled>" not in card

    held(first, "gpu-a:101", silent_s=settings.JOBSITE_STALL_AFTER_S + 30)
    card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert "data-shard-stalled>stalled" in card


def test_card_of_a_sharded_extraction_reads_its_shards_once(staff_client, model_record, dataset):
    """The heartbeat, the stall, the phase line and the rows all come from one read of the
    shards: a page of sharded jobs does not read each job's shards three times."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    job = planned(model_record, dataset, shards=3)
    held(job.shard_set.get(index=0), "gpu-a:101")
    with CaptureQueriesContext(connection) as queries:
        card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert "Extracting with 3 shards: 1 running, 2 queued" in card
    reads = [q["sql"] for q in queries.captured_queries
             if q["sql"].startswith('SELECT "extraction_extractionshard"."id"')]
    assert len(reads) == 1, reads


def test_card_and_history_of_one_worker_job_show_no_shards(staff_client, make_extraction):
    job = make_extraction("extracting", worker="gpu-a:1", started_at=timezone.now(), total_samples=100)
    card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert "data-shards" not in card and "heartbeat <span data-heartbeat-age>" in card
    assert "data-shard-count" not in staff_client.get("/extractions/history/").content.decode()


def test_history_row_says_how_many_shards(staff_client, make_extraction):
    make_extraction("completed", shards=3, total_samples=100, samples_processed=100)
    assert "3 shards" in staff_client.get("/extractions/history/").content.decode()


def test_admin_lists_shards_done_and_shows_them_on_the_change_page(client, django_user_model, model_record, dataset):
    client.force_login(django_user_model.objects.create_superuser("boss", password="pw"))
    job = planned(model_record, dataset)
    first = job.shard_set.get(index=0)
    run_extraction_shard(first.pk)
    first.refresh_from_db()
    changelist = client.get(reverse("admin:extraction_extraction_changelist")).content.decode()
    assert "0/2 done" not in changelist and "1/2 done" in changelist
    page = client.get(reverse("admin:extraction_extraction_change", args=[job.pk])).content.decode()
    assert "Extraction shards" in page
    assert first.worker in page and f"{first.total_samples:,}/{first.total_samples:,} (100 %)" in page
    shards_page = client.get(reverse("admin:extraction_extractionshard_changelist")).content.decode()
    assert f"Shard 0 of extraction {job.pk} (completed)" in shards_page
