"""The trainer with the real MiniLM encoder: progress counted in texts across chunks and
queries, a stop between batches, a resume that keeps the batches done; the epoch chosen on
validation, early stopping, and an adapter worse than the encoder alone never adopted."""

import io
import os

import numpy as np
import pytest
from safetensors.torch import load_file

from jobsite.errors import Cancelled
from tests.conftest import TEXTS
from training_runs.trainer import (KeywordIndex, TrainSpec, adapter_keyword_weight, apply_adapter, beats, best_blend,
                                  embed, embed_batch_size, embedding_key, length_order, load_adapter, load_encoder,
                                  recall_at_k, run_training, selection_key)

CHUNKS = [f"{text} (section {i})" for i, text in enumerate(TEXTS[:10])]
TRAIN = [(f"what does section {i} say about it", i) for i in range(0, len(CHUNKS), 2)]
# Validation asks with the chunks' own opening words: the encoder alone finds them first.
VALIDATION = [(CHUNKS[1][:40], 1), (CHUNKS[7][:40], 7)]
TEST = [("where is section 3", 3), ("where is section 9", 9)]
TOTAL = len(CHUNKS) + len(TRAIN) + len(VALIDATION) + len(TEST)
# Batches of 4: the chunks in 3 (the last of 2), the training queries in 2 (the last of 1), the
# validation and the test queries in 1 each.
EVERY_BATCH = [0, 4, 8, 10, 14, 15, 17, 19]


def train(encoder, output_dir, *, should_cancel, epochs=2, train_pairs=TRAIN, **spec_fields):
    """Runs the trainer, asking should_cancel(reports so far); returns (reports, result or Cancelled),
    the reports in order: ("texts", done, total) while embedding, ("epochs", done, total) after."""
    reports = []
    spec = TrainSpec(encoder_path=str(encoder), output_dir=str(output_dir), epochs=epochs, batch_size=8,
                     **{"embed_batch_size": 4, **spec_fields})
    try:
        result = run_training(
            spec, chunk_texts=CHUNKS, train_pairs=train_pairs, validation_pairs=VALIDATION, test_pairs=TEST,
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
    assert TOTAL == 19
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


# Every training query is paired with one of two chunks whatever it asks: training pulls the
# adapter away from what the encoder finds, and validation, which the encoder alone gets right,
# can only get worse.
MISLEADING = [(f"what does section {i} say about it", 0 if i % 2 else 5) for i in range(len(CHUNKS))]


def test_an_adapter_worse_than_the_encoder_alone_is_kept_as_the_best_epoch_but_not_adopted(encoder, tmp_path):
    _, result = train(encoder, tmp_path / "run", should_cancel=never, epochs=12, train_pairs=MISLEADING,
                      learning_rate=0.05, identity_decay=0, patience=2)
    assert not result.adopted
    assert not beats(result.validation_curve[result.best_epoch - 1], result.validation_before)
    # The kept epoch is the best on validation, not the last, and training stopped `patience` epochs after it.
    assert result.best_epoch == max(range(1, len(result.validation_curve) + 1),
                                    key=lambda e: (selection_key(result.validation_curve[e - 1]), -e))
    assert len(result.loss_curve) == result.best_epoch + 2 < 12
    # The saved adapter and keyword weight are that epoch's: they measure what the curve says they did.
    kept = result.validation_curve[result.best_epoch - 1]
    assert adapter_keyword_weight(result.adapter_path) == kept["keyword_weight"] == result.keyword_weight
    vectors = embed(str(encoder), [q for q, _ in VALIDATION])
    keywords = KeywordIndex(CHUNKS).scores([q for q, _ in VALIDATION])
    saved = recall_at_k(apply_adapter(load_adapter(result.adapter_path), vectors), embed(str(encoder), CHUNKS),
                        [c for _, c in VALIDATION], keywords, adapter_keyword_weight(result.adapter_path))
    assert {**saved, "keyword_weight": kept["keyword_weight"]} == kept


@pytest.mark.parametrize(("recall", "adopted"), [
    ((0.6, 0.8, 0.9), True), ((0.5, 0.8, 0.9), False), ((0.6, 0.9, 0.9), True), ((0.7, 0.7, 1.0), False),
], ids=["better at 1", "the same", "better at 1 and 5", "better at 1 and 10, worse at 5"])
def test_an_epoch_is_adopted_only_when_it_is_no_worse_at_any_k_and_better_at_one(recall, adopted):
    baseline = {"recall@1": 0.5, "recall@5": 0.8, "recall@10": 0.9}
    assert beats(dict(zip(baseline, recall, strict=True)), baseline) is adopted


def test_a_run_stopped_between_epochs_resumes_knowing_its_best_epoch(encoder, tmp_path):
    options = dict(epochs=6, train_pairs=MISLEADING, learning_rate=0.05, identity_decay=0, patience=4)
    reports, stopped = train(encoder, tmp_path / "run", should_cancel=lambda reports: ("epochs", 2, 6) in reports,
                             **options)
    assert isinstance(stopped, Cancelled) and str(stopped) == "Stopped in epoch 3."
    _, resumed = train(encoder, tmp_path / "run", should_cancel=never, **options)
    _, uninterrupted = train(encoder, tmp_path / "reference", should_cancel=never, **options)
    assert (resumed.best_epoch, resumed.validation_curve, resumed.loss_curve, resumed.adopted) == (
        uninterrupted.best_epoch, uninterrupted.validation_curve, uninterrupted.loss_curve, uninterrupted.adopted)
    ours, theirs = load_file(resumed.adapter_path), load_file(uninterrupted.adapter_path)
    assert all((ours[k] == theirs[k]).all() for k in ours)


def test_a_score_that_is_not_a_number_finds_nothing():
    chunks = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [np.nan, 0, 0]], dtype=np.float32)
    assert recall_at_k(queries, chunks, [0, 1]) == {"recall@1": 0.5, "recall@5": 0.5, "recall@10": 0.5}


def test_keyword_scores_are_textbook_bm25_scaled_to_the_querys_best_chunk():
    chunks = ["The cat sat.", "The dog sat on the mat, the MAT!", "Cats and dogs", "Café au lait"]
    index = KeywordIndex(chunks)
    tokens = [["the", "cat", "sat"], ["the", "dog", "sat", "on", "the", "mat", "the", "mat"], ["cats", "and", "dogs"],
              ["café", "au", "lait"]]
    average = sum(map(len, tokens)) / len(tokens)

    def bm25(query_words, doc):  # Robertson's BM25 with Lucene's idf, k1 1.2, b 0.75, written out
        total = 0.0
        for word in set(query_words):
            df = sum(word in d for d in tokens)
            tf = doc.count(word)
            if df and tf:
                idf = np.log(1 + (len(tokens) - df + 0.5) / (df + 0.5))
                total += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(doc) / average))
        return total

    for query, words in [("cat mat", ["cat", "mat"]), ("CAFÉ", ["café"]), ("the dog", ["the", "dog"])]:
        raw = np.array([bm25(words, doc) for doc in tokens])
        assert np.allclose(index.scores([query])[0], raw / raw.max(), atol=1e-6), query
    # Whole words only: "cat" is not "cats", and a query with no word in the corpus scores 0 everywhere.
    assert index.scores(["cats"])[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert index.scores(["zebra"])[0].tolist() == [0.0] * 4


NOTHING_FOUND = {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0}


def test_validation_chooses_no_keyword_weight_where_the_words_mislead_and_one_where_they_help():
    chunks = np.eye(4, dtype=np.float32)
    right = np.eye(4, dtype=np.float32)[[0, 1, 2]] * 0.9 + 0.1  # the cosine finds each query's chunk
    misleading = np.eye(4, dtype=np.float32)[[3, 3, 3]]  # the words point every query at chunk 3
    chosen = best_blend(right, chunks, [0, 1, 2], misleading, (0.0, 0.5, 1.0, 2.0), NOTHING_FOUND)
    assert chosen["keyword_weight"] == 0.0 and chosen["recall@1"] == 1.0
    wrong = np.eye(4, dtype=np.float32)[[1, 2, 0]]  # the cosine finds the next chunk instead
    helpful = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    chosen = best_blend(wrong, chunks, [0, 1, 2], helpful, (0.0, 0.5, 2.0), NOTHING_FOUND)
    assert chosen["keyword_weight"] == 2.0 and chosen["recall@1"] == 1.0  # at 0.5 the cosine still leads
    # On a tie the lower weight is kept: words that add nothing do not enter search.
    assert best_blend(right, chunks, [0, 1, 2], right, (0.0, 0.5), NOTHING_FOUND)["keyword_weight"] == 0.0


def test_a_keyword_weight_that_would_cost_the_epoch_its_adoption_is_not_chosen():
    chunks = np.eye(7, dtype=np.float32)
    cosine = np.array([[1.0, 0, 0.5, 0.4, 0.3, 0.2, 0.1],  # query 0 finds its chunk first
                       [0.9, 0, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)  # query 1 finds its chunk last
    keywords = np.zeros((2, 7), dtype=np.float32)
    keywords[0, 2], keywords[1, 1] = 1.0, 0.4  # at weight 2: query 0 falls to second, query 1 rises to second
    baseline = {"recall@1": 0.5, "recall@5": 0.5, "recall@10": 0.5}
    # Weight 2 finds both within 5 (recall@5 1.0 against 0.5) but neither first: it does not beat
    # the encoder alone, while weight 0 does (at recall@10); the epoch keeps weight 0 and its adoption.
    chosen = best_blend(cosine, chunks, [0, 1], keywords, (0.0, 2.0), baseline)
    assert chosen == {"recall@1": 0.5, "recall@5": 0.5, "recall@10": 1.0, "keyword_weight": 0.0}
    assert beats(chosen, baseline)
    alone = best_blend(cosine, chunks, [0, 1], keywords, (2.0,), baseline)
    assert alone["recall@5"] == 1.0 and alone["recall@1"] == 0.0 and not beats(alone, baseline)


def test_texts_are_embedded_most_tokens_first_and_each_gets_its_own_embedding(encoder):
    tokenizer = load_encoder(str(encoder))[0]
    # Fewer characters, more tokens: a reference number splits into many pieces; long plain
    # words stay whole. By characters the second would come first, and a batch of it and a
    # short text would pad the short one to its length.
    codes, words = "x9-q7 z3/k8 v2", "understanding everything"
    assert len(codes) < len(words) and len(tokenizer(codes)["input_ids"]) > len(tokenizer(words)["input_ids"])
    texts = ["short", words, codes, words]
    assert length_order(texts, tokenizer) == [2, 1, 3, 0], "most tokens first, ties in their order"
    long_text = " ".join(CHUNKS) * 3  # past MAX_TOKENS: counted as the encoder reads it, cut there
    assert length_order([long_text, long_text + " more words"], tokenizer) == [0, 1]

    texts = [CHUNKS[0], "short", CHUNKS[3][:30], codes, CHUNKS[5]]
    together = embed(str(encoder), texts, batch_size=2)
    alone = np.concatenate([embed(str(encoder), [text]) for text in texts])
    assert np.allclose(together, alone, atol=1e-5)


def test_a_second_run_on_the_same_texts_takes_their_embeddings_from_the_shared_folder(encoder, tmp_path):
    shared = str(tmp_path / "shared")
    _, first = train(encoder, tmp_path / "first", should_cancel=never, shared_dir=shared)
    reports, second = train(encoder, tmp_path / "second", should_cancel=never, shared_dir=shared)
    assert [r for r in reports if r[0] == "texts"] == [("texts", TOTAL, TOTAL)], "nothing embedded again"
    assert np.array_equal(np.load(tmp_path / "first" / "index.npy"), np.load(tmp_path / "second" / "index.npy"))
    assert (second.before, second.validation_curve, second.loss_curve) == (
        first.before, first.validation_curve, first.loss_curve)

    # Another batch size makes other values in the last bits: it embeds its own, and shares them apart.
    reports, _ = train(encoder, tmp_path / "third", should_cancel=never, shared_dir=shared, embed_batch_size=2)
    assert texts_reported(reports)[:3] == [0, 2, 4]

    # A shared file that is not a whole .npy (text, a zip archive) is embedded again, to the same
    # values, and written again for the next run.
    archive = io.BytesIO()
    np.savez(archive, chunks=np.zeros((len(CHUNKS), 384), np.float32))
    for garbage in (b"not an array", b"PK\x03\x04 half an archive", archive.getvalue()):
        for path in (tmp_path / "shared").rglob("chunks-*.npy"):
            path.write_bytes(garbage)
        output = tmp_path / f"again-{len(garbage)}"
        reports, _ = train(encoder, output, should_cancel=never, shared_dir=shared)
        assert texts_reported(reports) == [TOTAL - len(CHUNKS), TOTAL - 6, TOTAL - 2, TOTAL], "the queries' are whole"
        assert np.array_equal(np.load(tmp_path / "first" / "index.npy"), np.load(output / "index.npy"))
        reports, _ = train(encoder, tmp_path / f"next-{len(garbage)}", should_cancel=never, shared_dir=shared)
        assert texts_reported(reports) == [TOTAL], "the shared file was mended"


def test_the_embedding_key_changes_when_an_encoder_file_is_rewritten_in_place(tmp_path):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    weights = encoder / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    spec = TrainSpec(encoder_path=str(encoder), output_dir=str(tmp_path / "run"))
    before = embedding_key(spec)
    assert embedding_key(spec) == before
    kept = weights.stat()
    weights.write_bytes(b"b" * 64)  # other weights, the same size and modification time
    os.utime(weights, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert embedding_key(spec) != before
    assert embedding_key(TrainSpec(encoder_path=str(encoder), output_dir="x", embed_batch_size=32)) != embedding_key(spec)
    # A spec without a batch size takes its device's, and is keyed by it as if it had named it.
    assert spec.embed_batch_size == embed_batch_size("cpu") == 16
    assert embedding_key(TrainSpec(encoder_path=str(encoder), output_dir="x", embed_batch_size=16)) == embedding_key(spec)
    assert TrainSpec(encoder_path=str(encoder), output_dir="x", device="cuda").embed_batch_size == 64


def test_a_run_resumed_with_another_batching_embeds_afresh_instead_of_mixing_batches(encoder, tmp_path):
    reports, stopped = train(encoder, tmp_path / "run", should_cancel=lambda reports: len(reports) >= 3)
    assert isinstance(stopped, Cancelled) and texts_reported(reports)[-1] == 8
    reports, resumed = train(encoder, tmp_path / "run", should_cancel=never, embed_batch_size=2)
    assert texts_reported(reports)[:3] == [0, 2, 4], "the batches of 4 are not taken for batches of 2"
    _, reference = train(encoder, tmp_path / "reference", should_cancel=never, embed_batch_size=2)
    assert np.array_equal(np.load(tmp_path / "run" / "index.npy"), np.load(tmp_path / "reference" / "index.npy"))
