"""Every hook point is what its definition says, on every model family jobsite knows.

Each family is a tiny random model built from its config. Two checks, independent of the
product's family table:
- the identity resid_post = resid_pre + attention + mlp (and resid_mid = resid_pre + attention
  where attention runs first), which holds only if each file is the contribution its name
  promises (a pre-norm sublayer output, as Gemma 2's was, breaks it by the size of the step);
- agreement with a per-sample, unpadded reference: `hidden_states` for the residual stream and
  forward hooks on the modules this test names itself, one sample at a time.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from extraction.runner import ExtractionSpec, inspect_model, run_extraction
from jobsite.demo import TINY_FAMILIES, build_tiny_family
from jobsite.errors import JobInputError
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

TEXTS = [
    "The tide came in slowly over the flat grey rocks.",
    "x",
    "",
    "Numbers: 3.14159, 2.71828 and 42.",
    "Ünïcödé text — and an em dash.",
    "The night train to the coast leaves at eleven and arrives before dawn, when the harbour is still dark.",
    "OK",
    "def add(a, b):    return a + b",
    "Bread rises faster in a warm kitchen.",
]
LAYERS = (0, 1)  # of 3: hidden_states[2] is still a block's output, not the final norm's
ALL_HOOKS = ("residual", "mlp", "attention", "resid_pre", "resid_mid", "mlp_hidden")

# This test's own reading of each family's blocks: (attention's contribution, the MLP's
# contribution, the down projection), as the model's source code writes its forward pass.
REFERENCE_MODULES = {
    "gpt2": ("h", "attn", "mlp", "mlp.c_proj"),
    "gpt_bigcode": ("h", "attn", "mlp", "mlp.c_proj"),
    "gptj": ("h", "attn", "mlp", "mlp.fc_out"),
    "gpt_neox": ("layers", "attention", "mlp", "mlp.dense_4h_to_h"),
    "llama": ("layers", "self_attn", "mlp", "mlp.down_proj"),
    "mixtral": ("layers", "self_attn", "mlp", None),
    "gemma2": ("layers", "post_attention_layernorm", "post_feedforward_layernorm", "mlp.down_proj"),
    "olmo2": ("layers", "post_attention_layernorm", "post_feedforward_layernorm", "mlp.down_proj"),
    "opt": ("decoder.layers", "self_attn", "fc2", "fc2"),
    "bloom": ("h", "self_attention.dense", "mlp.dense_4h_to_h", "mlp.dense_4h_to_h"),
    "falcon": ("h", "self_attention", "mlp", "mlp.dense_4h_to_h"),
    "phi": ("layers", "self_attn", "mlp", "mlp.fc2"),
}
REFERENCE_MODULES.update({name: REFERENCE_MODULES["llama"] for name in ("mistral", "qwen2", "qwen3", "gemma", "phi3")})
REFERENCE_MODULES["gemma3_text"] = REFERENCE_MODULES["gemma2"]
PARALLEL_FAMILIES = {"gptj", "gpt_neox", "falcon", "phi"}  # attention and MLP read the same input


@pytest.fixture(autouse=True)
def _data_dir():
    """The runner needs no Django settings."""
    yield


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "samples.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def extract_family(tmp_path_factory, dataset_path):
    """family -> (model directory, output directory, hooks offered), every hook point the model
    offers extracted once per module."""
    done = {}

    def extract(family):
        if family not in done:
            root = tmp_path_factory.mktemp(family)
            model = build_tiny_family(str(root / "model"), TEXTS, family)
            hooks = inspect_model(model).supported_hooks
            spec = ExtractionSpec(model, dataset_path, str(root / "out"), LAYERS, hooks, batch_size=4, max_length=64)
            run_extraction(spec, progress=None, heartbeat=None, should_cancel=None)
            done[family] = model, root / "out", hooks
        return done[family]

    return extract


def _base(family: str) -> str:
    return family.split("-")[0]


OFFERING = {  # family -> the hook points its blocks define
    family: set(ALL_HOOKS)
    - ({"resid_mid"} if _base(family) in PARALLEL_FAMILIES and not family.endswith("-sequential") else set())
    - ({"mlp_hidden"} if family == "mixtral" else set())
    - ({"attention", "mlp", "resid_mid"} if family == "opt-post-norm" else set())
    for family in TINY_FAMILIES
}
ADDITIVE = [family for family in TINY_FAMILIES if {"attention", "mlp"} <= OFFERING[family]]
DENSE = [family for family in TINY_FAMILIES if {"mlp_hidden", "mlp"} <= OFFERING[family]]


def stored(out, layer, hook):
    return np.load(os.path.join(out, f"layer_{layer}_{hook}.npy"))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_offers_what_its_blocks_define(family, extract_family):
    assert set(extract_family(family)[2]) == OFFERING[family]


@pytest.mark.parametrize("family", ADDITIVE)
def test_the_residual_stream_is_the_sum_of_what_each_sublayer_adds(family, extract_family):
    _, out, hooks = extract_family(family)
    for layer in LAYERS:
        post = stored(out, layer, "residual")
        summed = stored(out, layer, "resid_pre") + stored(out, layer, "attention") + stored(out, layer, "mlp")
        step = np.abs(post - stored(out, layer, "resid_pre")).max()
        assert step > 1e-3, "a step this small would let any definition pass"
        np.testing.assert_allclose(summed, post, atol=1e-4, rtol=0, err_msg=f"{family} layer {layer}")
        if "resid_mid" in hooks:
            np.testing.assert_allclose(stored(out, layer, "resid_pre") + stored(out, layer, "attention"),
                                       stored(out, layer, "resid_mid"), atol=1e-4, rtol=0)
            np.testing.assert_allclose(stored(out, layer, "resid_mid") + stored(out, layer, "mlp"), post,
                                       atol=1e-4, rtol=0)


def _reference(model, tokenizer, family: str, text: str) -> dict[tuple[int, str], np.ndarray]:
    """Every hook point of one sample, unpadded, from hidden_states and hooks this test places."""
    blocks_path, attention, mlp, down = REFERENCE_MODULES[_base(family)]
    blocks, seen, handles = model.get_submodule(blocks_path), {}, []

    def keep(key, pick):
        return lambda module, args, output: seen.__setitem__(key, pick(args, output).detach().clone())

    for layer in LAYERS:
        block = blocks[layer]
        out_of = lambda args, output: output[0] if isinstance(output, tuple) else output  # noqa: E731
        handles.append(block.get_submodule(attention).register_forward_hook(keep((layer, "attention"), out_of)))
        handles.append(block.get_submodule(mlp).register_forward_hook(keep((layer, "mlp"), out_of)))
        if down is not None:
            handles.append(block.get_submodule(down).register_forward_hook(keep((layer, "mlp_hidden"),
                                                                                lambda args, output: args[0])))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    reference = {key: value.reshape(ids.shape[1], -1).numpy() for key, value in seen.items()}
    for layer in LAYERS:
        reference[layer, "resid_pre"] = hidden[layer][0].numpy()
        reference[layer, "residual"] = hidden[layer + 1][0].numpy()
        if "resid_mid" in OFFERING[family]:
            reference[layer, "resid_mid"] = reference[layer, "resid_pre"] + reference[layer, "attention"]
    return reference


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_hook_point_equals_an_unpadded_per_sample_reference(family, extract_family):
    model_dir, out, hooks = extract_family(family)
    offsets = np.load(out / "offsets.npy")
    tokens = np.load(out / "tokens.npy")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    for i, text in enumerate(TEXTS):
        start, end = offsets[i], offsets[i + 1]
        assert tokens[start:end].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        if start == end:
            continue
        reference = _reference(model, tokenizer, family, text)
        for layer in LAYERS:
            for hook in hooks:
                np.testing.assert_allclose(stored(out, layer, hook)[start:end], reference[layer, hook], atol=1e-4,
                                           rtol=0, err_msg=f"{family} sample {i} layer {layer} {hook}")


@pytest.mark.parametrize("family", DENSE)
def test_mlp_hidden_is_the_down_projections_input_and_as_wide_as_the_mlp(family, extract_family):
    model_dir, out, _ = extract_family(family)
    down = REFERENCE_MODULES[_base(family)][3]
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    blocks = model.get_submodule(REFERENCE_MODULES[_base(family)][0])
    for layer in LAYERS:
        projection = blocks[layer].get_submodule(down)
        hidden = torch.from_numpy(stored(out, layer, "mlp_hidden"))
        assert hidden.shape[1] == inspect_model(model_dir).points.widths["mlp_hidden"] > 32
        with torch.inference_mode():
            projected = projection(hidden).numpy()
        if REFERENCE_MODULES[_base(family)][2] == "post_feedforward_layernorm":
            with torch.inference_mode():
                projected = blocks[layer].post_feedforward_layernorm(torch.from_numpy(projected)).numpy()
        np.testing.assert_allclose(projected, stored(out, layer, "mlp"), atol=1e-4, rtol=0)


REFUSED = {
    "gptj": ("resid_mid", "runs attention and the MLP in parallel on the same input, so no residual stream lies "
                          "between them"),
    "mixtral": ("mlp_hidden", "mixtral has a mixture of experts, not one MLP with a single layer of neurons"),
    "opt-post-norm": ("mlp", "normalises the residual stream after each sublayer (do_layer_norm_before is false)"),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_hook_point_a_family_cannot_honour_is_refused_with_why(family, tmp_path, dataset_path):
    hook, why = REFUSED[family]
    model = build_tiny_family(str(tmp_path / "model"), TEXTS, family)
    spec = ExtractionSpec(model, dataset_path, str(tmp_path / "out"), (0,), (hook,), batch_size=4, max_length=64)
    with pytest.raises(JobInputError) as refused:
        run_extraction(spec, progress=None, heartbeat=None, should_cancel=None)
    assert why in str(refused.value) and f"Hook point {hook} is not available" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_family_jobsite_does_not_know_offers_its_block_output_only_and_says_why(tmp_path, dataset_path):
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(build_tiny_family(str(tmp_path / "gpt2"), TEXTS, "gpt2")).save_pretrained(
        tmp_path / "bert")
    info = inspect_model(str(tmp_path / "bert"))
    assert info.supported_hooks == ("residual",)
    spec = ExtractionSpec(str(tmp_path / "bert"), dataset_path, str(tmp_path / "out"), (0,), ("mlp",), batch_size=4)
    with pytest.raises(JobInputError) as refused:
        run_extraction(spec, progress=None, heartbeat=None, should_cancel=None)
    assert "'bert' is not a family jobsite knows, so only residual (the block's output) is offered" in str(
        refused.value)
    assert "gemma2" in str(refused.value) and "llama" in str(refused.value)
