"""One table of family adapters: where each hook point lives in a family's blocks.

Every hook point is defined once (extraction.constants.HOOK_DEFINITIONS) as what it is in the
residual stream; an adapter only says which module of a block carries it. Modules are named,
never guessed from attribute names: Llama's `post_attention_layernorm` is the MLP's *input*
norm, Gemma 2's is applied to attention's *output*, and BLOOM's attention module returns the
residual stream with its own output already added. A family the table does not know gets the
block's output (`residual`) only, and a sentence for every other hook point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from extraction.constants import HOOK_DEFINITIONS, HOOK_TYPES, TRANSFORMERLENS_NAMES, refusal_sentence
from jobsite.errors import JobInputError

# The order in which a block produces its hook points: a run stops right after the last one it
# needs of its last layer (attention runs before the MLP in parallel blocks too).
PRODUCED_AT = {"resid_pre": 0, "attention": 1, "resid_mid": 1, "mlp_hidden": 2, "mlp": 3, "residual": 4}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # the block list, from the base model AutoModel builds
    attention: str  # the module (inside a block) whose output is what attention adds
    mlp: str  # the module whose output is what the MLP adds
    down: str | None  # the MLP's down projection (its input is mlp_hidden); None: a mixture of experts
    parallel: Callable[[PretrainedConfig], bool] = lambda config: False
    # Hook points this config cannot honour, with why: {hook: sentence}.
    refusals: Callable[[PretrainedConfig], dict[str, str]] = lambda config: {}
    # The block adds attention into the MLP's output tensor in place (Falcon's parallel
    # block): the MLP's output is copied when captured, or it would read attention + mlp.
    mlp_written_in_place: Callable[[PretrainedConfig], bool] = lambda config: False


def _opt_refusals(config) -> dict[str, str]:
    if getattr(config, "do_layer_norm_before", True):
        return {}
    why = ("this OPT normalises the residual stream after each sublayer (do_layer_norm_before is false), so "
           "attention and the MLP add nothing that sums to the block's output")
    return {hook: why for hook in ("attention", "mlp", "resid_mid")}


def _bloom_refusals(config) -> dict[str, str]:
    refused = {}
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        why = ("this BLOOM carries its normalised input as the residual (apply_residual_connection_post_layernorm), "
               "so attention and the MLP add nothing that sums to the block's output")
        refused.update({hook: why for hook in ("attention", "mlp", "resid_mid")})
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        why = "this BLOOM computes its output projections in slices (slow_but_exact), which no hook sees whole"
        refused.update({hook: why for hook in ("attention", "mlp", "mlp_hidden")})
    return refused


def _falcon_parallel(config) -> bool:
    return bool(getattr(config, "parallel_attn", True) or getattr(config, "new_decoder_architecture", False))


_LLAMA_STYLE = dict(blocks="layers", attention="self_attn", mlp="mlp", down="mlp.down_proj")
# Sandwich norms: each sublayer's output is normalised before it joins the residual stream.
_SANDWICH = dict(blocks="layers", attention="post_attention_layernorm", mlp="post_feedforward_layernorm",
                 down="mlp.down_proj")

FAMILIES = (
    Family("gpt2", ("gpt2",), blocks="h", attention="attn", mlp="mlp", down="mlp.c_proj"),
    Family("gpt_bigcode", ("gpt_bigcode",), blocks="h", attention="attn", mlp="mlp", down="mlp.c_proj"),
    Family("gpt_neox", ("gpt_neox",), blocks="layers", attention="attention", mlp="mlp",
           down="mlp.dense_4h_to_h", parallel=lambda config: bool(getattr(config, "use_parallel_residual", True))),
    Family("gptj", ("gptj",), blocks="h", attention="attn", mlp="mlp", down="mlp.fc_out",
           parallel=lambda config: True),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), **_LLAMA_STYLE),
    Family("mixtral", ("mixtral",), blocks="layers", attention="self_attn", mlp="mlp", down=None),
    Family("gemma2", ("gemma2", "gemma3_text"), **_SANDWICH),
    # OLMo 2 normalises sublayer outputs only (no input norms): the same hook points as Gemma 2.
    Family("olmo2", ("olmo2",), **_SANDWICH),
    Family("opt", ("opt",), blocks="decoder.layers", attention="self_attn", mlp="fc2", down="fc2",
           refusals=_opt_refusals),
    # BLOOM's attention and MLP modules add the residual themselves: their projections carry the contributions.
    Family("bloom", ("bloom",), blocks="h", attention="self_attention.dense", mlp="mlp.dense_4h_to_h",
           down="mlp.dense_4h_to_h", refusals=_bloom_refusals),
    Family("falcon", ("falcon",), blocks="h", attention="self_attention", mlp="mlp", down="mlp.dense_4h_to_h",
           parallel=_falcon_parallel, mlp_written_in_place=_falcon_parallel),
    Family("phi", ("phi",), blocks="layers", attention="self_attn", mlp="mlp", down="mlp.fc2",
           parallel=lambda config: True),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
KNOWN_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))
_KNOWN_SENTENCE = ", ".join(KNOWN_MODEL_TYPES)


@dataclass(frozen=True)
class HookPoints:
    """What one model offers: each hook point's width, and why the others are refused."""

    family: str | None
    widths: dict[str, int]  # hook -> values per token, for the hook points offered
    refusals: dict[str, str]  # hook -> the sentence saying why it is not offered
    parallel: bool

    @property
    def supported(self) -> tuple[str, ...]:
        return tuple(hook for hook in HOOK_TYPES if hook in self.widths)

    def describe(self) -> dict[str, dict]:
        """{hook: {definition, width, transformerlens}}, as the model's page, the API and metadata.json list them."""
        return {hook: {"definition": HOOK_DEFINITIONS[hook], "width": self.widths[hook],
                       "transformerlens": TRANSFORMERLENS_NAMES[hook]} for hook in self.supported}


def family_of(config: PretrainedConfig) -> Family | None:
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def find_blocks(model: torch.nn.Module, config: PretrainedConfig) -> torch.nn.ModuleList:
    family, num_layers = family_of(config), config.num_hidden_layers
    if family is not None:
        try:
            blocks = model.get_submodule(family.blocks)
        except AttributeError:
            blocks = None
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == num_layers:
            return blocks
        raise JobInputError(f"{type(model).__name__} has no {family.blocks} list of {num_layers} blocks, as "
                            f"{family.name} models have; use a model whose architecture transformers ships.")
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise JobInputError(f"{type(model).__name__} has no list of {num_layers} blocks to hook; "
                        "use a model whose architecture transformers ships.")


def _width_in(module: torch.nn.Module) -> int:
    """The input width of a down projection: nn.Linear's in_features, or GPT-2's Conv1D's nx."""
    width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    if not isinstance(width, int):
        raise JobInputError(f"The MLP's down projection ({type(module).__name__}) has no input width jobsite can read.")
    return width


def hook_points(model: torch.nn.Module, config: PretrainedConfig) -> HookPoints:
    """The hook points this model offers (built on the meta device is enough: nothing runs)."""
    blocks = find_blocks(model, config)
    hidden = config.hidden_size
    family = family_of(config)
    if family is None:
        why = (f"{config.model_type!r} is not a family jobsite knows, so only residual (the block's output) is "
               f"offered; the other hook points are defined for {_KNOWN_SENTENCE}")
        return HookPoints(None, {"residual": hidden}, {h: why for h in HOOK_TYPES if h != "residual"}, False)
    parallel = family.parallel(config)
    refusals = dict(family.refusals(config))
    if parallel:
        refusals.setdefault("resid_mid", f"this {family.name} block runs attention and the MLP in parallel on the "
                                         "same input, so no residual stream lies between them")
    if family.down is None:
        refusals.setdefault("mlp_hidden", f"{family.name} has a mixture of experts, not one MLP with a single "
                                          "layer of neurons")
    widths = {hook: hidden for hook in HOOK_TYPES if hook not in refusals}
    if "mlp_hidden" in widths:
        widths["mlp_hidden"] = _width_in(blocks[0].get_submodule(family.down))
    return HookPoints(family.name, widths, refusals, parallel)


def refusal(points: HookPoints, hook: str, architecture: str) -> str:
    """The sentence for a hook point this model does not offer."""
    return refusal_sentence(hook, points.refusals.get(hook, "it is not offered"), points.supported, architecture)
