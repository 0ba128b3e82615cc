"""extraction.export on outputs the real runner wrote, read back with datasets.load_from_disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from extraction import export
from extraction.constants import file_name, parse_hook
from extraction.export import ExportError, export_hf_datasets
from extraction.reader import OutputError
from extraction.runner import Cancelled, ExtractionSpec, run_extraction
from jobsite.demo import build_tiny_causal_lm
from tests.conftest import TEXTS

LAYERS, HOOKS = (0, 2), ("residual", "mlp", "mlp_hidden")
COLUMNS = [f"blocks.{layer}.{name}" for layer in LAYERS
           for name in ("hook_resid_post", "hook_mlp_out", "mlp.hook_post")]


def extract(model, dataset, output_dir, *, should_cancel=None, failpoint=None, **options):
    spec = ExtractionSpec(str(model), str(dataset), str(output_dir), LAYERS, HOOKS, 4, **options)
    return run_extraction(spec, progress=None, heartbeat=None, should_cancel=should_cancel, failpoint=failpoint)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A complete float32 run, a complete float16 run and a run cancelled after two batches."""
    root = tmp_path_factory.mktemp("export")
    model = build_tiny_causal_lm(str(root / "model"), TEXTS, arch="gpt2", n_layer=3, hidden=32, n_head=4,
                                 vocab_size=300)
    dataset = root / "samples.txt"
    dataset.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    extract(model, dataset, root / "complete")
    extract(model, dataset, root / "float16", storage_dtype="float16")
    batches = []
    with pytest.raises(Cancelled):
        extract(model, dataset, root / "partial", failpoint=lambda name, context: batches.append(context["index"]),
                should_cancel=lambda: len(batches) >= 2)
    return root


@pytest.fixture
def where(tmp_path):
    """Where exports go: tmp_path also holds tests/conftest.py's data directory."""
    path = tmp_path / "exports"
    path.mkdir()
    return path


def load(output_dir, name):
    return np.load(Path(output_dir) / name)


def done_rows(output_dir, name):
    """The done samples' rows in dataset order, worked out from the files as docs/output-format.md says."""
    offsets = load(output_dir, "offsets.npy")
    rows = load(output_dir, name)
    checkpoint = Path(output_dir) / "checkpoint.json"
    if (Path(output_dir) / "metadata.json").exists():
        return rows
    done = np.sort(np.argsort(-np.diff(offsets), kind="stable")[: json.loads(checkpoint.read_text())["samples_done"]])
    return np.concatenate([rows[offsets[i] : offsets[i + 1]] for i in done])


def assert_export_equals_files(target, output_dir, result, context_size):
    dataset = datasets.load_from_disk(str(target))
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.num_rows == result.sequences
    tokens = done_rows(output_dir, "tokens.npy")
    assert result.tokens == result.sequences * context_size
    assert result.rows_left_over == len(tokens) - result.tokens < context_size
    assert dataset.features["token_ids"] == datasets.Sequence(datasets.Value("int32"), length=context_size)
    rows = dataset.with_format("numpy")[:]
    np.testing.assert_array_equal(rows["token_ids"], tokens[: result.tokens].reshape(-1, context_size))
    for column in result.hook_columns:
        stored = done_rows(output_dir, file_name(*parse_hook(column)))
        assert dataset.features[column].dtype == str(stored.dtype)  # numpy formatting reads float16 as float32
        np.testing.assert_array_equal(rows[column], stored[: result.tokens].reshape(-1, context_size, stored.shape[1]))
    return dataset


@pytest.mark.parametrize("shard_bytes", [None, 200_000], ids=["one-shard", "many-shards"])
def test_complete_run_exports_every_row_and_token_cut_into_sequences(runs, where, monkeypatch, shard_bytes):
    if shard_bytes:
        monkeypatch.setattr(export, "SHARD_BYTES", shard_bytes)
    seen = []
    result = export_hf_datasets(runs / "complete", where / "hf", context_size=10,
                                progress=lambda done, total: seen.append((done, total)))
    dataset = assert_export_equals_files(where / "hf", runs / "complete", result, 10)
    assert dataset.column_names == result.columns == [*COLUMNS, "token_ids"]
    widths = {"hook_resid_post": 32, "hook_mlp_out": 32, "mlp.hook_post": 128}
    for column in COLUMNS:
        assert dataset.features[column] == datasets.Array2D(shape=(10, widths[column.split(".", 2)[2]]),
                                                            dtype="float32")
    total = len(load(runs / "complete", "tokens.npy"))
    assert (result.sequences, result.rows_left_over) == divmod(total, 10) and result.rows_left_over > 0
    assert result.complete and result.samples == len(TEXTS) and result.dtype == "float32"
    assert seen[0] == (0, result.sequences) and seen[-1] == (result.sequences, result.sequences)
    assert len([n for n in os.listdir(where / "hf") if n.endswith(".arrow")]) == result.shards == len(seen) - 1
    assert (result.shards > 1) == bool(shard_bytes)
    assert os.listdir(where) == ["hf"], "the work directory beside the target is gone"


def test_partial_run_exports_only_its_done_samples_in_dataset_order(runs, where):
    checkpoint = json.loads((runs / "partial" / "checkpoint.json").read_text())
    assert not (runs / "partial" / "metadata.json").exists() and checkpoint["samples_done"] == 8
    result = export_hf_datasets(runs / "partial", where / "hf", context_size=7)
    assert not result.complete and result.samples == 8
    assert_export_equals_files(where / "hf", runs / "partial", result, 7)
    rows = datasets.load_from_disk(str(where / "hf")).with_format("numpy")[:]["blocks.2.hook_resid_post"]
    assert (np.abs(rows).sum(axis=-1) > 0).all(), "no row of a sample not done (zeros on disk) was exported"


def test_float16_output_is_exported_as_float16(runs, where):
    result = export_hf_datasets(runs / "float16", where / "hf", context_size=16)
    dataset = assert_export_equals_files(where / "hf", runs / "float16", result, 16)
    assert result.dtype == "float16" and dataset.features["blocks.0.mlp.hook_post"].dtype == "float16"
    assert str(dataset.data.column("blocks.0.mlp.hook_post").type.storage_type) == "list<item: list<item: halffloat>>"


def test_hooks_chooses_the_columns_in_the_order_given(runs, where):
    result = export_hf_datasets(runs / "complete", where / "hf", context_size=32,
                                hooks=["blocks.2.hook_mlp_out", (0, "residual"), "blocks.2.hook_mlp_out"])
    assert result.columns == ["blocks.2.hook_mlp_out", "blocks.0.hook_resid_post", "token_ids"]
    assert_export_equals_files(where / "hf", runs / "complete", result, 32)


def test_an_empty_target_directory_is_written_into(runs, where):
    (where / "hf").mkdir()
    result = export_hf_datasets(runs / "complete", where / "hf", context_size=64)
    assert datasets.load_from_disk(str(where / "hf")).num_rows == result.sequences > 0


@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        (dict(context_size=0), "The context size must be a whole number of at least 1, not 0."),
        (dict(context_size=100_000), r"has [\d,]+ rows \(tokens\) in its 36 done samples, fewer than one sequence of "
                                     r"100,000; choose a context size of at most [\d,]+\."),
        (dict(hooks=["blocks.1.hook_mlp_out"]), "blocks.1.hook_mlp_out was not extracted in .*; it has "
                                                "blocks.0.hook_resid_post, "),
        (dict(hooks=["mlp"]), "'mlp' names no layer; give one"),
        (dict(hooks=[]), "No hook was given; name at least one"),
    ],
)
def test_bad_requests_are_refused_with_a_sentence_and_write_nothing(runs, where, options, sentence):
    with pytest.raises(OutputError, match=sentence):  # ExportError is an OutputError, as the reader's refusals are
        export_hf_datasets(runs / "complete", where / "hf", **options)
    assert os.listdir(where) == []


def test_a_target_that_is_not_empty_is_refused(runs, where):
    (where / "hf").mkdir()
    (where / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"hf is not empty: choose a new directory or empty it\."):
        export_hf_datasets(runs / "complete", where / "hf")
    assert os.listdir(where / "hf") == ["notes.txt"]


@pytest.mark.parametrize("layout", ["no-extraction", "format-1"])
def test_a_directory_that_is_no_format_2_output_is_refused_by_the_reader(tmp_path, layout):
    source = tmp_path / "source"
    source.mkdir()
    if layout == "format-1":
        np.save(source / "offsets.npy", np.array([0, 2], dtype=np.int64))
        np.save(source / "layer_0_residual.npy", np.ones((2, 4), dtype=np.float32))
    sentence = "run the extraction again to get format 2" if layout == "format-1" else "is no extraction output"
    with pytest.raises(OutputError, match=sentence):
        export_hf_datasets(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_full_disk_midway_leaves_nothing_behind(runs, where, monkeypatch):
    monkeypatch.setattr(export, "SHARD_BYTES", 200_000)
    save, calls = datasets.Dataset.save_to_disk, []

    def fills_the_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", fills_the_disk)
    with pytest.raises(ExportError, match=r"Writing the export to .*hf failed \(No space left on device\) and left "
                                          r"nothing behind; free some space"):
        export_hf_datasets(runs / "complete", where / "hf", context_size=8)
    assert os.listdir(where) == []


@pytest.fixture
def completed(db, model_record, dataset, runs):
    """A completed extraction row with the runner's output where the row says it is (the module's
    run of the same samples, copied: running it again for every test would only cost time)."""
    from extraction.models import Extraction

    job = Extraction.objects.create(model=model_record, dataset=dataset, layers=list(LAYERS), hooks=list(HOOKS),
                                    batch_size=4, status="completed", finished_at=timezone.now(), fingerprint="fp")
    shutil.copytree(runs / "complete", job.output_dir)
    return job


def test_command_exports_and_says_how_to_load_it(completed, tmp_path, capsys):
    target = tmp_path / "sae"
    call_command("extraction", "export", str(completed.pk), "--format", "hf-datasets", str(target),
                 "--context-size", "16", "--hooks", "blocks.2.hook_mlp_out,blocks.0.mlp.hook_post")
    out, err = capsys.readouterr()
    dataset = datasets.load_from_disk(str(target))
    tokens = load(completed.output_dir, "tokens.npy")
    sequences = len(tokens) // 16
    assert dataset.column_names == ["blocks.2.hook_mlp_out", "blocks.0.mlp.hook_post", "token_ids"]
    assert dataset.num_rows == sequences
    np.testing.assert_array_equal(dataset.with_format("numpy")[:]["blocks.0.mlp.hook_post"],
                                  load(completed.output_dir, "layer_0_mlp_hidden.npy")[: sequences * 16]
                                  .reshape(sequences, 16, -1))
    assert out.strip() == (
        f"Exported extraction {completed.pk} to {target}: {sequences:,} sequences of 16 tokens ({sequences * 16:,} "
        f"tokens, {len(tokens) - sequences * 16:,} left over), float32, columns blocks.2.hook_mlp_out, "
        f"blocks.0.mlp.hook_post, token_ids. Load it with datasets.load_from_disk('{target}'), or train SAELens on "
        f"it with cached_activations_path='{target}', context_size=16 and hook_name one of blocks.2.hook_mlp_out, "
        "blocks.0.mlp.hook_post."
    )
    assert f"export {completed.pk}: 100%" in err


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["999", "--format", "hf-datasets"], "Extraction 999 does not exist; `manage.py extraction list` shows them."),
        (["{pk}", "--format", "hf-datasets", "--hooks", "blocks.1.hook_attn_out"],
         "blocks.1.hook_attn_out was not extracted in "),
        (["{pk}", "--format", "hf-datasets", "--context-size", "100000"], "choose a context size of at most"),
    ],
)
def test_command_refuses_with_the_sentence(completed, tmp_path, args, sentence):
    args = [arg.format(pk=completed.pk) for arg in args]
    with pytest.raises(CommandError, match=sentence) as refused:
        call_command("extraction", "export", args[0], str(tmp_path / "sae"), *args[1:])
    assert refused.value.returncode == 1
    assert not (tmp_path / "sae").exists()


def test_command_refuses_a_target_that_is_not_empty(completed, tmp_path):
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "keep.txt").write_text("mine")
    with pytest.raises(CommandError, match=r"sae is not empty: choose a new directory or empty it\."):
        call_command("extraction", "export", str(completed.pk), "--format", "hf-datasets", str(tmp_path / "sae"))


def test_command_refuses_an_extraction_without_output(make_extraction, tmp_path):
    job = make_extraction("queued")
    with pytest.raises(CommandError, match=f"Extraction {job.pk} has no output yet \\(it is queued\\); export it "
                                           "once it has run."):
        call_command("extraction", "export", str(job.pk), "--format", "hf-datasets", str(tmp_path / "sae"))
