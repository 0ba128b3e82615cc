import html
import re

import pytest
from django.urls import reverse

from extraction.models import Extraction

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:extraction_extraction_changelist"


@pytest.fixture
def admin_client_logged(client, django_user_model):
    user = django_user_model.objects.create_superuser("boss", password="pw")
    client.force_login(user)
    return client


def act(client, action, jobs):
    return client.post(reverse(CHANGELIST), {"action": action, "_selected_action": [j.pk for j in jobs]}, follow=True)


def test_changelist_shows_status_badge_progress_and_error(admin_client_logged, make_extraction):
    make_extraction("failed", error_type="OOM", error_message="CUDA out of memory.", total_samples=10, samples_processed=4)
    page = admin_client_logged.get(reverse(CHANGELIST)).content.decode()
    assert ">failed</span>" in page and "4/10 (40 %)" in page and "OOM" in page
    filtered = admin_client_logged.get(reverse(CHANGELIST), {"status__exact": "completed"}).content.decode()
    assert "4/10" not in filtered


def test_cancel_asks_for_a_confirmation_then_cancels_and_reports_refusals(admin_client_logged, make_extraction):
    queued, done = make_extraction("queued"), make_extraction("completed")
    page = act(admin_client_logged, "cancel", [queued, done]).content.decode()
    assert f"Extraction {done.pk} is completed; only a queued or running extraction can be cancelled." in page
    assert "Cancel these extractions?" in page and f"Extraction {queued.pk} — queued" in page
    assert f"Extraction {done.pk} — " not in page, "a refused job is not offered for the confirmation"
    assert Extraction.objects.get(pk=queued.pk).status == "queued", "nothing is cancelled before the confirmation"
    page = admin_client_logged.post(reverse(CHANGELIST), {
        "action": "cancel", "_selected_action": [queued.pk], "confirmed": "yes"}, follow=True).content.decode()
    assert "1 extraction cancelled" in page
    assert Extraction.objects.get(pk=queued.pk).status == "cancelled"


def test_retry_with_suggested_parameters_uses_the_half_batch_size(admin_client_logged, make_extraction):
    failed = make_extraction("failed", batch_size=16, error_type="OOM", suggested_retry_params={"batch_size": 8})
    page = act(admin_client_logged, "retry_with_suggested", [failed]).content.decode()
    retry = Extraction.objects.get(original_extraction=failed)
    assert retry.batch_size == 8 and retry.status == "queued"
    assert "1 retry started with suggested parameters" in page


def test_retry_action_refuses_a_running_job(admin_client_logged, make_extraction):
    running = make_extraction("extracting")
    page = act(admin_client_logged, "retry", [running]).content.decode()
    assert "only a failed or cancelled extraction can be retried" in page
    assert not Extraction.objects.filter(original_extraction=running).exists()


def test_lifecycle_fields_cannot_be_edited_and_jobs_not_added(admin_client_logged, make_extraction):
    job = make_extraction("queued")
    change = reverse("admin:extraction_extraction_change", args=[job.pk])
    admin_client_logged.post(change, {"status": "completed"})
    job.refresh_from_db()
    assert job.status == "queued"
    assert admin_client_logged.get(reverse("admin:extraction_extraction_add")).status_code == 403


def test_oom_at_batch_size_one_suggests_a_shorter_max_length_and_the_retry_uses_it(admin_client_logged, make_extraction):
    failed = make_extraction("failed", batch_size=1, max_length=512, error_type="OOM")
    failed.suggested_retry_params = failed.suggest_retry_params("OOM")
    failed.save(update_fields=["suggested_retry_params"])
    assert failed.suggested_retry_params == {"batch_size": 1, "max_length": 256}
    act(admin_client_logged, "retry_with_suggested", [failed])
    retry = Extraction.objects.get(original_extraction=failed)
    assert retry.batch_size == 1 and retry.max_length == 256


@pytest.mark.parametrize("selected", [["abc"], ["\x00"], ["²"], ["1", "x"]])
def test_an_action_on_ids_that_are_not_numbers_is_a_warning_not_a_500(admin_client_logged, make_extraction, selected):
    queued = make_extraction("queued")
    response = admin_client_logged.post(reverse(CHANGELIST), {"action": "cancel", "_selected_action": selected},
                                        follow=True)
    assert response.status_code == 200
    assert "The selection was not understood; no action was taken." in response.content.decode()
    queued.refresh_from_db()
    assert queued.status == "queued"


@pytest.mark.parametrize("query", [{"status__exact": "\x00"}, {"error_type__exact": "a\x00b"}])
def test_a_filter_value_with_a_nul_redirects_like_any_bad_lookup(admin_client_logged, make_extraction, query):
    make_extraction("failed", error_type="OOM")
    response = admin_client_logged.get(reverse(CHANGELIST), query)
    assert response.status_code == 302 and response["Location"].endswith("?e=1")
    assert admin_client_logged.get(response["Location"]).status_code == 200


def test_delete_refuses_an_active_job_and_takes_a_finished_ones_files_after_a_confirmation(
        admin_client_logged, make_extraction, django_capture_on_commit_callbacks):
    from jobsite.models import Event

    running, done = make_extraction("extracting"), make_extraction("completed")
    done.output_dir.mkdir(parents=True)
    (done.output_dir / "layer_0_residual.npy").write_bytes(b"rows")
    page = act(admin_client_logged, "delete", [running, done]).content.decode()
    assert f"Extraction {running.pk} is extracting; cancel it first, then delete it." in page
    assert "Delete these extractions?" in page and str(done.output_dir) in page
    assert Extraction.objects.filter(pk=done.pk).exists(), "nothing is deleted before the confirmation"
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client_logged.post(reverse(CHANGELIST), {
            "action": "delete", "_selected_action": [done.pk], "confirmed": "yes"}, follow=True).content.decode()
    assert "1 extraction deleted with its files." in page
    assert not Extraction.objects.filter(pk=done.pk).exists() and not done.output_dir.exists()
    assert Extraction.objects.filter(pk=running.pk).exists()
    assert Event.objects.filter(topic=done.topic, type="extraction.deleted").get().payload["deleted_by"] == "boss"
    assert "delete_selected" not in admin_client_logged.get(reverse(CHANGELIST)).content.decode()
    change = admin_client_logged.get(reverse("admin:extraction_extraction_change", args=[running.pk])).content.decode()
    assert "deletelink" not in change


def test_delete_waits_for_a_retry_that_copies_the_originals_samples(admin_client_logged, make_extraction):
    """A retry that changed only the batch size starts from the original's finished samples,
    read from its files as it loads: deleting them then would fail the retry."""
    original = make_extraction("failed", error_type="OOM", samples_processed=40)
    retry = make_extraction("queued", original_extraction=original, resumed_samples=40)
    page = act(admin_client_logged, "delete", [original]).content.decode()
    assert (f"Extraction {retry.pk}, a retry of extraction {original.pk}, starts from its 40 finished samples and "
            f"is queued: delete extraction {original.pk} once {retry.pk} is extracting.") in page
    assert Extraction.objects.filter(pk=original.pk).exists()
    Extraction.objects.filter(pk=retry.pk).update(status="extracting")
    page = act(admin_client_logged, "delete", [original]).content.decode()
    assert "Delete these extractions?" in page


def test_delete_waits_for_a_queued_retry_that_has_not_started_copying_yet(admin_client_logged, make_extraction):
    """Queued, the retry has copied nothing (resumed_samples is counted once the copy is done),
    but it will read the original's finished samples when a worker takes it."""
    original = make_extraction("failed", error_type="OOM", samples_processed=40)
    original.output_dir.mkdir(parents=True)
    (original.output_dir / "checkpoint.json").write_text('{"format_version": 2, "samples_done": 40}')
    retry = make_extraction("queued", original_extraction=original, fingerprint=original.fingerprint)
    page = act(admin_client_logged, "delete", [original]).content.decode()
    assert f"starts from its 40 finished samples and is queued: delete extraction {original.pk} once" in page
    assert Extraction.objects.filter(pk=original.pk).exists() and retry.resumed_samples == 0


def test_models_datasets_and_corpora_are_viewed_not_edited(admin_client_logged, fake_model, fake_dataset, settings):
    """An edit in the admin would skip registration's checks: a dataset pointed at a file outside
    the data directory was read by the next extraction, and finished ones no longer said what
    they had read."""
    from training_runs.models import Corpus

    corpus = Corpus.objects.create(name="handbook", source=str(settings.JOBSITE_DATA_DIR), num_documents=1)
    for record, name in [(fake_model, "extraction_modelrecord"), (fake_dataset, "extraction_dataset"),
                         (corpus, "training_runs_corpus")]:
        url = reverse(f"admin:{name}_change", args=[record.pk])
        page = admin_client_logged.get(url)
        assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
        refused = admin_client_logged.post(url, {"name": "../evil name!", "path": "/usr/lib", "source": "/usr/lib"})
        assert refused.status_code == 403
        record.refresh_from_db()
        assert record.name != "../evil name!"
    fake_dataset.refresh_from_db()
    assert fake_dataset.path != "/usr/lib"


def test_the_changelist_shows_which_jobs_stalled_and_resume_takes_them_back(admin_client_logged, make_extraction,
                                                                            settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.JOBSITE_STALL_AFTER_S = 30
    now, stale = timezone.now(), timezone.now() - timedelta(seconds=120)
    stalled = make_extraction("extracting", worker="w:1", started_at=stale, heartbeat_at=stale, attempt=1,
                              samples_processed=1200, total_samples=18000)
    live = make_extraction("extracting", worker="w:2", started_at=stale, heartbeat_at=now, attempt=1)
    page = admin_client_logged.get(reverse(CHANGELIST)).content.decode()
    assert re.search(r"stalled: silent 12\d s", page) and "1,200/18,000 (7 %)" in page
    page = act(admin_client_logged, "resume", [stalled, live]).content.decode()
    assert "1 stalled job queued again; it continues from its checkpoint." in page
    assert (f"Extraction {live.pk} is extracting and its worker is alive; only a stalled extraction can be "
            "resumed.") in page
    assert Extraction.objects.get(pk=stalled.pk).status == "queued"
    assert Extraction.objects.get(pk=live.pk).status == "extracting"


def test_a_models_admin_page_lists_its_hook_points_and_why_others_are_not(admin_client_logged, model_record,
                                                                         fake_model):
    page = admin_client_logged.get(reverse("admin:extraction_modelrecord_change", args=[model_record.pk]))
    html = page.content.decode()
    assert ("<code>mlp_hidden</code> · <code>blocks.L.mlp.hook_post</code> · width 128 · the MLP&#x27;s neurons "
            "after the activation") in html
    assert html.index("<code>resid_pre</code>") < html.index("<code>attention</code>") < html.index(
        "<code>residual</code>")
    fake_model.hook_refusals = {"mlp": "'bert' is not a family jobsite knows"}
    fake_model.save()
    other = admin_client_logged.get(reverse("admin:extraction_modelrecord_change", args=[fake_model.pk]))
    assert "&#x27;bert&#x27; is not a family jobsite knows" in other.content.decode()


def test_retry_with_suggested_parameters_is_refused_without_a_suggestion(admin_client_logged, make_extraction):
    failed = make_extraction("failed", error_type="VALIDATION", error_message="Layer 7 does not exist.")
    response = admin_client_logged.post(
        reverse("admin:extraction_extraction_changelist"),
        {"action": "retry_with_suggested", "_selected_action": [failed.pk]}, follow=True)
    assert (f"Extraction {failed.pk}'s failure (VALIDATION) suggests no parameters; retry it with the parameters "
            "you choose") in html.unescape(response.content.decode())
    assert not Extraction.objects.filter(original_extraction=failed).exists()


def test_dismiss_moves_failed_and_cancelled_jobs_into_the_history_and_refuses_others(
        admin_client_logged, make_extraction, django_capture_on_commit_callbacks):
    from jobsite.models import Event

    failed, cancelled, running = (make_extraction("failed", error_type="OOM"), make_extraction("cancelled"),
                                  make_extraction("extracting"))
    with django_capture_on_commit_callbacks(execute=True):
        page = html.unescape(act(admin_client_logged, "dismiss", [failed, cancelled, running]).content.decode())
    assert "2 extractions dismissed: they are in the history" in page
    assert (f"Extraction {running.pk} is extracting; only a failed or cancelled extraction can be dismissed "
            "(cancel it first).") in page
    for job in (failed, cancelled):
        job.refresh_from_db()
        assert job.dismissed_at is not None and job.dismissed_by.username == "boss"
    assert Extraction.objects.get(pk=running.pk).dismissed_at is None
    assert Event.objects.get(topic=failed.topic, type="extraction.dismissed").payload["dismissed_by"] == "boss"
    dismissed = admin_client_logged.get(reverse(CHANGELIST), {"dismissed_at__isempty": "0"}).content.decode()
    assert f'value="{failed.pk}"' in dismissed and f'value="{running.pk}"' not in dismissed


def test_a_viewer_is_not_offered_dismiss(client, viewer_user, make_extraction):
    failed = make_extraction("failed", error_type="OOM")
    client.force_login(viewer_user)
    page = client.get(reverse(CHANGELIST))
    assert page.status_code == 200 and 'value="dismiss"' not in page.content.decode()
    client.post(reverse(CHANGELIST), {"action": "dismiss", "_selected_action": [failed.pk]}, follow=True)
    assert Extraction.objects.get(pk=failed.pk).dismissed_at is None


def test_deleting_an_original_keeps_its_number_on_the_retry(admin_client_logged, make_extraction,
                                                            django_capture_on_commit_callbacks):
    original = make_extraction("failed", error_type="OOM")
    retry = make_extraction("completed", original_extraction=original, retry_count=1)
    with django_capture_on_commit_callbacks(execute=True):
        admin_client_logged.post(reverse(CHANGELIST), {
            "action": "delete", "_selected_action": [original.pk], "confirmed": "yes"}, follow=True)
    assert not Extraction.objects.filter(pk=original.pk).exists()
    retry.refresh_from_db()
    assert retry.original_extraction_id == original.pk and retry.retry_count == 1
    assert f"#{original.pk} (deleted)" in admin_client_logged.get(reverse(CHANGELIST)).content.decode()
    change = admin_client_logged.get(reverse("admin:extraction_extraction_change", args=[retry.pk]))
    assert change.status_code == 200 and f"#{original.pk} (deleted)" in change.content.decode()


def test_the_changelist_has_short_columns(admin_client_logged, make_extraction):
    """What fits beside the filters at 1,280 px (tests/browser/test_admin_layout.py measures it)."""
    make_extraction("failed", error_type="OOM", attempt=2, total_samples=20000, samples_processed=12480)
    page = admin_client_logged.get(reverse(CHANGELIST)).content.decode()
    table = page.split('id="result_list"', 1)[1].split("</thead>", 1)[0]
    labels = re.findall(r'<div class="text">\s*(?:<a[^>]*>|<span>)(.*?)(?:</a>|</span>)', table, re.S)
    labels = [label.strip() for label in labels if "<input" not in label]  # the select-all box
    assert len(labels) <= 9 and all(len(label) <= 10 for label in labels), labels
    assert "12,480/20,000 (62 %)" in page and "OOM · try 2" in page
