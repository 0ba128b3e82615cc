"""Phase 1 of a training run: cut a corpus into chunks and write queries for every chunk.

Pure Python + torch/transformers (no Django): the task passes callbacks that store a
chunk's pairs atomically, heartbeat, and say whether to stop.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence

from jobsite.errors import Cancelled, JobInputError

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers him his how i if in into is it its itself just may me more most must my
    no nor not now of off on once only or other our out over own same she should so some such than that
    the their them then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your one two each every per via its they're
    it's don't can't""".split()
)
TEMPLATES = (
    "what is said about {a} {b}",
    "{a} {b} {c}",
    "how do i handle {a} and {b}",
    "rules for {a} {b} {c}",
    "where can i find {a} {b}",
    "when is {a} {b}",
    "who is responsible for {a} {b}",
    "{a} {b} details",
)
# A word in any script (letters, with an apostrophe or a hyphen inside: "don't", "half-day";
# never one at its end), or a number ("9", "7.30").
WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|['\u2019\-](?=[^\W\d_]))+|\d+(?:[.:]\d+)?")


def check_chunking(size: int, overlap: int) -> None:
    """A chunk size and overlap chunk_text can cut with, or a sentence saying which is wrong."""
    if not 50 <= size <= 20000:
        raise JobInputError("The chunk size must be between 50 and 20,000 characters.", field="chunk_size")
    if not 0 <= overlap < size // 2:
        raise JobInputError(f"The overlap must be between 0 and {size // 2 - 1} characters for a chunk size of {size:,}.",
                            field="chunk_overlap")


def chunk_text(text: str, *, size: int, overlap: int) -> list[str]:
    """Paragraphs packed up to `size` characters; a longer paragraph is cut at word
    boundaries with `overlap` characters repeated at the start of the next piece."""
    check_chunking(size, overlap)
    pieces: list[str] = []
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        while len(paragraph) > size:
            cut = paragraph.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            pieces.append(paragraph[:cut].strip())
            restart = paragraph.rfind(" ", 0, max(0, cut - overlap)) + 1 if overlap else cut
            paragraph = paragraph[restart if 0 < restart < cut else cut :].strip()
        pieces.append(paragraph)
    chunks: list[str] = []
    for piece in pieces:
        # A heading starts a chunk, and never stays alone: a chunk of only "# Beehive Notes"
        # says nothing to retrieve, yet would get queries and win searches for its words.
        heading_only = bool(chunks) and all(line.startswith("#") for line in chunks[-1].splitlines() if line.strip())
        if chunks and (heading_only or (len(chunks[-1]) + 2 + len(piece) <= size and not piece.startswith("#"))):
            chunks[-1] = f"{chunks[-1]}\n\n{piece}"
        else:
            chunks.append(piece)
    return [c for c in chunks if c]


# What a model's byte-level decoding can yield that is not text: NUL (which PostgreSQL text
# cannot hold), other control characters, and U+FFFD for a character cut in half.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")


def clean_query(text: str) -> str:
    """A generated query as one line of text, at most 200 characters."""
    first_line = text.strip().split("\n")[0]
    return " ".join(_NOT_TEXT.sub("", first_line).split())[:200]


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


class LocalGenerator:
    """Deterministic keyword queries: offline, CPU, the same output on every machine.

    Each query picks distinctive words of one sentence of the chunk (names, numbers, long
    words) into a question-like template, so a query is about its chunk without copying it.
    """

    name = "local"

    def __init__(self, *, queries_per_chunk: int = 2, seed: int = 0):
        if not 1 <= queries_per_chunk <= 20:
            raise JobInputError("queries_per_chunk must be between 1 and 20.")
        self.queries_per_chunk = queries_per_chunk
        self.seed = seed

    def generate(self, chunks: Sequence[str]) -> list[list[str]]:
        return [self._queries(chunk) for chunk in chunks]

    def _queries(self, chunk: str) -> list[str]:
        rng = random.Random(_stable_seed(self.seed, chunk))
        sentences = [s for s in re.split(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])|\n+", chunk) if len(WORD.findall(s)) >= 3]
        sentences = sentences or [chunk]
        queries: list[str] = []
        for attempt in range(self.queries_per_chunk * 4):
            words = [w for w in WORD.findall(rng.choice(sentences)) if len(w) > 1 and w.lower() not in STOPWORDS]
            if len(words) < 2:
                continue
            ranked = sorted(words, key=lambda w: (not w[0].isupper(), not w[0].isdigit(), -len(w), rng.random()))
            picked = ranked[: rng.randint(2, min(4, len(ranked)))]
            rng.shuffle(picked)
            a, b, c = (picked + picked)[:3]
            query = rng.choice(TEMPLATES).format(a=a.lower(), b=b.lower(), c=c.lower())
            if query not in queries:
                queries.append(query)
            if len(queries) == self.queries_per_chunk:
                break
        return queries or [" ".join(WORD.findall(chunk)[:6]).lower() or chunk[:60]]


class CausalLMGenerator:
    """Queries written by a local transformers causal LM with batched `generate`."""

    name = "causal_lm"
    PROMPT = "Passage: {chunk}\nA question this passage answers:"

    def __init__(self, *, model_path: str, queries_per_chunk: int = 2, device: str = "cpu", max_new_tokens: int = 24,
                 seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise JobInputError(f"The query generator model at {model_path} cannot be loaded: {exc}") from exc
        self.tokenizer.padding_side = "left"  # generation continues after the prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(device).eval()
        self.device, self.torch = device, torch
        self.queries_per_chunk, self.max_new_tokens, self.seed = queries_per_chunk, max_new_tokens, seed
        self.fallback = LocalGenerator(queries_per_chunk=queries_per_chunk, seed=seed)

    def generate(self, chunks: Sequence[str]) -> list[list[str]]:
        torch = self.torch
        prompts = [self.PROMPT.format(chunk=chunk[:600]) for chunk in chunks]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=384)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        torch.manual_seed(_stable_seed(self.seed, *chunks) % 2**31)
        with torch.inference_mode():
            out = self.model.generate(
                **batch, do_sample=True, top_p=0.9, max_new_tokens=self.max_new_tokens,
                num_return_sequences=self.queries_per_chunk, pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        results = []
        for i, chunk in enumerate(chunks):
            mine = texts[i * self.queries_per_chunk : (i + 1) * self.queries_per_chunk]
            cleaned = [query for query in dict.fromkeys(map(clean_query, mine)) if query]
            # A model that writes nothing usable for a chunk must not leave it without a pair.
            results.append(cleaned or self.fallback.generate([chunk])[0])
        return results


def run_generation(
    chunks: Iterable[tuple[int, str]],
    generator,
    *,
    batch_size: int,
    save: Callable[[int, list[str]], None],
    heartbeat: Callable[[], None],
    should_cancel: Callable[[], bool],
    failpoint: Callable[[str, dict], None],
    start_index: int = 0,
) -> int:
    """Generate for (chunk id, text) pairs in order, `save` each chunk's queries; returns
    the number of chunks processed. `start_index` numbers failpoints across resumes."""
    pending = list(chunks)
    processed = 0
    for offset in range(0, len(pending), batch_size):
        heartbeat()
        if should_cancel():
            raise Cancelled(f"Stopped after {processed} chunks.")
        batch = pending[offset : offset + batch_size]
        for position, _ in enumerate(batch):
            failpoint("training.generate", {"index": start_index + processed + position})
        for (chunk_id, _), queries in zip(batch, generator.generate([text for _, text in batch]), strict=True):
            save(chunk_id, queries)
            processed += 1
    return processed
