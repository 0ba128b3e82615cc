"""The GPU path: CUDA extraction, bf16 models, and a real torch.cuda.OutOfMemoryError.

CI has no GPU; these run on a CUDA host (`pytest -m cuda`).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from extraction.runner import ExtractionSpec, run_extraction
from jobsite.demo import build_tiny_causal_lm
from jobsite.errors import is_oom

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TEXTS = [" ".join(f"word{(i * 13 + k) % 97}" for k in range(3 + (i * 7) % 60)) for i in range(64)]


@pytest.fixture(autouse=True)
def _data_dir():
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("m") / "gpt2"), TEXTS, n_layer=4, hidden=64, n_head=4)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return str(path)


def spec(model_dir, dataset, out, **overrides):
    values = dict(model_path=model_dir, dataset_path=dataset, output_dir=str(out), layers=(0, 3),
                  hooks=("residual", "mlp", "attention"), batch_size=8)
    return ExtractionSpec(**{**values, **overrides})


def load(out):
    return {name: np.load(out / name) for name in ("layer_0_residual.npy", "layer_3_mlp.npy", "layer_3_attention.npy")}


def test_cuda_extraction_matches_cpu(model_dir, dataset, tmp_path):
    run_extraction(spec(model_dir, dataset, tmp_path / "cpu"), progress=None, heartbeat=None, should_cancel=None)
    run_extraction(spec(model_dir, dataset, tmp_path / "gpu", device="cuda"), progress=None, heartbeat=None,
                   should_cancel=None)
    cpu, gpu = load(tmp_path / "cpu"), load(tmp_path / "gpu")
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], atol=1e-4, rtol=1e-3, err_msg=name)


def test_bf16_model_on_cuda_stays_close_to_float32(model_dir, dataset, tmp_path):
    run_extraction(spec(model_dir, dataset, tmp_path / "fp32", device="cuda"), progress=None, heartbeat=None,
                   should_cancel=None)
    run_extraction(spec(model_dir, dataset, tmp_path / "bf16", device="cuda", model_dtype="bfloat16",
                        storage_dtype="float16"), progress=None, heartbeat=None, should_cancel=None)
    fp32, bf16 = load(tmp_path / "fp32"), load(tmp_path / "bf16")
    for name in fp32:
        assert bf16[name].dtype == np.float16
        scale = np.abs(fp32[name]).max()
        assert np.abs(bf16[name].astype(np.float32) - fp32[name]).max() <= 0.05 * scale, name


def _fill_gpu_leaving(free_bytes: int) -> torch.Tensor:
    """Hold all but free_bytes of the device so a large batch genuinely does not fit."""
    gc.collect()  # an earlier test's caught error holds its tensors in a reference cycle
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return torch.empty(max(0, free - free_bytes), dtype=torch.uint8, device="cuda")


@pytest.fixture
def wide_model(tmp_path_factory):
    texts = [" ".join(f"w{(i * 31 + k) % 997}" for k in range(2000)) for i in range(16)]
    out = tmp_path_factory.mktemp("wide") / "gpt2"
    build_tiny_causal_lm(str(out), texts, n_layer=2, hidden=1024, n_head=16, vocab_size=2048, max_positions=2048)
    data = out.parent / "long.txt"
    data.write_text("\n".join(texts) + "\n")
    return str(out), str(data)


def test_real_cuda_oom_fails_as_oom_without_auto_retry(wide_model, tmp_path):
    model_dir, data = wide_model
    ballast = _fill_gpu_leaving(600 * 2**20)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
            run_extraction(spec(model_dir, data, tmp_path / "o", layers=(1,), hooks=("residual",), batch_size=16,
                                max_length=2048, device="cuda"), progress=None, heartbeat=None, should_cancel=None)
        assert is_oom(caught.value)
    finally:
        del ballast
        torch.cuda.empty_cache()


def test_real_cuda_oom_is_halved_in_place_and_completes(wide_model, tmp_path):
    model_dir, data = wide_model
    events = []
    ballast = _fill_gpu_leaving(600 * 2**20)
    try:
        result = run_extraction(
            spec(model_dir, data, tmp_path / "o", layers=(1,), hooks=("residual",), batch_size=16, max_length=2048,
                 device="cuda", auto_retry_on_oom=True),
            progress=None, heartbeat=None, should_cancel=None, on_event=lambda kind, p: events.append((kind, p)),
        )
    finally:
        del ballast
        torch.cuda.empty_cache()
    reductions = [p for kind, p in events if kind == "batch_size_reduced"]
    assert reductions and reductions[0]["from"] == 16
    assert result.batch_size < 16 and result.samples == 16


def test_after_a_real_cuda_oom_the_batch_grows_back_on_short_samples(wide_model, tmp_path):
    """Four long samples do not fit 16 at a time; once they are done, 16 of the short ones hold
    fewer tokens than the halved batch of long ones did, and run together without running out."""
    model_dir, _ = wide_model
    texts = ([" ".join(f"w{(i * 31 + k) % 997}" for k in range(2000)) for i in range(4)]
             + [" ".join(f"w{(i * 17 + k) % 997}" for k in range(60)) for i in range(32)])
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(texts) + "\n")
    options = dict(layers=(1,), hooks=("residual",), batch_size=16, max_length=2048, device="cuda")
    events = []
    ballast = _fill_gpu_leaving(600 * 2**20)
    try:
        result = run_extraction(spec(model_dir, str(data), tmp_path / "o", auto_retry_on_oom=True, **options),
                                progress=None, heartbeat=None, should_cancel=None,
                                on_event=lambda kind, p: events.append((kind, p)))
    finally:
        del ballast
        torch.cuda.empty_cache()
    reductions = [p for kind, p in events if kind == "batch_size_reduced"]
    grown = [p for kind, p in events if kind == "batch_size_grown"]
    assert reductions and reductions[0]["from"] == 16 and all(p["at_sample"] == 0 for p in reductions)
    halved = reductions[-1]["to"]
    # At the first batch of the halved size past the long samples.
    assert [(p["at_sample"], p["from"], p["to"]) for p in grown] == [(-(-4 // halved) * halved, halved, 16)]
    assert result.batch_size == 16 and result.samples == 36
    run_extraction(spec(model_dir, str(data), tmp_path / "cpu", **{**options, "device": "cpu"}),
                   progress=None, heartbeat=None, should_cancel=None)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "layer_1_residual.npy"),
                               np.load(tmp_path / "cpu" / "layer_1_residual.npy"), atol=1e-4, rtol=1e-3)
