"""extraction.loader on synthetic format-2 directories of a few thousand rows: no Django, no database."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import torch
from extraction import loader as loader_module
from extraction.loader import ActivationLoader, _resume
from extraction.reader import OutputError, open_output
from torch.utils.data import DataLoader

from tests.extraction.test_reader import write_output

TWO = ["blocks.0.hook_resid_post", (2, "mlp")]
# 2 hooks x 8 float32 (+ 4 bytes of token id) a row: two buffers of 512 rows (8 batches of 64).
SMALL = {"batch_size": 64, "buffer_bytes": 2 * 512 * 68}


@pytest.fixture(autouse=True)
def _data_dir():
    """Overrides tests/conftest.py's: the loader needs no Django settings, so `-p no:django` works."""
    yield


def lengths(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 60, n)


@pytest.fixture
def run(tmp_path):
    return write_output(tmp_path / "run", lengths(100, 0))


@pytest.fixture
def second(tmp_path):
    return write_output(tmp_path / "second", lengths(60, 1), tag=1)


def identities(batches, key="blocks.0.hook_resid_post") -> list[tuple[int, int]]:
    """(run tag, row) of every row served, read from its values."""
    rows = torch.cat([b[key] if isinstance(b, dict) else b for b in batches])
    return [(int(tag), int(row) - 1) for row, tag in rows[:, :2].tolist()]


def eligible(path, tag: int, skip_first_token=False) -> list[tuple[int, int]]:
    """(run tag, row) of every row of the done samples, less their first with skip_first_token."""
    output = open_output(path)
    starts, ends = output.offsets[:-1] + skip_first_token, output.offsets[1:]
    return [(tag, r) for i in output.done_samples() for r in range(starts[i], ends[i])]


def same_stream(a, b) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in x) if isinstance(x, dict) else torch.equal(x, y) for x, y in zip(a, b)
    )


def as_bytes(batch) -> bytes:
    tensors = [batch[k] for k in sorted(batch)] if isinstance(batch, dict) else [batch]
    return b"".join(t.numpy().tobytes() for t in tensors)


def test_every_row_is_served_exactly_once_an_epoch(run, second):
    loader = ActivationLoader([run, second], TWO, drop_last=False, with_tokens=True, **SMALL)
    batches = list(loader)
    assert loader.num_rows == len(eligible(run, 0)) + len(eligible(second, 1))
    assert loader.num_buffers > 2 and len(batches) == len(loader) == loader.num_batches
    assert all(len(b["token_ids"]) == 64 for b in batches[:-1])
    assert len(batches[-1]["token_ids"]) == loader.num_rows % 64
    served = identities(batches)
    assert sorted(served) == sorted(eligible(run, 0) + eligible(second, 1)) and len(set(served)) == len(served)


def test_hooks_and_token_ids_are_rows_of_the_same_tokens(run):
    output = open_output(run)
    for batch in ActivationLoader(run, TWO, with_tokens=True, **SMALL):
        residual, mlp = batch["blocks.0.hook_resid_post"], batch["blocks.2.hook_mlp_out"]
        assert residual.shape == mlp.shape == (64, 8) and residual.dtype == torch.float32
        assert torch.equal(residual[:, 0], mlp[:, 0]) and (residual[:, 2] == 0).all() and (mlp[:, 2] == 1).all()
        assert batch["token_ids"].dtype == torch.int64
        assert batch["token_ids"].tolist() == output.tokens[(residual[:, 0] - 1).long().numpy()].tolist()


def test_one_hook_yields_tensors_and_a_list_yields_dicts(run):
    assert isinstance(next(iter(ActivationLoader(run, (2, "mlp"), batch_size=32))), torch.Tensor)
    assert isinstance(next(iter(ActivationLoader(run, "blocks.2.hook_mlp_out", batch_size=32))), torch.Tensor)
    listed = next(iter(ActivationLoader(run, ["blocks.2.hook_mlp_out"], batch_size=32)))
    assert list(listed) == ["blocks.2.hook_mlp_out"]
    with_tokens = next(iter(ActivationLoader(run, (2, "mlp"), batch_size=32, with_tokens=True)))
    assert list(with_tokens) == ["blocks.2.hook_mlp_out", "token_ids"]


def test_drop_last_drops_only_the_final_partial_batch(run):
    loader = ActivationLoader(run, TWO, **SMALL)
    batches = list(loader)
    assert len(batches) == loader.num_batches == loader.num_rows // 64
    assert all(b["blocks.0.hook_resid_post"].shape == (64, 8) for b in batches)
    served = identities(batches)
    assert len(set(served)) == len(served) == loader.num_rows - loader.num_rows % 64


def test_dtype_casts_stored_float16(tmp_path):
    path = write_output(tmp_path / "half", lengths(40, 2), dtype=np.float16)
    assert next(iter(ActivationLoader(path, (2, "mlp"), batch_size=16))).dtype == torch.float16
    loader = ActivationLoader(path, (2, "mlp"), batch_size=16, dtype=torch.float32, drop_last=False)
    batches = list(loader)
    assert all(b.dtype == torch.float32 for b in batches)
    assert sorted(r for _, r in identities(batches)) == [r for _, r in eligible(path, 0)]


def test_the_stream_is_fixed_by_the_seed(run):
    first, again = list(ActivationLoader(run, TWO, seed=7, **SMALL)), list(ActivationLoader(run, TWO, seed=7, **SMALL))
    other = list(ActivationLoader(run, TWO, seed=8, **SMALL))
    assert same_stream(first, again) and not same_stream(first, other)
    loader = ActivationLoader(run, TWO, seed=7, **SMALL)
    assert same_stream(list(loader), list(loader)), "iterating again replays the stream"


def test_rows_are_shuffled_across_the_run(run):
    served = [r for _, r in identities(list(ActivationLoader(run, TWO, drop_last=False, **SMALL)))]
    assert served != sorted(served)
    first_batch = served[:64]
    assert max(first_batch) - min(first_batch) > len(served) / 4, "a batch mixes rows from far apart"


def test_a_batch_is_a_random_draw_served_in_file_order(run):
    """The documented contract: which rows share a batch is random, their order inside it is the file's."""
    loader = ActivationLoader(run, TWO, drop_last=False, **SMALL)
    batches = [[r for _, r in identities([b])] for b in loader]
    assert all(rows == sorted(rows) for rows in batches)
    again = [[r for _, r in identities([b])] for b in ActivationLoader(run, TWO, drop_last=False, seed=1, **SMALL)]
    assert [set(b) for b in batches] != [set(b) for b in again], "another seed draws other batches"
    gaps = [b - a for rows in batches for a, b in zip(rows, rows[1:])]
    assert np.mean(gaps) > 3, "a batch is not a run of neighbouring rows"


def test_each_epoch_covers_every_row_in_a_new_order(run):
    loader = ActivationLoader(run, TWO, epochs=3, drop_last=False, **SMALL)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 * loader.num_batches
    epochs = [identities(batches[e * loader.num_batches : (e + 1) * loader.num_batches]) for e in range(3)]
    for served in epochs:
        assert sorted(served) == sorted(eligible(run, 0))
    assert epochs[0] != epochs[1] != epochs[2]
    assert same_stream(batches[: loader.num_batches], list(ActivationLoader(run, TWO, drop_last=False, **SMALL)))


def test_endless_epochs(run):
    loader = ActivationLoader(run, TWO, epochs=None, **SMALL)
    batches = list(itertools.islice(loader, 3 * loader.num_batches + 2))
    assert len(batches) == 3 * loader.num_batches + 2
    with pytest.raises(TypeError, match="An endless ActivationLoader"):
        len(loader)


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_resume_yields_the_tail_of_the_uninterrupted_stream(run, second, drop_last):
    options = dict(epochs=2, drop_last=drop_last, with_tokens=True, **SMALL)
    full = list(ActivationLoader([run, second], TWO, **options))
    per_epoch = len(full) // 2
    for start in (0, 1, 6, 7, 8, per_epoch - 1, per_epoch, per_epoch + 9, len(full) - 1, len(full)):
        resumed = ActivationLoader([run, second], TWO, start_batch=start, **options)
        assert len(resumed) == len(full) - start
        assert same_stream(list(resumed), full[start:]), start


def test_a_resume_reads_no_buffer_before_its_batch(run, monkeypatch):
    filled = []
    original = ActivationLoader._fill
    monkeypatch.setattr(ActivationLoader, "_fill", lambda self, *job: filled.append(job[:2]) or original(self, *job))
    loader = ActivationLoader(run, TWO, start_batch=8 * 2 + 3, **SMALL)  # 8 batches a buffer: buffer 2, batch 3
    list(loader)
    assert filled == [(0, b) for b in range(2, loader.num_buffers)]


def test_the_buffer_bound_holds_however_large_the_run(tmp_path, monkeypatch):
    path = write_output(tmp_path / "big", lengths(400, 3), width=64)  # about 12,000 rows, 3 MB a hook
    budget = 256 * 1024
    loader = ActivationLoader(path, TWO, batch_size=64, buffer_bytes=budget)
    allocated = []
    original = ActivationLoader._allocate
    monkeypatch.setattr(ActivationLoader, "_allocate", lambda self: allocated.append(original(self)) or allocated[-1])
    tracemalloc.start()
    try:
        for batch in loader:
            del batch
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = sum(a.nbytes for arrays in allocated for a in arrays)
    assert len(allocated) == 2 and held <= budget
    assert loader.num_rows * loader.row_bytes > 10 * budget
    batch_bytes = 64 * loader.row_bytes
    assert peak < budget + 4 * batch_bytes + 64 * 1024, peak


def test_a_batch_kept_by_the_consumer_never_changes_while_later_buffers_are_read(run, monkeypatch):
    """Batches are views of the buffer: a buffer still referenced by a kept batch is not refilled."""
    allocated = []
    original = ActivationLoader._allocate
    monkeypatch.setattr(ActivationLoader, "_allocate", lambda self: allocated.append(1) or original(self))
    loader = ActivationLoader(run, TWO, **SMALL)
    kept, copies = [], []
    for i, batch in enumerate(loader):
        if i % 8 == 3:  # one batch of every buffer
            kept.append(batch)
            copies.append({k: v.clone() for k, v in batch.items()})
    assert len(kept) == loader.num_buffers > 3
    assert all(torch.equal(k[key], c[key]) for k, c in zip(kept, copies) for key in k)
    assert len(allocated) == loader.num_buffers  # a new buffer for every one a kept batch holds
    # Let go of them, and the next pass reads into the two it keeps.
    reference = list(ActivationLoader(run, TWO, **SMALL))[:3]
    kept.clear()
    del batch
    allocated.clear()
    assert same_stream(list(itertools.islice(loader, 3)), reference)
    assert len(allocated) == 0


def test_skip_first_token_leaves_out_each_samples_first_row(run):
    served = identities(list(ActivationLoader(run, TWO, skip_first_token=True, drop_last=False, **SMALL)))
    firsts = set(open_output(run).offsets[:-1].tolist())
    assert sorted(served) == sorted(eligible(run, 0, skip_first_token=True))
    assert not firsts & {r for _, r in served}


@pytest.mark.parametrize("skip_first_token", [False, True])
def test_a_partial_run_serves_only_done_samples_and_never_zeros(tmp_path, second, skip_first_token):
    path = write_output(tmp_path / "partial", lengths(100, 4), samples_done=37, tag=2)
    on_disk = np.load(path / "layer_0_residual.npy")
    written = set(np.flatnonzero(on_disk.any(axis=1)).tolist())
    assert len(written) < len(on_disk) - 100, "the rows of samples not done are zeros on disk"
    firsts = set(open_output(path).offsets[:-1].tolist()) if skip_first_token else set()
    loader = ActivationLoader([path, second], TWO, drop_last=False, skip_first_token=skip_first_token, **SMALL)
    batches = list(loader)
    for batch in batches:
        for key in ("blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"):
            assert not (batch[key] == 0).all(dim=1).any()
    expected = [(2, r) for r in written - firsts] + eligible(second, 1, skip_first_token)
    assert sorted(identities(batches)) == sorted(expected)


def test_two_workers_serve_the_same_batches_once(run, second):
    loader = ActivationLoader([run, second], TWO, with_tokens=True, **SMALL)
    alone = list(loader)
    together = list(DataLoader(loader, batch_size=None, num_workers=2))
    assert len(together) == len(alone) == len(loader)
    assert sorted(map(as_bytes, together)) == sorted(map(as_bytes, alone))
    served = identities(together)
    assert len(set(served)) == len(served)
    assert not same_stream(together, alone), "workers interleave their buffers"


def test_with_workers_a_resume_yields_the_tail_of_the_combined_stream(tmp_path):
    run = write_output(tmp_path / "run", lengths(100, 4))
    options = dict(epochs=2, with_tokens=True, **SMALL)
    loader = ActivationLoader(run, TWO, **options)
    assert loader.num_buffers == 7 and loader._buffer_batches(6) == 3, "worker 0 serves 3 batches more an epoch"
    full = list(DataLoader(loader, batch_size=None, num_workers=2))
    assert len(full) == 2 * (27 + 24)
    # Mid-turn, at a turn, and after worker 1 is exhausted (batch 96 on).
    for start in (5, 6, 97, 100):
        resumed = DataLoader(ActivationLoader(run, TWO, start_batch=start, **options), batch_size=None, num_workers=2)
        assert same_stream(list(resumed), full[start:]), start


def test_workers_started_by_spawn_get_the_plan_not_the_buffers(run):
    loader = ActivationLoader(run, (2, "mlp"), drop_last=False, **SMALL)
    alone = list(loader)
    assert loader._spare is not None
    spawned = list(DataLoader(loader, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    assert same_stream(spawned, alone)


def test_resume_roles_follow_the_dataloaders_turns():
    assert _resume(0, [3, 5]) == [(0, 0), (1, 0)]
    assert _resume(1, [2, 2, 2]) == [(1, 0), (2, 0), (0, 1)]
    assert _resume(5, [3, 5]) == [(1, 2), (0, 3)]
    assert _resume(7, [3, 5]) == [(1, 4), (0, 3)]
    assert _resume(8, [3, 5]) == [(0, 3), (1, 5)]
    assert _resume(3, [0, 2, 2]) == [(2, 1), (1, 2), (0, 0)]
    assert _resume(10**9 + 1, [float("inf")] * 2) == [(1, 5 * 10**8), (0, 5 * 10**8 + 1)]


BAD_INPUT = {
    "unknown hook": (["run"], "blocks.0.hook_nonsense", {}, "Hook 'blocks.0.hook_nonsense' is unknown; choose from"),
    "hook without layer": (["run"], "mlp", {}, "'mlp' names no layer; give one"),
    "hook missing in one run": (
        ["run", "without"], TWO, {},
        "blocks.2.hook_mlp_out was not extracted in {without}; it has blocks.0.hook_resid_post."),
    "width mismatch": (
        ["run", "narrow"], TWO, {},
        "blocks.0.hook_resid_post has different widths (8 in {run}, 4 in {narrow}); read together only runs of "
        "one model."),
    "batch_size < 1": (["run"], TWO, {"batch_size": 0}, "batch_size must be a whole number of at least 1, not 0."),
    "buffer under two batches": (
        ["run"], TWO, {"batch_size": 64, "buffer_bytes": 2 * 64 * 64 - 1},
        "buffer_bytes=8,191 holds fewer than two batches of 64 rows of 64 bytes (one is read while the other is "
        "served); give at least 8,192, or a smaller batch_size."),
    "epochs < 1": (["run"], TWO, {"epochs": 0}, "epochs must be a whole number of at least 1, not 0."),
    "start past the end": (
        ["run"], TWO, {"start_batch": 10**6, **SMALL},
        "start_batch=1,000,000 is past the end of the stream, which has 47 batches in 1 epoch; resume with the "
        "start_batch, seed and sizes of the run you resume."),
    "dtype not torch": (["run"], TWO, {"dtype": "float32"}, "dtype must be None (the stored dtype) or a torch float"),
    "no output": ([], TWO, {}, "No output was given; give an extraction's output directory, or a list of them."),
    "no hook": (["run"], [], {}, "No hook was given; name one, as in 'blocks.5.hook_mlp_out' or (5, 'mlp')."),
    "hook twice": (
        ["run"], ["blocks.2.hook_mlp_out", (2, "mlp")], {},
        "blocks.2.hook_mlp_out is named twice among the hooks; name each hook once."),
    "run twice": (["run", "second", "run"], TWO, {}, "{run} is given twice, so its rows would be read twice an epoch"),
    "no done rows": (["empty"], TWO, {}, "There are no done rows to read ({empty}: 0 of 2 samples done); wait for"),
    "no directory": (["nowhere"], TWO, {}, "{nowhere} is not a directory; give the directory an extraction wrote"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_with_a_sentence(tmp_path, case):
    paths = {
        "run": write_output(tmp_path / "run", lengths(100, 0)),
        "second": write_output(tmp_path / "second", [5, 6]),
        "narrow": write_output(tmp_path / "narrow", [3, 4], width=4),
        "without": write_output(tmp_path / "without", [3, 4], points=((0, "residual"),)),
        "empty": write_output(tmp_path / "empty", [3, 4], samples_done=0),
        "nowhere": tmp_path / "nowhere",
    }
    names, hooks, options, sentence = BAD_INPUT[case]
    with pytest.raises(OutputError) as caught:
        ActivationLoader([paths[name] for name in names], hooks, **options)
    assert sentence.format(**paths) in str(caught.value)


def test_the_loader_imports_no_django():
    assert "django" not in loader_module.__dict__ and not hasattr(loader_module, "settings")
