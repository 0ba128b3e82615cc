import json

import pytest

from extraction.models import Extraction

pytestmark = pytest.mark.django_db


def post(client, url, body=None):
    return client.post(url, data=json.dumps(body) if body is not None else "", content_type="application/json")


def start_url(model):
    return f"/api/v1/models/{model.pk}/extractions"


def body(dataset, **overrides):
    return {"dataset_id": dataset.pk, "layers": [0, 1], "hooks": ["residual", "mlp"], "batch_size": 8, **overrides}


def test_anonymous_reader_gets_401_with_a_sentence(client, fake_model):
    response = client.get(start_url(fake_model))
    assert response.status_code == 401
    assert "Log in" in response.json()["message"]


def test_non_staff_user_can_read_but_not_start(client, plain_user, fake_model, fake_dataset):
    client.force_login(plain_user)
    assert client.get(start_url(fake_model)).status_code == 200
    response = post(client, start_url(fake_model), body(fake_dataset))
    assert response.status_code == 403
    assert response.json()["message"].startswith("You may view jobs but not start extractions")
    assert Extraction.objects.count() == 0


@pytest.mark.parametrize("batch_size", [0, 3, 1024, "8", 8.5, True])
def test_invalid_batch_size_is_422_naming_the_valid_sizes(staff_client, fake_model, fake_dataset, batch_size):
    response = post(staff_client, start_url(fake_model), body(fake_dataset, batch_size=batch_size))
    assert response.status_code == 422
    assert "1, 2, 4, 8, 16, 32, 64, 128, 256, 512" in response.json()["message"]
    assert Extraction.objects.count() == 0


@pytest.mark.parametrize(
    ("overrides", "sentence"),
    [
        ({"layers": [9]}, "Layer 9 does not exist: fake has layers 0-3."),
        ({"layers": []}, "layers"),
        ({"hooks": ["logits"]}, "Hook 'logits' is unknown"),
        ({"hooks": ["blocks.9.hook_mlp_out"]}, "blocks.9.hook_mlp_out names layer 9, which does not exist: fake has "
                                               "layers 0-3."),
        ({"hooks": ["blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"], "layers": []},
         "These names ask for different hook points at different layers, and one extraction takes every hook point "
         "at every layer it has: ask for layers 1, 2 with mlp, attention (4 files), or start one extraction per "
         "layer."),
        ({"hooks": ["blocks.1.hook_mlp_out"], "layers": [0]}, "Layer 0 has no hook point: choose one for it, or leave "
                                                             "the layers out when every hook names its layer"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_samples": 10**9}, "Max samples must be between 1 and 100"),
        ({"max_length": -5}, "max_length"),
        ({"storage_dtype": "int8"}, "storage_dtype"),
        # JSON types are taken as sent, never converted into something the client did not mean.
        ({"layers": [True]}, "item 1 of layers must be a whole number."),
        ({"auto_retry_on_oom": "yes"}, "auto_retry_on_oom must be true or false, not 'yes'."),
        ({"dataset_id": "1"}, "dataset_id must be a whole number, not '1'."),
        ({"batch_size": None}, "(a JSON number, not null)."),
    ],
)
def test_bad_parameters_are_422_with_a_sentence_and_the_field(staff_client, fake_model, fake_dataset, overrides,
                                                               sentence):
    response = post(staff_client, start_url(fake_model), body(fake_dataset, **overrides))
    assert response.status_code == 422
    assert sentence in response.json()["message"]
    assert response.json()["field"] == next(iter(overrides)), "a client can show the sentence beside its input"


@pytest.mark.parametrize(("asked", "layers", "hooks"), [
    ({"layers": [0, 2], "hooks": ["hook_resid_post", "hook_attn_out"]}, [0, 2], ["residual", "attention"]),
    ({"hooks": ["blocks.1.hook_mlp_out"]}, [1], ["mlp"]),
    ({"hooks": ["blocks.3.hook_mlp_out", "blocks.3.hook_resid_post"]}, [3], ["residual", "mlp"]),
    ({"layers": [1], "hooks": ["resid_post", "blocks.1.hook_mlp_out"]}, [1], ["residual", "mlp"]),
])
def test_transformerlens_names_start_the_hook_points_and_layers_they_name(staff_client, fake_model, fake_dataset,
                                                                         asked, layers, hooks):
    payload = {key: value for key, value in body(fake_dataset).items() if key not in ("layers", "hooks")}
    response = post(staff_client, start_url(fake_model), {**payload, **asked})
    assert response.status_code == 201, response.json()
    job = Extraction.objects.get()
    assert (job.layers, job.hooks) == (layers, hooks) == (response.json()["layers"], response.json()["hooks"])


def test_a_model_lists_each_hook_point_with_its_definition_width_and_why_others_are_not(staff_client, model_record):
    answer = staff_client.get(f"/api/v1/models/{model_record.pk}").json()
    assert answer["family"] == "gpt2" and answer["supported_hooks"] == [
        "residual", "mlp", "attention", "resid_pre", "resid_mid", "mlp_hidden"]
    assert answer["hook_points"]["mlp_hidden"] == {
        "definition": "the MLP's neurons after the activation: the down projection's input (dense MLPs only)",
        "width": 128, "transformerlens": "mlp.hook_post"}
    assert answer["hook_points"]["residual"]["width"] == 32 and answer["hook_refusals"] == {}
    assert staff_client.get("/api/v1/models").json()[0]["hook_points"] == answer["hook_points"]
    missing = staff_client.get("/api/v1/models/999")
    assert missing.status_code == 404 and missing.json()["message"] == (
        "Model 999 does not exist; GET /api/v1/models lists them.")


def test_malformed_json_and_an_empty_body_are_4xx_with_a_sentence(staff_client, fake_model):
    response = staff_client.post(start_url(fake_model), data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["message"] == ("The request body is not JSON: send a JSON object, e.g. {...}, with "
                                          "Content-Type: application/json.")
    response = post(staff_client, start_url(fake_model))
    assert response.status_code == 422
    assert response.json()["message"] == "The request needs a JSON object as its body, e.g. {...}; see /api/v1/docs."
    assert Extraction.objects.count() == 0


def test_unknown_model_and_dataset_are_404_with_a_sentence(staff_client, fake_model, fake_dataset):
    response = post(staff_client, "/api/v1/models/999/extractions", body(fake_dataset))
    assert response.status_code == 404 and "Model 999 does not exist" in response.json()["message"]
    response = post(staff_client, start_url(fake_model), body(fake_dataset, dataset_id=999))
    assert response.status_code == 404 and "Dataset 999 does not exist" in response.json()["message"]


def test_identical_active_request_returns_the_existing_job(staff_client, fake_model, fake_dataset):
    first = post(staff_client, start_url(fake_model), body(fake_dataset))
    again = post(staff_client, start_url(fake_model), body(fake_dataset, batch_size=4))
    other = post(staff_client, start_url(fake_model), body(fake_dataset, layers=[2]))
    assert first.status_code == 201 and again.status_code == 200 and other.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert other.json()["id"] != first.json()["id"]
    assert first.json()["message"] == f"Extraction {first.json()['id']} is queued."
    # What it asked for and does not get is said, not dropped in silence.
    assert again.json()["batch_size"] == 8
    assert again.json()["message"].endswith(
        "It keeps its batch size 8, not 4. No second copy was started.")
    assert Extraction.objects.count() == 2


def test_list_filters_by_status_and_detail_shows_progress(staff_client, make_extraction, fake_model):
    queued = make_extraction("queued")
    failed = make_extraction("failed", error_type="OOM", error_message="CUDA out of memory.",
                             suggested_retry_params={"batch_size": 4})
    listing = staff_client.get(start_url(fake_model), {"status": "failed"}).json()
    assert [row["id"] for row in listing] == [failed.pk]
    detail = staff_client.get(f"{start_url(fake_model)}/{failed.pk}").json()
    assert detail["error_type"] == "OOM" and detail["suggested_retry_params"] == {"batch_size": 4}
    assert detail["retry_available"] is True and detail["cancel_available"] is False
    assert staff_client.get(f"{start_url(fake_model)}/{queued.pk}").json()["cancel_available"] is True
    assert staff_client.get(start_url(fake_model), {"status": "bogus"}).status_code == 422


def test_cancel_queued_extraction(staff_client, make_extraction, fake_model):
    job = make_extraction("queued")
    response = post(staff_client, f"{start_url(fake_model)}/{job.pk}/cancel")
    assert response.status_code == 200
    assert response.json() == {"extraction_id": job.pk, "status": "cancelled", "message": f"Extraction {job.pk} is cancelled."}
    job.refresh_from_db()
    assert job.status == "cancelled"


@pytest.mark.parametrize("status", ["completed", "cancelled", "failed"])
def test_cancel_of_a_finished_extraction_is_409_with_a_sentence(staff_client, make_extraction, fake_model, status):
    job = make_extraction(status)
    response = post(staff_client, f"{start_url(fake_model)}/{job.pk}/cancel")
    assert response.status_code == 409
    assert f"is {status}; only a queued or running extraction can be cancelled" in response.json()["message"]


def test_retry_with_new_batch_size_creates_a_linked_extraction(staff_client, make_extraction, fake_model):
    failed = make_extraction("failed", batch_size=8, error_type="OOM", error_message="CUDA out of memory.")
    response = post(staff_client, f"{start_url(fake_model)}/{failed.pk}/retry", {"batch_size": 4})
    assert response.status_code == 201
    retry = response.json()
    assert retry["original_extraction_id"] == failed.pk
    assert retry["batch_size"] == 4 and retry["retry_count"] == 1 and retry["status"] == "queued"
    assert "OOM" in retry["retry_reason"]


def test_retry_without_body_keeps_parameters(staff_client, make_extraction, fake_model):
    cancelled = make_extraction("cancelled", batch_size=16)
    response = post(staff_client, f"{start_url(fake_model)}/{cancelled.pk}/retry")
    assert response.status_code == 201 and response.json()["batch_size"] == 16


@pytest.mark.parametrize("status", ["queued", "extracting", "completed"])
def test_retry_of_a_job_that_did_not_fail_is_409(staff_client, make_extraction, fake_model, status):
    job = make_extraction(status)
    response = post(staff_client, f"{start_url(fake_model)}/{job.pk}/retry", {"batch_size": 4})
    assert response.status_code == 409
    assert "only a failed or cancelled extraction can be retried" in response.json()["message"]


def test_retry_with_invalid_batch_size_is_422(staff_client, make_extraction, fake_model):
    job = make_extraction("failed")
    response = post(staff_client, f"{start_url(fake_model)}/{job.pk}/retry", {"batch_size": 3})
    assert response.status_code == 422 and "1, 2, 4" in response.json()["message"]


@pytest.mark.parametrize("path", ["../../etc", "/etc", "/tmp"])
def test_model_path_outside_the_roots_is_refused(staff_client, path):
    response = post(staff_client, "/api/v1/models", {"path": path})
    assert response.status_code == 422
    assert "outside the allowed directories" in response.json()["message"]


def test_model_symlink_pointing_outside_the_roots_is_refused(staff_client, settings, tmp_path):
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (settings.JOBSITE_MODEL_ROOTS[0] / "sneaky").symlink_to(outside)
    response = post(staff_client, "/api/v1/models", {"path": str(settings.JOBSITE_MODEL_ROOTS[0] / "sneaky")})
    assert response.status_code == 422 and "outside the allowed directories" in response.json()["message"]


def test_openapi_docs_are_served_without_the_internet(staff_client):
    from django.contrib.staticfiles import finders

    assert staff_client.get("/api/docs").status_code == 302
    schema = staff_client.get("/api/v1/openapi.json")
    assert schema.status_code == 200
    assert "/api/v1/models/{model_id}/extractions/{extraction_id}/retry" in schema.json()["paths"]
    # The Swagger UI comes from this server's static files: nothing is fetched from a CDN.
    page = staff_client.get("/api/v1/docs").content.decode()
    assert "cdn." not in page and "/static/ninja/swagger-ui-bundle.js" in page
    assert finders.find("ninja/swagger-ui-bundle.js")


@pytest.mark.parametrize("path", ["/api/v1/nothing", "/api/v1/models/1/nothing", "/api/v1/training/runs/1/x/y",
                                  "/api/v1/"])
def test_an_unknown_api_path_is_a_json_404_with_a_sentence(staff_client, path):
    response = staff_client.get(path)
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert response.json()["message"] == f"No API endpoint at {path}; the endpoints are listed at /api/v1/docs."


def test_a_method_an_endpoint_does_not_take_is_a_json_405_naming_the_ones_it_does(staff_client):
    response = staff_client.put("/api/v1/models")
    assert response.status_code == 405 and response["Content-Type"] == "application/json"
    assert set(response["Allow"].split(", ")) == {"GET", "POST"}
    assert response.json()["message"] == f"PUT is not allowed on /api/v1/models; it takes {response['Allow']}."
    assert staff_client.get("/api/v1/models/1/extractions/1/cancel").json()["message"].startswith("GET is not allowed")


def test_pages_keep_their_html_404(staff_client):
    response = staff_client.get("/extractions/99999/card/")
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")


def test_a_bad_query_parameter_is_named_in_the_sentence(staff_client):
    response = staff_client.get("/api/v1/training/runs/1/search", {"query": "", "k": 0})
    assert response.status_code == 422
    message = response.json()["message"]
    assert message == "query needs at least 1 character; k must be at least 1, not '0'."


@pytest.mark.parametrize(("change", "message"), [
    ({"layers": "0,2"}, "layers must be a list, e.g. [0, 2], not '0,2'."),
    ({"layers": []}, "Choose at least one layer: fake has layers 0-3 (or name it in each hook, e.g. "
                     "blocks.0.hook_mlp_out)."),
    ({"layers": [0, "a"]}, "item 2 of layers must be a whole number, not 'a'."),
    ({"hooks": ["logits"]}, "Hook 'logits' is unknown; choose from residual, mlp, attention, resid_pre, resid_mid, "
                            "mlp_hidden (or TransformerLens's names: hook_resid_pre, hook_resid_mid, hook_resid_post, "
                            "hook_attn_out, hook_mlp_out, mlp.hook_post, and blocks.N.hook_mlp_out for layer N)."),
    ({"max_samples": 0}, "max_samples must be greater than 0, not 0."),
    ({"auto_retry_on_oom": "maybe"}, "auto_retry_on_oom must be true or false, not 'maybe'."),
])
def test_a_malformed_start_body_is_answered_in_sentences_a_person_reads(staff_client, fake_model, fake_dataset,
                                                                        change, message):
    response = post(staff_client, start_url(fake_model), {**body(fake_dataset), **change})
    assert response.status_code == 422
    assert response.json()["message"] == message and response.json()["field"] == next(iter(change))


def test_resume_of_a_live_job_is_409_and_of_a_stalled_one_requeues(staff_client, make_extraction, fake_model, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.JOBSITE_STALL_AFTER_S = 5
    stale = timezone.now() - timedelta(seconds=60)
    stalled = make_extraction("extracting", heartbeat_at=stale, started_at=stale, worker="w:1")
    live = make_extraction("extracting", heartbeat_at=timezone.now(), started_at=stale, worker="w:2")
    # The answer says which is which: a client need not work out a heartbeat's age itself.
    shown = {job["id"]: job for job in staff_client.get(start_url(fake_model)).json()}
    assert shown[stalled.pk]["is_stalled"] is True and shown[stalled.pk]["heartbeat_age_s"] >= 60
    assert shown[live.pk]["is_stalled"] is False and shown[live.pk]["heartbeat_age_s"] < 5
    response = post(staff_client, f"{start_url(fake_model)}/{live.pk}/resume")
    assert response.status_code == 409 and "only a stalled extraction can be resumed" in response.json()["message"]
    response = post(staff_client, f"{start_url(fake_model)}/{stalled.pk}/resume")
    assert response.status_code == 200 and response.json()["status"] == "queued"


@pytest.mark.parametrize("path", ["bad\x00path", "x" * 5000, ""])
def test_unusable_model_paths_are_422_not_500(staff_client, path):
    response = post(staff_client, "/api/v1/models", {"path": path})
    assert response.status_code == 422 and "path" in response.json()["message"]


def test_starting_an_identical_failed_request_again_points_to_its_retry(staff_client, fake_model, fake_dataset):
    first = post(staff_client, start_url(fake_model), body(fake_dataset)).json()
    job = Extraction.objects.get(pk=first["id"])
    job.status, job.error_type, job.error_message = "failed", "OOM", "CUDA out of memory."
    job.suggested_retry_params, job.finished_at = {"batch_size": 4}, job.created_at
    job.save()
    again = post(staff_client, start_url(fake_model), body(fake_dataset))
    assert again.status_code == 409
    assert again.json()["message"] == (
        f"An identical extraction ({job.pk}) failed (OOM: CUDA out of memory.); "
        "retry it with {'batch_size': 4} instead of starting it again."
    )
    assert Extraction.objects.count() == 1
    retry = post(staff_client, f"{start_url(fake_model)}/{job.pk}/retry", {"batch_size": 4})
    assert retry.status_code == 201


def test_an_unknown_field_is_422_naming_it_and_starts_nothing(staff_client, fake_model, fake_dataset):
    response = post(staff_client, start_url(fake_model), body(fake_dataset, dtype="int8"))
    assert response.status_code == 422
    assert response.json()["message"] == (
        "Unknown field 'dtype'; the fields are dataset_id, layers, hooks, batch_size, max_samples, max_length, "
        "storage_dtype, auto_retry_on_oom and shards."
    )
    assert response.json()["field"] == "dtype"
    assert Extraction.objects.count() == 0


def test_a_misspelled_required_field_is_named_before_the_missing_one(staff_client, fake_model, fake_dataset):
    request = body(fake_dataset)
    request["dataset"] = request.pop("dataset_id")
    response = post(staff_client, start_url(fake_model), request)
    assert response.status_code == 422 and response.json()["field"] == "dataset"
    assert response.json()["message"].startswith("Unknown field 'dataset'; the fields are dataset_id, ")
    assert response.json()["message"].endswith("; dataset_id is required.")


def test_a_retry_with_an_unknown_field_is_422_and_retries_nothing(staff_client, make_extraction, fake_model):
    failed = make_extraction("failed", error_type="OOM")
    response = post(staff_client, f"{start_url(fake_model)}/{failed.pk}/retry", {"batch_sise": 4})
    assert response.status_code == 422 and response.json()["field"] == "batch_sise"
    assert response.json()["message"] == (
        "Unknown field 'batch_sise'; the fields are batch_size, max_samples, max_length, shards and reason.")
    assert Extraction.objects.count() == 1


def test_a_retry_reason_too_long_is_422_naming_the_reason(staff_client, make_extraction, fake_model):
    failed = make_extraction("failed", error_type="OOM")
    response = post(staff_client, f"{start_url(fake_model)}/{failed.pk}/retry", {"reason": "x" * 100_000})
    assert response.status_code == 422
    assert response.json() == {"message": "The retry reason is 100,000 characters long; the most is 500.",
                               "field": "reason"}
    assert Extraction.objects.count() == 1


@pytest.fixture
def cancelled_of_2000(make_extraction, fake_dataset):
    """Cancelled after it was started with max_samples 2000 on a dataset of 3,000."""
    fake_dataset.num_samples = 3000
    fake_dataset.save()
    return make_extraction("cancelled", max_samples=2000, total_samples=2000)


@pytest.mark.parametrize("retry_body, max_samples, total", [
    ({"max_samples": None}, None, 3000),
    ({}, 2000, 2000),
    ({"batch_size": 4}, 2000, 2000),
    ({"max_samples": 100}, 100, 100),
])
def test_retry_max_samples_null_means_all_and_omitted_keeps_the_originals(
    staff_client, fake_model, cancelled_of_2000, django_capture_on_commit_callbacks, retry_body, max_samples, total
):
    with django_capture_on_commit_callbacks(execute=False):
        response = post(staff_client, f"{start_url(fake_model)}/{cancelled_of_2000.pk}/retry", retry_body)
    assert response.status_code == 201, response.json()
    assert (response.json()["max_samples"], response.json()["total_samples"]) == (max_samples, total)


def test_an_extraction_is_read_by_its_number_alone_whichever_model_it_belongs_to(staff_client, make_extraction):
    extraction = make_extraction("failed", error_type="OOM", error_message="CUDA out of memory.")
    response = staff_client.get(f"/api/v1/extractions/{extraction.pk}")
    assert response.status_code == 200
    assert (response.json()["id"], response.json()["status"]) == (extraction.pk, "failed")
    missing = staff_client.get("/api/v1/extractions/999999")
    assert missing.status_code == 404 and missing.json()["message"].startswith("Extraction 999999 does not exist")


def test_a_start_with_several_problems_names_each_and_the_first_field(staff_client, fake_model, fake_dataset):
    fake_model.max_positions = 1024
    fake_model.save()
    response = post(staff_client, start_url(fake_model), body(fake_dataset, layers=[7], batch_size=3,
                                                              max_length=5000))
    assert response.status_code == 422
    assert response.json() == {
        "message": "Layer 7 does not exist: fake has layers 0-3. The batch size must be one of 1, 2, 4, 8, 16, 32, "
                   "64, 128, 256, 512; got 3. Max length 5,000 is beyond fake's position limit: it reads at most "
                   "1,024 tokens.",
        "field": "layers"}
    assert Extraction.objects.count() == 0


def test_the_storage_dtype_has_one_name(staff_client, fake_model, fake_dataset):
    response = post(staff_client, start_url(fake_model), body(fake_dataset, dtype="float16"))
    assert response.status_code == 422 and response.json()["field"] == "dtype"
    assert response.json()["message"].startswith("Unknown field 'dtype'; the fields are") and (
        "storage_dtype" in response.json()["message"])
    response = post(staff_client, start_url(fake_model), body(fake_dataset, storage_dtype="int8"))
    assert response.status_code == 422 and response.json()["field"] == "storage_dtype"


def test_dismiss_moves_a_failed_job_into_the_history_and_refuses_a_running_one(
        staff_client, make_extraction, django_capture_on_commit_callbacks):
    from jobsite.models import Event

    failed, running = make_extraction("failed", error_type="OOM"), make_extraction("extracting")
    with django_capture_on_commit_callbacks(execute=True):
        response = post(staff_client, f"/api/v1/extractions/{failed.pk}/dismiss")
    assert response.status_code == 200
    answer = response.json()
    assert answer["dismissed_by"] == "staff" and answer["dismissed_at"] and answer["status"] == "failed"
    assert Event.objects.filter(topic=failed.topic, type="extraction.dismissed").count() == 1
    again = post(staff_client, f"/api/v1/extractions/{failed.pk}/dismiss")
    assert again.status_code == 200 and again.json()["dismissed_at"] == answer["dismissed_at"]
    refused = post(staff_client, f"/api/v1/extractions/{running.pk}/dismiss")
    assert refused.status_code == 409 and refused.json()["message"] == (
        f"Extraction {running.pk} is extracting; only a failed or cancelled extraction can be dismissed (cancel it "
        "first).")
    assert post(staff_client, "/api/v1/extractions/999999/dismiss").status_code == 404


def test_a_viewer_cannot_dismiss(client, viewer_user, make_extraction):
    failed = make_extraction("failed", error_type="OOM")
    client.force_login(viewer_user)
    response = post(client, f"/api/v1/extractions/{failed.pk}/dismiss")
    assert response.status_code == 403 and "dismiss extractions" in response.json()["message"]
    assert Extraction.objects.get(pk=failed.pk).dismissed_at is None


def test_the_list_of_extractions_pages_with_totals_and_filters(staff_client, make_extraction, fake_model):
    jobs = [make_extraction("completed") for _ in range(5)] + [make_extraction("failed", error_type="OOM")]
    newest = [job.pk for job in reversed(jobs)]
    answer = staff_client.get("/api/v1/extractions", {"limit": 4}).json()
    assert [row["id"] for row in answer["items"]] == newest[:4]
    assert {key: answer[key] for key in ("count", "page", "pages", "limit")} == {
        "count": 6, "page": 1, "pages": 2, "limit": 4}
    second = staff_client.get("/api/v1/extractions", {"limit": 4, "page": 2}).json()
    assert [row["id"] for row in second["items"]] == newest[4:]
    assert staff_client.get("/api/v1/extractions").json()["limit"] == 20
    for model in (fake_model.name, fake_model.pk):
        failed = staff_client.get("/api/v1/extractions", {"status": "failed", "model": model}).json()
        assert [row["id"] for row in failed["items"]] == [jobs[-1].pk] and failed["count"] == 1
    # The model's own list stays a list (its clients read one), and pages the same way when asked.
    whole = staff_client.get(start_url(fake_model))
    assert [row["id"] for row in whole.json()] == newest and whole["X-Total-Count"] == "6"
    paged = staff_client.get(start_url(fake_model), {"page": 2, "limit": 4})
    assert [row["id"] for row in paged.json()] == newest[4:] and paged["X-Page-Count"] == "2"


def test_a_model_filter_by_number_is_that_model_even_when_another_is_named_so(staff_client, make_extraction,
                                                                              fake_model):
    from extraction.models import ModelRecord

    named_like_a_number = ModelRecord.objects.create(
        name=str(fake_model.pk), path="/models/other", architecture="GPT2LMHeadModel", model_type="gpt2",
        num_layers=4, hidden_size=32, vocab_size=300, supported_hooks=["residual"])
    mine = make_extraction("completed")
    Extraction.objects.create(model=named_like_a_number, dataset=mine.dataset, layers=[0], hooks=["residual"],
                              fingerprint="other", status="queued")
    answer = staff_client.get("/api/v1/extractions", {"model": str(fake_model.pk)}).json()
    assert [row["id"] for row in answer["items"]] == [mine.pk]
    paged = staff_client.get(start_url(fake_model), {"page": 1}).json()
    assert [row["id"] for row in paged] == [mine.pk]


def test_a_nul_in_the_model_filter_is_a_sentence_not_a_server_error(staff_client, make_extraction):
    response = staff_client.get("/api/v1/extractions", {"model": "gpt\x002"})
    assert response.status_code == 422 and response.json()["field"] == "model"
    page = staff_client.get("/extractions/history/", {"model": "gpt\x002"})
    assert page.status_code == 400


@pytest.mark.parametrize(("query", "status", "message"), [
    ({"limit": 500}, 422, "limit must be at most 100, not '500'."),
    ({"limit": 0}, 422, "limit must be at least 1, not '0'."),
    ({"page": 0}, 422, "page must be at least 1, not '0'."),
    ({"page": 3}, 404, "Page 3 does not exist: 1 extraction make 1 page of 20."),
    ({"model": "nope"}, 422, "No model named or numbered 'nope' is registered; GET /api/v1/models lists them."),
    ({"status": "lost"}, 422, "status must be"),
])
def test_a_page_past_the_end_or_beyond_the_limit_is_refused_with_a_sentence(staff_client, make_extraction, query,
                                                                             status, message):
    make_extraction("completed")
    response = staff_client.get("/api/v1/extractions", query)
    assert response.status_code == status
    assert response.json()["message"].startswith(message)


def test_a_retry_keeps_the_number_of_its_deleted_original(staff_client, make_extraction):
    from extraction.services import extraction_delete

    original = make_extraction("failed", error_type="OOM")
    retry = make_extraction("queued", original_extraction=original, retry_count=1)
    assert staff_client.get(f"/api/v1/extractions/{retry.pk}").json()["original_deleted"] is False
    extraction_delete(extraction=original)
    answer = staff_client.get(f"/api/v1/extractions/{retry.pk}").json()
    assert (answer["original_extraction_id"], answer["original_deleted"]) == (original.pk, True)
    listed = staff_client.get("/api/v1/extractions").json()["items"]
    assert [(row["id"], row["original_extraction_id"], row["original_deleted"]) for row in listed] == [
        (retry.pk, original.pk, True)]
