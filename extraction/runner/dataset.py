"""A dataset file: `.txt`, one sample a line, or `.jsonl` with `text` or `input_ids`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from jobsite.errors import JobInputError


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    num_samples: int
    size_bytes: int


def read_dataset(path: str) -> tuple[str, list[str | list[int]]]:
    """(format, samples): a sample is a text or, from .jsonl, a list of token ids."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("txt", "jsonl"):
        raise JobInputError("The dataset must be a .txt or .jsonl file.")
    if not os.path.isfile(path):
        raise JobInputError(f"The dataset {path} does not exist.")
    samples: list[str | list[int]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise JobInputError(f"The dataset is not valid UTF-8 (line {number}).") from None
            if fmt == "txt":
                # Every line is a sample, an empty one too (it has no tokens): sample i is line i + 1,
                # so whatever a user keeps per line (labels) lines up with the output.
                samples.append(line)
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
                samples.append(text)
            elif isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                huge = next((i for i in ids if not -2**63 <= i < 2**63), None)
                if huge is not None:
                    raise JobInputError(f"Line {number} of the dataset has a token id that is not a 64-bit integer: "
                                        f"{str(huge)[:30]}.")
                samples.append(ids)
            else:
                fields = '"text" string or an "input_ids" list of integers'
                raise JobInputError(f"Line {number} of the dataset needs a {fields}.")
    if not any(s if isinstance(s, list) else s.strip() for s in samples):
        raise JobInputError("The dataset is empty.")
    return fmt, samples


def inspect_dataset(path: str) -> DatasetInfo:
    fmt, samples = read_dataset(path)
    return DatasetInfo(format=fmt, num_samples=len(samples), size_bytes=os.path.getsize(path))
