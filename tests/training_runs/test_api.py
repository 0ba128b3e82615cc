import json

import pytest

from training_runs.models import TrainingRun
from training_runs.tasks import run_training_phase

pytestmark = pytest.mark.django_db(transaction=True)


def post(client, url, body=None):
    return client.post(url, data=json.dumps(body) if body is not None else "", content_type="application/json")


@pytest.fixture
def generated_run(staff_client, small_corpus, fast_machinery):
    response = post(staff_client, "/api/v1/training/runs", {"corpus_id": small_corpus.pk})
    assert response.status_code == 201, response.content
    run_training_phase(response.json()["id"])
    return TrainingRun.objects.get(pk=response.json()["id"])


def test_settings_say_available_and_name_the_blocking_run(staff_client, generated_run):
    body = staff_client.get("/api/v1/training/settings").json()
    assert body["is_available"] is True and body["reason"] == ""
    assert body["blocking_run_id"] == generated_run.pk
    assert f"training run {generated_run.pk} is generated" in body["blocking_sentence"]


def test_settings_explain_why_training_is_unavailable(staff_client, settings, db):
    settings.JOBSITE_ENCODER_PATH = ""
    body = staff_client.get("/api/v1/training/settings").json()
    assert body["is_available"] is False and "JOBSITE_ENCODER_PATH" in body["reason"]


def test_second_generation_is_409_naming_the_blocking_run(staff_client, small_corpus, generated_run):
    response = post(staff_client, "/api/v1/training/runs", {"corpus_id": small_corpus.pk})
    assert response.status_code == 409
    assert response.json()["message"] == (
        f"A new generation cannot start while training run {generated_run.pk} is generated; "
        "review its pairs and train it first."
    )


def test_review_then_train_flow_and_wrong_state_answers(staff_client, generated_run):
    run_url = f"/api/v1/training/runs/{generated_run.pk}"
    assert post(staff_client, f"{run_url}/proceed").status_code == 409
    response = post(staff_client, f"{run_url}/train")
    assert response.status_code == 422 and "Approve more pairs" in response.json()["message"]
    pairs = staff_client.get(f"{run_url}/pairs", {"limit": 3}).json()
    assert len(pairs) == 3 and pairs[0]["query"] and pairs[0]["chunk_text"]
    reviewed = post(staff_client, f"{run_url}/pairs/review", {"decision": "rejected", "pair_ids": [p["id"] for p in pairs]})
    assert reviewed.json()["updated"] == 3 and reviewed.json()["review_counts"]["rejected"] == 3
    everything = post(staff_client, f"{run_url}/pairs/review", {"decision": "approved"}).json()
    assert everything["review_counts"]["pending"] == 0
    response = post(staff_client, f"{run_url}/train", {"epochs": 2})
    assert response.status_code == 200 and response.json()["status"] == "training"
    texts = generated_run.corpus.chunks.count() + everything["review_counts"]["approved"]
    assert response.json()["progress"] == f"Embedding 0 of {texts:,} texts"
    assert staff_client.delete(run_url).status_code == 409
    assert staff_client.get(f"{run_url}/search", {"query": "brakes"}).status_code == 422


def test_bad_input_is_4xx_with_a_sentence(staff_client, small_corpus):
    assert post(staff_client, "/api/v1/training/runs", {"corpus_id": 999}).status_code == 404
    response = post(staff_client, "/api/v1/training/runs", {"corpus_id": small_corpus.pk, "queries_per_chunk": 0})
    assert response.status_code == 422 and "queries_per_chunk" in response.json()["message"]
    response = post(staff_client, "/api/v1/training/runs", {"corpus_id": small_corpus.pk, "generator": "gpt5"})
    assert response.status_code == 422
    assert staff_client.get("/api/v1/training/runs/999").status_code == 404
    response = post(staff_client, "/api/v1/training/corpora", {"name": "x", "path": "/etc"})
    assert response.status_code == 422 and "outside the allowed directories" in response.json()["message"]
    response = post(staff_client, "/api/v1/training/corpora", {"name": "../evil", "path": "corpora-src"})
    assert response.status_code == 422 and "corpus name" in response.json()["message"]


def test_upload_makes_a_corpus_and_refuses_other_files(staff_client, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    text = "\n\n".join(f"Paragraph {i} talks about harbour cranes and tide tables." for i in range(30))
    ok = staff_client.post("/api/v1/training/corpora/upload", {
        "name": "uploaded", "chunk_size": 200, "files": [SimpleUploadedFile("notes.md", text.encode())],
    })
    assert ok.status_code == 201, ok.content
    assert ok.json()["num_chunks"] > 5 and ok.json()["num_documents"] == 1
    bad = staff_client.post("/api/v1/training/corpora/upload", {
        "name": "bad", "files": [SimpleUploadedFile("image.png", b"\x89PNG")],
    })
    assert bad.status_code == 422 and "upload .txt, .md or .jsonl files only" in bad.json()["message"]
    binary = staff_client.post("/api/v1/training/corpora/upload", {
        "name": "binary", "files": [SimpleUploadedFile("notes.txt", b"\xff\xfe\x00bad")],
    })
    assert binary.status_code == 422 and "not valid UTF-8" in binary.json()["message"]


def test_non_staff_cannot_generate_or_remove(client, plain_user, small_corpus):
    client.force_login(plain_user)
    assert client.get("/api/v1/training/runs").status_code == 200
    assert post(client, "/api/v1/training/runs", {"corpus_id": small_corpus.pk}).status_code == 403
    assert client.delete("/api/v1/training/runs/1").status_code == 403


def test_stop_answers_the_run_and_409_once_it_is_no_longer_running(staff_client, small_corpus, fast_machinery):
    started = post(staff_client, "/api/v1/training/runs", {"corpus_id": small_corpus.pk}).json()
    response = post(staff_client, f"/api/v1/training/runs/{started['id']}/stop")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "generating_failed" and body["error_type"] == "CANCELLED"
    assert body["next_step"].startswith("Stopped on request: Proceed continues")
    again = post(staff_client, f"/api/v1/training/runs/{started['id']}/stop")
    assert again.status_code == 409
    assert again.json()["message"].endswith("only a generating or training run can be stopped.")
    assert post(staff_client, "/api/v1/training/runs/999999/stop").status_code == 404


def test_a_run_reads_embedding_progress_then_epochs(staff_client, small_corpus):
    run = TrainingRun.objects.create(corpus=small_corpus, status="training", epochs=8, texts_total=1479,
                                     texts_embedded=480, worker="host:1")
    body = staff_client.get(f"/api/v1/training/runs/{run.pk}").json()
    assert body["progress"] == "Embedding 480 of 1,479 texts"
    assert (body["progress_done"], body["progress_total"]) == (480, 1479)
    assert (body["texts_embedded"], body["texts_total"], body["epochs_done"]) == (480, 1479, 0)

    TrainingRun.objects.filter(pk=run.pk).update(texts_embedded=1479, epochs_done=3)
    body = staff_client.get(f"/api/v1/training/runs/{run.pk}").json()
    assert body["progress"] == "3 of 8 epochs"
    assert (body["progress_done"], body["progress_total"]) == (3, 8)
