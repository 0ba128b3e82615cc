"""The epoch a run keeps and whether search uses it, through every door: the service, the API,
the command and the admin. A run whose adapter did not beat the encoder alone on validation
completes "not adopted": search goes through the encoder alone until a person adopts it."""

import io
import json

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from safetensors.torch import save_file

from training_runs import services
from training_runs.models import TrainingRun
from training_runs.selectors import training_run_search
from training_runs.tasks import run_training_phase
from training_runs.trainer import ADAPTER, KeywordIndex, beats, embed, selection_key

pytestmark = pytest.mark.django_db

QUERY = "how do I adjust the brakes on a bicycle"


@pytest.fixture
def not_adopted(small_corpus, settings):
    """A completed run whose adapter was not adopted: its index holds the encoder's chunk embeddings,
    its adapter reverses every query, so whatever search goes through it finds other chunks."""
    run = TrainingRun.objects.create(
        corpus=small_corpus, status="completed", finished_at=timezone.now(), pair_count=40, epochs=8, epochs_done=4,
        best_epoch=1, adopted=False, loss_curve=[1.0, 0.5, 0.4, 0.3],
        validation_curve=[{"recall@1": 0.4, "recall@5": 0.6, "recall@10": 0.7}] * 4,
        metrics={"before": {"recall@1": 0.5, "recall@5": 0.7, "recall@10": 0.8},
                 "after": {"recall@1": 0.4, "recall@5": 0.6, "recall@10": 0.7},
                 "validation_before": {"recall@1": 0.5, "recall@5": 0.7, "recall@10": 0.8},
                 "validation_after": {"recall@1": 0.4, "recall@5": 0.6, "recall@10": 0.7},
                 "train_pairs": 30, "validation_pairs": 5, "test_pairs": 5},
    )
    run.output_dir.mkdir(parents=True)
    chunks = list(small_corpus.chunks.order_by("index").values_list("text", flat=True))
    np.save(run.output_dir / "index.npy", embed(settings.JOBSITE_ENCODER_PATH, chunks))
    import torch

    save_file({"weight": -torch.eye(384), "bias": torch.zeros(384)}, str(run.output_dir / ADAPTER))
    return run


def ranking(run):
    return [hit["index"] for hit in training_run_search(run=TrainingRun.objects.get(pk=run.pk), query=QUERY, k=5)]


def test_search_goes_through_the_encoder_alone_until_a_person_adopts_the_adapter(not_adopted, settings, staff_user):
    chunks = list(not_adopted.corpus.chunks.order_by("index").values_list("text", flat=True))
    scores = embed(settings.JOBSITE_ENCODER_PATH, chunks) @ embed(settings.JOBSITE_ENCODER_PATH, [QUERY])[0]
    assert ranking(not_adopted) == list(np.argsort(-scores)[:5])
    assert not_adopted.corpus.chunks.get(index=ranking(not_adopted)[0]).document == "bicycle-maintenance-guide.md"

    services.training_run_adopt(run=not_adopted, user=staff_user)
    assert ranking(not_adopted) == list(np.argsort(scores)[:5]), "the adopted adapter is what search goes through"
    run = TrainingRun.objects.get(pk=not_adopted.pk)
    assert run.adopted and run.adopted_by == staff_user and run.verdict.startswith(
        f"Adopted by hand by {staff_user.username}: epoch 1 of 4 did not beat the encoder alone")


def test_search_adds_keyword_matching_at_the_weight_the_run_chose(not_adopted, settings, staff_user, staff_client):
    import torch

    # The reversed adapter, saved and recorded as a run that chose keyword matching at weight 1.5 does.
    save_file({"weight": -torch.eye(384), "bias": torch.zeros(384)}, str(not_adopted.output_dir / ADAPTER),
              metadata={"keyword_weight": "1.5"})
    not_adopted.metrics["validation_after"]["keyword_weight"] = 1.5
    not_adopted.save(update_fields=["metrics"])
    row = reverse("training_runs:row", args=[not_adopted.pk])
    assert "as search will once the adapter is adopted" in staff_client.get(row).content.decode()
    services.training_run_adopt(run=not_adopted, user=staff_user)
    body = staff_client.get(f"/api/v1/training/runs/{not_adopted.pk}").json()
    assert body["keyword_weight"] == 1.5
    assert body["verdict"].startswith(f"Adopted by hand by {staff_user.username}: epoch 1 of 4 with keyword matching "
                                      "weighted 1.5 did not beat the encoder alone")
    page = staff_client.get(row).content.decode()
    assert "count keyword matching (BM25) at weight 1.5 beside the adapter, as search does" in page
    chunks = list(not_adopted.corpus.chunks.order_by("index").values_list("text", flat=True))
    cosine = -(embed(settings.JOBSITE_ENCODER_PATH, chunks) @ embed(settings.JOBSITE_ENCODER_PATH, [QUERY])[0])
    keywords = KeywordIndex(chunks).scores([QUERY])[0]
    blended = cosine + 1.5 * keywords
    hits = training_run_search(run=TrainingRun.objects.get(pk=not_adopted.pk), query=QUERY, k=5)
    assert [hit["index"] for hit in hits] == list(np.argsort(-blended, kind="stable")[:5])
    assert [hit["index"] for hit in hits] != list(np.argsort(-cosine)[:5]), "the words moved the ranking"
    assert [hit["score"] for hit in hits] == [round(float(blended[hit["index"]]), 4) for hit in hits]


def test_the_api_says_not_adopted_and_adopts_once(staff_client, not_adopted):
    url = f"/api/v1/training/runs/{not_adopted.pk}"
    body = staff_client.get(url).json()
    assert body["adopted"] is False and body["best_epoch"] == 1 and len(body["validation_curve"]) == 4
    assert body["keyword_weight"] == 0.0, "trained without keyword matching: the adapter alone"
    assert body["verdict"] == (
        "Not adopted: no epoch beat the encoder alone on validation (its best, epoch 1 of 4, fell at recall@1 "
        "0.50 → 0.40, recall@5 0.70 → 0.60, recall@10 0.80 → 0.70), so search uses the encoder alone. Try more or "
        "better pairs, or a lower learning rate.")
    response = staff_client.post(f"{url}/adopt")
    assert response.status_code == 200, response.content
    assert response.json()["adopted"] is True
    assert response.json()["message"] == f"Training run {not_adopted.pk}'s adapter is adopted: search now goes through it."
    again = staff_client.post(f"{url}/adopt")
    assert again.status_code == 409 and again.json()["message"] == (
        f"Training run {not_adopted.pk}'s adapter is adopted already.")


def test_only_a_completed_run_can_be_adopted_and_patience_is_checked(staff_client, small_corpus):
    run = TrainingRun.objects.create(corpus=small_corpus, status="generated", pair_count=10)
    response = staff_client.post(f"/api/v1/training/runs/{run.pk}/adopt")
    assert response.status_code == 409
    assert "only a completed run's adapter can be adopted" in response.json()["message"]
    response = staff_client.post(f"/api/v1/training/runs/{run.pk}/train", {"patience": 0},
                                 content_type="application/json")
    assert response.status_code == 422 and "patience" in json.dumps(response.json())


def test_the_command_asks_before_it_adopts_and_status_prints_the_verdict(not_adopted, monkeypatch):
    out = io.StringIO()
    call_command("training", "status", str(not_adopted.pk), stdout=out)
    assert "Not adopted: no epoch beat the encoder alone on validation" in out.getvalue()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(CommandError, match=f"nothing adopted. To adopt without a prompt, run `manage.py training "
                                           f"adopt {not_adopted.pk} --yes`"):
        call_command("training", "adopt", str(not_adopted.pk), stdout=io.StringIO())
    assert TrainingRun.objects.get(pk=not_adopted.pk).adopted is False
    out = io.StringIO()
    call_command("training", "adopt", str(not_adopted.pk), "--yes", stdout=out)
    assert out.getvalue().strip() == f"Training run {not_adopted.pk}'s adapter is adopted: search now goes through it."
    assert TrainingRun.objects.get(pk=not_adopted.pk).adopted


def test_the_admin_action_shows_the_verdict_and_adopts_once_confirmed(client, django_user_model, not_adopted):
    client.force_login(django_user_model.objects.create_superuser("boss", password="pw"))
    url = reverse("admin:training_runs_trainingrun_changelist")
    asked = client.post(url, {"action": "adopt", "_selected_action": [not_adopted.pk]})
    assert "Not adopted: no epoch beat the encoder alone" in asked.content.decode()
    assert TrainingRun.objects.get(pk=not_adopted.pk).adopted is False
    client.post(url, {"action": "adopt", "_selected_action": [not_adopted.pk], "confirmed": "yes"}, follow=True)
    assert TrainingRun.objects.get(pk=not_adopted.pk).adopted
    detail = client.get(reverse("admin:training_runs_trainingrun_change", args=[not_adopted.pk]))
    assert "Adopted by hand by boss" in detail.content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_real_run_keeps_its_best_validation_epoch_and_stops_after_its_patience(small_corpus, fast_machinery):
    run = services.training_run_generate(corpus=small_corpus)
    run_training_phase(run.pk)
    services.training_run_review(run=TrainingRun.objects.get(pk=run.pk), decision="approved")
    services.training_run_train(run=TrainingRun.objects.get(pk=run.pk), epochs=10, patience=2, learning_rate=0.01)
    run_training_phase(run.pk)
    run = TrainingRun.objects.get(pk=run.pk)
    assert run.status == "completed", run.error_message
    assert run.epochs_done == len(run.loss_curve) == len(run.validation_curve)
    baseline = run.metrics["validation_before"]
    keys = [selection_key(r) for r in run.validation_curve]
    adoptable = [e for e in range(1, run.epochs_done + 1) if beats(run.validation_curve[e - 1], baseline)]
    # The kept epoch: the best of those that beat the encoder alone, or the best of all when none does.
    candidates = adoptable or list(range(1, run.epochs_done + 1))
    assert run.best_epoch == max(candidates, key=lambda e: (keys[e - 1], -e))
    assert run.adopted == bool(adoptable)
    # Training stops `patience` epochs after validation was last at its best.
    assert run.epochs_done == 10 or run.epochs_done == keys.index(max(keys)) + 1 + 2
    assert run.verdict.startswith("Adopted epoch" if run.adopted else "Not adopted")
    assert {"train_pairs", "validation_pairs", "test_pairs", "before", "after"} <= set(run.metrics)


def test_a_removed_run_says_search_no_longer_uses_it(not_adopted, staff_user):
    services.training_run_remove(run=not_adopted, user=staff_user)
    run = TrainingRun.objects.get(pk=not_adopted.pk)
    assert run.verdict.startswith(f"Not adopted when it was removed (removed by {staff_user.username} on ")
    assert run.verdict.endswith("); search no longer uses it.")


@pytest.mark.parametrize(("after", "adopted", "verdict"), [
    (0.6, True, "Adopted: epoch 8 of 8, trained before validation existed (held-out recall@5 0.55 → 0.60); search "
                "uses it."),
    (0.5, False, "Not adopted: epoch 8 of 8, trained before validation existed (held-out recall@5 0.55 → 0.50); "
                 "search uses the encoder alone."),
])
def test_a_run_trained_before_validation_existed_is_judged_on_its_held_out_recall(small_corpus, after, adopted,
                                                                                  verdict):
    run = TrainingRun.objects.create(
        corpus=small_corpus, status="completed", finished_at=timezone.now(), epochs=8, epochs_done=8, best_epoch=8,
        adopted=adopted, metrics={"before": {"recall@1": 0.3, "recall@5": 0.55, "recall@10": 0.7},
                                  "after": {"recall@1": 0.3, "recall@5": after, "recall@10": 0.7}, "eval_pairs": 40})
    assert run.verdict == verdict
