"""Phase 2 of a training run: a retrieval adapter over a local encoder's embeddings.

Chunks and queries are embedded once with the encoder (mean pooling, batched, cached on
disk batch by batch, so a stop or a crash while embedding keeps the batches already done).
A linear adapter on the query side starts at the identity (the encoder alone) and is trained
with an in-batch contrastive loss, its weights decayed toward the identity so a small corpus
cannot push it far from the encoder. Search adds keyword matching (BM25 over the chunks) to
the adapter's cosine score, at a weight chosen on validation with the epoch: 0 where the
words do not help, so a corpus whose queries paraphrase their chunks keeps the adapter alone.

The pairs are split three ways by chunk: training, validation (which chooses) and test
(which reports). Every epoch is measured on validation; the best epoch's adapter is kept,
not the last, training stops early once validation recall@5 has not improved for
`patience` epochs, and the adapter is adopted only when it beats the encoder alone on
validation. Every epoch ends with a checkpoint (safetensors: adapter, optimizer state, best
adapter; JSON: epoch, losses, validation curve, best epoch), and a resumed run continues
after the last complete epoch with the same shuffles, so it ends where an uninterrupted run
ends. Pure torch/transformers: no Django here, and no pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import safetensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.utils import logging as transformers_logging

from jobsite.errors import Cancelled, JobInputError

# Worker logs are read by people: no weight-loading progress bars there.
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

ADAPTER = "adapter.safetensors"
CHECKPOINT_DIR = "checkpoint"
BEST = "best.safetensors"
KS = (1, 5, 10)
TEMPERATURE = 0.05
# The share of chunks whose pairs validate (choose the epoch) and test (report), by chunk.
VALIDATION_FRACTION = 0.15
TEST_FRACTION = 0.2
# The weights of keyword matching (BM25, scaled to 1 at the query's best chunk) added to the
# cosine score; validation chooses one with every epoch. 0 is the adapter alone. The cosine
# scores of a query's top chunks lie within about 0.1-0.3 of each other, so 0.05 nudges ties and
# 1.0 lets the words lead.
KEYWORD_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
# The encoder reads a text's first 256 tokens (MiniLM was trained on 256).
MAX_TOKENS = 256


@dataclass(frozen=True)
class TrainSpec:
    encoder_path: str
    output_dir: str
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    # Texts per forward pass when embedding; 0: embed_batch_size(device).
    embed_batch_size: int = 0
    # Epochs without a better validation recall@5 before training stops.
    patience: int = 3
    # Decoupled weight decay of (W - I) and of the bias, times the learning rate per step: the
    # pull toward the encoder alone. At 100, five seeds on the demo corpus and on a second one
    # each adopted an adapter no worse than the encoder on test recall@1 and @5; at 30 and below
    # one seed in five lost recall@1 (bench/RESULTS.md, 2026-12-07).
    identity_decay: float = 100.0
    # The keyword weights validation chooses from; (0.0,) serves the adapter alone.
    keyword_weights: tuple[float, ...] = KEYWORD_WEIGHTS
    # Where complete embeddings are shared between runs ("": each run embeds its own texts).
    shared_dir: str = ""

    def __post_init__(self) -> None:
        if not self.embed_batch_size:
            object.__setattr__(self, "embed_batch_size", embed_batch_size(self.device))


@dataclass
class TrainResult:
    before: dict  # test recall of the encoder alone
    after: dict  # test recall of the chosen epoch's adapter
    validation_before: dict = field(default_factory=dict)
    validation_curve: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    adopted: bool = False
    loss_curve: list[float] = field(default_factory=list)
    adapter_path: str = ""
    keyword_weight: float = 0.0  # the chosen epoch's weight of keyword matching in search

    @property
    def epochs_run(self) -> int:
        return len(self.loss_curve)


@lru_cache(maxsize=2)
def load_encoder(path: str, device: str = "cpu"):
    """(tokenizer, model) of a local encoder; cached per process (search calls it per query)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise JobInputError(f"The encoder at {path} cannot be loaded: {exc}") from exc
    return tokenizer, model.to(device).eval()


def _nothing() -> None:
    return None


def _never() -> bool:
    return False


def embed_batch_size(device: str) -> int:
    """Texts per forward pass when embedding. On a CPU, 16: with texts ordered by their tokens
    (length_order), batches of 16 pad the demo corpus's chunks and queries to 1.02 times their
    tokens (64: 1.10). Embedding them took 0.81 of the time of batches of 64 in that order, and
    0.70 of the earlier order of characters in batches of 64 (the second corpus: 0.88, 0.78;
    `bench/training.py --embedding-orders 4`, medians of 4 interleaved rounds, two threads).
    The matrix products run at the machine's own rate, so padding is what there is to win.
    On a GPU, 64 (not measured: none was at hand)."""
    return 16 if device == "cpu" else 64


def embed_batches(encoder_path: str, texts: Sequence[str], *, device: str = "cpu", batch_size: int | None = None,
                  heartbeat: Callable[[], None] = _nothing,
                  should_cancel: Callable[[], bool] = _never) -> Iterator[np.ndarray]:
    """L2-normalised mean-pooled embeddings, float32 [batch, hidden], one batch at a time.

    Cancel is asked between batches, so a stop takes effect within one batch.
    """
    tokenizer, model = load_encoder(encoder_path, device)
    batch_size = batch_size or embed_batch_size(device)
    for start in range(0, len(texts), batch_size):
        heartbeat()
        if should_cancel():
            raise Cancelled(f"Stopped while embedding ({start:,} of {len(texts):,} texts).")
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        yield torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


def length_order(texts: Sequence[str], tokenizer) -> list[int]:
    """The order texts are embedded in: most tokens first (as the encoder reads them, cut at
    MAX_TOKENS; ties by position), so a batch pads its texts to a length near their own.

    Counted in tokens, not characters: markup, digits and rare words make many tokens of few
    characters. On the demo corpus's chunks and queries, batches of 64 padded to 1.28 times
    their tokens in the order of characters and to 1.10 in this one (batches of 16: 1.19 and
    1.02); the second corpus's, 1.45 and 1.27. Counting costs one pass of the tokenizer, a
    thousand texts at a time, keeping only the counts."""
    counts: list[int] = []
    for start in range(0, len(texts), 1024):
        ids = tokenizer(list(texts[start : start + 1024]), truncation=True, max_length=MAX_TOKENS)["input_ids"]
        counts.extend(map(len, ids))
    return sorted(range(len(texts)), key=lambda i: (-counts[i], i))


def _in_place(order: Sequence[int], values: np.ndarray) -> np.ndarray:
    """Embeddings made in `order`, put back in the texts' own order."""
    out = np.empty_like(values)
    out[np.asarray(order, dtype=np.int64)] = values
    return out


def embed(encoder_path: str, texts: Sequence[str], *, device: str = "cpu", batch_size: int | None = None,
          heartbeat: Callable[[], None] = _nothing, should_cancel: Callable[[], bool] = _never) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, float32 [len(texts), hidden], in the texts' order
    (made in length_order's batches, as a training run's are)."""
    tokenizer, model = load_encoder(encoder_path, device)
    order = length_order(texts, tokenizer)
    out = list(embed_batches(encoder_path, [texts[i] for i in order], device=device, batch_size=batch_size,
                             heartbeat=heartbeat, should_cancel=should_cancel))
    return _in_place(order, np.concatenate(out)) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)


def _save_npy(path: str, values: np.ndarray) -> None:
    """Atomically, through a temporary file of its own: two runs writing one shared file never
    rename each other's half-written one into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, values)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class EmbeddingCache:
    """A run directory's embeddings of one list of texts (the chunks, the training or the
    held-out queries), keyed by the texts.

    The texts are embedded in length_order, as embed() does. Every batch is written
    (atomically) as soon as it is embedded, so a stop or a crash keeps the batches before it
    and a resume embeds only the rest, in the batches an uninterrupted run uses (so with the
    same values). Once complete, the batches become one file, in the texts' own order.

    With a `shared` directory (one per encoder and batching: embedding_key), the
    complete file is also kept there, and a later run on the same texts takes it instead of
    embedding them again: a second run on a corpus embeds only the queries it has not seen.
    """

    def __init__(self, output_dir: str, name: str, texts: Sequence[str], key: str = "", shared: str = ""):
        # `key` (embedding_key): a run resumed after its encoder or batching changed embeds afresh
        # instead of mixing old batches with new ones. "most tokens first": batches an earlier version
        # wrote in another order (the texts' own, longest in characters first) are not these.
        digest = hashlib.sha256(f"most tokens first\x1e{key}\x1e".encode() + "\x1e".join(texts).encode()).hexdigest()[:16]
        self.texts = texts
        self.path = os.path.join(output_dir, f"{name}-{digest}.npy")
        self.shared_path = os.path.join(shared, f"{name}-{digest}.npy") if shared else ""
        self.batches_dir = os.path.join(output_dir, f"{name}-{digest}.batches")
        self.shared_ok = False  # whether the shared folder holds this file whole already
        self.complete = self._whole()  # the texts' embeddings in their order, or None
        self.stored = [self.complete] if self.complete is not None else self._batches()

    def _batch_path(self, start: int) -> str:
        return os.path.join(self.batches_dir, f"{start:09d}.npy")

    def _whole(self) -> np.ndarray | None:
        """The run's complete file, else the shared one where it holds one row per text."""
        self.shared_ok = bool(self.shared_path) and self._shared_fits()
        if os.path.exists(self.path):
            return np.load(self.path)
        return np.load(self.shared_path) if self.shared_ok else None

    def _shared_fits(self) -> bool:
        """Whether the shared file is a whole .npy of one float32 row per text (its header and
        size read, not its rows): absent, cut short, an archive or another shape is written again."""
        try:
            shared = np.load(self.shared_path, mmap_mode="r")
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return False
        if not isinstance(shared, np.ndarray):
            shared.close()  # an .npz archive
            return False
        return shared.ndim == 2 and len(shared) == len(self.texts) and shared.dtype == np.float32

    def _batches(self) -> list[np.ndarray]:
        stored, start = [], 0
        while os.path.exists(self._batch_path(start)):
            stored.append(np.load(self._batch_path(start)))
            start += len(stored[-1])
        return stored

    @property
    def done(self) -> int:
        """Texts whose embeddings are on disk already."""
        return sum(len(values) for values in self.stored)

    def fill(self, spec: TrainSpec, *, heartbeat: Callable[[], None], should_cancel: Callable[[], bool],
             embedded: Callable[[int], None]) -> np.ndarray:
        """Embed what is not stored yet (`embedded(count)` after every batch); all of them."""
        start = self.done
        order = [] if self.complete is not None else length_order(self.texts, load_encoder(spec.encoder_path, spec.device)[0])
        if start < len(self.texts):
            os.makedirs(self.batches_dir, exist_ok=True)
            ordered = [self.texts[i] for i in order]
            for values in embed_batches(spec.encoder_path, ordered[start:], device=spec.device,
                                        batch_size=spec.embed_batch_size, heartbeat=heartbeat,
                                        should_cancel=should_cancel):
                _save_npy(self._batch_path(start), values)
                self.stored.append(values)
                start += len(values)
                embedded(len(values))
        if self.complete is not None:
            values = self.complete
        elif self.stored:
            values = _in_place(order, np.concatenate(self.stored))
        else:
            values = np.zeros((0, load_encoder(spec.encoder_path, spec.device)[1].config.hidden_size), np.float32)
        if not os.path.exists(self.path):
            _save_npy(self.path, values)
            shutil.rmtree(self.batches_dir, ignore_errors=True)
        if self.shared_path and not self.shared_ok:
            try:  # a cache: a run that cannot write it goes on, and the next one embeds again
                os.makedirs(os.path.dirname(self.shared_path), exist_ok=True)
                _save_npy(self.shared_path, values)
            except OSError:
                pass
        return values


def embedding_key(spec: TrainSpec) -> str:
    """What embeddings depend on besides their texts: the encoder's files and the batching.

    The files by path, name, size, modification time, inode and change time: a file rewritten in
    place changes its change time even when its size and modification time are kept, and a
    copy elsewhere is another key (embedded again, never mixed). The batching by batch size and
    device: the values depend on them in the last bits, so a file under this key holds exactly
    the values a run with this spec computes."""
    key = hashlib.sha256(f"{os.path.realpath(spec.encoder_path)}\x1e{spec.embed_batch_size}\x1e{spec.device}".encode())
    for root, dirs, files in os.walk(spec.encoder_path):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.stat(path)
            key.update(f"\x1e{os.path.relpath(path, spec.encoder_path)}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}"
                       f"\x1f{stat.st_ino}\x1f{stat.st_ctime_ns}".encode())
    return key.hexdigest()[:16]


def new_adapter(hidden: int) -> torch.nn.Linear:
    adapter = torch.nn.Linear(hidden, hidden)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(hidden))
        adapter.bias.zero_()
    return adapter


def load_adapter(path: str) -> torch.nn.Linear:
    weights = load_file(path)
    adapter = new_adapter(weights["weight"].shape[0])
    adapter.load_state_dict(weights)
    return adapter.eval()


def adapter_keyword_weight(path: str) -> float:
    """The weight of keyword matching search adds beside an adapter (0 for one saved before it existed)."""
    with safe_open(path, framework="pt") as f:
        return float((f.metadata() or {}).get("keyword_weight", 0.0))


def apply_adapter(adapter: torch.nn.Linear, queries: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(adapter(torch.from_numpy(queries)), dim=-1).numpy()


_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """What keyword matching compares: lower-cased runs of letters and digits (Unicode ones; a
    script written without spaces, such as Chinese, gives one word per run)."""
    return _WORD.findall(text.lower())


class KeywordIndex:
    """BM25 (k1 1.2, b 0.75, Lucene's idf) over the chunks, for keyword matching beside the encoder.

    scores() gives each query's BM25 divided by its best chunk's, so 1 at the best chunk and 0
    where no word matches: a weight then means the same for every query.
    """

    K1, B = 1.2, 0.75

    def __init__(self, texts: Sequence[str]):
        self.size = len(texts)
        postings: dict[str, dict[int, int]] = {}
        lengths = np.zeros(self.size, dtype=np.float64)
        for index, text in enumerate(texts):
            tokens = words(text)
            lengths[index] = len(tokens)
            for token in tokens:
                counts = postings.setdefault(token, {})
                counts[index] = counts.get(index, 0) + 1
        norm = self.K1 * (1 - self.B + self.B * lengths / max(lengths.mean() if self.size else 0.0, 1.0))
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for token, counts in postings.items():
            where = np.fromiter(counts, dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            idf = math.log(1 + (self.size - len(counts) + 0.5) / (len(counts) + 0.5))
            self.postings[token] = where, idf * tf * (self.K1 + 1) / (tf + norm[where])

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(queries), self.size), dtype=np.float32)
        for row, query in enumerate(queries):
            for token in set(words(query)):
                if token in self.postings:
                    where, weight = self.postings[token]
                    out[row, where] += weight
            best = out[row].max(initial=0.0)
            if best > 0:
                out[row] /= best
        return out


def _blend(cosine: np.ndarray, keyword: np.ndarray | None, weight: float) -> np.ndarray:
    return cosine + np.float32(weight) * keyword if weight and keyword is not None else cosine


def search_scores(query_vectors: np.ndarray, chunk_vectors: np.ndarray, keyword: np.ndarray | None = None,
                  weight: float = 0.0) -> np.ndarray:
    """What search ranks by: cosine, plus `weight` times the keyword scores."""
    return _blend(query_vectors @ chunk_vectors.T, keyword, weight)


def recall_at_k(query_vectors: np.ndarray, chunk_vectors: np.ndarray, targets: Sequence[int],
                keyword: np.ndarray | None = None, weight: float = 0.0) -> dict:
    """recall@1/5/10 of search_scores: the share of queries whose chunk ranks within the top k."""
    return recall_of(search_scores(query_vectors, chunk_vectors, keyword, weight), targets)


def recall_of(scores: np.ndarray, targets: Sequence[int]) -> dict:
    """recall@1/5/10 of a [queries, chunks] score matrix, the right chunk of query i being targets[i]."""
    if not len(targets):
        return {f"recall@{k}": 0.0 for k in KS}
    true = scores[np.arange(len(targets)), targets]
    # Rank = how many chunks score strictly higher than the right one.
    rank = (scores > true[:, None]).sum(1)
    rank[~np.isfinite(true)] = np.iinfo(rank.dtype).max  # a score that is not a number finds nothing
    return {f"recall@{k}": round(float((rank < k).mean()), 4) for k in KS}


def _adapter_tensors(adapter: torch.nn.Linear) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in adapter.state_dict().items()}


def _save_checkpoint(directory: str, epoch: int, adapter, optimizer, best: dict, meta: dict) -> None:
    """One file, replaced atomically: the adapter, the optimizer state, the best adapter so far and
    the run's record (epoch, losses, validation curve, best epoch) in its metadata, so a kill at
    any moment leaves the previous epoch's checkpoint or this one, never half of each."""
    os.makedirs(directory, exist_ok=True)
    tensors = {f"adapter.{k}": v.contiguous() for k, v in adapter.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
    meta = {**meta, "epoch": epoch, "param_groups": state["param_groups"]}
    tmp = os.path.join(directory, "state.safetensors.tmp")
    save_file(tensors, tmp, metadata={"meta": json.dumps(meta)})
    os.replace(tmp, os.path.join(directory, "state.safetensors"))


def _load_checkpoint(directory: str, adapter, optimizer, fingerprint: str) -> tuple[dict, dict] | None:
    """(meta, best adapter's tensors) of the last complete epoch, or None to start afresh."""
    path = os.path.join(directory, "state.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = load_file(path)
    except (OSError, ValueError, safetensors.SafetensorError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")})
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta, best


def _embed_all(spec: TrainSpec, parts: list[tuple[str, list[str]]], *, report: Callable[[int, int], None],
               heartbeat: Callable[[], None], should_cancel: Callable[[], bool],
               failpoint: Callable[[str, dict], None]) -> list[np.ndarray]:
    """Every part's embeddings, counted as one job of texts: what is stored counts at once."""
    key = embedding_key(spec)
    shared = os.path.join(spec.shared_dir, key) if spec.shared_dir else ""
    caches = [EmbeddingCache(spec.output_dir, name, texts, key, shared) for name, texts in parts]
    total = sum(len(cache.texts) for cache in caches)
    done = sum(cache.done for cache in caches)
    report(done, total)

    def embedded(count: int) -> None:
        nonlocal done
        done += count
        report(done, total)
        failpoint("training.embed", {"index": done})

    try:
        return [cache.fill(spec, heartbeat=heartbeat, should_cancel=should_cancel, embedded=embedded)
                for cache in caches]
    except Cancelled:
        # In the run's terms: texts of all parts, not of the part that was being embedded.
        raise Cancelled(f"Stopped while embedding ({done:,} of {total:,} texts).") from None


def best_blend(query_vectors: np.ndarray, chunk_vectors: np.ndarray, targets: Sequence[int], keyword: np.ndarray,
               weights: Sequence[float], baseline: dict) -> dict:
    """Validation recall at the keyword weight that does best, with that weight as
    "keyword_weight": by the rule that keeps an epoch (_preferred: a weight that beats the
    encoder alone over one that does not, then selection_key; the lower weight on a tie), so a
    weight that wins at recall@5 and loses at @1 never costs an epoch its adoption."""
    best: dict = {}
    cosine = query_vectors @ chunk_vectors.T  # once: only the keyword weight changes between them
    for weight in weights:
        recall = {**recall_of(_blend(cosine, keyword, weight), targets), "keyword_weight": weight}
        if not best or _preferred(recall, best, baseline):
            best = recall
    return best


def selection_key(recall: dict) -> tuple[float, float, float]:
    """Which epoch is best on validation: recall@5 first, then recall@1, then recall@10."""
    return recall.get("recall@5", 0.0), recall.get("recall@1", 0.0), recall.get("recall@10", 0.0)


def beats(recall: dict, baseline: dict) -> bool:
    """Whether an epoch beats the encoder alone on validation, and so is adopted: no worse at any
    k and better at one. Better recall@5 alone is not enough: an adapter that trades recall@1
    for it finds the right chunk first less often than the encoder did."""
    keys = [f"recall@{k}" for k in KS]
    return all(recall.get(k, 0.0) >= baseline.get(k, 0.0) for k in keys) and any(
        recall.get(k, 0.0) > baseline.get(k, 0.0) for k in keys)


def _preferred(recall: dict, kept: dict, baseline: dict) -> bool:
    """Whether an epoch's adapter is kept over the one kept so far: one that beats the encoder alone
    over one that does not, then the better by selection_key."""
    if beats(recall, baseline) != beats(kept, baseline):
        return beats(recall, baseline)
    return selection_key(recall) > selection_key(kept)


def _pull_toward_identity(adapter: torch.nn.Linear, amount: float) -> None:
    """Decoupled weight decay of W - I and of b: W <- W - amount (W - I), b <- (1 - amount) b.

    At most the whole way back: a larger step would overshoot the identity and grow without end."""
    amount = min(amount, 1.0)
    if amount <= 0:
        return
    with torch.no_grad():
        eye = torch.eye(adapter.weight.shape[0], dtype=adapter.weight.dtype)
        adapter.weight.sub_(amount * (adapter.weight - eye))
        adapter.bias.mul_(1 - amount)


def run_training(
    spec: TrainSpec,
    *,
    chunk_texts: Sequence[str],
    train_pairs: Sequence[tuple[str, int]],
    validation_pairs: Sequence[tuple[str, int]],
    test_pairs: Sequence[tuple[str, int]],
    progress: Callable[[int, int, list[float], dict], None],
    heartbeat: Callable[[], None],
    should_cancel: Callable[[], bool],
    failpoint: Callable[[str, dict], None],
    embedding_progress: Callable[[int, int], None] = lambda done, total: None,
) -> TrainResult:
    """Train on (query, chunk index) pairs; choose the epoch on validation_pairs; report
    recall@k on test_pairs for the encoder alone and for the chosen epoch's adapter.

    Embedding comes first and is reported as `embedding_progress(texts done, texts in all)`
    (texts a previous attempt embedded count at once), then every epoch as `progress(epoch,
    epochs, losses, partial)`, where partial holds the test "before", the validation curve
    and the best epoch so far.
    """
    if len(train_pairs) < 2:
        raise JobInputError("Training needs at least 2 approved pairs for training; approve more pairs.")
    if not validation_pairs:
        raise JobInputError("Training needs approved pairs on more chunks: none are left to validate on.")
    if spec.epochs < 1 or spec.batch_size < 2:
        raise JobInputError("epochs must be at least 1 and batch_size at least 2.")
    if spec.patience < 1:
        raise JobInputError("patience must be at least 1.")
    os.makedirs(spec.output_dir, exist_ok=True)
    chunks, train_q, validation_q, test_q = _embed_all(
        spec, [("chunks", list(chunk_texts)), ("train-queries", [q for q, _ in train_pairs]),
               ("validation-queries", [q for q, _ in validation_pairs]),
               ("test-queries", [q for q, _ in test_pairs])],
        report=embedding_progress, heartbeat=heartbeat, should_cancel=should_cancel, failpoint=failpoint,
    )
    keywords = KeywordIndex(chunk_texts)
    validation_keywords = keywords.scores([q for q, _ in validation_pairs])
    test_keywords = keywords.scores([q for q, _ in test_pairs])
    train_t = torch.tensor([t for _, t in train_pairs])
    validation_t = [t for _, t in validation_pairs]
    test_t = [t for _, t in test_pairs]

    torch.manual_seed(spec.seed)
    adapter = new_adapter(chunks.shape[1])
    optimizer = torch.optim.Adam(adapter.parameters(), lr=spec.learning_rate)
    fingerprint = hashlib.sha256(
        json.dumps([str(spec.encoder_path), spec.batch_size, spec.learning_rate, spec.seed, spec.identity_decay,
                    "bm25", list(spec.keyword_weights),
                    list(map(list, train_pairs)), list(map(list, validation_pairs)),
                    list(map(list, test_pairs))]).encode()
    ).hexdigest()
    checkpoint_dir = os.path.join(spec.output_dir, CHECKPOINT_DIR)
    loaded = _load_checkpoint(checkpoint_dir, adapter, optimizer, fingerprint)
    if loaded is None:
        meta = {"fingerprint": fingerprint, "epoch": 0, "losses": [], "validation_curve": [], "best_epoch": 0,
                "before": recall_at_k(test_q, chunks, test_t),
                "validation_before": recall_at_k(validation_q, chunks, validation_t)}
        best = _adapter_tensors(adapter)
    else:
        meta, best = loaded
    start_epoch, losses, curve = meta["epoch"], list(meta["losses"]), list(meta["validation_curve"])
    best_epoch = meta["best_epoch"]

    def partial() -> dict:
        return {"before": meta["before"], "validation": {"before": meta["validation_before"], "curve": curve},
                "best_epoch": best_epoch}

    def stale_epochs() -> int:
        """Epochs since validation was last at its best (by selection_key)."""
        if not curve:
            return 0
        keys = [selection_key(recall) for recall in curve]
        return len(curve) - 1 - keys.index(max(keys))

    progress(start_epoch, spec.epochs, losses, partial())
    chunk_tensor = torch.from_numpy(chunks)
    train_tensor = torch.from_numpy(train_q)
    epoch = start_epoch
    while epoch < spec.epochs and stale_epochs() < spec.patience:
        failpoint("training.epoch", {"index": epoch})
        # Seeded per epoch, so a resumed epoch shuffles exactly as the uninterrupted one.
        order = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(spec.seed * 1000 + epoch))
        epoch_losses = []
        for start in range(0, len(order), spec.batch_size):
            heartbeat()
            if should_cancel():
                raise Cancelled(f"Stopped in epoch {epoch + 1}.")
            index = order[start : start + spec.batch_size]
            if len(index) < 2:
                continue
            queries = torch.nn.functional.normalize(adapter(train_tensor[index]), dim=-1)
            targets = train_t[index]
            logits = queries @ chunk_tensor[targets].T / TEMPERATURE
            # Two pairs of the same chunk in one batch are not negatives of each other.
            same_chunk = targets[:, None] == targets[None, :]
            logits = logits.masked_fill(same_chunk & ~torch.eye(len(index), dtype=torch.bool), float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(index)))
            if not torch.isfinite(loss):
                raise JobInputError(f"Training diverged in epoch {epoch + 1}: the loss is not a number; a learning "
                                    f"rate below {spec.learning_rate:g} avoids it.")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _pull_toward_identity(adapter, spec.learning_rate * spec.identity_decay)
            epoch_losses.append(float(loss.detach()))
        epoch += 1
        losses.append(round(float(np.mean(epoch_losses)), 6) if epoch_losses else 0.0)
        curve.append(best_blend(apply_adapter(adapter, validation_q), chunks, validation_t, validation_keywords,
                                spec.keyword_weights, meta["validation_before"]))
        if not best_epoch or _preferred(curve[-1], curve[best_epoch - 1], meta["validation_before"]):
            best_epoch, best = epoch, _adapter_tensors(adapter)
        meta.update(losses=losses, validation_curve=curve, best_epoch=best_epoch)
        _save_checkpoint(checkpoint_dir, epoch, adapter, optimizer, best, meta)
        progress(epoch, spec.epochs, losses, partial())

    chosen = new_adapter(chunks.shape[1])
    chosen.load_state_dict(best)
    weight = curve[best_epoch - 1].get("keyword_weight", 0.0)
    after = recall_at_k(apply_adapter(chosen.eval(), test_q), chunks, test_t, test_keywords, weight)
    adapter_path = os.path.join(spec.output_dir, ADAPTER)
    save_file(best, adapter_path + ".tmp", metadata={"keyword_weight": repr(float(weight))})
    os.replace(adapter_path + ".tmp", adapter_path)
    np.save(os.path.join(spec.output_dir, "index.npy"), chunks)
    return TrainResult(
        before=meta["before"], after=after, validation_before=meta["validation_before"], validation_curve=curve,
        best_epoch=best_epoch, adopted=beats(curve[best_epoch - 1], meta["validation_before"]), loss_curve=losses,
        adapter_path=adapter_path, keyword_weight=weight,
    )


def split_pairs(pairs: Sequence[tuple[int, str, int]], validation_fraction: float = VALIDATION_FRACTION,
                test_fraction: float = TEST_FRACTION):
    """Deterministic three-way split of whole chunks: (train, validation, test) lists of
    (query, chunk index).

    A chunk's pairs are all trained on, all validated on or all tested on, so recall measures
    how the adapter finds chunks it never saw as a target (splitting single pairs would leave
    nearly every held-out chunk among the training targets, and flatter the "after"); a
    validation or test query that is also a training query is dropped, since it would be found
    from memory. With three chunks or more, each part has at least one; with two, one trains
    and one validates; one chunk is all training. Chosen by the chunk's
    position, not by ids: the same corpus gives the same split in any database, so recall
    figures compare across runs.
    """
    def bucket(chunk_index: int) -> float:
        return int(hashlib.sha256(f"chunk {chunk_index}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    chunks = sorted({chunk_index for _pair_id, _query, chunk_index in pairs}, key=bucket)
    tested = sum(bucket(c) < test_fraction for c in chunks)
    validated = sum(test_fraction <= bucket(c) < test_fraction + validation_fraction for c in chunks)
    if len(chunks) >= 3:
        tested = min(max(tested, 1), len(chunks) - 2)
        validated = min(max(validated, 1), len(chunks) - tested - 1)
    else:  # too few chunks to test on: one validates (so training can choose), the other trains
        tested, validated = 0, len(chunks) - 1
    test_chunks = set(chunks[:tested])
    validation_chunks = set(chunks[tested : tested + validated])
    train = [(query, c) for _pair_id, query, c in pairs if c not in test_chunks | validation_chunks]
    seen = {query for query, _c in train}
    validation = [(query, c) for _pair_id, query, c in pairs if c in validation_chunks and query not in seen]
    test = [(query, c) for _pair_id, query, c in pairs if c in test_chunks and query not in seen]
    return train, validation, test
