"""The trainer's embedding stage with the real MiniLM encoder: progress counted in texts
across chunks and queries, a stop between batches, and a resume that keeps the batches done."""

import numpy as np
import pytest
from safetensors.torch import load_file

from jobsite.errors import Cancelled
from tests.conftest import TEXTS
from training_runs.trainer import TrainSpec, run_training

CHUNKS = [f"{text} (section {i})" for i, text in enumerate(TEXTS[:10])]
TRAIN = [(f"what does section {i} say about it", i) for i in range(0, len(CHUNKS), 2)]
EVAL = [("where is section 1", 1), ("where is section 7", 7)]
TOTAL = len(CHUNKS) + len(TRAIN) + len(EVAL)
# Batches of 4: the chunks in 3 (the last of 2), the training queries in 2 (the last of 1), the held-out ones in 1.
EVERY_BATCH = [0, 4, 8, 10, 14, 15, 17]


def train(encoder, output_dir, *, should_cancel, epochs=2):
    """Runs the trainer, asking should_cancel(reports so far); returns (reports, result or Cancelled),
    the reports in order: ("texts", done, total) while embedding, ("epochs", done, total) after."""
    reports = []
    spec = TrainSpec(encoder_path=str(encoder), output_dir=str(output_dir), epochs=epochs, batch_size=8,
                     embed_batch_size=4)
    try:
        result = run_training(
            spec, chunk_texts=CHUNKS, train_pairs=TRAIN, eval_pairs=EVAL,
            embedding_progress=lambda done, total: reports.append(("texts", done, total)),
            progress=lambda epoch, epochs, *_: reports.append(("epochs", epoch, epochs)),
            heartbeat=lambda: None, should_cancel=lambda: should_cancel(reports), failpoint=lambda *a: None,
        )
    except Cancelled as exc:
        return reports, exc
    return reports, result


def texts_reported(reports):
    assert all(total == TOTAL for kind, _done, total in reports if kind == "texts")
    return [done for kind, done, _total in reports if kind == "texts"]


def never(reports):
    return False


def test_embedding_reports_every_batch_up_to_all_chunks_and_queries_before_the_first_epoch(encoder, tmp_path):
    assert TOTAL == 17
    reports, _result = train(encoder, tmp_path / "run", should_cancel=never)
    assert texts_reported(reports) == EVERY_BATCH
    assert [r for r in reports if r[0] == "epochs"] == [("epochs", 0, 2), ("epochs", 1, 2), ("epochs", 2, 2)]
    assert reports.index(("texts", TOTAL, TOTAL)) < reports.index(("epochs", 0, 2))


def test_a_second_attempt_counts_what_is_embedded_as_done_at_once(encoder, tmp_path):
    train(encoder, tmp_path / "run", should_cancel=never)
    reports, result = train(encoder, tmp_path / "run", should_cancel=never, epochs=3)
    assert [r for r in reports if r[0] == "texts"] == [("texts", TOTAL, TOTAL)]
    assert len(result.loss_curve) == 3


@pytest.mark.parametrize(("reports_before_stop", "stopped_at"), [(3, 8), (5, 14)],
                         ids=["in the chunks", "in the training queries"])
def test_a_stop_while_embedding_ends_before_any_epoch_and_a_resume_embeds_only_the_rest(
    encoder, tmp_path, reports_before_stop, stopped_at
):
    reports, stopped = train(encoder, tmp_path / "run", should_cancel=lambda reports: len(reports) >= reports_before_stop)
    assert isinstance(stopped, Cancelled)
    assert str(stopped) == f"Stopped while embedding ({stopped_at} of {TOTAL} texts)."
    assert texts_reported(reports)[-1] == stopped_at and not [r for r in reports if r[0] == "epochs"]

    reports, resumed = train(encoder, tmp_path / "run", should_cancel=never)
    assert texts_reported(reports) == [stopped_at, *[done for done in EVERY_BATCH if done > stopped_at]]

    # The same batches as an uninterrupted run: the same embeddings, the same adapter.
    _, uninterrupted = train(encoder, tmp_path / "reference", should_cancel=never)
    assert np.array_equal(np.load(tmp_path / "run" / "index.npy"), np.load(tmp_path / "reference" / "index.npy"))
    assert resumed.loss_curve == uninterrupted.loss_curve and resumed.before == uninterrupted.before
    ours, theirs = load_file(resumed.adapter_path), load_file(uninterrupted.adapter_path)
    assert all((ours[k] == theirs[k]).all() for k in ours)
