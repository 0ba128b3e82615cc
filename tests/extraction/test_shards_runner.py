"""extraction.runner's shards, without Django: the global order cut into parts that separate
workers fill, and the files byte-identical to one worker's with the same batch size."""

from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
from extraction import runner
from extraction.runner import ExtractionSpec, shards

from tests.extraction.test_runner import extract, fail_at, layer_files, load, models, samples_path  # noqa: F401


@pytest.fixture(autouse=True)
def _data_dir():
    """The runner needs no Django settings."""
    yield


def spec_for(model_path, dataset_path, output_dir, *, batch_size=4, hooks=("residual", "mlp"), layers=(0, 2),
             **options):
    return ExtractionSpec(model_path, dataset_path, str(output_dir), tuple(layers), tuple(hooks), batch_size, **options)


def run_all(spec, count, *, order=None, failpoint=None):
    planned = runner.plan_shards(spec, count)
    for index in order or range(len(planned.shards)):
        runner.run_shard(spec, index, progress=None, heartbeat=None, should_cancel=None, failpoint=failpoint)
    return planned, runner.finish_shards(spec)


def same_files(a, b) -> list[str]:
    names = ["offsets.npy", "tokens.npy", "metadata.json", *layer_files(a)]
    assert layer_files(a) == layer_files(b)
    return [name for name in names if not filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False)]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_write_the_same_bytes_as_one_worker(models, samples_path, tmp_path, count):
    one = tmp_path / "one"
    extract(models["gpt2"], samples_path, one, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    spec = spec_for(models["gpt2"], samples_path, tmp_path / "sharded")
    # Run in reverse: each shard writes its own rows, whatever the others do.
    planned, metadata = run_all(spec, count, order=list(reversed(range(count))))
    assert len(planned.shards) == count
    assert same_files(one, spec.output_dir) == []
    # A finished sharded output looks like a one-worker output: no shard files are left.
    assert not os.path.exists(os.path.join(spec.output_dir, "shards.json"))
    assert not os.path.exists(os.path.join(spec.output_dir, "shards"))
    assert metadata["samples"] == 50


def test_shards_start_on_batch_boundaries_and_balance_padded_tokens():
    lengths = np.array(sorted([200, 180, 150] + [20] * 61, reverse=True))
    cut = shards.bounds(lengths, 4, 2)
    assert cut[0][0] == 0 and cut[-1][1] == len(lengths)
    assert all(first % 4 == 0 for first, _ in cut)
    assert [end for _, end in cut[:-1]] == [first for first, _ in cut[1:]]
    cost = [sum(4 * lengths[b] for b in range(first, end, 4)) for first, end in cut]
    # The first shard holds the long samples: few samples, about half the work.
    assert cut[0][1] - cut[0][0] < cut[1][1] - cut[1][0]
    assert max(cost) / min(cost) < 1.3


def test_the_cut_counts_what_attention_adds_to_long_batches():
    """Two shards whose padded tokens are even are not even work where attention costs: with a
    width near the lengths, the first shard (the long samples) gets fewer of them."""
    lengths = np.array(sorted(np.random.default_rng(0).integers(8, 256, 400), reverse=True))
    by_tokens = shards.bounds(lengths, 8, 2)
    by_work = shards.bounds(lengths, 8, 2, hidden=64)
    assert by_work[0][1] < by_tokens[0][1]

    def work(first, end):
        return sum(min(8, end - b) * lengths[b] * (1 + lengths[b] / (6 * 64)) for b in range(first, end, 8))

    assert max(work(*c) for c in by_work) / min(work(*c) for c in by_work) < 1.05
    assert max(work(*c) for c in by_tokens) / min(work(*c) for c in by_tokens) > 1.1


def test_more_shards_than_batches_gives_one_shard_a_batch():
    assert shards.bounds(np.array([5, 4, 3, 2, 1]), 2, 8) == [(0, 2), (2, 4), (4, 5)]


def test_a_killed_shard_resumes_alone_and_the_output_is_still_identical(models, samples_path, tmp_path):
    one = tmp_path / "one"
    extract(models["gpt2"], samples_path, one, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    spec = spec_for(models["gpt2"], samples_path, tmp_path / "sharded")
    planned = runner.plan_shards(spec, 2)
    second = planned.shards[1]
    # Shard 1 dies after its first batch (global batch indices: it starts where shard 0 ends).
    die = fail_at(second["first_sample"] // 4 + 1, RuntimeError("worker died"))
    with pytest.raises(RuntimeError):
        runner.run_shard(spec, 1, progress=None, heartbeat=None, should_cancel=None, failpoint=die)
    assert shards.progress(spec.output_dir) == (4, 50)
    runner.run_shard(spec, 0, progress=None, heartbeat=None, should_cancel=None)
    calls = []
    runner.run_shard(spec, 1, progress=lambda *told: calls.append(told), heartbeat=None, should_cancel=None)
    assert calls[0][:2] == (4, second["samples"])  # it went on after its first batch
    runner.finish_shards(spec)
    assert same_files(one, spec.output_dir) == []


def test_a_retry_planned_the_same_way_keeps_the_shards_its_original_finished(models, samples_path, tmp_path):
    spec = spec_for(models["gpt2"], samples_path, tmp_path / "original")
    planned = runner.plan_shards(spec, 2)
    runner.run_shard(spec, 1, progress=None, heartbeat=None, should_cancel=None)
    retry = spec_for(models["gpt2"], samples_path, tmp_path / "retry")
    replanned = runner.plan_shards(retry, 2, seed_from=spec.output_dir)
    assert replanned.done == [0, planned.shards[1]["samples"]]
    runner.run_shard(retry, 0, progress=None, heartbeat=None, should_cancel=None)
    runner.finish_shards(retry)
    one = tmp_path / "one"
    extract(models["gpt2"], samples_path, one, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    assert same_files(one, retry.output_dir) == []
    # Asked for 3 shards, a retry keeps the cut of the job it retries, and so the shard it finished.
    other = spec_for(models["gpt2"], samples_path, tmp_path / "other")
    assert runner.plan_shards(other, 3, seed_from=spec.output_dir).done == [0, planned.shards[1]["samples"]]
    # Another request (other layers) keeps nothing.
    changed = spec_for(models["gpt2"], samples_path, tmp_path / "changed", layers=(1,))
    assert runner.plan_shards(changed, 2, seed_from=spec.output_dir).done == [0, 0]


def test_finish_refuses_while_a_shard_is_not_done(models, samples_path, tmp_path):
    spec = spec_for(models["gpt2"], samples_path, tmp_path / "sharded")
    runner.plan_shards(spec, 2)
    runner.run_shard(spec, 0, progress=None, heartbeat=None, should_cancel=None)
    with pytest.raises(Exception, match="Shard 1 .* is not done"):
        runner.finish_shards(spec)
    assert not os.path.exists(os.path.join(spec.output_dir, "metadata.json"))


def test_a_retry_at_half_the_batch_size_keeps_the_shards_done_and_their_cut(models, samples_path, tmp_path):
    spec = spec_for(models["gpt2"], samples_path, tmp_path / "original", batch_size=8)
    planned = runner.plan_shards(spec, 2)
    runner.run_shard(spec, 0, progress=None, heartbeat=None, should_cancel=None)
    retry = spec_for(models["gpt2"], samples_path, tmp_path / "retry", batch_size=4)
    replanned = runner.plan_shards(retry, 2, seed_from=spec.output_dir)
    assert [(s["first_sample"], s["end_sample"]) for s in replanned.shards] == [
        (s["first_sample"], s["end_sample"]) for s in planned.shards]
    assert replanned.done == [planned.shards[0]["samples"], 0]
    runner.run_shard(retry, 1, progress=None, heartbeat=None, should_cancel=None)
    metadata = runner.finish_shards(retry)
    assert metadata["samples"] == 50
    # Shard 0's rows are the original's; shard 1's were cut at batch size 4: the values agree
    # with a one-worker run to float rounding.
    one = tmp_path / "one"
    extract(models["gpt2"], samples_path, one, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    for name in layer_files(one):
        np.testing.assert_allclose(load(retry.output_dir, name), load(one, name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_a_dataset_tokenized_in_parts_gives_the_plan_of_one_pass(models, samples_path, tmp_path, parts):
    one = tmp_path / "one"
    extract(models["gpt2"], samples_path, one, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    spec = spec_for(models["gpt2"], samples_path, tmp_path / "sharded")
    cut = runner.split_dataset(spec, parts)
    assert [p["first_sample"] for p in cut] == sorted(p["first_sample"] for p in cut)
    assert sum(p["end_sample"] - p["first_sample"] for p in cut) == 50
    for part in reversed(cut):  # in any order, by any worker
        runner.tokenize_part(spec, part)
    planned = runner.plan_shards(spec, 2, parts=cut)
    for index in range(len(planned.shards)):
        runner.run_shard(spec, index, progress=None, heartbeat=None, should_cancel=None)
    runner.finish_shards(spec)
    assert not os.path.exists(os.path.join(spec.output_dir, "tokenizing"))
    assert same_files(one, spec.output_dir) == []
    with open(os.path.join(one, "checkpoint.json")) as a, open(os.path.join(spec.output_dir, "checkpoint.json")) as b:
        import json

        # The same fingerprint and dataset record: a resume checks the same thing either way.
        first, second = json.load(a), json.load(b)
        assert (first["fingerprint"], first["dataset"]) == (second["fingerprint"], second["dataset"])


def test_parts_of_a_jsonl_file_with_blank_lines_and_a_limit(models, tmp_path):
    import json

    lines = []
    for i in range(30):
        lines.append(json.dumps({"text": f"sample {i} " + "word " * (i % 7)}))
        if i % 4 == 0:
            lines.append("   ")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    one = tmp_path / "one"
    extract(models["gpt2"], str(path), one, layers=(1,), hooks=("residual",), batch_size=4, max_samples=25)
    spec = spec_for(models["gpt2"], str(path), tmp_path / "sharded", layers=(1,), hooks=("residual",),
                    max_samples=25)
    cut = runner.split_dataset(spec, 4)
    assert cut[-1]["end_sample"] == 25
    for part in cut:
        runner.tokenize_part(spec, part)
    planned = runner.plan_shards(spec, 3, parts=cut)
    for index in range(len(planned.shards)):
        runner.run_shard(spec, index, progress=None, heartbeat=None, should_cancel=None)
    runner.finish_shards(spec)
    assert same_files(one, spec.output_dir) == []


def test_a_checkpoint_written_back_by_a_woken_worker_does_not_undo_a_finished_shard(models, samples_path, tmp_path):
    import json

    spec = spec_for(models["gpt2"], samples_path, tmp_path / "sharded")
    planned = runner.plan_shards(spec, 2)
    stale = shards.read_shard_checkpoint(spec.output_dir, 0)  # before it ran: what a paused worker holds
    for index in range(2):
        runner.run_shard(spec, index, progress=None, heartbeat=None, should_cancel=None)
    with open(os.path.join(spec.output_dir, "shards", "0.json"), "w") as f:
        json.dump(stale, f)
    assert runner.finish_shards(spec)["samples"] == 50
    assert planned.shards[0]["first_sample"] == 0


def test_a_jsonl_line_of_unicode_spaces_is_no_sample_when_split_either(models, tmp_path):
    import json

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": "a"}), "\u00a0", json.dumps({"text": "b"}),
                               json.dumps({"text": "c"}), json.dumps({"text": "d"})]) + "\n", encoding="utf-8")
    spec = spec_for(models["gpt2"], str(path), tmp_path / "sharded", layers=(1,), hooks=("residual",), max_samples=3)
    cut = runner.split_dataset(spec, 2)
    assert cut[-1]["end_sample"] == 3
    from extraction.runner.dataset import iter_samples
    from itertools import islice

    read = [s for part in cut for s in islice(iter_samples(str(path), start=part["start_byte"], end=part["end_byte"],
                                                           first_line=part["first_line"]),
                                              part["end_sample"] - part["first_sample"])]
    assert read == ["a", "b", "c"]
