"""A dataset file: `.txt`, one sample a line, or `.jsonl` with `text` or `input_ids`.

Read line by line, never held whole: a plan of millions of samples keeps one chunk of them at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from jobsite.errors import JobInputError


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    num_samples: int
    size_bytes: int


def dataset_format(path: str) -> str:
    """"txt" or "jsonl", once the file is there."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("txt", "jsonl"):
        raise JobInputError("The dataset must be a .txt or .jsonl file.")
    if not os.path.isfile(path):
        raise JobInputError(f"The dataset {path} does not exist.")
    return fmt


def iter_samples(path: str, *, digest=None, start: int = 0, end: int | None = None,
                 first_line: int = 1) -> Iterator[str | list[int]]:
    """Every sample in file order: a text or, from .jsonl, a list of token ids. `digest` (a
    hashlib object) is fed every byte read. "The dataset is empty." is raised only at the end
    of the file: a reader that stops early (max_samples) never reads what follows.

    A part of the file (`start` and `end`, byte positions at line starts; `first_line`, the
    number of the line at `start`) is read the same way, and never called empty."""
    fmt = dataset_format(path)
    whole = start == 0 and end is None
    nonempty = not whole
    with open(path, "rb") as f:
        f.seek(start)
        lines = f if end is None else _until(f, end)
        for number, raw in enumerate(lines, start=first_line):
            if digest is not None:
                digest.update(raw)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise JobInputError(f"The dataset is not valid UTF-8 (line {number}).") from None
            if fmt == "txt":
                # Every line is a sample, an empty one too (it has no tokens): sample i is line i + 1,
                # so whatever a user keeps per line (labels) lines up with the output.
                nonempty = nonempty or bool(line.strip())
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise JobInputError(f"Line {number} of the dataset is not JSON.") from None
            except RecursionError:
                raise JobInputError(f"Line {number} of the dataset nests JSON too deeply to read.") from None
            record = record if isinstance(record, dict) else {}
            text, ids = record.get("text"), record.get("input_ids")
            if isinstance(text, str):
                nonempty = nonempty or bool(text.strip())
                yield text
            elif isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                huge = next((i for i in ids if not -2**63 <= i < 2**63), None)
                if huge is not None:
                    raise JobInputError(f"Line {number} of the dataset has a token id that is not a 64-bit integer: "
                                        f"{str(huge)[:30]}.")
                nonempty = nonempty or bool(ids)
                yield ids
            else:
                fields = '"text" string or an "input_ids" list of integers'
                raise JobInputError(f"Line {number} of the dataset needs a {fields}.")
    if not nonempty:
        raise JobInputError("The dataset is empty.")


def _blank(raw: bytes) -> bool:
    """A .jsonl line iter_samples skips: blank as a str is (Unicode spaces included, which
    bytes.strip() would count as a sample)."""
    return not raw.decode("utf-8", "replace").strip()


def _until(f, end: int) -> Iterator[bytes]:
    position = f.tell()
    for raw in f:
        if position >= end:
            return
        position += len(raw)
        yield raw


def split_samples(path: str, limit: int | None, parts: int) -> list[dict]:
    """The first `limit` samples (all when None) cut into at most `parts` runs of consecutive
    lines with as many samples each: [{first_sample, end_sample, start_byte, end_byte,
    first_line}], read from the line breaks alone (a sample is a line of a .txt, a line that is
    not blank of a .jsonl, as iter_samples counts them)."""
    fmt = dataset_format(path)
    total = count_samples(path, limit)
    parts = max(1, min(parts, total))
    cuts = [total * k // parts for k in range(parts + 1)]
    found: list[tuple[int, int]] = []  # (byte, line) where sample cuts[k] starts
    sample, position, line, k = 0, 0, 1, 0
    with open(path, "rb") as f:
        for raw in f:
            counts = fmt == "txt" or not _blank(raw)
            if counts:
                while k < len(cuts) and cuts[k] == sample:
                    found.append((position, line))
                    k += 1
                sample += 1
            position, line = position + len(raw), line + 1
            if sample >= total and k == len(cuts) - 1:
                break
    while len(found) < len(cuts):
        found.append((position, line))
    return [{"index": k, "first_sample": cuts[k], "end_sample": cuts[k + 1], "start_byte": found[k][0],
             "end_byte": found[k + 1][0], "first_line": found[k][1]} for k in range(parts)]


def count_samples(path: str, limit: int | None = None) -> int:
    """How many samples the file holds (at most `limit`), from its line breaks alone: the total
    a plan reports its progress against before it has read a sample. Exact for .txt; for .jsonl
    a line of nothing but Unicode spaces counts here and not as a sample."""
    fmt = dataset_format(path)
    count = 0
    with open(path, "rb") as f:
        if fmt == "txt":
            last = b"\n"
            while (limit is None or count < limit) and (block := f.read(1 << 20)):
                count, last = count + block.count(b"\n"), block[-1:]
            count += last != b"\n"
        else:
            for raw in f:
                if not _blank(raw):
                    count += 1
                    if limit is not None and count >= limit:
                        break
    return count if limit is None else min(count, limit)


def inspect_dataset(path: str) -> DatasetInfo:
    fmt, count = dataset_format(path), 0
    for _ in iter_samples(path):
        count += 1
    return DatasetInfo(format=fmt, num_samples=count, size_bytes=os.path.getsize(path))
