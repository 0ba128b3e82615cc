"""Workers SIGKILLed at random points; every job still ends with the output of an uninterrupted run."""

import os
import random

import pytest

from extraction.models import Extraction
from extraction.services import extraction_start
from tests.extraction.test_worker_integration import reference_files
from training_runs.generator import LocalGenerator
from training_runs.models import TrainingRun
from training_runs.services import training_run_generate, training_run_review, training_run_train

from .campaign import extraction_campaign, generation_campaign, running_without_heartbeat, training_campaign

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.django_db(transaction=True)]
# bench/chaos.py raises this for long campaigns.
KILLS = int(os.environ.get("JOBSITE_CHAOS_KILLS", 2))


def report(name, campaign):
    print(f"\n{name}: {campaign.kills} SIGKILLs at {campaign.kill_points}")


def test_extraction_killed_repeatedly_resumes_itself_to_identical_files(model_record, dataset, start_worker, tmp_path):
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0, 2], hooks=["residual", "mlp"],
                              batch_size=2)
    campaign = extraction_campaign(job.pk, start_worker, KILLS, random.Random(7))
    report("extraction", campaign)
    job = Extraction.objects.get(pk=job.pk)
    assert campaign.kills >= 1, "the job finished before any kill"
    assert job.attempt == campaign.kills + 1 and job.status == "completed"
    produced = {p.name: p.read_bytes() for p in job.output_dir.iterdir() if p.suffix == ".npy"}
    assert produced == reference_files(job, tmp_path / "reference")
    assert running_without_heartbeat() == []


def test_generation_killed_repeatedly_processes_every_chunk_once(small_corpus, encoder, settings, start_worker):
    env = dict(JOBSITE_ENCODER_PATH=settings.JOBSITE_ENCODER_PATH)
    run = training_run_generate(corpus=small_corpus)
    campaign = generation_campaign(run.pk, start_worker, KILLS, random.Random(11), env=env)
    report("generation", campaign)
    run = TrainingRun.objects.get(pk=run.pk)
    assert campaign.kills >= 1 and run.processed_chunks == run.total_chunks
    chunks = list(small_corpus.chunks.order_by("index"))
    uninterrupted = LocalGenerator(queries_per_chunk=2).generate([chunk.text for chunk in chunks])
    for chunk, queries in zip(chunks, uninterrupted, strict=True):
        assert sorted(run.pairs.filter(chunk=chunk).values_list("query", flat=True)) == sorted(queries)
    assert running_without_heartbeat() == []


def test_training_killed_repeatedly_ends_as_an_uninterrupted_run(small_corpus, encoder, settings, start_worker):
    from tests.training_runs.test_services import generate_and_approve

    env = dict(JOBSITE_ENCODER_PATH=settings.JOBSITE_ENCODER_PATH, JOBSITE_MIN_APPROVED_PAIRS=4,
               JOBSITE_FAILPOINTS='{"training.epoch": {"action": "sleep", "seconds": 0.7}}')
    settings.JOBSITE_HEARTBEAT_S, settings.JOBSITE_PROGRESS_EVERY_S = 0.2, 0
    run = generate_and_approve(small_corpus)
    training_run_review(run=run, decision="approved")
    # Patience 8: all 8 epochs run, however validation goes, so kills land in every part of the run.
    training_run_train(run=TrainingRun.objects.get(pk=run.pk), epochs=8, patience=8)
    campaign = training_campaign(run.pk, start_worker, KILLS, random.Random(3), env=env)
    report("training", campaign)
    run = TrainingRun.objects.get(pk=run.pk)
    assert campaign.kills >= 1 and run.status == "completed" and len(run.loss_curve) == 8

    from training_runs.trainer import TrainSpec, run_training, split_pairs

    positions = {pk: i for i, pk in enumerate(small_corpus.chunks.order_by("index").values_list("pk", flat=True))}
    approved = run.pairs.filter(review="approved").order_by("pk")
    train, validation, test = split_pairs([(p.pk, p.query, positions[p.chunk_id]) for p in approved])
    reference = run_training(
        TrainSpec(encoder_path=settings.JOBSITE_ENCODER_PATH, output_dir=str(run.output_dir.parent / "ref"), epochs=8,
                  patience=8),
        chunk_texts=list(small_corpus.chunks.order_by("index").values_list("text", flat=True)), train_pairs=train,
        validation_pairs=validation, test_pairs=test, progress=lambda *a: None, heartbeat=lambda: None, should_cancel=lambda: False,
        failpoint=lambda *a: None,
    )
    assert run.loss_curve == reference.loss_curve and run.metrics["after"] == reference.after
    assert (run.best_epoch, run.validation_curve, run.adopted) == (
        reference.best_epoch, reference.validation_curve, reference.adopted)
    assert running_without_heartbeat() == []
