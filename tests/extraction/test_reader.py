"""extraction.reader on synthetic format-2 directories: no Django, no database, no model."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from extraction.reader import Output, OutputError, open_output, resolve_point
from jobsite.demo import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "x",
    "Numbers: 3.14159 and 42.",
    "A river runs past the stone market and its garden.",
    "def add(a, b): return a + b",
    "OK",
    "Light and shadow, light and shadow, light and shadow.",
]


@pytest.fixture(autouse=True)
def _data_dir():
    """Overrides tests/conftest.py's: the reader needs no Django settings, so `-p no:django` works."""
    yield


def row_value(output_tag: int, point_tag: int, row: int, width: int) -> np.ndarray:
    """What a synthetic row holds: it names its run, hook and row, and is never all zeros."""
    return np.array([row + 1, output_tag, point_tag] + [row * 0.5 + k for k in range(width - 3)])


def write_output(
    root: Path,
    lengths=None,
    *,
    texts=None,
    tokenizer=None,
    points=((0, "residual"), (2, "mlp")),
    width=8,
    dtype=np.float32,
    samples_done=None,
    tag=0,
    format_version=2,
) -> Path:
    """A format-2 output as the runner leaves it. samples_done=None is a complete run (with
    metadata.json); a number is a partial run whose rows outside the done samples are zeros.
    Row r of hook point k holds row_value(tag, k, r): unique, and comparable by value."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [tokenizer.encode(text) for text in texts] if texts else None
    lengths = np.array([len(i) for i in ids] if ids else lengths, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    rows = int(offsets[-1])
    np.save(root / "offsets.npy", offsets)
    tokens = np.concatenate([np.array(i) for i in ids]) if ids else np.arange(rows) % 250
    np.save(root / "tokens.npy", tokens.astype(np.int32))
    done = np.ones(len(lengths), bool)
    if samples_done is not None:
        done[:] = False
        done[np.argsort(-lengths, kind="stable")[:samples_done]] = True
    on_disk = np.repeat(done, lengths)
    widths = width if isinstance(width, dict) else {}
    for k, (layer, hook) in enumerate(points):
        w = widths.get((layer, hook), width if isinstance(width, int) else 8)
        array = np.lib.format.open_memmap(root / f"layer_{layer}_{hook}.npy", mode="w+", dtype=dtype, shape=(rows, w))
        values = np.stack([row_value(tag, k, r, w) for r in range(rows)]) if rows else np.zeros((0, w))
        array[:] = np.where(on_disk[:, None], values, 0)
        array.flush()
        del array
    checkpoint = {"format_version": format_version, "samples_done": int(done.sum()), "batch_size": 8}
    (root / "checkpoint.json").write_text(json.dumps(checkpoint))
    if samples_done is None:
        metadata = {"format_version": format_version, "storage_dtype": np.dtype(dtype).name,
                    "layers": sorted({p[0] for p in points}), "samples": len(lengths), "tokens": rows}
        (root / "metadata.json").write_text(json.dumps(metadata))
    if tokenizer is not None:
        tokenizer.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def complete(tmp_path, tokenizer):
    return open_output(write_output(tmp_path / "run", texts=TEXTS, tokenizer=tokenizer))


@pytest.fixture
def partial(tmp_path, tokenizer):
    return open_output(write_output(tmp_path / "partial", texts=TEXTS, tokenizer=tokenizer, samples_done=3))


def test_complete_output_exposes_its_shape_and_files(complete):
    lengths = np.diff(complete.offsets)
    assert complete.format_version == 2 and complete.complete and complete.metadata["samples"] == len(TEXTS)
    assert complete.num_samples == complete.samples_done == len(TEXTS)
    assert complete.num_tokens == lengths.sum() == len(complete.tokens)
    assert complete.layers == [0, 2] and complete.hooks == ["residual", "mlp"]
    assert complete.points == [(0, "residual"), (2, "mlp")]
    assert complete.storage_dtype == "float32" and complete.offsets.dtype == np.int64
    assert complete.tokens.dtype == np.int32
    assert complete.done_samples().tolist() == list(range(len(TEXTS)))
    assert complete.width(0, "residual") == 8


def test_points_are_listed_layer_first_then_in_hook_order(tmp_path):
    output = open_output(write_output(tmp_path, [3, 4], points=((1, "mlp_hidden"), (1, "residual"), (0, "attention"))))
    assert output.points == [(0, "attention"), (1, "residual"), (1, "mlp_hidden")]
    assert output.hooks == ["residual", "attention", "mlp_hidden"]


@pytest.mark.parametrize("spelling", [
    (2, "mlp"), (2, "hook_mlp_out"), (2, "mlp_out"), ("blocks.2.hook_mlp_out",), ((2, "mlp"),), (np.int64(2), "mlp"),
])
def test_rows_accepts_every_hook_spelling(complete, spelling):
    rows = complete.rows(*spelling)
    assert isinstance(rows, np.memmap) and not rows.flags.writeable
    assert rows.shape == (complete.num_tokens, 8)
    assert rows[:, 0].tolist() == list(range(1, complete.num_tokens + 1)) and (rows[:, 2] == 1).all()


def test_a_layer_given_twice_must_agree(complete):
    assert complete.width(2, "blocks.2.hook_mlp_out") == 8
    with pytest.raises(OutputError, match="Layer 3 disagrees with 'blocks.2.hook_mlp_out', which names layer 2"):
        complete.rows(3, "blocks.2.hook_mlp_out")


def test_a_hook_without_a_layer_is_refused(complete):
    with pytest.raises(OutputError, match=r"'mlp' names no layer; give one, as in \(5, 'mlp'\) or 'blocks.5.hook_mlp"):
        complete.rows("mlp")


def test_an_unknown_hook_is_refused_with_the_choices(complete):
    with pytest.raises(OutputError, match="Hook 'hook_nonsense' is unknown; choose from residual"):
        complete.rows(0, "hook_nonsense")
    with pytest.raises(OutputError, match="A layer must be a whole number, not '0'"):
        complete.rows("0", "mlp")


def test_a_point_not_extracted_is_refused_naming_those_present(complete):
    with pytest.raises(OutputError) as caught:
        complete.rows(0, "mlp")
    assert str(caught.value) == (
        f"blocks.0.hook_mlp_out was not extracted in {complete.path}; "
        "it has blocks.0.hook_resid_post and blocks.2.hook_mlp_out."
    )


def test_sample_rows_are_the_samples_slice(complete):
    for i in range(complete.num_samples):
        rows = complete.sample_rows(i, "blocks.0.hook_resid_post")
        a, b = complete.offsets[i], complete.offsets[i + 1]
        assert rows.shape == (b - a, 8) and rows[:, 0].tolist() == list(range(a + 1, b + 1))


def test_sample_indexes_out_of_range_are_refused(complete):
    with pytest.raises(OutputError, match=f"Sample {len(TEXTS)} is out of range; .* has samples 0 to {len(TEXTS) - 1}"):
        complete.sample_rows(len(TEXTS), 0, "residual")
    with pytest.raises(OutputError, match="Sample -1 is out of range"):
        complete.sample_tokens(-1)
    with pytest.raises(OutputError, match="A sample index must be a whole number, not 1.5"):
        complete.is_done(1.5)


def test_partial_output_exposes_only_the_longest_first_prefix(partial):
    lengths = np.diff(partial.offsets)
    expected = np.sort(np.argsort(-lengths, kind="stable")[:3])
    assert not partial.complete and partial.metadata is None and partial.samples_done == 3
    assert partial.done_samples().tolist() == expected.tolist()
    for i in range(partial.num_samples):
        assert partial.is_done(i) == (i in expected)
        if i in expected:
            assert (partial.sample_rows(i, 2, "mlp")[:, 0] > 0).all()
        else:
            sentence = f"Sample {i} is not done in this partial run \\(3 of {len(TEXTS)} samples\\)"
            with pytest.raises(OutputError, match=sentence):
                partial.sample_rows(i, 2, "mlp")


def test_partial_output_refuses_rows_saying_what_reads_it(partial):
    with pytest.raises(OutputError) as caught:
        partial.rows(0, "residual")
    assert str(caught.value) == (
        f"{partial.path} is a partial run (3 of {len(TEXTS)} samples done) whose other rows are zeros, so rows() "
        "refuses it; use sample_rows() on done_samples(), or ActivationLoader, which read only done samples."
    )


def test_tokens_of_a_sample_not_done_are_still_read(partial):
    """The runner writes every token id before its first batch, so they are data, not zeros."""
    not_done = next(i for i in range(partial.num_samples) if not partial.is_done(i))
    assert partial.text(not_done) == TEXTS[not_done]


def test_tokens_decode_to_the_sample_text(complete, tokenizer):
    for i, text in enumerate(TEXTS):
        ids = complete.sample_tokens(i)
        assert ids.dtype == np.int32 and ids.tolist() == tokenizer.encode(text)
        assert complete.text(i) == text
        strings = complete.token_strings(i)
        assert strings == [tokenizer.decode([t]) for t in ids] and "".join(strings) == text


def test_a_missing_tokenizer_is_refused_when_decoding(tmp_path):
    output = open_output(write_output(tmp_path, [2, 3]))
    assert output.sample_tokens(1).shape == (3,)
    with pytest.raises(OutputError, match="has no tokenizer/ to decode its tokens with; run the extraction again"):
        output.text(0)


def test_describe_says_complete_or_partial_and_what_is_inside(complete, partial):
    text = complete.describe()
    assert text.startswith(f"Complete extraction output in {complete.path} (format 2): {len(TEXTS)} samples, ")
    assert f"{complete.num_tokens} tokens; layers 0 and 2; " in text
    assert ("residual (blocks.L.hook_resid_post, width 8) at layer 0; "
            "mlp (blocks.L.hook_mlp_out, width 8) at layer 2") in text
    assert text.endswith("stored as float32.")
    done_tokens = int(np.diff(partial.offsets)[partial.done_samples()].sum())
    assert (f"Partial extraction output in {partial.path} (format 2): 3 of {len(TEXTS)} samples done "
            f"({done_tokens} of {partial.num_tokens} tokens; only those are read") in partial.describe()


def test_a_directory_that_is_no_output_is_refused(tmp_path):
    with pytest.raises(OutputError, match="is not a directory; give the directory an extraction wrote"):
        open_output(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OutputError, match="is no extraction output \\(it has no offsets.npy"):
        open_output(tmp_path)


def test_an_output_without_checkpoint_or_metadata_is_refused(tmp_path):
    root = write_output(tmp_path / "run", [2, 3])
    (root / "checkpoint.json").unlink()
    (root / "metadata.json").unlink()
    with pytest.raises(OutputError, match="has neither checkpoint.json nor metadata.json"):
        open_output(root)


@pytest.mark.parametrize("layout", ["format 1 files", "format_version 1"])
def test_a_format_1_output_is_refused_saying_to_run_again(tmp_path, layout):
    root = write_output(tmp_path / "run", [2, 3], format_version=1)
    if layout == "format 1 files":
        (root / "tokens.npy").unlink()
        for name in ("checkpoint.json", "metadata.json"):
            data = json.loads((root / name).read_text())
            del data["format_version"]
            (root / name).write_text(json.dumps(data))
    with pytest.raises(OutputError) as caught:
        open_output(root)
    assert str(caught.value) == (
        f"{root} was written before format 2 (it has no tokens.npy or format_version), which this reader does "
        "not read; run the extraction again to get format 2."
    )


def test_a_format_2_output_without_tokens_is_damaged(tmp_path):
    root = write_output(tmp_path / "run", [2, 3])
    (root / "tokens.npy").unlink()
    with pytest.raises(OutputError, match="has no tokens.npy, so the directory is damaged: run the extraction again"):
        open_output(root)


def test_a_newer_format_asks_to_upgrade(tmp_path):
    root = write_output(tmp_path / "run", [2, 3], format_version=3)
    with pytest.raises(OutputError, match="is in format 3, newer than the format 2 this jobsite reads; upgrade"):
        open_output(root)


def test_damaged_files_are_refused(tmp_path):
    root = write_output(tmp_path / "run", [2, 3])
    np.save(root / "layer_2_mlp.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(OutputError, match="layer_2_mlp.npy has shape \\(4, 8\\) where offsets.npy counts 5 rows"):
        open_output(root)
    (root / "layer_2_mlp.npy").write_bytes(b"not numpy")
    with pytest.raises(OutputError, match="layer_2_mlp.npy cannot be read as .npy"):
        open_output(root)
    np.save(root / "offsets.npy", np.array([0, 3, 2, 5]))
    with pytest.raises(OutputError, match="offsets.npy is no ascending list of row offsets from 0, so the directory"):
        open_output(root)


def test_resolve_point_reads_tuples_and_names():
    assert resolve_point("blocks.3.mlp.hook_post") == (3, "mlp_hidden")
    assert resolve_point((4, "resid_post")) == (4, "residual")
    assert resolve_point(1, "attn_out") == (1, "attention")


def test_an_output_pickles_as_its_path(complete):
    """DataLoader workers started by spawn receive the path, not a copy of the rows."""
    data = pickle.dumps(complete)
    assert len(data) < 500
    again = pickle.loads(data)
    assert isinstance(again, Output) and again.path == complete.path
    assert np.array_equal(again.rows(0, "residual"), complete.rows(0, "residual"))


def test_the_reader_imports_neither_django_nor_torch():
    code = ("import sys, extraction.reader; "
            "print(sorted(m for m in ('django', 'torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
