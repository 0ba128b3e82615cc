"""extraction.runner on tiny random models built locally: no Django, no database, no network."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from extraction import runner
from extraction.runner import (
    Cancelled,
    ExtractionSpec,
    inspect_dataset,
    inspect_model,
    run_extraction,
    seed_from_checkpoint,
)
from jobsite.demo import build_tiny_causal_lm, train_tokenizer
from jobsite.errors import ErrorType, JobInputError, classify_error, error_sentence, is_oom
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from tests.conftest import missing

WORDS = "the a quick brown fox jumps over lazy dog river stone light shadow market garden numbers".split()
TEXTS = [
    "Hello world.",
    "A short one.",
    "x",
    "Numbers: 3.14159, 2.71828 and 42.",
    "Ünïcödé text with accents — and an em dash.",
    "def add(a, b):    return a + b",
    "The model reads every token of this sentence, one after another, left to right.",
    "tabs\tand  double  spaces",
    "日本語のテキストも少し。",
    "OK",
] + [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + (i * 5) % 23)) for i in range(40)]
REPO = Path(__file__).resolve().parents[2]
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(autouse=True)
def _data_dir():
    """Overrides tests/conftest.py's: the runner needs no Django settings, so `-p no:django` works."""
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        arch: build_tiny_causal_lm(str(root / arch), TEXTS, arch=arch, n_layer=4, hidden=32, n_head=4)
        for arch in ("gpt2", "gpt_neox")
    }


@pytest.fixture(scope="module")
def samples_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "samples.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return str(path)


def extract(model_path, dataset_path, output_dir, *, layers=(1, 2), hooks=("residual",), batch_size=8,
            failpoint=None, should_cancel=None, events=None, **spec_options):
    """run_extraction with recording callbacks; returns (result, the progress calls)."""
    spec = ExtractionSpec(
        model_path, dataset_path, str(output_dir), tuple(layers), tuple(hooks), batch_size, **spec_options
    )
    calls = []
    result = run_extraction(
        spec,
        progress=lambda *args: calls.append(args),
        heartbeat=None,
        should_cancel=should_cancel,
        on_event=(lambda kind, payload: events.append((kind, payload))) if events is not None else None,
        failpoint=failpoint,
    )
    return result, calls


def load(output_dir, name):
    return np.load(os.path.join(output_dir, name), mmap_mode="r")


def layer_files(output_dir):
    return sorted(n for n in os.listdir(output_dir) if n.startswith("layer_"))


def fail_at(index, exc):
    def failpoint(name, context):
        if name == "extraction.batch" and context["index"] == index:
            raise exc

    return failpoint


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_batched_output_equals_per_sample_unpadded_output(models, samples_path, tmp_path, arch):
    hooks = ("residual", "mlp", "attention")
    batched, _ = extract(models[arch], samples_path, tmp_path / "b8", hooks=hooks, batch_size=8)
    single, _ = extract(models[arch], samples_path, tmp_path / "b1", hooks=hooks, batch_size=1)
    assert layer_files(tmp_path / "b8") == sorted(f"layer_{l}_{h}.npy" for l in (1, 2) for h in hooks)
    for name in layer_files(tmp_path / "b8"):
        np.testing.assert_allclose(load(tmp_path / "b8", name), load(tmp_path / "b1", name), atol=1e-5, rtol=0)
    assert batched.tokens == single.tokens > len(TEXTS)


def test_residual_at_layer_equals_hidden_states_of_next_layer(models, samples_path, tmp_path):
    extract(models["gpt2"], samples_path, tmp_path, layers=(0, 1, 2, 3), batch_size=8)
    offsets = load(tmp_path, "offsets.npy")
    tokenizer = AutoTokenizer.from_pretrained(models["gpt2"], local_files_only=True)
    model = AutoModel.from_pretrained(models["gpt2"], local_files_only=True).eval()
    for i in (0, 6, 12, len(TEXTS) - 1):
        ids = tokenizer(TEXTS[i], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        # The last layer is left out: transformers applies the final norm to its hidden state.
        for layer in (0, 1, 2):
            stored = load(tmp_path, f"layer_{layer}_residual.npy")[offsets[i] : offsets[i + 1]]
            np.testing.assert_allclose(stored, hidden[layer + 1][0].numpy(), atol=1e-5, rtol=0)


def test_files_are_in_dataset_order_and_offsets_match_token_counts(models, samples_path, tmp_path):
    result, _ = extract(models["gpt2"], samples_path, tmp_path, layers=(0,), hooks=("residual", "mlp"), batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(models["gpt2"], local_files_only=True)
    counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in TEXTS]
    offsets = load(tmp_path, "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    residual = load(tmp_path, "layer_0_residual.npy")
    assert residual.shape == (sum(counts), 32) and residual.dtype == np.float32
    # Sample 2 alone, unbatched, lands exactly on its own rows.
    alone = tmp_path / "alone.txt"
    alone.write_text(TEXTS[2] + "\n", encoding="utf-8")
    extract(models["gpt2"], str(alone), tmp_path / "one", layers=(0,), batch_size=1)
    alone_rows = load(tmp_path / "one", "layer_0_residual.npy")
    np.testing.assert_allclose(residual[offsets[2] : offsets[3]], alone_rows, atol=1e-5, rtol=0)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["samples"] == result.samples == len(TEXTS)
    assert metadata["tokens"] == result.tokens == sum(counts)
    assert metadata["files"]["layer_0_mlp.npy"] == {"dtype": "float32", "shape": [sum(counts), 32]}
    assert sorted(result.files) == sorted(["offsets.npy", "tokens.npy", "layer_0_residual.npy", "layer_0_mlp.npy",
                                           "metadata.json"])


def test_every_line_of_a_text_dataset_is_a_sample_an_empty_one_too(models, tmp_path):
    path = write(tmp_path / "lines.txt", "first line\n\nthird line\n   \nfifth line\n".encode())
    assert inspect_dataset(path).num_samples == 5
    result, _ = extract(models["gpt2"], path, tmp_path / "out", layers=(0,), batch_size=2)
    tokenizer = AutoTokenizer.from_pretrained(models["gpt2"], local_files_only=True)
    counts = [len(tokenizer(line, add_special_tokens=False)["input_ids"])
              for line in ["first line", "", "third line", "   ", "fifth line"]]
    offsets = load(tmp_path / "out", "offsets.npy")
    assert result.samples == 5 and offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert offsets[1] == offsets[2], "line 2 is empty: sample 1 has no rows, and sample 2 is line 3"
    alone = write(tmp_path / "third.txt", b"third line\n")
    extract(models["gpt2"], alone, tmp_path / "third", layers=(0,), batch_size=1)
    np.testing.assert_allclose(load(tmp_path / "out", "layer_0_residual.npy")[offsets[2]:offsets[3]],
                               load(tmp_path / "third", "layer_0_residual.npy"), atol=1e-5, rtol=0)


def test_a_token_id_beyond_64_bits_is_refused_with_its_line(tmp_path):
    path = write(tmp_path / "ids.jsonl", b'{"input_ids": [1, 2]}\n{"input_ids": [1, 2, 99999999999999999999999]}\n')
    with pytest.raises(JobInputError, match=r"^Line 2 of the dataset has a token id that is not a 64-bit integer: "
                                            r"99999999999999999999999\.$"):
        inspect_dataset(path)


def test_ids_beyond_vocab_are_clamped_and_counted(models, tmp_path):
    vocab = inspect_model(models["gpt2"]).vocab_size
    path = tmp_path / "ids.jsonl"
    rows = [{"input_ids": [1, 2, vocab + 5, 10**9]}, {"text": "Hello world."}, {"input_ids": [-3, 4]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert inspect_dataset(str(path)).format == "jsonl"
    result, _ = extract(models["gpt2"], str(path), tmp_path / "out", layers=(0,), batch_size=2)
    assert result.clamped_tokens == 3 and result.samples == 3
    # tokens.npy holds the id the model saw, not the one the dataset gave.
    tokens, offsets = load(tmp_path / "out", "tokens.npy"), load(tmp_path / "out", "offsets.npy")
    assert tokens.dtype == np.int32 and tokens[: offsets[1]].tolist() == [1, 2, vocab - 1, vocab - 1]
    assert tokens[offsets[2] : offsets[3]].tolist() == [0, 4]
    # A clamped id computes exactly like the last id of the vocabulary.
    path.write_text(json.dumps({"input_ids": [1, 2, vocab - 1, vocab - 1]}) + "\n")
    extract(models["gpt2"], str(path), tmp_path / "ref", layers=(0,), batch_size=1)
    clamped = load(tmp_path / "out", "layer_0_residual.npy")[:4]
    np.testing.assert_allclose(clamped, load(tmp_path / "ref", "layer_0_residual.npy"), atol=1e-5)


def test_truncation_at_max_length_is_counted(models, samples_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(models["gpt2"], local_files_only=True)
    counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in TEXTS]
    result, _ = extract(models["gpt2"], samples_path, tmp_path, layers=(0,), max_length=5)
    assert result.truncated_samples == sum(c > 5 for c in counts) > 0
    assert np.diff(load(tmp_path, "offsets.npy")).tolist() == [min(c, 5) for c in counts]


def test_resume_after_interruption_is_byte_identical_to_uninterrupted_run(models, samples_path, tmp_path):
    model = models["gpt_neox"]
    options = dict(layers=(0, 2), hooks=("residual", "attention"), batch_size=4, storage_dtype="float16")
    extract(model, samples_path, tmp_path / "straight", **options)
    with pytest.raises(ValueError, match="injected"):
        extract(model, samples_path, tmp_path / "resumed", failpoint=fail_at(3, ValueError("injected")), **options)
    assert not (tmp_path / "resumed" / "metadata.json").exists()
    _, calls = extract(model, samples_path, tmp_path / "resumed", **options)
    assert calls[0][0] == 3 * 4 and calls[-1][0] == len(TEXTS)
    for name in ["offsets.npy", *layer_files(tmp_path / "straight"), "metadata.json"]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


KILLED_RUN = """
import os, sys
from extraction import runner
from extraction.runner import ExtractionSpec, run_extraction

runner.SYNC_EVERY_S = float(os.environ["SYNC_EVERY_S"])

def die_at_batch_3(name, context):
    if context["index"] == 3:
        os._exit(9)

model, data, out = sys.argv[1:]
spec = ExtractionSpec(model, data, out, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
run_extraction(spec, progress=None, heartbeat=None, should_cancel=None, failpoint=die_at_batch_3)
"""


@pytest.mark.parametrize("sync_every_s, resumed_at", [(0, 3 * 4), (3600, 0)])
def test_resume_after_the_process_died_is_byte_identical(models, samples_path, tmp_path, sync_every_s, resumed_at):
    """Resumed from the last sync: after each batch when syncs are due every batch, from the
    start when none was due yet. Either way the files come out identical."""
    options = dict(layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    extract(models["gpt2"], samples_path, tmp_path / "straight", **options)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SYNC_EVERY_S": str(sync_every_s)}
    died = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, models["gpt2"], samples_path, str(tmp_path / "resumed")], cwd=REPO, env=env
    )
    assert died.returncode == 9
    _, calls = extract(models["gpt2"], samples_path, tmp_path / "resumed", **options)
    assert calls[0][0] == resumed_at
    for name in ["offsets.npy", *layer_files(tmp_path / "straight")]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_blocks_after_the_last_requested_layer_never_run(models, samples_path, tmp_path, monkeypatch):
    ran = set()

    def load_and_watch(*args, **kwargs):
        model = AutoModel.from_pretrained(*args, **kwargs)
        for index, block in enumerate(model.h):
            block.register_forward_pre_hook(lambda module, inputs, index=index: ran.add(index))
        return model

    watched = SimpleNamespace(from_pretrained=load_and_watch, from_config=AutoModel.from_config)
    monkeypatch.setattr(runner.model, "AutoModel", watched)
    extract(models["gpt2"], samples_path, tmp_path, layers=(0, 1), hooks=("mlp",))
    assert ran == {0, 1}


def test_cancel_between_batches_raises_cancelled_within_one_batch(models, samples_path, tmp_path):
    batches = []
    with pytest.raises(Cancelled):
        extract(
            models["gpt2"],
            samples_path,
            tmp_path,
            batch_size=4,
            failpoint=lambda name, context: batches.append(context["index"]),
            should_cancel=lambda: len(batches) >= 2,
        )
    assert batches == [0, 1]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["samples_done"] == 8


def test_injected_oom_with_auto_retry_halves_batch_size_and_completes(models, samples_path, tmp_path):
    """Every batch above 2 runs out of memory, however short: halved to 2, it grows back once a
    batch of 4 holds no more tokens than the first batch of 2 did, runs out again there, and
    grows no more (memory is not bound by tokens on this device)."""
    def failpoint(name, context):
        if context["batch_size"] > 2:
            raise RuntimeError(OOM_MESSAGE)

    events = []
    hooks = ("residual", "mlp", "attention")
    options = dict(hooks=hooks, auto_retry_on_oom=True, failpoint=failpoint, events=events)
    result, _ = extract(models["gpt2"], samples_path, tmp_path / "oom", **options)
    reductions = [payload for kind, payload in events if kind == "batch_size_reduced"]
    assert [(r["from"], r["to"], r["batch_index"]) for r in reductions] == [(8, 4, 0), (4, 2, 0), (4, 2, 12)]
    # 4 x 11 tokens (the 25th longest sample) fit in the 2 x 23 that ran first; 4 x 12 did not.
    assert sorted_lengths(models["gpt2"], samples_path)[22:25] == [12, 11, 11]
    assert changes_of(events) == [(0, 8, 4, "out_of_memory"), (0, 4, 2, "out_of_memory"), (24, 2, 4, "grew_back"),
                                  (24, 4, 2, "out_of_memory")]
    assert result.batch_size == 2
    assert [p["phase"] for kind, p in events if kind == "phase"] == ["extracting", "saving"]
    extract(models["gpt2"], samples_path, tmp_path / "b1", hooks=hooks, batch_size=1)
    for name in layer_files(tmp_path / "b1"):
        np.testing.assert_allclose(load(tmp_path / "oom", name), load(tmp_path / "b1", name), atol=1e-5, rtol=0)


def sorted_lengths(model, samples_path):
    """Every sample's token count, longest first: the order the runner computes them in."""
    plan = runner.prepare(ExtractionSpec(model, samples_path, "unused", (0,), ("residual",), 8))
    return sorted(np.diff(plan.offsets).tolist(), reverse=True)


def changes_of(events):
    return [(p["at_sample"], p["from"], p["to"], p["why"]) for kind, p in events
            if kind in ("batch_size_reduced", "batch_size_grown")]


def device_holding(tokens, also=None):
    """A failpoint that runs out of memory as a device holding `tokens` (samples x padded length)
    at most would, then calls `also`."""
    def failpoint(name, context):
        if also is not None:
            also(name, context)
        if context["tokens"] > tokens:
            raise RuntimeError(OOM_MESSAGE)

    return failpoint


GROWS = dict(layers=(0, 2), hooks=("residual", "mlp", "attention"), batch_size=8, auto_retry_on_oom=True)
# 8 x 23 tokens do not fit, 4 x 23 do: halved at the first batch, it grows back to 8 once the
# samples left are 11 tokens long (8 x 11 = 88 <= 92), after 24 samples.
HOLDS = 100
GREW_BACK = [(0, 8, 4, "out_of_memory"), (24, 4, 8, "grew_back")]


def test_after_an_oom_the_batch_grows_back_on_shorter_samples_and_the_output_matches(models, samples_path, tmp_path):
    lengths = sorted_lengths(models["gpt2"], samples_path)
    # Batches of 4 start at samples 0, 4, ..., 20, 24: the one at 24 is the first whose 8 fit.
    assert 8 * lengths[0] > HOLDS >= 4 * lengths[0] and 8 * lengths[24] <= 4 * lengths[0] < 8 * lengths[20]
    events, ran = [], []
    result, _ = extract(models["gpt2"], samples_path, tmp_path / "grown", events=events,
                        failpoint=device_holding(HOLDS, lambda name, c: ran.append(c)), **GROWS)
    assert changes_of(events) == GREW_BACK
    assert result.batch_size == 8
    # One batch ran out of memory; the batch grew back only as far as what had run fits.
    assert [(c["samples_done"], c["batch_size"]) for c in ran] == [
        (0, 8), (0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8)]
    grown = [p for kind, p in events if kind == "batch_size_grown"]
    assert grown[0]["batch_size_changes"] == [dict(zip(("at_sample", "from", "to", "why"), c)) for c in GREW_BACK]
    checkpoint = json.loads((tmp_path / "grown" / "checkpoint.json").read_text())
    assert checkpoint["batch_size"] == 8 and checkpoint["batch_size_changes"] == grown[0]["batch_size_changes"]
    # The same activations as a run that never ran out of memory, to 1e-6.
    extract(models["gpt2"], samples_path, tmp_path / "straight", **GROWS)
    for name in layer_files(tmp_path / "straight"):
        np.testing.assert_allclose(load(tmp_path / "grown", name), load(tmp_path / "straight", name),
                                   atol=1e-6, rtol=0, err_msg=name)


GROWN_RUN_KILLED = """
import os, sys
from extraction import runner
from extraction.runner import ExtractionSpec, run_extraction

runner.SYNC_EVERY_S = float(os.environ["SYNC_EVERY_S"])
die_at, holds = int(os.environ["DIE_AT"]), int(os.environ["HOLDS"])

def device(name, context):
    if context["index"] == die_at:
        os._exit(9)
    if context["tokens"] > holds:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

model, data, out = sys.argv[1:]
spec = ExtractionSpec(model, data, out, layers=(0, 2), hooks=("residual", "mlp", "attention"), batch_size=8,
                      auto_retry_on_oom=True)
run_extraction(spec, progress=None, heartbeat=None, should_cancel=None, failpoint=device)
"""


@pytest.mark.parametrize("sync_every_s, die_at, resumed_at, resumed_size", [
    (0, 3, 12, 4),  # halved, not grown yet: goes on at 4 and grows at the same sample
    (0, 8, 40, 8),  # grown: goes on at 8
    (3600, 8, 0, 4),  # grown, but only the halving's checkpoint was written: grows again at the same sample
])
def test_a_run_killed_after_an_oom_resumes_with_the_batch_size_and_growth_in_force(
    models, samples_path, tmp_path, sync_every_s, die_at, resumed_at, resumed_size
):
    extract(models["gpt2"], samples_path, tmp_path / "straight", failpoint=device_holding(HOLDS), **GROWS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SYNC_EVERY_S": str(sync_every_s), "DIE_AT": str(die_at),
           "HOLDS": str(HOLDS)}
    died = subprocess.run(
        [sys.executable, "-c", GROWN_RUN_KILLED, models["gpt2"], samples_path, str(tmp_path / "resumed")],
        cwd=REPO, env=env,
    )
    assert died.returncode == 9
    events, ran = [], []
    result, calls = extract(models["gpt2"], samples_path, tmp_path / "resumed", events=events,
                            failpoint=device_holding(HOLDS, lambda name, c: ran.append(c)), **GROWS)
    assert calls[0][0] == resumed_at and (ran[0]["samples_done"], ran[0]["batch_size"]) == (resumed_at, resumed_size)
    assert not [kind for kind, _ in events if kind == "batch_size_reduced"], "the halving is not redone"
    assert changes_of(events) == ([(24, 4, 8, "grew_back")] if resumed_at < 24 else [])
    checkpoint = json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())
    assert changes_of([("batch_size_grown", c) for c in checkpoint["batch_size_changes"]]) == GREW_BACK
    assert result.batch_size == 8
    for name in ["offsets.npy", *layer_files(tmp_path / "straight"), "metadata.json"]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_injected_oom_without_auto_retry_reraises_an_oom_error(models, samples_path, tmp_path):
    with pytest.raises(RuntimeError) as caught:
        extract(models["gpt2"], samples_path, tmp_path, failpoint=fail_at(1, RuntimeError(OOM_MESSAGE)))
    assert is_oom(caught.value)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["samples_done"] == 8


@pytest.mark.parametrize("message, oom", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB", True),
    # A failed cudaMalloc outside the caching allocator (a kernel's module loaded lazily, a
    # cuBLAS workspace) reaches Python as a plain RuntimeError without the final period.
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call", True),
    ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "8589934592 bytes.", True),
    ("CUDA error: device-side assert triggered", False),
    ("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!", False),
])
def test_out_of_memory_is_recognised_by_its_message(message, oom):
    assert is_oom(RuntimeError(message)) is oom
    # torch raises CUDA errors as AcceleratorError, a RuntimeError
    assert is_oom(torch.AcceleratorError(message)) is oom


@pytest.fixture(scope="module")
def loud_model(models, tmp_path_factory):
    """The tiny GPT-2 with layer 1's MLP output scaled up: many of its values pass float16's 65504."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("loud") / "gpt2"
    shutil.copytree(models["gpt2"], path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e8)
    model.save_pretrained(path)
    return str(path)


LOUD = dict(layers=(1,), hooks=("mlp", "residual"), batch_size=8)


def stored_infs(output_dir):
    return sum(int(np.isinf(load(output_dir, name)).sum()) for name in layer_files(output_dir))


def test_float16_values_beyond_its_range_are_counted(loud_model, samples_path, tmp_path):
    exact, _ = extract(loud_model, samples_path, tmp_path / "f32", **LOUD)
    assert exact.inf_values == 0 and stored_infs(tmp_path / "f32") == 0
    assert np.abs(load(tmp_path / "f32", "layer_1_mlp.npy")).max() > 65504

    result, _ = extract(loud_model, samples_path, tmp_path / "f16", storage_dtype="float16", **LOUD)
    assert result.inf_values == stored_infs(tmp_path / "f16") > 0
    assert json.loads((tmp_path / "f16" / "metadata.json").read_text())["inf_values"] == result.inf_values


def test_the_inf_count_survives_a_resume_and_a_halved_batch(loud_model, samples_path, tmp_path):
    options = dict(storage_dtype="float16", **LOUD)
    straight, _ = extract(loud_model, samples_path, tmp_path / "straight", **options)
    with pytest.raises(ValueError, match="injected"):
        extract(loud_model, samples_path, tmp_path / "resumed", failpoint=fail_at(3, ValueError("injected")),
                **options)
    resumed, calls = extract(loud_model, samples_path, tmp_path / "resumed", **options)
    assert calls[0][0] == 3 * 8  # it did resume

    def oom_once(name, context):  # the third batch, at batch size 8 only
        if context["index"] == 2 and context["batch_size"] == 8:
            raise RuntimeError(OOM_MESSAGE)

    halved, _ = extract(loud_model, samples_path, tmp_path / "halved", auto_retry_on_oom=True, failpoint=oom_once,
                        **options)
    changes = json.loads((tmp_path / "halved" / "checkpoint.json").read_text())["batch_size_changes"]
    assert [(c["from"], c["to"]) for c in changes] == [(8, 4), (4, 8)]  # halved, then grown back on shorter samples
    assert resumed.inf_values == halved.inf_values == straight.inf_values == stored_infs(tmp_path / "halved") > 0


def test_seed_from_checkpoint_resumes_at_new_batch_size_without_recomputing(models, samples_path, tmp_path):
    model, options = models["gpt2"], dict(layers=(1, 3), hooks=("residual", "mlp"))
    with pytest.raises(RuntimeError):
        oom_at_batch_2 = fail_at(2, RuntimeError(OOM_MESSAGE))
        extract(model, samples_path, tmp_path / "first", batch_size=8, failpoint=oom_at_batch_2, **options)
    retry = ExtractionSpec(model, samples_path, str(tmp_path / "retry"), (1, 3), ("residual", "mlp"), batch_size=4)
    assert seed_from_checkpoint(str(tmp_path / "first"), retry.output_dir, retry) == 16
    forwarded = []
    result, calls = extract(
        model, samples_path, tmp_path / "retry", batch_size=4, failpoint=lambda name, c: forwarded.append(c), **options
    )
    assert calls[0][0] == 16 and result.samples == len(TEXTS)
    assert all(c["batch_size"] == 4 for c in forwarded)
    assert forwarded[0]["samples_done"] == 16 and len(forwarded) == -(-(len(TEXTS) - 16) // 4)
    extract(model, samples_path, tmp_path / "ref", batch_size=1, **options)
    for name in layer_files(tmp_path / "ref"):
        np.testing.assert_allclose(load(tmp_path / "retry", name), load(tmp_path / "ref", name), atol=1e-5, rtol=0)
    # A different request (another layer) shares nothing with the checkpoint.
    other = ExtractionSpec(model, samples_path, str(tmp_path / "other"), (0,), ("residual",), batch_size=4)
    assert seed_from_checkpoint(str(tmp_path / "first"), other.output_dir, other) == 0
    assert not (tmp_path / "other").exists()


def test_inspect_model_reports_shape_and_offers_only_residual_for_bert(models, tmp_path):
    info = inspect_model(models["gpt_neox"])
    assert (info.architecture, info.model_type, info.num_layers) == ("GPTNeoXForCausalLM", "gpt_neox", 4)
    assert (info.hidden_size, info.vocab_size) == (32, len(AutoTokenizer.from_pretrained(models["gpt_neox"])))
    assert info.supported_hooks == ("residual", "mlp", "attention", "resid_pre", "mlp_hidden")
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(bert).save_pretrained(tmp_path)
    train_tokenizer(TEXTS, vocab_size=64).save_pretrained(tmp_path)
    assert inspect_model(str(tmp_path)).supported_hooks == ("residual",)


def write(path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


BAD_SPECS = {
    "unknown hook": (dict(hooks=("foo",)), "Hook 'foo' is unknown; choose from residual, mlp, attention, resid_pre, "
                      "resid_mid, mlp_hidden (or TransformerLens's names: hook_resid_pre, hook_resid_mid, "
                      "hook_resid_post, hook_attn_out, hook_mlp_out, mlp.hook_post, and blocks.N.hook_mlp_out for "
                      "layer N)."),
    "layer out of range": (dict(layers=(1, 7)), "Layer 7 does not exist: this model has layers 0-3."),
    "batch size 3": (dict(batch_size=3), "The batch size must be one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512; got 3."),
    "max length 0": (dict(max_length=0), "Max length must be between 1 and 1024 tokens; got 0."),
    "max samples 0": (dict(max_samples=0), "Max samples must be at least 1, or empty for every sample."),
    "storage dtype": (dict(storage_dtype="int8"), "The storage dtype must be float32 or float16."),
    "bf16 on the cpu": (dict(model_dtype="bfloat16"),
                        "The model dtype bfloat16 needs a CUDA device; use float32 on the cpu."),
    "device": (dict(device="tpu"), "This worker's device is 'tpu'; set JOBSITE_DEVICE to cpu, cuda or cuda:N and "
               "restart the worker."),
}


@pytest.mark.parametrize("change,sentence", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_raises_job_input_error_with_the_fix(models, samples_path, tmp_path, change, sentence):
    with pytest.raises(JobInputError) as caught:
        extract(models["gpt2"], samples_path, tmp_path, **change)
    assert str(caught.value) == sentence
    assert not (tmp_path / "checkpoint.json").exists()


def test_a_worker_set_to_cuda_on_a_host_without_one_says_which_setting_to_change(models, samples_path, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a host without CUDA, whatever this one has
    with pytest.raises(JobInputError, match=r"^This worker is set to run on cuda but has no CUDA device: set "
                                            r"JOBSITE_DEVICE=cpu for it, or run it on a GPU host, then retry\.$"):
        extract(models["gpt2"], samples_path, tmp_path, device="cuda")


@pytest.mark.parametrize(
    "content,sentence",
    [
        (b"", "The dataset is empty."),
        (b"\n  \n", "The dataset is empty."),
        (b"fine\nfine too\nbad \xff byte\n", "The dataset is not valid UTF-8 (line 3)."),
    ],
    ids=["empty", "blank lines", "non-utf8"],
)
def test_bad_dataset_raises_job_input_error(models, tmp_path, content, sentence):
    path = write(tmp_path / "data.txt", content)
    with pytest.raises(JobInputError) as caught:
        inspect_dataset(path)
    assert str(caught.value) == sentence
    with pytest.raises(JobInputError, match="^" + sentence.replace("(", r"\(").replace(")", r"\)") + "$"):
        extract(models["gpt2"], path, tmp_path / "out")


def test_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = write(tmp_path / "data.jsonl", b'{"text": "a"}\n{"text": "b"}\n\n{oops\n')
    with pytest.raises(JobInputError, match=r"^Line 4 of the dataset is not JSON\.$"):
        inspect_dataset(path)


def broken_copy(src, dst, breakage):
    shutil.copytree(src, dst)
    breakage(dst)
    return str(dst)


def add_auto_map(path):
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))


def truncate_weights(path):
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


BAD_MODELS = {
    "trust_remote_code": (
        add_auto_map,
        "The config asks for trust_remote_code, which jobsite refuses; "
        "use a model whose architecture transformers ships.",
    ),
    "missing weights": (lambda p: (p / "model.safetensors").unlink(), "No model weights (model.safetensors) found in"),
    "pickle weights": (
        lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"),
        "The model weights are a pickle (.bin) file, which jobsite refuses",
    ),
    "corrupt weights": (truncate_weights, "The model weights file is corrupt: model.safetensors"),
}


@pytest.mark.parametrize("breakage,sentence", BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_bad_model_raises_job_input_error(models, samples_path, tmp_path, breakage, sentence):
    path = broken_copy(models["gpt2"], tmp_path / "model", breakage)
    with pytest.raises(JobInputError) as caught:
        inspect_model(path)
    assert str(caught.value).startswith(sentence)
    with pytest.raises(JobInputError):
        extract(path, samples_path, tmp_path / "out")


# --- the writer thread ---------------------------------------------------------------


def fail_writes_at(call: int, exc: BaseException, monkeypatch):
    """Makes the writer thread's `call`-th row write (counting from 0) raise `exc`."""
    original, calls = runner.writer._pwrite_all, []

    def pwrite_all(fd, data, position):
        calls.append(position)
        if len(calls) == call + 1:
            raise exc
        original(fd, data, position)

    monkeypatch.setattr(runner.writer, "_pwrite_all", pwrite_all)


def test_writer_error_stops_the_run_as_its_exception_and_its_batch_is_never_counted(
    models, samples_path, tmp_path, monkeypatch
):
    options = dict(layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    extract(models["gpt2"], samples_path, tmp_path / "straight", **options)
    # 4 samples x 4 files of rows a batch: the 3rd row of batch 2 fails, with rows of it already written.
    fail_writes_at(2 * 16 + 2, OSError(errno.ENOSPC, "No space left on device"), monkeypatch)
    forwarded = []
    with pytest.raises(OSError) as caught:
        extract(models["gpt2"], samples_path, tmp_path / "resumed",
                failpoint=lambda name, context: forwarded.append(context["index"]), **options)
    assert caught.value.errno == errno.ENOSPC and classify_error(caught.value) == ErrorType.STORAGE
    assert forwarded == [0, 1, 2], "the run stops at the first batch after the failed write"
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["samples_done"] == 8
    assert not (tmp_path / "resumed" / "metadata.json").exists()
    monkeypatch.undo()
    _, calls = extract(models["gpt2"], samples_path, tmp_path / "resumed", **options)
    assert calls[0][0] == 8
    for name in ["offsets.npy", *layer_files(tmp_path / "straight"), "metadata.json"]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_checkpoint_is_written_only_after_the_batchs_rows_are_synced(models, samples_path, tmp_path, monkeypatch):
    log = []
    original_write, original_sync, original_json = runner.writer._pwrite_all, os.fdatasync, runner.outputs.write_json
    monkeypatch.setattr(runner.writer, "_pwrite_all", lambda fd, *args: (log.append(("row", fd)), original_write(fd, *args)))
    monkeypatch.setattr(os, "fdatasync", lambda fd: (log.append(("sync", fd)), original_sync(fd)))
    monkeypatch.setattr(runner.outputs, "write_json", lambda path, obj: (log.append(("json", obj)), original_json(path, obj)))
    extract(models["gpt_neox"], samples_path, tmp_path, layers=(1,), hooks=("residual", "attention"), batch_size=8)
    unsynced, counted = set(), 0
    for kind, value in log:
        if kind == "row":
            unsynced.add(value)
        elif kind == "sync":
            unsynced.discard(value)
        elif "samples_done" in value and value["samples_done"] > counted:
            assert not unsynced, f"checkpoint {value['samples_done']} counts rows not yet synced"
            counted = value["samples_done"]
    assert counted == len(TEXTS)


def test_rows_are_written_while_the_next_batch_runs_forward(models, samples_path, tmp_path, monkeypatch):
    spans = {"forward": [], "write": []}

    def timed(kind, function):
        def wrapper(*args, **kwargs):
            start = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                spans[kind].append((start, time.monotonic()))

        return wrapper

    def slow_write(self, rows):
        time.sleep(0.2)
        original_write(self, rows)

    original_write = runner.writer.Writer._write_rows
    monkeypatch.setattr(runner, "run_batch", timed("forward", runner.run_batch))
    monkeypatch.setattr(runner.writer.Writer, "_write_rows", timed("write", slow_write))
    extract(models["gpt2"], samples_path, tmp_path, batch_size=16)
    assert len(spans["forward"]) == len(spans["write"]) == 4
    for (write_start, write_end), (next_start, _) in zip(spans["write"], spans["forward"][1:]):
        assert next_start < write_end, "the next batch waited for the write instead of running beside it"


WRITER_KILLED_RUN = """
import os, sys
from extraction import runner

original, calls = runner.writer._pwrite_all, []

def die_in_the_writer(fd, data, position):
    calls.append(position)
    if len(calls) == 3 * 16 + 5:  # rows of batch 3 are half written, not synced, not counted
        os._exit(9)
    original(fd, data, position)

runner.writer._pwrite_all = die_in_the_writer
runner.SYNC_EVERY_S = 0  # a checkpoint per batch, so the resume point is known
model, data, out = sys.argv[1:]
spec = runner.ExtractionSpec(model, data, out, layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
runner.run_extraction(spec, progress=None, heartbeat=None, should_cancel=None)
"""


def test_process_died_in_the_writer_resumes_after_the_last_counted_batch_byte_identical(
    models, samples_path, tmp_path
):
    options = dict(layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    extract(models["gpt2"], samples_path, tmp_path / "straight", **options)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    died = subprocess.run(
        [sys.executable, "-c", WRITER_KILLED_RUN, models["gpt2"], samples_path, str(tmp_path / "resumed")],
        cwd=REPO, env=env,
    )
    assert died.returncode == 9
    _, calls = extract(models["gpt2"], samples_path, tmp_path / "resumed", **options)
    assert calls[0][0] == 3 * 4
    for name in ["offsets.npy", *layer_files(tmp_path / "straight"), "metadata.json"]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_tokenizing_in_chunks_gives_the_same_files_and_fingerprint(models, samples_path, tmp_path, monkeypatch):
    options = dict(layers=(1,), hooks=("residual",), batch_size=4)
    extract(models["gpt2"], samples_path, tmp_path / "whole", **options)
    monkeypatch.setattr(runner.plan, "TOKENIZE_CHUNK", 3)
    extract(models["gpt2"], samples_path, tmp_path / "chunked", **options)
    for name in ["offsets.npy", "tokens.npy", "layer_1_residual.npy", "checkpoint.json", "metadata.json"]:
        assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_packed_real_tokens_land_on_the_rows_of_the_padded_batch():
    """The cuda path packs real tokens on the device before the copy; the rows written must not move."""
    lengths, starts = [5, 3, 1], [7, 0, 12]
    padded = torch.randn(3, 5, 4)
    mask = np.arange(5)[None, :] < np.array(lengths)[:, None]
    packed = runner.forward.gather({"a": padded}, mask, torch.float16)["a"]
    assert packed.shape == (sum(lengths), 4) and packed.dtype == torch.float16
    as_padded = runner.forward.Rows({"a": padded.half().numpy()}, False, starts, lengths, lambda: None)
    as_packed = runner.forward.Rows({"a": packed.numpy()}, True, starts, lengths, lambda: None)
    for (start, rows), (packed_start, packed_rows) in zip(as_padded.pieces("a"), as_packed.pieces("a"), strict=True):
        assert start == packed_start and np.array_equal(rows, packed_rows)


# --- a disk that fills up -------------------------------------------------------------


def _fill(directory: Path) -> Path:
    """Writes a file until the disk has no space left; returns it (delete it to free the space)."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_output_larger_than_the_free_space_is_refused_before_any_batch_then_completes_when_space_returns(
    models, samples_path, tmp_path, small_disk
):
    options = dict(layers=(0, 1, 2, 3), hooks=("residual", "mlp", "attention"), batch_size=8)
    extract(models["gpt2"], samples_path, tmp_path / "straight", **options)
    needed = sum((tmp_path / "straight" / name).stat().st_size for name in layer_files(tmp_path / "straight"))
    disk = small_disk.mount(tmp_path / "disk", "64k")
    forwarded = []
    with pytest.raises(OSError) as caught:
        extract(models["gpt2"], samples_path, disk / "out",
                failpoint=lambda name, context: forwarded.append(context["index"]), **options)
    assert classify_error(caught.value) == ErrorType.STORAGE
    sentence = error_sentence(caught.value)
    assert sentence.startswith("The activations need ") and " is free: free space there" in sentence, sentence
    assert needed > 64 * 1024 and forwarded == [], "no batch is computed for an output that cannot fit"
    small_disk.remount(disk, f"size={needed * 2}")
    extract(models["gpt2"], samples_path, disk / "out", **options)
    for name in ["offsets.npy", *layer_files(tmp_path / "straight"), "metadata.json"]:
        assert (disk / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_disk_filling_up_mid_run_fails_classified_keeps_a_consistent_checkpoint_and_resumes_identical(
    models, samples_path, tmp_path, small_disk, monkeypatch
):
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0)  # a checkpoint per batch, as on a slow model
    options = dict(layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)
    extract(models["gpt2"], samples_path, tmp_path / "straight", **options)
    disk = small_disk.mount(tmp_path / "disk", "2m")
    fillers = []

    def another_program_fills_the_disk(name, context):
        if context["index"] == 3 and not fillers:
            fillers.append(_fill(disk))

    with pytest.raises(OSError) as caught:
        extract(models["gpt2"], samples_path, disk / "out", failpoint=another_program_fills_the_disk, **options)
    assert caught.value.errno == errno.ENOSPC and classify_error(caught.value) == ErrorType.STORAGE
    assert error_sentence(caught.value).startswith("No space left on the device writing ")
    # The rows were reserved up front; what could not be written is the checkpoint, and the
    # one on disk is the last complete one, with no half-written file beside it.
    checkpoint = json.loads((disk / "out" / "checkpoint.json").read_text())
    assert checkpoint["samples_done"] == 3 * 4
    assert not (disk / "out" / "checkpoint.json.tmp").exists()
    assert not (disk / "out" / "metadata.json").exists()
    fillers[0].unlink()
    _, calls = extract(models["gpt2"], samples_path, disk / "out", **options)
    assert calls[0][0] >= 3 * 4
    for name in ["offsets.npy", *layer_files(tmp_path / "straight"), "metadata.json"]:
        assert (disk / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


HEAP_REUSE_RUN = """
import json, os, resource, torch
from extraction import runner

def measured(allocate):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, rss

def batches():
    for _ in range(6):
        torch.ones(64 * 2**20 // 4, dtype=torch.float32)  # a batch's activations, filled, freed at once

outside, _ = measured(batches)
with runner.heap_reuse("cpu"):
    batches()
    inside, rss_inside = measured(batches)
_, rss_after = measured(lambda: None)
print(json.dumps(dict(outside=outside, inside=inside, rss_inside=rss_inside, rss_after=rss_after)))
"""


def test_heap_reuse_keeps_freed_activations_for_the_next_batch_and_gives_them_back_after_the_run():
    if runner.native._MALLOPT is None:
        missing("needs glibc's allocator (mallopt), which the worker image and CI have")
    # In a process of its own, as a worker starts: this one's heap holds whatever earlier tests left.
    done = subprocess.run([sys.executable, "-c", HEAP_REUSE_RUN], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 64 * 2**20 // 4096  # of one batch
    assert seen["outside"] > 5 * pages, "glibc maps (and faults in) a large block afresh every time"
    assert seen["inside"] < 2 * pages, f"{seen['inside']} page faults for 6 batches: their memory was re-faulted"
    assert seen["rss_after"] < seen["rss_inside"] - 32 * 2**20, "the run's heap stays resident after the run"
    # What glibc does after the run depends on where the trimmed heap left its free blocks, so
    # it is not asserted: a block may be served from the heap again instead of a new mapping.


def test_files_are_synced_when_a_sync_is_due_not_after_every_batch(models, samples_path, tmp_path, monkeypatch):
    syncs, counted = [], []
    original_sync, original_json = os.fdatasync, runner.outputs.write_json
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), original_sync(fd)))
    monkeypatch.setattr(runner.outputs, "write_json", lambda path, obj: (counted.append(obj.get("samples_done")),
                                                                   original_json(path, obj)))
    options = dict(layers=(0, 2), hooks=("residual", "mlp"), batch_size=4)  # 13 batches, 4 files
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 3600)
    _, calls = extract(models["gpt2"], samples_path, tmp_path / "rare", **options)
    assert len(syncs) == 4, "one sync of each file, at the end"
    assert [c[0] for c in calls] == [0, *range(4, len(TEXTS), 4), len(TEXTS)], "progress moves batch by batch"
    assert [n for n in counted if n is not None] == [0, len(TEXTS)], "checkpoints: the new one, then the last"
    counted.clear()
    syncs.clear()
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0)
    _, calls = extract(models["gpt2"], samples_path, tmp_path / "every", **options)
    assert len(syncs) == 13 * 4
    assert [n for n in counted if n is not None] == [0, *range(4, len(TEXTS), 4), len(TEXTS)]
    assert [c[0] for c in calls] == [0, *range(4, len(TEXTS), 4), len(TEXTS)]
    for name in ["offsets.npy", *layer_files(tmp_path / "rare"), "metadata.json"]:
        assert (tmp_path / "rare" / name).read_bytes() == (tmp_path / "every" / name).read_bytes(), name


def test_batches_before_a_long_batch_are_synced_and_counted_while_it_runs(models, samples_path, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0.1)
    on_disk = []

    def batch_3_takes_long(name, context):
        if context["index"] == 3:
            time.sleep(0.5)
            on_disk.append(json.loads((tmp_path / "checkpoint.json").read_text())["samples_done"])

    spec = ExtractionSpec(models["gpt2"], samples_path, str(tmp_path), (1,), ("residual",), 4)
    run_extraction(spec, progress=None, heartbeat=None, should_cancel=None, failpoint=batch_3_takes_long)
    assert on_disk == [3 * 4], "the batches written before the long one wait for it to be counted"


# --- a plan that streams ----------------------------------------------------------------


def lognormal_lines(count, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.5, 0.8, count).astype(int), 1, 200)
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) for i, n in enumerate(lengths)]


def test_tokenizing_memory_stays_flat_as_the_dataset_grows_eightfold(models, tmp_path, monkeypatch):
    """What stays in memory is the offsets (8 bytes a sample) and one chunk: the ids go to disk."""
    import tracemalloc

    monkeypatch.setattr(runner.plan, "TOKENIZE_CHUNK", 256)
    peaks, tokens = {}, {}
    for count in (4000, 32000):
        path = tmp_path / f"{count}.txt"
        path.write_text("\n".join(lognormal_lines(count)) + "\n", encoding="utf-8")
        spec = ExtractionSpec(models["gpt2"], str(path), str(tmp_path / f"out{count}"), (0,), ("residual",), 8)
        runner.prepare(spec).close()  # the tokenizer's own first-use allocations are not the plan's
        tracemalloc.start()
        try:
            plan = runner.prepare(spec, directory=spec.output_dir)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        tokens[count] = int(plan.offsets[-1])
        assert plan.ids.dtype == np.int32 and len(plan.ids) == tokens[count] and not plan.ids.flags.owndata
        plan.close()
        assert not os.listdir(spec.output_dir), "a plan no output took leaves no file"
    assert tokens[32000] > 7 * tokens[4000]
    # Holding the samples and the ids (8 bytes a token, as before) would add ~10 MB at 8N; the
    # offsets (8 bytes a sample, twice while they are summed) add 0.5 MB.
    assert peaks[32000] < 1.5 * peaks[4000], peaks


def test_the_fingerprint_is_the_one_checkpoints_were_written_with_before_the_ids_streamed(models, samples_path,
                                                                                          tmp_path):
    """sha256(request, offsets, ids as int64): a job planned by an earlier version resumes after an
    upgrade instead of starting again (checked once against the previous runner on the same input)."""
    import hashlib
    import json as _json

    spec = ExtractionSpec(models["gpt2"], str(samples_path), str(tmp_path / "out"), (0, 1), ("residual",), 8,
                          max_length=40)
    plan = runner.prepare(spec)
    request = [os.path.abspath(spec.model_path), [0, 1], ["residual"], "float32", "float32", 40,
               runner.plan.FORMAT_VERSION]
    digest = hashlib.sha256(_json.dumps(request).encode())
    digest.update(plan.offsets.astype(np.int64).tobytes())
    digest.update(np.asarray(plan.ids).astype(np.int64).tobytes())
    assert plan.fingerprint == digest.hexdigest()
    plan.close()


def test_tokenizing_reports_progress_and_stops_on_cancel_leaving_nothing_a_resume_trusts(
    models, samples_path, tmp_path, monkeypatch
):
    monkeypatch.setattr(runner.plan, "TOKENIZE_CHUNK", 8)
    monkeypatch.setattr(runner.plan, "TOKENIZE_PROGRESS_EVERY_S", 0)
    events = []
    extract(models["gpt2"], samples_path, tmp_path / "done", events=events)
    told = [(p["samples_tokenized"], p["total_samples"]) for kind, p in events if kind == "tokenizing"]
    assert told == [(0, 50), (8, 50), (16, 50), (24, 50), (32, 50), (40, 50), (48, 50), (50, 50)]
    first = next(p for kind, p in events if kind == "tokenizing" and p["samples_tokenized"] == 16)
    assert first["message"] == "Tokenizing 16 of 50 samples"
    assert [kind for kind, _ in events].index("phase") > max(i for i, (k, _) in enumerate(events) if k == "tokenizing")

    asked = []

    def cancel_after_three_chunks():
        asked.append(1)
        return len(asked) >= 3

    events.clear()
    with pytest.raises(Cancelled, match=r"^Cancelled while tokenizing, after 24 of 50 samples\.$"):
        extract(models["gpt2"], samples_path, tmp_path / "cancelled", should_cancel=cancel_after_three_chunks,
                events=events)
    assert [kind for kind, _ in events if kind != "tokenizing"] == [], "no extraction started"
    assert os.listdir(tmp_path / "cancelled") == [], "no half plan, no checkpoint"
    result, calls = extract(models["gpt2"], samples_path, tmp_path / "cancelled")
    assert calls[0][0] == 0 and result.samples == 50
    for name in ["tokens.npy", "offsets.npy", "layer_1_residual.npy", "checkpoint.json", "metadata.json"]:
        assert (tmp_path / "cancelled" / name).read_bytes() == (tmp_path / "done" / name).read_bytes(), name


def test_clamping_truncation_and_max_samples_are_the_same_across_chunk_edges(models, tmp_path, monkeypatch):
    vocab = inspect_model(models["gpt2"]).vocab_size
    rows = [{"input_ids": [1, vocab + i, 3, -1, 5, 6, 7][: 2 + i % 6]} for i in range(9)] + [{"text": "Hello world."}]
    path = tmp_path / "ids.jsonl"
    # Past max_samples the file is not read: a line that is not JSON there fails nothing.
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n{not json\n")
    options = dict(layers=(0,), batch_size=2, max_length=4, max_samples=len(rows))
    whole, _ = extract(models["gpt2"], str(path), tmp_path / "whole", **options)
    monkeypatch.setattr(runner.plan, "TOKENIZE_CHUNK", 3)
    chunked, _ = extract(models["gpt2"], str(path), tmp_path / "chunked", **options)
    kept = [r["input_ids"][:4] for r in rows[:9]]
    assert whole.clamped_tokens == chunked.clamped_tokens == sum(i < 0 or i >= vocab for ids in kept for i in ids)
    assert whole.truncated_samples == chunked.truncated_samples == sum(len(r["input_ids"]) > 4 for r in rows[:9])
    assert whole.samples == chunked.samples == 10
    for name in ["tokens.npy", "offsets.npy", "layer_0_residual.npy", "checkpoint.json", "metadata.json"]:
        assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_resume_of_a_dataset_file_changed_since_the_plan_is_refused_with_what_changed(
    models, samples_path, tmp_path
):
    data = tmp_path / "data.txt"
    shutil.copyfile(samples_path, data)
    os.utime(data, (1_600_000_000, 1_600_000_000))
    options = dict(layers=(1,), batch_size=4)
    with pytest.raises(RuntimeError, match="worker died"):
        extract(models["gpt2"], str(data), tmp_path / "out", failpoint=fail_at(3, RuntimeError("worker died")),
                **options)
    checkpoint = (tmp_path / "out" / "checkpoint.json").read_bytes()
    assert json.loads(checkpoint)["samples_done"] == 12
    # The same bytes, touched: nothing changed that the output depends on, so it resumes.
    os.utime(data, (1_600_000_060, 1_600_000_060))
    with pytest.raises(RuntimeError, match="worker died"):
        extract(models["gpt2"], str(data), tmp_path / "out", failpoint=fail_at(4, RuntimeError("worker died")),
                **options)
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["samples_done"] == 16
    checkpoint = (tmp_path / "out" / "checkpoint.json").read_bytes()
    with open(data, "a", encoding="utf-8") as f:
        f.write("one more line\nand another\n")
    with pytest.raises(JobInputError) as caught:
        extract(models["gpt2"], str(data), tmp_path / "out", **options)
    sentence = str(caught.value)
    assert sentence.startswith("The dataset file changed since this extraction was planned (samples: 50 then, 52 now; "
                               "tokens: "), sentence
    size = len(Path(samples_path).read_bytes())
    assert f"; size: {size:,} bytes then, {size + 26:,} bytes now; modified: 2020-09-13 12:26:40 UTC then, " in sentence
    assert sentence.endswith("): its completed samples came from the file as it was, so it is not resumed; retry it "
                             "to extract the file as it is now.")
    assert caught.value.field == "dataset" and classify_error(caught.value) == ErrorType.VALIDATION
    assert (tmp_path / "out" / "checkpoint.json").read_bytes() == checkpoint, "the completed samples are kept"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["checkpoint.json", "offsets.npy", "tokens.npy", "tokenizer", "layer_1_residual.npy"])
