"""Phase 2 of a training run: a retrieval adapter over a local encoder's embeddings.

Chunks and queries are embedded once with the encoder (mean pooling, batched, cached on
disk batch by batch, so a stop or a crash while embedding keeps the batches already done);
a linear adapter on the query side (initialised to the identity, so "before" is the
plain encoder) is trained with an in-batch contrastive loss. Every epoch ends with a
checkpoint (safetensors: adapter, optimizer state; JSON: epoch, losses), and a resumed
run continues after the last complete epoch with the same shuffles, so it ends where an
uninterrupted run ends. Pure torch/transformers: no Django here, and no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as transformers_logging

from jobsite.errors import Cancelled, JobInputError

# Worker logs are read by people: no weight-loading progress bars there.
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

ADAPTER = "adapter.safetensors"
CHECKPOINT_DIR = "checkpoint"
KS = (1, 5, 10)
TEMPERATURE = 0.05


@dataclass(frozen=True)
class TrainSpec:
    encoder_path: str
    output_dir: str
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    embed_batch_size: int = 64


@dataclass
class TrainResult:
    before: dict
    after: dict
    loss_curve: list[float] = field(default_factory=list)
    adapter_path: str = ""


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


def embed_batches(encoder_path: str, texts: Sequence[str], *, device: str = "cpu", batch_size: int = 64,
                  heartbeat: Callable[[], None] = _nothing,
                  should_cancel: Callable[[], bool] = _never) -> Iterator[np.ndarray]:
    """L2-normalised mean-pooled embeddings, float32 [batch, hidden], one batch at a time.

    Cancel is asked between batches, so a stop takes effect within one batch.
    """
    tokenizer, model = load_encoder(encoder_path, device)
    for start in range(0, len(texts), batch_size):
        heartbeat()
        if should_cancel():
            raise Cancelled(f"Stopped while embedding ({start:,} of {len(texts):,} texts).")
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=256,
                          return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        yield torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


def embed(encoder_path: str, texts: Sequence[str], *, device: str = "cpu", batch_size: int = 64,
          heartbeat: Callable[[], None] = _nothing, should_cancel: Callable[[], bool] = _never) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, float32 [len(texts), hidden]."""
    out = list(embed_batches(encoder_path, texts, device=device, batch_size=batch_size, heartbeat=heartbeat,
                             should_cancel=should_cancel))
    hidden_size = load_encoder(encoder_path, device)[1].config.hidden_size
    return np.concatenate(out) if out else np.zeros((0, hidden_size), dtype=np.float32)


def _save_npy(path: str, values: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, values)
    os.replace(tmp, path)


class EmbeddingCache:
    """A run directory's embeddings of one list of texts (the chunks, the training or the
    held-out queries), keyed by the texts.

    Every batch is written (atomically) as soon as it is embedded, so a stop or a crash keeps
    the batches before it and a resume embeds only the rest, in the batches an uninterrupted
    run uses (so with the same values). Once complete, the batches become one file.
    """

    def __init__(self, output_dir: str, name: str, texts: Sequence[str]):
        digest = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:16]
        self.texts = texts
        self.path = os.path.join(output_dir, f"{name}-{digest}.npy")
        self.batches_dir = os.path.join(output_dir, f"{name}-{digest}.batches")
        self.stored = self._load()

    def _batch_path(self, start: int) -> str:
        return os.path.join(self.batches_dir, f"{start:09d}.npy")

    def _load(self) -> list[np.ndarray]:
        if os.path.exists(self.path):
            return [np.load(self.path)]
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
        if start < len(self.texts):
            os.makedirs(self.batches_dir, exist_ok=True)
            for values in embed_batches(spec.encoder_path, self.texts[start:], device=spec.device,
                                        batch_size=spec.embed_batch_size, heartbeat=heartbeat,
                                        should_cancel=should_cancel):
                _save_npy(self._batch_path(start), values)
                self.stored.append(values)
                start += len(values)
                embedded(len(values))
        if self.stored:
            values = np.concatenate(self.stored)
        else:
            values = np.zeros((0, load_encoder(spec.encoder_path, spec.device)[1].config.hidden_size), np.float32)
        if not os.path.exists(self.path):
            _save_npy(self.path, values)
            shutil.rmtree(self.batches_dir, ignore_errors=True)
        return values


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


def apply_adapter(adapter: torch.nn.Linear, queries: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(adapter(torch.from_numpy(queries)), dim=-1).numpy()


def recall_at_k(query_vectors: np.ndarray, chunk_vectors: np.ndarray, targets: Sequence[int]) -> dict:
    if not len(targets):
        return {f"recall@{k}": 0.0 for k in KS}
    scores = query_vectors @ chunk_vectors.T
    true = scores[np.arange(len(targets)), targets]
    # Rank = how many chunks score strictly higher than the right one.
    rank = (scores > true[:, None]).sum(1)
    return {f"recall@{k}": round(float((rank < k).mean()), 4) for k in KS}


def _save_checkpoint(directory: str, epoch: int, adapter, optimizer, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = {f"adapter.{k}": v.contiguous() for k, v in adapter.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
    tmp = os.path.join(directory, "state.safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, "state.safetensors"))
    meta = {**meta, "epoch": epoch, "param_groups": state["param_groups"]}
    with open(os.path.join(directory, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(directory, "meta.json.tmp"), os.path.join(directory, "meta.json"))


def _load_checkpoint(directory: str, adapter, optimizer, fingerprint: str) -> dict | None:
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(directory, "state.safetensors"))
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _embed_all(spec: TrainSpec, parts: list[tuple[str, list[str]]], *, report: Callable[[int, int], None],
               heartbeat: Callable[[], None], should_cancel: Callable[[], bool],
               failpoint: Callable[[str, dict], None]) -> list[np.ndarray]:
    """Every part's embeddings, counted as one job of texts: what is stored counts at once."""
    caches = [EmbeddingCache(spec.output_dir, name, texts) for name, texts in parts]
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


def run_training(
    spec: TrainSpec,
    *,
    chunk_texts: Sequence[str],
    train_pairs: Sequence[tuple[str, int]],
    eval_pairs: Sequence[tuple[str, int]],
    progress: Callable[[int, int, list[float], dict], None],
    heartbeat: Callable[[], None],
    should_cancel: Callable[[], bool],
    failpoint: Callable[[str, dict], None],
    embedding_progress: Callable[[int, int], None] = lambda done, total: None,
) -> TrainResult:
    """Train on (query, chunk index) pairs; report recall@k on eval_pairs before and after.

    Embedding comes first and is reported as `embedding_progress(texts done, texts in all)`
    (texts a previous attempt embedded count at once), then every epoch as `progress`.
    """
    if len(train_pairs) < 2:
        raise JobInputError("Training needs at least 2 approved pairs for training; approve more pairs.")
    if spec.epochs < 1 or spec.batch_size < 2:
        raise JobInputError("epochs must be at least 1 and batch_size at least 2.")
    os.makedirs(spec.output_dir, exist_ok=True)
    chunks, train_q, eval_q = _embed_all(
        spec, [("chunks", list(chunk_texts)), ("train-queries", [q for q, _ in train_pairs]),
               ("eval-queries", [q for q, _ in eval_pairs])],
        report=embedding_progress, heartbeat=heartbeat, should_cancel=should_cancel, failpoint=failpoint,
    )
    train_t = torch.tensor([t for _, t in train_pairs])
    eval_t = [t for _, t in eval_pairs]

    torch.manual_seed(spec.seed)
    adapter = new_adapter(chunks.shape[1])
    optimizer = torch.optim.Adam(adapter.parameters(), lr=spec.learning_rate)
    fingerprint = hashlib.sha256(
        json.dumps([str(spec.encoder_path), spec.batch_size, spec.learning_rate, spec.seed, list(map(list, train_pairs)),
                    list(map(list, eval_pairs))]).encode()
    ).hexdigest()
    checkpoint_dir = os.path.join(spec.output_dir, CHECKPOINT_DIR)
    meta = _load_checkpoint(checkpoint_dir, adapter, optimizer, fingerprint)
    if meta is None:
        before = recall_at_k(eval_q, chunks, eval_t)
        meta = {"fingerprint": fingerprint, "epoch": 0, "losses": [], "before": before}
    start_epoch, losses, before = meta["epoch"], list(meta["losses"]), meta["before"]
    progress(start_epoch, spec.epochs, losses, {"before": before})

    chunk_tensor = torch.from_numpy(chunks)
    train_tensor = torch.from_numpy(train_q)
    for epoch in range(start_epoch, spec.epochs):
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
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(round(float(np.mean(epoch_losses)), 6) if epoch_losses else 0.0)
        _save_checkpoint(checkpoint_dir, epoch + 1, adapter, optimizer, {**meta, "losses": losses})
        progress(epoch + 1, spec.epochs, losses, {"before": before})

    after = recall_at_k(apply_adapter(adapter, eval_q), chunks, eval_t)
    adapter_path = os.path.join(spec.output_dir, ADAPTER)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, adapter_path + ".tmp")
    os.replace(adapter_path + ".tmp", adapter_path)
    np.save(os.path.join(spec.output_dir, "index.npy"), chunks)
    return TrainResult(before=before, after=after, loss_curve=losses, adapter_path=adapter_path)


def split_pairs(pairs: Sequence[tuple[int, str, int]], eval_fraction: float = 0.2):
    """Deterministic hold-out of whole chunks: (train, eval) lists of (query, chunk index).

    A chunk's pairs are all trained on or all held out, so recall measures how the adapter
    finds chunks it never saw as a target (holding out single pairs would leave nearly every
    held-out chunk among the training targets, and flatter the "after"); a held-out query
    that is also a training query is dropped, since it would be found from memory. With two
    chunks or more, at least one is held out and one trained on. Chosen by the chunk's
    position, not by ids: the same corpus gives the same split in any database, so recall
    figures compare across runs.
    """
    def bucket(chunk_index: int) -> float:
        return int(hashlib.sha256(f"chunk {chunk_index}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    chunks = sorted({chunk_index for _pair_id, _query, chunk_index in pairs}, key=bucket)
    held = sum(bucket(c) < eval_fraction for c in chunks)
    if len(chunks) > 1:
        held = min(max(held, 1), len(chunks) - 1)
    held_chunks = set(chunks[:held])
    train = [(query, c) for _pair_id, query, c in pairs if c not in held_chunks]
    seen = {query for query, _c in train}
    held_out = [(query, c) for _pair_id, query, c in pairs if c in held_chunks and query not in seen]
    return train, held_out
