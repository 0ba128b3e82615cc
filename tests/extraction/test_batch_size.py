"""The batch size rule on its own: halved on out-of-memory, grown back on shorter samples."""

from __future__ import annotations

import json

import pytest

from extraction.runner.batch_size import BatchSize, grown_size

# Token counts, longest first as the runner orders them: 502 down to 7, a long tail of short ones.
LENGTHS = sorted((2 + int(500 * 0.985 ** (i - i % 3)) for i in range(300)), reverse=True)


@pytest.fixture(autouse=True)
def _data_dir():
    """Overrides tests/conftest.py's: the rule needs no Django settings."""
    yield


def simulate(fits, *, requested=32, sizer=None, done=0):
    """Cuts LENGTHS into batches as the runner does, on a device where fits(size, tokens) says
    whether a batch runs. Returns the batches run [(first sample, size)], the samples where one
    ran out of memory, the checkpoint after each batch [(samples done, fields)] and the sizer."""
    sizer = sizer or BatchSize(requested, requested)
    runs, ooms, checkpoints = [], [], []
    while done < len(LENGTHS):
        sizer.grow(done, LENGTHS[done])
        batch = LENGTHS[done : done + sizer.current]
        tokens = len(batch) * batch[0]
        if not fits(sizer.current, tokens):
            ooms.append(done)
            sizer.halve(done)
            continue
        sizer.ran(tokens)
        runs.append((done, sizer.current))
        done += len(batch)
        # Through JSON, as checkpoint.json holds it.
        checkpoints.append((done, json.loads(json.dumps(sizer.checkpoint_fields()))))
    return runs, ooms, checkpoints, sizer


def test_grown_size_is_the_largest_doubling_whose_full_padded_batch_fits_what_ran():
    assert grown_size(current=4, ceiling=8, next_length=11, fit_tokens=None) == 4, "no batch ran since the halving"
    assert grown_size(current=4, ceiling=8, next_length=12, fit_tokens=92) == 4  # 8 x 12 = 96 > 92
    assert grown_size(current=4, ceiling=8, next_length=11, fit_tokens=92) == 8  # 8 x 11 = 88 <= 92
    assert grown_size(current=4, ceiling=8, next_length=23, fit_tokens=184) == 8  # equal fits
    assert grown_size(current=1, ceiling=64, next_length=3, fit_tokens=23) == 4  # 4 x 3 <= 23 < 8 x 3
    assert grown_size(current=2, ceiling=16, next_length=1, fit_tokens=10_000) == 16, "never past the ceiling"
    assert grown_size(current=2, ceiling=8, next_length=0, fit_tokens=0) == 8, "empty samples hold no tokens"


def test_on_a_device_bound_by_tokens_it_halves_once_and_grows_back_as_early_as_what_ran_allows():
    capacity = 32 * LENGTHS[0] // 3  # 32 and 16 of the longest samples do not fit, 8 do
    runs, ooms, _, sizer = simulate(lambda size, tokens: tokens <= capacity)
    assert ooms == [0, 0] and [c["why"] for c in sizer.changes[:2]] == ["out_of_memory"] * 2
    budget = 8 * LENGTHS[0]  # the first batch after the halvings
    for first, size in runs:
        # The independent statement of the rule: the largest size up to 32 whose full batch,
        # padded to its longest sample, holds no more tokens than the budget (8 at least).
        allowed = max([8] + [s for s in (16, 32) if s * LENGTHS[first] <= budget])
        assert size == allowed, (first, size)
        assert min(size, len(LENGTHS) - first) * LENGTHS[first] <= capacity, "a grown batch never runs out"
    assert runs[-1][1] == 32 and sizer.current == 32
    grown = [c for c in sizer.changes if c["why"] == "grew_back"]
    assert [(c["from"], c["to"]) for c in grown] == [(8, 16), (16, 32)]
    assert all(LENGTHS[c["at_sample"]] * c["to"] <= budget for c in grown)


@pytest.mark.parametrize("capacity_in_longest", [3, 5, 12])
def test_a_resume_from_any_checkpoint_cuts_the_same_batches_as_the_uninterrupted_run(capacity_in_longest):
    def fits(size, tokens):
        return tokens <= capacity_in_longest * LENGTHS[0]

    runs, _, checkpoints, sizer = simulate(fits)
    # The checkpoint the halving wrote (nothing done yet, no budget measured) and every later one.
    for done, fields in [(0, {"batch_size": runs[0][1]}), *checkpoints]:
        resumed = BatchSize.from_checkpoint(fields, 32)
        tail, ooms, _, end = simulate(fits, sizer=resumed, done=done)
        assert tail == [run for run in runs if run[0] >= done] and not ooms, done
        assert end.current == sizer.current


def test_a_size_it_grew_back_to_that_still_runs_out_is_not_tried_again():
    """Memory not bound by tokens (above 2 every batch fails, however short): one batch is run
    twice for the growth, then the run stays at 2."""
    runs, ooms, checkpoints, sizer = simulate(lambda size, tokens: size <= 2, requested=8)
    assert [(c["from"], c["to"], c["why"]) for c in sizer.changes] == [
        (8, 4, "out_of_memory"), (4, 2, "out_of_memory"), (2, 4, "grew_back"), (4, 2, "out_of_memory")]
    assert len(ooms) == 3 and sizer.ceiling == 2 and {size for _, size in runs} == {2}
    # A resume reads the ceiling from the changes its checkpoint carries.
    done, fields = checkpoints[-5]
    assert BatchSize.from_checkpoint(fields, 8).ceiling == 2


def test_a_jump_that_runs_out_goes_back_to_the_size_that_ran_not_to_half_the_jump():
    sizer = BatchSize(8, 2, fit_tokens=100)
    assert sizer.grow(40, next_length=10) == {"at_sample": 40, "from": 2, "to": 8, "why": "grew_back"}
    assert sizer.halve(40) == {"at_sample": 40, "from": 8, "to": 2, "why": "out_of_memory"}
    sizer.fit_tokens = 10_000  # whatever ran since, the ceiling holds
    assert sizer.ceiling == 2 and sizer.grow(41, next_length=1) is None
    # Out of memory later at a size it did not grow to: halved, and it grows back to 2, no further.
    assert sizer.halve(50)["to"] == 1 and sizer.ceiling == 2
    sizer.ran(5)
    assert sizer.grow(60, next_length=1) == {"at_sample": 60, "from": 1, "to": 2, "why": "grew_back"}
