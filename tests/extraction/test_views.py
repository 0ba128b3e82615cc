"""The extractions pages through Django's test client: access, forms, actions, files."""

import json
import os
import re
from datetime import timedelta
from html import unescape as html_unescape

import numpy as np
import pytest
from django.utils import timezone

from extraction.models import Dataset, Extraction, ModelRecord
from jobsite.models import Event
from tests.conftest import write_dataset

pytestmark = pytest.mark.django_db

PAGE = "/extractions/"


def start_data(model_record, dataset_record, **overrides):
    data = {
        "model": model_record.pk, "dataset": dataset_record.pk, "layers": "0,1", "hooks": ["residual", "mlp"], "batch_size": "8",
        "max_samples": "", "max_length": "512", "storage_dtype": "float32",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] if response.context else []


def failed_oom(make_extraction, **fields):
    return make_extraction(
        "failed", error_type="OOM", error_message="CUDA out of memory. Tried to allocate 2.00 GiB",
        suggested_retry_params={"batch_size": 4}, batch_size=8, samples_processed=12, total_samples=100, attempt=1,
        **fields,
    )


# -- access --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/", PAGE, "/extractions/active/", "/extractions/history/", "/extractions/1/card/",
                                 "/extractions/1/files/", "/extractions/1/files/metadata.json"])
def test_pages_redirect_an_anonymous_visitor_to_the_login_page(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_root_redirects_to_the_extractions_page(staff_client):
    response = staff_client.get("/")
    assert response.status_code == 302 and response["Location"] == PAGE


def test_a_user_who_is_not_staff_logs_in_on_the_pages_own_login(client, plain_user):
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and b"Log in" in page.content
    response = client.post("/accounts/login/", {"username": "reader", "password": "pw", "next": PAGE})
    assert response.status_code == 302 and response["Location"] == PAGE
    assert client.get(PAGE).status_code == 200


def test_reader_sees_the_page_with_actions_disabled_and_a_sentence(client, plain_user, fake_model, fake_dataset,
                                                                     make_extraction):
    failed_oom(make_extraction)
    client.force_login(plain_user)
    html = client.get(PAGE).content.decode()
    assert "group (and superusers) can start, cancel or retry jobs, or add models, datasets and corpora" in html
    assert 'class="start-form"' not in html, "the start form is replaced by the sentence"
    assert "Retry (with suggested params)" not in html
    assert "Read only: ask an administrator" in html
    assert "/extractions/register/" not in html
    assert 'href="/admin/"' not in html, "a link that would only answer 'not authorized'"


@pytest.mark.parametrize("path", ["", "{id}/cancel/", "{id}/retry/", "{id}/retry-suggested/", "{id}/resume/",
                                  "{id}/restart/", "register/"])
def test_a_user_who_is_not_staff_cannot_post_any_action(client, plain_user, make_extraction, fake_model, fake_dataset,
                                                         path):
    job = failed_oom(make_extraction)
    client.force_login(plain_user)
    data = {**start_data(fake_model, fake_dataset), "confirmed": "1", "kind": "dataset", "dataset-path": "x.txt"}
    response = client.post(PAGE + path.format(id=job.pk), data)
    assert response.status_code == 403
    assert b"You may view jobs but not" in response.content
    assert Extraction.objects.count() == 1
    assert Dataset.objects.count() == 1
    assert Extraction.objects.get().status == "failed"


# -- start form ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "field", "sentence"),
    [
        ({"layers": "abc"}, "layers", "Write layers as numbers"),
        ({"layers": ""}, "layers", "Choose at least one layer, e.g. 0 or 0,2."),
        ({"layers": "3-1"}, "layers", "runs backwards"),
        ({"layers": "9"}, "layers", "Layer 9 does not exist: fake has layers 0-3."),
        ({"layers": "99999999999999999999"}, "layers", "Layer 99999999999999999999 does not exist: fake has layers 0-3."),
        ({"layers": "0-99999"}, "layers", "The range 0-99999 is longer than any model's layers."),
        ({"layers": "\u0663"}, "layers", "Write layers as numbers"),
        ({"hooks": []}, "hooks", "Choose at least one hook point."),
        ({"hooks": ["logits"]}, "hooks", "Select a valid choice"),
        ({"batch_size": "3"}, "batch_size", "Select a valid choice"),
        ({"batch_size": "eight"}, "batch_size", "Select a valid choice"),
        ({"max_samples": "0"}, "max_samples", "greater than or equal to 1"),
        ({"max_samples": "1000000"}, "max_samples", "Max samples must be between 1 and 100"),
        ({"max_length": "-5"}, "max_length", "greater than or equal to 1"),
        ({"max_length": "ten"}, "max_length", "Enter a whole number"),
        ({"storage_dtype": "int8"}, "storage_dtype", "Select a valid choice"),
        ({"model": "999"}, "model", "Select a valid choice"),
        ({"model": "x' OR 1=1"}, "model", "Select a valid choice"),
        ({"dataset": ""}, "dataset", "This field is required"),
    ],
)
def test_bad_start_input_shows_the_error_on_its_field(staff_client, fake_model, fake_dataset, overrides, field,
                                                      sentence):
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, **overrides))
    assert response.status_code == 400
    form = response.context["form"]
    assert any(sentence in error for error in form.errors[field]), form.errors
    assert sentence.split("'")[0] in response.content.decode().replace("&#x27;", "'")
    assert Extraction.objects.count() == 0


def test_hook_points_are_started_by_transformerlens_names_too(staff_client, fake_model, fake_dataset,
                                                             django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        staff_client.post(PAGE, start_data(fake_model, fake_dataset, layers="", hooks=[],
                                           hook_names="blocks.3.hook_attn_out, blocks.3.hook_resid_post"))
    assert (Extraction.objects.get().layers, Extraction.objects.get().hooks) == ([3], ["residual", "attention"])
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, hooks=["mlp"], hook_names="hook_logits"))
    assert response.status_code == 400 and "Hook 'hook_logits' is unknown" in " ".join(
        response.context["form"].errors["hooks"])


def test_a_model_without_a_hook_point_is_a_field_error_naming_what_it_supports(staff_client, fake_model,
                                                                               fake_dataset):
    fake_model.supported_hooks = ["residual"]
    fake_model.hook_refusals = {"mlp": "'bert' is not a family jobsite knows"}
    fake_model.save()
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, hooks=["mlp"]))
    assert response.status_code == 400
    assert " ".join(response.context["form"].errors["hooks"]) == (
        "Hook point mlp is not available for fake (GPT2LMHeadModel): 'bert' is not a family jobsite knows. "
        "Choose from residual.")


def test_start_queues_one_extraction_and_the_identical_request_shows_the_existing_one(
    staff_client, fake_model, fake_dataset, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        first = staff_client.post(PAGE, start_data(fake_model, fake_dataset, max_samples="20"), follow=True)
    job = Extraction.objects.get()
    assert first.redirect_chain[-1][0] == f"{PAGE}?job={job.pk}#extraction-{job.pk}"
    assert f"Extraction {job.pk} is queued." in messages_of(first)
    assert (job.layers, job.hooks, job.batch_size, job.max_samples) == ([0, 1], ["residual", "mlp"], 8, 20)
    assert job.created_by.username == "staff"
    assert f'id="extraction-{job.pk}"' in first.content.decode()

    with django_capture_on_commit_callbacks(execute=False):
        second = staff_client.post(PAGE, start_data(fake_model, fake_dataset, max_samples="20", batch_size="16"),
                                   follow=True)
    assert Extraction.objects.count() == 1
    assert messages_of(second) == [
        f"Extraction {job.pk}, started by staff just now, already extracts the same dataset, layers, hooks and limits "
        f"with {fake_model.name}: it is queued (0/20 samples). It keeps its batch size 8, not 16. Here it is; "
        "no second copy was started."
    ]


def test_the_page_replays_the_last_seconds_of_events_and_embeds_the_delays_from_settings(staff_client, settings,
                                                                                         make_extraction):
    """The stream starts before the events of the last 5 s: one that committed after the page
    read its rows (with a seq below one committed before) still reaches the page."""
    settings.JOBSITE_POLL_FALLBACK_S = 2
    settings.JOBSITE_SLOW_AFTER_S = 7
    settings.JOBSITE_STALL_AFTER_S = 3
    make_extraction("queued")
    settled = Event.objects.create(topic="extraction.1", type="extraction.progress", payload={},
                                   created_at=timezone.now() - timedelta(seconds=6))
    Event.objects.create(topic="extraction.1", type="extraction.progress", payload={})
    html = staff_client.get(PAGE).content.decode()
    assert f'data-live-after="{settled.seq}"' in html
    assert 'data-poll-fallback-s="2"' in html and 'data-slow-after-s="7"' in html and 'data-stall-after-s="3"' in html
    assert "django_htmx/htmx-2.min.js" in html and "jobsite/live.js" in html
    for link in ('href="/extractions/"', 'href="/training/"', 'href="/admin/"', 'href="/api/docs"',
                 'href="/api/v1/health"'):
        assert link in html


# -- cards ---------------------------------------------------------------------------------------

def test_a_failed_extraction_shows_its_error_the_suggested_parameters_and_the_retries(staff_client, make_extraction):
    job = failed_oom(make_extraction)
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert "Failed: OOM" in html and "CUDA out of memory" in html
    assert '<code class="mono" data-suggested>{&quot;batch_size&quot;: 4}</code>' in html
    assert "Retry (with suggested params)" in html and "Retry…" in html
    assert re.search(r'<option value="4" selected>', html)
    assert 'class="progress' not in html and "spinner" not in html and "Waiting" not in html


@pytest.mark.parametrize("error_type, plain_retry", [("VALIDATION", False), ("UNKNOWN", True), ("WORKER_LOST", True)])
def test_invalid_input_is_retried_with_edited_parameters_not_unchanged(staff_client, make_extraction, error_type,
                                                                        plain_retry):
    job = make_extraction("failed", error_type=error_type, error_message="Layer 9 does not exist")
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert (f"/extractions/{job.pk}/retry-suggested/" in html) is plain_retry, "unchanged, it fails again"
    primary = re.search(r'<summary class="button( primary)?">Retry…</summary>', html)[1]
    assert bool(primary) is not plain_retry, "the editor is the way on when an unchanged retry cannot help"


def test_terminal_cards_never_show_a_bar_or_a_spinner(staff_client, make_extraction):
    for status in ("completed", "cancelled"):
        job = make_extraction(status, samples_processed=100, total_samples=100)
        html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
        assert 'class="progress' not in html and "data-spinner" not in html, status


def test_the_time_left_weighs_the_samples_left_as_well_as_the_tokens(staff_client, make_extraction):
    """Longest samples run first: 40 % of the tokens in 25 % of the samples. Tokens alone say
    15 s left, samples alone 30 s; the card says their mean."""
    now = timezone.now()
    job = make_extraction("extracting", samples_processed=25, total_samples=100, tokens_processed=800,
                          total_tokens=2000, started_at=now - timedelta(seconds=10), progress_at=now,
                          heartbeat_at=now, attempt=1, worker="host:1")
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    # The page counts down from the exact figure, as of the last progress.
    assert re.search(r'ETA <span data-eta data-left-s="22\.5">2[23] s</span>', html)


def test_a_resumed_attempt_says_its_count_restarts_from_the_checkpoint(staff_client, make_extraction):
    now = timezone.now()
    first = make_extraction("extracting", samples_processed=6, total_samples=100, started_at=now, heartbeat_at=now,
                            attempt=1, worker="host:1")
    again = make_extraction("extracting", samples_processed=0, total_samples=100, started_at=now, heartbeat_at=now,
                            attempt=2, worker="host:2")
    assert "data-resumed" not in staff_client.get(f"/extractions/{first.pk}/card/").content.decode()
    card = staff_client.get(f"/extractions/{again.pk}/card/").content.decode()
    assert "Attempt 2 continues from the last checkpoint: the count can step back a little" in card


def test_a_running_extraction_shows_live_progress(staff_client, make_extraction):
    now = timezone.now()
    job = make_extraction("extracting", samples_processed=25, total_samples=100, tokens_processed=500,
                          total_tokens=2000, started_at=now - timedelta(seconds=10), progress_at=now,
                          heartbeat_at=now, attempt=1, worker="host:1")
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert 'style="width: 25.0%"' in html
    assert "25</span>/<span data-field=\"total_samples\">100</span> samples" in html
    assert '<span data-rate>50</span> tokens/s' in html and 'ETA <span data-eta data-left-s="30.0">30 s</span>' in html
    assert 'data-stalled-notice hidden' in html and 'data-slow-notice hidden' in html


@pytest.mark.parametrize("how", ["a second attempt", "a retry seeded from its original", "stalled"])
def test_a_card_shows_no_rate_it_cannot_measure(staff_client, settings, make_extraction, how):
    """A resumed attempt's counts hold the earlier attempts' work (300 tokens/s would read as 5,000),
    and a stalled job moves at no rate at all: '—' until the page measures one."""
    now = timezone.now()
    fields = dict(samples_processed=60, total_samples=100, tokens_processed=6000, total_tokens=10000,
                  started_at=now - timedelta(seconds=2), progress_at=now, heartbeat_at=now, attempt=1,
                  worker="host:1")
    if how == "a second attempt":
        fields["attempt"] = 2
    elif how == "a retry seeded from its original":
        fields["resumed_samples"] = 50
    else:
        fields["heartbeat_at"] = now - timedelta(seconds=settings.JOBSITE_STALL_AFTER_S + 5)
    job = make_extraction("extracting", **fields)
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert "<span data-rate>—</span> tokens/s" in html and "ETA <span data-eta>—</span>" in html
    fresh = make_extraction("extracting", **{**fields, "attempt": 1, "resumed_samples": 0, "heartbeat_at": now})
    html = staff_client.get(f"/extractions/{fresh.pk}/card/").content.decode()
    assert "<span data-rate>3,000</span> tokens/s" in html


def test_a_running_job_without_heartbeat_shows_resume_and_cancel(staff_client, settings, make_extraction):
    settings.JOBSITE_STALL_AFTER_S = 30
    old = timezone.now() - timedelta(seconds=95)
    job = make_extraction("extracting", started_at=old, heartbeat_at=old, progress_at=old, attempt=1,
                          worker="host:1")
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    stalled = html.split("data-stalled-notice", 1)[1].split("</div>\n      </div>", 1)[0]
    assert not stalled.startswith(" hidden")
    assert "No heartbeat for <span data-heartbeat-age>95</span> s." in html
    assert f"/extractions/{job.pk}/resume/" in stalled and f"/extractions/{job.pk}/cancel/" in stalled


def test_a_job_without_progress_for_long_shows_taking_longer_than_expected(staff_client, settings, make_extraction):
    settings.JOBSITE_SLOW_AFTER_S = 60
    job = make_extraction("queued", queued_at=timezone.now() - timedelta(seconds=120))
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    slow = html.split("data-slow-notice", 1)[1]
    assert not slow.startswith(" hidden")
    assert "Taking longer than expected." in slow and "No progress for <span data-idle>2 min 0 s</span>" in slow
    assert f"/extractions/{job.pk}/restart/" in slow


def test_history_shows_each_retry_under_its_original(staff_client, make_extraction):
    original = failed_oom(make_extraction)
    retry = make_extraction("failed", original_extraction=original, retry_count=1, error_type="OOM")
    second = make_extraction("completed", original_extraction=retry, retry_count=2)
    other = make_extraction("completed")
    html = staff_client.get("/extractions/history/").content.decode()
    order = [int(pk) for pk in re.findall(r'<tr id="row-(\d+)"', html)]
    assert order == [other.pk, original.pk, retry.pk, second.pk]
    assert f"retry of #{original.pk}" in html and f"retry of #{retry.pk}" in html
    assert 'class="depth-2"' in html


def test_missing_extractions_are_404_never_500(staff_client):
    for url in ["/extractions/999/card/", "/extractions/999/files/", "/extractions/999/files/metadata.json"]:
        assert staff_client.get(url).status_code == 404
    for path in ["cancel", "retry", "retry-suggested", "resume", "restart"]:
        assert staff_client.post(f"/extractions/999/{path}/", {"confirmed": "1"}).status_code == 404
    # The address of a form drawn again after a refusal, reloaded or bookmarked: back to the form's page.
    for path, page in [("/extractions/1/retry/", "/extractions/?job=1#extraction-1"),
                       ("/extractions/register/", "/extractions/#register"),
                       ("/training/corpora/", "/training/#corpora"), ("/training/generate/", "/training/#workflow")]:
        response = staff_client.get(path)
        assert (response.status_code, response["Location"]) == (302, page), path
    assert staff_client.put("/extractions/register/").status_code == 405


# -- actions -------------------------------------------------------------------------------------

def test_cancel_asks_for_confirmation_then_cancels_through_the_service(staff_client, make_extraction):
    job = make_extraction("queued")
    confirm = staff_client.post(f"/extractions/{job.pk}/cancel/")
    assert confirm.status_code == 200 and b"Yes, cancel it" in confirm.content
    assert Extraction.objects.get(pk=job.pk).status == "queued"
    response = staff_client.post(f"/extractions/{job.pk}/cancel/", {"confirmed": "1"}, follow=True)
    assert Extraction.objects.get(pk=job.pk).status == "cancelled"
    assert f"Extraction {job.pk} is cancelled." in messages_of(response)
    assert Event.objects.filter(topic=job.topic, type="extraction.cancelled").exists()


def test_cancel_of_a_running_job_asks_its_worker_to_stop(staff_client, make_extraction):
    job = make_extraction("extracting", started_at=timezone.now(), heartbeat_at=timezone.now())
    response = staff_client.post(f"/extractions/{job.pk}/cancel/", {"confirmed": "1"}, follow=True)
    job.refresh_from_db()
    assert job.status == "extracting" and job.cancel_requested
    assert "stops after the current batch" in messages_of(response)[0]


def test_cancel_of_a_finished_job_is_a_message_not_an_error_page(staff_client, make_extraction):
    job = make_extraction("completed")
    response = staff_client.post(f"/extractions/{job.pk}/cancel/", {"confirmed": "1"}, follow=True)
    assert response.status_code == 200
    assert "only a queued or running extraction can be cancelled" in messages_of(response)[0]


def test_retry_with_suggested_params_creates_the_linked_job(staff_client, make_extraction,
                                                            django_capture_on_commit_callbacks):
    job = failed_oom(make_extraction)
    with django_capture_on_commit_callbacks(execute=False):
        response = staff_client.post(f"/extractions/{job.pk}/retry-suggested/", follow=True)
    retry = Extraction.objects.exclude(pk=job.pk).get()
    assert (retry.original_extraction_id, retry.batch_size, retry.retry_count) == (job.pk, 4, 1)
    assert "with suggested parameters" in retry.retry_reason
    assert messages_of(response)[0].startswith(f'Extraction {retry.pk} retries extraction {job.pk} with {{"batch_size": 4}}. ')
    html = response.content.decode()
    assert f'id="extraction-{retry.pk}"' in html
    assert f'id="extraction-{job.pk}"' not in html, "a retried failure no longer needs attention"

    again = staff_client.post(f"/extractions/{job.pk}/retry-suggested/", follow=True)
    assert Extraction.objects.count() == 2
    assert messages_of(again) == [
        f"Extraction {job.pk} was not retried: Extraction {retry.pk}, started by staff just now, already extracts the "
        f"same dataset, layers, hooks and limits with fake: it is queued (0/100 samples). Follow that one; no second "
        "copy was started."
    ]


def test_retry_with_edited_parameters(staff_client, make_extraction, django_capture_on_commit_callbacks):
    job = failed_oom(make_extraction)
    with django_capture_on_commit_callbacks(execute=False):
        staff_client.post(f"/extractions/{job.pk}/retry/", {"batch_size": "2", "max_samples": "10", "max_length": "64"})
    retry = Extraction.objects.exclude(pk=job.pk).get()
    assert (retry.batch_size, retry.max_samples, retry.max_length, retry.original_extraction_id) == (2, 10, 64, job.pk)


@pytest.mark.parametrize(
    ("data", "sentence"),
    [
        ({"batch_size": "3"}, "Batch size: Select a valid choice"),
        ({"max_samples": "-1"}, "Max samples: Ensure this value is greater than or equal to 1"),
        ({"max_samples": "5000"}, "Max samples must be between 1 and 100"),
        ({"max_length": "x"}, "Max length: Enter a whole number"),
    ],
)
def test_bad_retry_parameters_are_a_message_and_start_nothing(staff_client, make_extraction, data, sentence):
    job = failed_oom(make_extraction)
    response = staff_client.post(f"/extractions/{job.pk}/retry/", data, follow=True)
    assert response.status_code == 200
    assert any(sentence in m for m in messages_of(response)), messages_of(response)
    assert Extraction.objects.count() == 1


def test_retry_of_a_job_that_did_not_fail_is_refused_with_a_message(staff_client, make_extraction):
    job = make_extraction("completed")
    response = staff_client.post(f"/extractions/{job.pk}/retry-suggested/", follow=True)
    assert "only a failed or cancelled extraction can be retried" in messages_of(response)[0]
    assert Extraction.objects.count() == 1


def test_resume_requeues_a_stalled_job_and_refuses_a_live_one(staff_client, settings, make_extraction,
                                                              django_capture_on_commit_callbacks):
    settings.JOBSITE_STALL_AFTER_S = 30
    live = make_extraction("extracting", started_at=timezone.now(), heartbeat_at=timezone.now(), worker="host:1")
    refused = staff_client.post(f"/extractions/{live.pk}/resume/", follow=True)
    assert "only a stalled extraction can be resumed" in messages_of(refused)[0]
    assert Extraction.objects.get(pk=live.pk).status == "extracting"

    old = timezone.now() - timedelta(seconds=60)
    stalled = make_extraction("extracting", started_at=old, heartbeat_at=old, worker="host:1")
    with django_capture_on_commit_callbacks(execute=False):
        response = staff_client.post(f"/extractions/{stalled.pk}/resume/", follow=True)
    stalled.refresh_from_db()
    assert stalled.status == "queued" and stalled.error_type == "WORKER_LOST"
    assert "continues from its checkpoint" in messages_of(response)[0]


def test_retry_of_a_slow_job_cancels_it_and_starts_a_linked_one(staff_client, make_extraction,
                                                                django_capture_on_commit_callbacks):
    job = make_extraction("queued", queued_at=timezone.now() - timedelta(hours=1))
    assert b"Yes, cancel and retry" in staff_client.post(f"/extractions/{job.pk}/restart/").content
    with django_capture_on_commit_callbacks(execute=False):
        response = staff_client.post(f"/extractions/{job.pk}/restart/", {"confirmed": "1"}, follow=True)
    job.refresh_from_db()
    retry = Extraction.objects.exclude(pk=job.pk).get()
    assert job.status == "cancelled" and retry.original_extraction_id == job.pk and retry.status == "queued"
    assert f"extraction {retry.pk} retries it" in messages_of(response)[0]


# -- output files --------------------------------------------------------------------------------

@pytest.fixture
def finished_with_files(make_extraction, settings, tmp_path):
    job = make_extraction("completed", samples_processed=100, total_samples=100)
    out = job.output_dir
    out.mkdir(parents=True)
    (out / "metadata.json").write_text(json.dumps({"model": "fake", "samples": 100}))
    (out / "offsets.npy").write_bytes(b"\0" * 808)
    (out / "layer_0_residual.npy").write_bytes(b"\1" * 4096)
    (out / "nested").mkdir()
    (out / "nested" / "inner.txt").write_text("not listed")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the output directory")
    os.symlink(secret, out / "escape.json")
    (settings.JOBSITE_DATA_DIR / "activations" / "neighbour.txt").write_text("a neighbour's file")
    return job


def test_files_page_lists_the_output_with_sizes_and_shows_the_metadata(staff_client, client, plain_user,
                                                                       finished_with_files):
    job = finished_with_files
    client.force_login(plain_user)
    html = client.get(f"/extractions/{job.pk}/files/").content.decode()
    names = re.findall(r'<td class="mono"><a href="[^"]+">([^<]+)</a>', html)
    assert names == ["layer_0_residual.npy", "metadata.json", "offsets.npy"]
    assert "4.0\xa0KB" in html and "808" in html
    assert "&quot;samples&quot;: 100" in html
    metadata = client.get(f"/extractions/{job.pk}/files/metadata.json")
    assert metadata.status_code == 200 and metadata["Content-Type"] == "application/json"
    assert json.loads(b"".join(metadata.streaming_content)) == {"model": "fake", "samples": 100}
    npy = client.get(f"/extractions/{job.pk}/files/offsets.npy")
    assert npy.status_code == 200 and "attachment" in npy["Content-Disposition"]


@pytest.mark.parametrize(
    "name",
    ["escape.json", "nested", "..%2Fneighbour.txt", "..%2F..%2Fjobsite.sqlite3", "%2Fetc%2Fpasswd", "..",
     "nested%2Finner.txt", "missing.npy", "metadata.json%00", "METADATA.JSON"],
)
def test_the_file_view_refuses_anything_outside_the_output_dir(staff_client, finished_with_files, name):
    job = finished_with_files
    response = staff_client.get(f"/extractions/{job.pk}/files/{name}")
    assert response.status_code == 404


def test_files_of_another_extraction_are_not_reachable_through_this_one(staff_client, finished_with_files,
                                                                          make_extraction):
    other = make_extraction("completed")
    assert staff_client.get(f"/extractions/{other.pk}/files/metadata.json").status_code == 404
    assert b"has written no files yet" in staff_client.get(f"/extractions/{other.pk}/files/").content


def test_starting_again_what_failed_is_a_form_error_that_says_to_retry_it(
    staff_client, fake_model, fake_dataset, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        staff_client.post(PAGE, start_data(fake_model, fake_dataset))
    Extraction.objects.update(status="failed", error_type="OOM", error_message="CUDA out of memory.",
                              finished_at=timezone.now())
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset))
    assert response.status_code == 400
    assert "retry it instead of starting it again" in " ".join(response.context["form"].non_field_errors())
    assert "retry it" in response.content.decode()
    assert Extraction.objects.count() == 1


def test_a_job_opened_from_the_history_shows_its_card_and_retry_whatever_its_status(staff_client, make_extraction):
    """A cancelled job is not 'needing attention', but the history links to its card, which
    holds its Retry; the live redraw of the panel keeps it there."""
    cancelled = make_extraction("cancelled")
    page = staff_client.get(PAGE).content.decode()
    assert f'id="extraction-{cancelled.pk}"' not in page
    assert f'href="/extractions/?job={cancelled.pk}#extraction-{cancelled.pk}"' in page  # its history row

    opened = staff_client.get(PAGE, {"job": cancelled.pk}).content.decode()
    assert f'id="extraction-{cancelled.pk}"' in opened and "Retry…" in opened
    fragment = staff_client.get("/extractions/active/", {"job": cancelled.pk}).content.decode()
    assert f'id="extraction-{cancelled.pk}"' in fragment
    assert f'hx-get="/extractions/active/?job={cancelled.pk}"' in fragment


@pytest.mark.parametrize("junk", ["abc", "²", "9" * 40, "-1", "99999"])
def test_a_job_parameter_that_names_no_job_is_ignored(staff_client, junk):
    response = staff_client.get(PAGE, {"job": junk})
    assert response.status_code == 200 and "Nothing is running" in response.content.decode()


def test_waiting_jobs_without_a_worker_say_none_is_running(staff_client, make_extraction):
    assert "No worker is running" not in staff_client.get(PAGE).content.decode()  # nothing waits
    queued = make_extraction("queued")
    page = staff_client.get(PAGE).content.decode()
    assert "No worker is running</strong> (start one with manage.py qcluster)" in page
    assert "No worker is running" in staff_client.get("/extractions/active/").content.decode()
    assert f'id="extraction-{queued.pk}"' in page


def test_a_stalled_card_is_drawn_stalled_with_one_cancel_and_one_attempt(staff_client, make_extraction, settings):
    settings.JOBSITE_STALL_AFTER_S = 5
    stale = timezone.now() - timedelta(seconds=120)
    job = make_extraction("extracting", heartbeat_at=stale, started_at=stale, worker="gone:1", attempt=1)
    card = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    # Drawn stalled from the start (not a second later by the page's clock): the notice shows, with
    # its own Resume and Cancel, and is-stalled hides the card's main Cancel (site.css).
    assert 'class="job is-stalled"' in card and "data-stalled-notice>" in card


# -- registering models and datasets ---------------------------------------------------------------

def test_a_model_and_a_dataset_registered_from_the_page_can_be_started(staff_client, settings, tiny_model_dir):
    settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
    write_dataset(settings, "reviews.txt", ["good bike", "bad brakes", "fine"])
    html = staff_client.get(PAGE).content.decode()
    assert 'data-register="model"' in html and 'data-register="dataset"' in html
    assert str(tiny_model_dir.parent) in html, "the page says where a model may be"

    response = staff_client.post(PAGE + "register/", {"kind": "model", "model-path": str(tiny_model_dir),
                                                      "model-name": ""}, follow=True)
    model = ModelRecord.objects.get()
    assert (model.name, model.num_layers, model.hidden_size) == ("tiny-gpt2", 3, 32)
    assert "Model tiny-gpt2 is registered: GPT2LMHeadModel, 3 layers, hidden size 32." in messages_of(response)
    response = staff_client.post(PAGE + "register/", {"kind": "dataset", "dataset-path": "datasets/reviews.txt",
                                                      "dataset-name": "bike reviews"}, follow=True)
    dataset = Dataset.objects.get()
    assert (dataset.name, dataset.num_samples) == ("bike reviews", 3)
    assert "Dataset bike reviews is registered: 3 samples." in messages_of(response)
    html = response.content.decode()
    assert re.search(rf'<option value="{model.pk}"[^>]*>tiny-gpt2</option>', html)
    assert re.search(rf'<option value="{dataset.pk}"[^>]*>bike reviews</option>', html)
    assert response.redirect_chain[-1][0] == f"{PAGE}?dataset={dataset.pk}#start"

    again = staff_client.post(PAGE + "register/", {"kind": "dataset", "dataset-path": "datasets/reviews.txt"},
                              follow=True)
    assert f"{dataset.path} is already registered as the dataset bike reviews." in messages_of(again)
    assert Dataset.objects.count() == 1

    started = staff_client.post(PAGE, start_data(model, dataset, layers="0"), follow=True)
    assert Extraction.objects.get().status == "queued"
    assert f"Extraction {Extraction.objects.get().pk} is queued." in messages_of(started)

    Dataset.objects.create(name="aaa first", path="/elsewhere/a.txt", format="txt", num_samples=1, size_bytes=2)
    picked = staff_client.get(f"{PAGE}?dataset={dataset.pk}&model={model.pk}").content.decode()
    assert re.search(rf'<option value="{dataset.pk}" selected>bike reviews</option>', picked), "the new one is picked"


@pytest.mark.parametrize("data, field, sentence", [
    ({"kind": "dataset", "dataset-path": ""}, "__all__", "Give the path of a file under the data directory, or upload one."),
    ({"kind": "model", "model-path": ""}, "path", "This field is required."),
    ({"kind": "dataset", "dataset-path": "../../etc/passwd"}, "path", "is outside the allowed directories"),
    ({"kind": "dataset", "dataset-path": "datasets/missing.txt"}, "path", "does not exist"),
    ({"kind": "dataset", "dataset-path": "datasets/table.csv"}, "path", "must be a .txt (one sample a line) or .jsonl"),
    ({"kind": "dataset", "dataset-path": "datasets/other.txt", "dataset-name": "taken"}, "name",
     "A dataset named 'taken' already exists; choose another name."),
    ({"kind": "dataset", "dataset-path": "datasets/other.txt", "dataset-name": "../../x"}, "name",
     "The dataset name '../../x' cannot be used"),
    ({"kind": "model", "model-path": "/etc"}, "path", "is outside the allowed directories"),
    ({"kind": "model", "model-path": "empty"}, "path", "No config.json found in"),
])
def test_a_refused_registration_shows_its_form_again_with_the_reason(staff_client, settings, data, field, sentence):
    write_dataset(settings, "table.csv", ["a,b"])
    write_dataset(settings, "other.txt", ["x"])
    taken = write_dataset(settings, "taken.txt", ["y"])
    Dataset.objects.create(name="taken", path=str(taken), format="txt", num_samples=1, size_bytes=2)
    (settings.JOBSITE_DATA_DIR / "models" / "empty").mkdir(parents=True)
    response = staff_client.post(PAGE + "register/", data)
    assert response.status_code == 400
    form = next(f for f, _ in response.context["register_pairs"] if f.prefix == data["kind"])
    assert any(sentence in error for error in form.errors[field]), form.errors
    assert (Dataset.objects.count(), ModelRecord.objects.count()) == (1, 0)


def test_a_registration_without_a_kind_is_a_message(staff_client):
    response = staff_client.post(PAGE + "register/", {"kind": "weights"}, follow=True)
    assert "Register a model or a dataset." in messages_of(response)


def uploaded(name: str, text: str):
    from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: PLC0415
    return SimpleUploadedFile(name, text.encode())


def test_an_uploaded_dataset_is_named_as_one_registered_by_path(staff_client, settings):
    response = staff_client.post(PAGE + "register/", {"kind": "dataset", "dataset-upload": uploaded("x.txt", "a\nb\n"),
                                                      "dataset-name": "bike reviews/2026"}, follow=True)
    dataset = Dataset.objects.get()
    kept = settings.JOBSITE_DATA_DIR / "datasets" / "uploaded" / "bike-reviews-2026.txt"
    assert (dataset.name, dataset.path, kept.read_text()) == ("bike reviews/2026", str(kept), "a\nb\n")
    assert "Dataset bike reviews/2026 is registered: 2 samples." in messages_of(response)


def test_a_dataset_uploaded_from_the_page_is_kept_under_the_data_directory_and_registered(staff_client, settings):
    lines = "\n".join(json.dumps({"text": f"sample {i}"}) for i in range(7)) + "\n"
    response = staff_client.post(PAGE + "register/", {"kind": "dataset", "dataset-upload": uploaded("Notes.JSONL", lines),
                                                      "dataset-name": ""}, follow=True)
    dataset = Dataset.objects.get()
    kept = settings.JOBSITE_DATA_DIR / "datasets" / "uploaded" / "Notes.jsonl"
    assert (dataset.name, dataset.num_samples, dataset.format, dataset.path) == ("Notes", 7, "jsonl", str(kept))
    assert kept.read_text() == lines
    assert "Dataset Notes is registered: 7 samples." in messages_of(response)
    assert [p.name for p in kept.parent.iterdir()] == ["Notes.jsonl"], "no staging file is left behind"


@pytest.mark.parametrize("data, field, sentence", [
    ({"dataset-upload": ("table.csv", "a,b\n")}, "upload", "table.csv: upload a .txt (one sample a line) or .jsonl"),
    ({"dataset-upload": ("bad.jsonl", "{not json\n")}, "upload", "bad.jsonl: Line 1 of the dataset is not JSON."),
    ({"dataset-upload": ("empty.txt", "")}, "upload", "The chosen file is empty; a dataset needs at least one sample."),
    ({"dataset-upload": ("blank.txt", "\n\n")}, "upload", "blank.txt: The dataset is empty."),
    ({"dataset-upload": ("a.txt", "x\n"), "dataset-name": "taken"}, "name",
     "A dataset named 'taken' already exists; choose another name."),
    ({"dataset-upload": ("a.txt", "x\n"), "dataset-name": "../up"}, "name",
     "The dataset name '../up' cannot be used"),
    ({"dataset-upload": ("kept.txt", "x\n")}, "name", "The file datasets/uploaded/kept.txt already exists"),
    ({"dataset-upload": ("a.txt", "x\n"), "dataset-path": "datasets/taken.txt"}, "__all__",
     "Give a path or upload a file, not both."),
    ({}, "__all__", "Give the path of a file under the data directory, or upload one."),
])
def test_a_refused_dataset_upload_says_why_and_leaves_no_file(staff_client, settings, data, field, sentence):
    taken = write_dataset(settings, "taken.txt", ["y"])
    Dataset.objects.create(name="taken", path=str(taken), format="txt", num_samples=1, size_bytes=2)
    uploads = settings.JOBSITE_DATA_DIR / "datasets" / "uploaded"
    uploads.mkdir(parents=True)
    (uploads / "kept.txt").write_text("someone's file\n")
    post = {key: uploaded(*value) if isinstance(value, tuple) else value for key, value in data.items()}
    response = staff_client.post(PAGE + "register/", {"kind": "dataset", **post})
    assert response.status_code == 400
    form = next(f for f, _ in response.context["register_pairs"] if f.prefix == "dataset")
    assert any(sentence in error for error in form.errors[field]), form.errors
    assert list(Dataset.objects.values_list("name", flat=True)) == ["taken"]
    assert sorted(p.name for p in uploads.iterdir()) == ["kept.txt"]
    assert (uploads / "kept.txt").read_text() == "someone's file\n"


def test_the_api_uploads_a_dataset_and_refuses_a_bad_one_with_422(staff_client, settings):
    response = staff_client.post("/api/v1/datasets/upload", {"file": uploaded("lines.txt", "a b\nc d\n"),
                                                             "name": "lines"})
    assert response.status_code == 201, response.content
    assert response.json()["num_samples"] == 2 and response.json()["name"] == "lines"
    refused = staff_client.post("/api/v1/datasets/upload", {"file": uploaded("lines.txt", "again\n"), "name": "lines"})
    assert refused.status_code == 422
    assert refused.json()["message"] == "A dataset named 'lines' already exists; choose another name."
    missing = staff_client.post("/api/v1/datasets/upload", {"name": "x"})
    assert missing.status_code == 422 and "file" in json.dumps(missing.json())
    extra = staff_client.post("/api/v1/datasets/upload", {"file": uploaded("more.txt", "a\n"), "nmae": "more"})
    assert extra.status_code == 422
    assert extra.json() == {"message": "Unknown field 'nmae'; the fields are file and name.", "field": "nmae"}
    assert not Dataset.objects.filter(name="more").exists()


def test_an_upload_to_a_full_disk_is_a_sentence_and_leaves_nothing(staff_client, settings, small_disk):
    uploads = small_disk.mount(settings.JOBSITE_DATA_DIR / "datasets" / "uploaded", "64k")
    big = "a sample line that fills the disk\n" * 4000  # 136 kB
    response = staff_client.post(PAGE + "register/", {"kind": "dataset", "dataset-upload": uploaded("big.txt", big)})
    assert response.status_code == 400
    form = next(f for f, _ in response.context["register_pairs"] if f.prefix == "dataset")
    assert form.errors["upload"] == ["The upload cannot be kept in the data directory: No space left on device."]
    assert list(uploads.iterdir()) == [] and Dataset.objects.count() == 0


def retry_editor_fields(html: str) -> dict[str, str]:
    """What the card's Retry… editor would post untouched: its inputs' values and each select's
    selected option (the first when none is)."""
    editor = re.search(r'<form[^>]*class="retry-form".*?</form>', html, re.S)[0]
    fields = {name: value for name, value in re.findall(r'<input type="number" name="(\w+)"[^>]*value="([^"]*)"', editor)}
    for name, options in re.findall(r'<select name="(\w+)">(.*?)</select>', editor, re.S):
        values = re.findall(r'<option value="([^"]*)"( selected)?', options)
        fields[name] = next((value for value, selected in values if selected), values[0][0])
    return fields


@pytest.mark.parametrize("edit, max_samples", [
    ({"max_samples": ""}, None),
    ({}, 2000),
    ({"batch_size": "4"}, 2000),
])
def test_an_emptied_max_samples_in_the_retry_editor_means_all_samples(staff_client, make_extraction, fake_dataset,
                                                                     django_capture_on_commit_callbacks, edit,
                                                                     max_samples):
    fake_dataset.num_samples = 3000
    fake_dataset.save()
    job = make_extraction("cancelled", max_samples=2000, total_samples=2000)
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    assert re.search(r'name="max_samples" min="1" value="2000" placeholder="all \(3,000\)"', html)
    with django_capture_on_commit_callbacks(execute=False):
        response = staff_client.post(f"/extractions/{job.pk}/retry/", {**retry_editor_fields(html), **edit},
                                     follow=True)
    retry = Extraction.objects.exclude(pk=job.pk).get()
    assert messages_of(response) == [
        f"Extraction {retry.pk} retries extraction {job.pk}. Extraction {retry.pk} starts from the first sample: it "
        f"asks for other samples, lengths or storage than extraction {job.pk}."]
    assert (retry.max_samples, retry.total_samples) == (max_samples, max_samples or 3000)


def test_a_link_to_a_job_that_no_longer_exists_says_so(staff_client, fake_model, fake_dataset):
    response = staff_client.get(PAGE + "?job=999")
    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == ["Extraction 999 does not exist (it may have been deleted)."]


def run_into(job, *, layers=(0, 2), hooks=("residual", "mlp_hidden"), cancel_after_batches=None):
    """The real runner writes the job's output directory (a partial one when it is cancelled)."""
    from extraction.runner import Cancelled, ExtractionSpec, run_extraction  # noqa: PLC0415

    spec = ExtractionSpec(job.model.path, job.dataset.path, str(job.output_dir), layers, hooks, batch_size=4,
                          max_length=64)
    asked = iter(range(10**6))
    cancel = (lambda: next(asked) >= cancel_after_batches) if cancel_after_batches is not None else None
    try:
        run_extraction(spec, progress=None, heartbeat=None, should_cancel=cancel)
    except Cancelled:
        pass


@pytest.fixture
def real_job(model_record, dataset, db):
    return Extraction.objects.create(model=model_record, dataset=dataset, layers=[0, 2], hooks=["residual", "mlp_hidden"],
                                     status="completed", finished_at=timezone.now(), fingerprint="fp-real")


def test_files_page_shows_how_to_load_a_sample_shaded_by_norm_and_a_histogram_per_file(client, plain_user, real_job):
    from extraction.reader import open_output  # noqa: PLC0415

    run_into(real_job)
    client.force_login(plain_user)
    response = client.get(f"/extractions/{real_job.pk}/files/?sample=4&point=blocks.2.mlp.hook_post")
    html = response.content.decode()
    out = str(real_job.output_dir)
    assert f'open_output(&quot;{out}&quot;)' in html and f'np.load(&quot;{out}/tokens.npy&quot;)' in html
    assert f"extraction export {real_job.pk} --format hf-datasets" in html
    output = open_output(out)
    tokens = re.findall(r'<span class="tok" style="--shade: ([\d.]+)" title="row (\d+) · norm ([^"]+)">([^<]*)</span>',
                        html)
    assert [html_unescape(text) for *_, text in tokens] == output.token_strings(4)
    norms = np.linalg.norm(output.sample_rows(4, "blocks.2.mlp.hook_post"), axis=1)
    assert [int(row) for _, row, _, _ in tokens] == list(range(output.offsets[4], output.offsets[5]))
    assert [float(n) for _, _, n, _ in tokens] == pytest.approx(norms.tolist(), rel=1e-3)
    shades = [float(shade) for shade, *_ in tokens]
    assert shades[int(norms.argmax())] == 1.0 and shades[int(norms.argmin())] == 0.05
    assert (np.diff(np.array(shades)[np.argsort(norms)]) >= 0).all(), "a larger norm is never lighter"
    assert "Sample 4 at blocks.2.mlp.hook_post" in html
    charts = re.findall(r'data-histogram="([^"]+)"', html)
    assert charts == ["layer_0_residual.npy", "layer_0_mlp_hidden.npy", "layer_2_residual.npy", "layer_2_mlp_hidden.npy"]
    bars = re.findall(r'<title>[^<]*: ([\d,]+) rows</title>', html)
    assert sum(int(b.replace(",", "")) for b in bars) == 4 * output.num_tokens, "every row of this small run, per file"


def test_a_partial_runs_page_shows_finished_samples_only_and_says_so_for_the_others(client, plain_user, real_job):
    from extraction.reader import open_output  # noqa: PLC0415

    Extraction.objects.filter(pk=real_job.pk).update(status="cancelled")
    run_into(real_job, cancel_after_batches=2)
    output = open_output(real_job.output_dir)
    assert 0 < output.samples_done < output.num_samples
    done, not_done = output.done_samples(), sorted(set(range(output.num_samples)) - set(output.done_samples()))
    client.force_login(plain_user)
    first = client.get(f"/extractions/{real_job.pk}/files/").content.decode()
    assert f"Sample {done[0]} at blocks.0.hook_resid_post" in first
    assert f"{output.samples_done} of {output.num_samples} samples done" in first
    refused = client.get(f"/extractions/{real_job.pk}/files/?sample={not_done[0]}").content.decode()
    assert f"Sample {not_done[0]} is not done in this partial run" in html_unescape(refused)
    bars = re.findall(r'<title>[^<]*: ([\d,]+) rows</title>', first)
    done_rows = int(np.diff(output.offsets)[done].sum())
    assert sum(int(b.replace(",", "")) for b in bars) == 4 * done_rows, "zeros of unfinished samples are no rows"


def test_an_output_the_reader_cannot_read_says_why_on_its_page(client, plain_user, finished_with_files):
    client.force_login(plain_user)
    html = html_unescape(client.get(f"/extractions/{finished_with_files.pk}/files/").content.decode())
    assert "was written before format 2 (it has no tokens.npy or format_version)" in html
    assert "run the extraction again to get format 2" in html


def test_a_models_page_lists_each_hook_point_with_its_definition_width_and_why_others_are_not(
    client, plain_user, model_record, fake_model
):
    client.force_login(plain_user)
    html = html_unescape(client.get(f"/extractions/models/{model_record.pk}/").content.decode())
    rows = re.findall(r'<tr><td class="mono">(\w+)</td><td class="mono">([\w.]+)</td><td>([^<]+)</td>'
                      r'<td class="num">(\d+)</td></tr>', html)
    assert [(name, tl, width) for name, tl, _, width in rows] == [
        ("resid_pre", "blocks.L.hook_resid_pre", "32"), ("attention", "blocks.L.hook_attn_out", "32"),
        ("resid_mid", "blocks.L.hook_resid_mid", "32"), ("mlp", "blocks.L.hook_mlp_out", "32"),
        ("residual", "blocks.L.hook_resid_post", "32"), ("mlp_hidden", "blocks.L.mlp.hook_post", "128")]
    assert rows[3][2] == "what the MLP (or mixture of experts) adds to the residual stream, after any post-feedforward norm"
    assert "family gpt2" in html and "Not offered" not in html
    fake_model.hook_points = {"residual": {"definition": "the block's output", "width": 32,
                                           "transformerlens": "hook_resid_post"}}
    fake_model.hook_refusals = {"mlp": "'bert' is not a family jobsite knows"}
    fake_model.save()
    other = html_unescape(client.get(f"/extractions/models/{fake_model.pk}/").content.decode())
    assert "<li><span class=\"mono\">mlp</span>: 'bert' is not a family jobsite knows.</li>" in other
    assert client.get("/extractions/models/999/").status_code == 404
    assert f'href="/extractions/models/{model_record.pk}/"' in client.get("/extractions/").content.decode()


def test_clamped_token_ids_get_a_warning_on_the_card_and_a_mark_in_the_history(staff_client, make_extraction):
    clamped = make_extraction("completed", samples_processed=4, total_samples=4, tokens_processed=40,
                              clamped_tokens=3)
    clean = make_extraction("completed", samples_processed=4, total_samples=4, tokens_processed=40)
    card = staff_client.get(f"/extractions/{clamped.pk}/card/").content.decode()
    assert "3 token ids beyond the model's vocabulary were clamped to its last id." in card
    assert "data-clamped-warning" not in staff_client.get(f"/extractions/{clean.pk}/card/").content.decode()
    history = staff_client.get("/extractions/history/").content.decode()
    assert history.count("data-clamped") == 1 and "3 clamped</span>" in history


# -- stalled and slow jobs, dismiss, the history's pages, the start form's values and errors --------

@pytest.mark.parametrize("how", ["stalled", "slow"])
def test_a_stalled_or_slow_job_shows_no_rate_and_no_time_left(staff_client, settings, make_extraction, how):
    """It showed "14,880 tokens/s · ETA 0 s" beside "heartbeat 28 s ago", and "655 tokens/s · ETA
    46 s" beside "Taking longer than expected": the last pace says nothing of a job that moves no more."""
    settings.JOBSITE_STALL_AFTER_S, settings.JOBSITE_SLOW_AFTER_S = 30, 60
    now = timezone.now()
    heartbeat = now - timedelta(seconds=45) if how == "stalled" else now
    progress = now - timedelta(seconds=20) if how == "stalled" else now - timedelta(seconds=90)
    job = make_extraction("extracting", samples_processed=60, total_samples=100, tokens_processed=6000,
                          total_tokens=10000, started_at=progress - timedelta(seconds=2), progress_at=progress,
                          queued_at=progress - timedelta(seconds=3), heartbeat_at=heartbeat, attempt=1,
                          worker="host:1")
    html = staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    notice = "data-stalled-notice" if how == "stalled" else "data-slow-notice"
    assert not html.split(notice, 1)[1].startswith(" hidden")
    assert "<span data-rate>—</span> tokens/s" in html and "ETA <span data-eta>—</span>" in html
    assert "data-left-s" not in html, "no time left for the page to count down from"


def test_dismiss_moves_a_failed_job_from_attention_to_the_history_and_tells_other_pages(
        staff_client, make_extraction, django_capture_on_commit_callbacks):
    failed = failed_oom(make_extraction)
    page = staff_client.get(PAGE).content.decode()
    card = page.split(f'id="extraction-{failed.pk}"', 1)[1].split("</article>", 1)[0]
    assert f'action="/extractions/{failed.pk}/dismiss/"' in card and ">Dismiss</button>" in card
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post(f"/extractions/{failed.pk}/dismiss/", follow=True)
    assert response.redirect_chain[-1][0] == f"{PAGE}#row-{failed.pk}"
    assert f"Extraction {failed.pk} is dismissed; it stays in the history, with its files and Retry." in messages_of(
        response)
    page = response.content.decode()
    assert f'id="extraction-{failed.pk}"' not in page, "out of the jobs needing attention"
    row = page.split(f'<tr id="row-{failed.pk}"', 1)[1].split("</tr>", 1)[0]
    assert "data-dismissed" in row
    failed.refresh_from_db()
    assert failed.dismissed_at is not None and failed.dismissed_by.username == "staff"
    event = Event.objects.get(topic=failed.topic, type="extraction.dismissed")
    assert event.payload["dismissed_by"] == "staff" and event.payload["status"] == "failed"
    # Opened from the history, its card says so, and keeps its Retry.
    card = staff_client.get(f"/extractions/{failed.pk}/card/").content.decode()
    assert "Dismissed by staff" in card and "Retry…" in card and ">Dismiss</button>" not in card


def test_dismiss_refuses_a_running_job_and_a_viewer(client, staff_client, viewer_user, make_extraction):
    running = make_extraction("extracting", worker="host:1", heartbeat_at=timezone.now())
    assert ">Dismiss</button>" not in staff_client.get(f"/extractions/{running.pk}/card/").content.decode()
    response = staff_client.post(f"/extractions/{running.pk}/dismiss/", follow=True)
    assert (f"Extraction {running.pk} was not dismissed: Extraction {running.pk} is extracting; only a failed or "
            "cancelled extraction can be dismissed (cancel it first).") in messages_of(response)
    assert Extraction.objects.get(pk=running.pk).dismissed_at is None

    cancelled = make_extraction("cancelled")
    client.force_login(viewer_user)
    assert ">Dismiss</button>" not in client.get(f"/extractions/{cancelled.pk}/card/").content.decode()
    refused = client.post(f"/extractions/{cancelled.pk}/dismiss/")
    assert refused.status_code == 403 and b"not dismiss extractions" in refused.content
    assert Extraction.objects.get(pk=cancelled.pk).dismissed_at is None


def test_the_retry_editor_closes_with_close_not_cancel(staff_client, make_extraction):
    """Its "Cancel" sat beside the job's own Cancel: a person meaning to close the editor was afraid to press it."""
    job = failed_oom(make_extraction)
    editor = staff_client.get(f"/extractions/{job.pk}/card/").content.decode().split('class="retry-form"', 1)[1]
    editor = editor.split("</form>", 1)[0]
    assert ">Close</button>" in editor and ">Cancel<" not in editor


def test_a_loading_card_says_how_far_tokenizing_is(staff_client, make_extraction):
    from django.utils import timezone

    from jobsite.events import publish

    job = make_extraction("loading", started_at=timezone.now(), heartbeat_at=timezone.now(), worker="h:1")
    assert "Tokenizing" not in staff_client.get(f"/extractions/{job.pk}/card/").content.decode()
    publish(job.topic, "extraction.tokenizing", {"message": "Tokenizing 120,000 of 300,000 samples"})
    assert "Tokenizing 120,000 of 300,000 samples" in staff_client.get(f"/extractions/{job.pk}/card/").content.decode()


def test_a_retry_of_a_deleted_original_shows_its_number(staff_client, make_extraction):
    original = failed_oom(make_extraction)
    retry = make_extraction("failed", original_extraction=original, retry_count=1, error_type="OOM")
    from extraction.services import extraction_delete

    extraction_delete(extraction=original)
    retry.refresh_from_db()
    assert retry.original_extraction_id == original.pk
    card = staff_client.get(f"/extractions/{retry.pk}/card/").content.decode()
    assert re.search(rf"retry of #{original.pk} <span[^>]*>\(deleted\)</span>", card)
    assert f"retry of #{original.pk} (deleted)" in staff_client.get("/extractions/history/").content.decode()


def history_rows(html: str) -> list[int]:
    return [int(pk) for pk in re.findall(r'<tr id="row-(\d+)"', html)]


def test_the_history_shows_20_jobs_a_page_with_totals_and_page_links(staff_client, make_extraction):
    jobs = [make_extraction("completed") for _ in range(23)]
    newest_first = [job.pk for job in reversed(jobs)]
    first = staff_client.get("/extractions/history/").content.decode()
    assert history_rows(first) == newest_first[:20]
    assert "1–20 of 23 extractions" in first and "page 1 of 2" in first
    assert 'href="?page=2#history"' in first and 'rel="next"' in first
    second = staff_client.get(PAGE, {"page": 2}).content.decode()
    assert history_rows(second) == newest_first[20:] and "21–23 of 23 extractions" in second
    small = staff_client.get("/extractions/history/", {"limit": 5, "page": 3}).content.decode()
    assert history_rows(small) == newest_first[10:15] and 'href="?limit=5&amp;page=4#history"' in small


@pytest.mark.parametrize(("query", "sentence"), [
    ({"limit": "500"}, "limit must be between 1 and 100, not 500; ask for the next page (?page=2) for more."),
    ({"page": "9"}, "Page 9 does not exist: 2 extractions make 1 page of 20."),
    ({"page": "two"}, "page must be a whole number of at least 1, not 'two'."),
    ({"status": "lost"}, "status must be one of queued, loading, extracting, saving, completed, failed, cancelled, "
                         "not 'lost'."),
    ({"model": "nope"}, "No model named or numbered 'nope' is registered"),
])
def test_a_bad_history_page_or_filter_is_a_400_with_a_sentence(staff_client, make_extraction, query, sentence):
    make_extraction("completed"), make_extraction("failed")
    for url in (PAGE, "/extractions/history/"):
        response = staff_client.get(url, query)
        assert response.status_code == 400
        assert sentence in html_unescape(response.content.decode())


def test_the_history_filters_by_status_and_model(staff_client, make_extraction, fake_model, fake_dataset):
    failed, done = make_extraction("failed", error_type="OOM"), make_extraction("completed")
    other_model = ModelRecord.objects.create(name="other", path="/models/other", architecture="GPT2LMHeadModel",
                                             model_type="gpt2", num_layers=2, hidden_size=8, vocab_size=10)
    other = Extraction.objects.create(model=other_model, dataset=fake_dataset, layers=[0], hooks=["residual"],
                                      status="failed", finished_at=timezone.now(), fingerprint="other")
    page = staff_client.get(PAGE, {"status": "failed", "model": "fake"}).content.decode()
    assert history_rows(page) == [failed.pk] and "(filtered)" in page
    assert '<option value="failed" selected>' in page and f'<option value="{fake_model.pk}" selected>' in page
    assert history_rows(staff_client.get("/extractions/history/", {"model": other_model.pk}).content.decode()) == [
        other.pk]
    assert history_rows(staff_client.get("/extractions/history/", {"status": "completed"}).content.decode()) == [
        done.pk]
    # A live redraw keeps the filters the page shows.
    assert 'hx-get="/extractions/history/?status=failed&amp;model=fake"' in page


def test_the_start_form_keeps_the_values_of_the_last_start(staff_client, fake_model, fake_dataset,
                                                          django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, layers="1-2", hooks=["mlp"],
                                                      batch_size="32", max_length="128", max_samples="7",
                                                      storage_dtype="float16", auto_retry_on_oom="on"), follow=True)
    assert Extraction.objects.count() == 1
    form = response.content.decode().split('class="start-form"', 1)[1].split("</form>", 1)[0]
    assert 'name="layers" value="1-2"' in form and 'name="max_length" value="128"' in form
    assert 'name="max_samples" value="7"' in form
    assert '<option value="32" selected>' in form and '<option value="float16" selected>' in form
    assert re.search(r'value="mlp"[^>]*checked', form) and not re.search(r'value="residual"[^>]*checked', form)
    assert re.search(r'name="auto_retry_on_oom"[^>]*checked', form)


def test_the_start_form_shows_every_error_at_once(staff_client, fake_model, fake_dataset):
    """The batch size's error hid "Layer 7 does not exist", and a max length past the model's
    positions was never flagged."""
    fake_model.max_positions = 1024
    fake_model.save()
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, layers="7", batch_size="3",
                                                  max_length="5000"))
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert "Select a valid choice" in " ".join(errors["batch_size"])
    assert errors["layers"] == ["Layer 7 does not exist: fake has layers 0-3."]
    assert errors["max_length"] == ["Max length 5,000 is beyond fake's position limit: it reads at most 1,024 tokens."]
    html = response.content.decode()
    assert "Layer 7 does not exist" in html and "Max length 5,000 is beyond" in html
    # With a valid batch size the service says both of its own at once.
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, layers="7", max_length="5000"))
    errors = response.context["form"].errors
    assert set(errors) == {"layers", "max_length"} and Extraction.objects.count() == 0


def test_a_model_without_a_position_limit_is_held_to_a_ceiling(staff_client, fake_model, fake_dataset):
    response = staff_client.post(PAGE, start_data(fake_model, fake_dataset, max_length="1000000"))
    assert response.context["form"].errors["max_length"] == [
        "Max length 1,000,000 is more than the 131,072 tokens jobsite takes per sample."]


def test_the_storage_dtype_is_called_so_on_the_form(staff_client, fake_model):
    html = staff_client.get(PAGE).content.decode()
    assert '<label for="id_storage_dtype">Storage dtype</label>' in html


def test_the_card_says_why_the_batch_runs_smaller_and_when_it_grew_back(staff_client, make_extraction):
    now = timezone.now()
    changes = [{"at_sample": 0, "from": 8, "to": 4, "why": "out_of_memory"},
               {"at_sample": 1, "from": 4, "to": 2, "why": "out_of_memory"},
               {"at_sample": 1200, "from": 2, "to": 8, "why": "grew_back"}]
    running = make_extraction("extracting", batch_size=8, current_batch_size=2, batch_size_changes=changes[:2],
                              samples_processed=600, total_samples=3000, started_at=now, heartbeat_at=now, attempt=1,
                              worker="host:1")
    card = html_unescape(staff_client.get(f"/extractions/{running.pk}/card/").content.decode())
    assert "batch 8 (now 2)" in card
    assert "Batch 8 → 4 from the first sample (out of memory); 4 → 2 after 1 sample (out of memory)." in card
    done = make_extraction("completed", batch_size=8, current_batch_size=8, batch_size_changes=changes,
                           samples_processed=3000, total_samples=3000)
    card = html_unescape(staff_client.get(f"/extractions/{done.pk}/card/").content.decode())
    assert ("Batch 8 → 4 from the first sample (out of memory); 4 → 2 after 1 sample (out of memory); grew back to 8 "
            "after 1,200 samples (shorter samples).") in card
    assert "(now" not in card
    plain = make_extraction("completed", batch_size=8, samples_processed=3000, total_samples=3000)
    assert "data-batch-size-changes" not in staff_client.get(f"/extractions/{plain.pk}/card/").content.decode()
