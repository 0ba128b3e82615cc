"""Shared by the models (web), the runner (worker) and the reader without importing torch or Django."""

from __future__ import annotations

import re

# The order hooks are stored and files are listed in. The first three are the original ones, in
# their original order: a request's fingerprint lists its hooks in this order, so it must not move.
HOOK_TYPES = ("residual", "mlp", "attention", "resid_pre", "resid_mid", "mlp_hidden")

# The residual stream in the order a block produces it, then the MLP's neurons: how people read them.
BLOCK_ORDER = ("resid_pre", "attention", "resid_mid", "mlp", "residual", "mlp_hidden")

# Each hook point, defined once as what it is in the residual stream. The family adapters
# (extraction/runner/families.py) implement these definitions; tests check them by the identity
# resid_post = resid_pre + attention + mlp on every family that offers them.
HOOK_DEFINITIONS = {
    "resid_pre": "the block's input (at layer 0: the embeddings, positions included where the model adds them)",
    "resid_mid": "resid_pre + attention: the residual stream between attention and MLP (sequential blocks only)",
    "residual": "the block's output, resid_pre + attention + mlp (resid_post)",
    "attention": "what attention adds to the residual stream, after any post-attention norm",
    "mlp": "what the MLP (or mixture of experts) adds to the residual stream, after any post-feedforward norm",
    "mlp_hidden": "the MLP's neurons after the activation: the down projection's input (dense MLPs only)",
}

# TransformerLens's names (blocks.{layer}.<name>), and the other spellings people use for ours.
TRANSFORMERLENS_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "residual": "hook_resid_post",
    "attention": "hook_attn_out",
    "mlp": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
}
HOOK_ALIASES = {
    **{name: name for name in HOOK_TYPES},
    **{tl: name for name, tl in TRANSFORMERLENS_NAMES.items()},
    "resid_post": "residual",
    "attn_out": "attention",
    "mlp_out": "mlp",
    "hook_post": "mlp_hidden",
}
HOOKS_SENTENCE = ("choose from " + ", ".join(HOOK_TYPES) + " (or TransformerLens's names: "
                  + ", ".join(TRANSFORMERLENS_NAMES.values()) + ", and blocks.N.hook_mlp_out for layer N)")
_LAYERED = re.compile(r"blocks\.(\d{1,6})\.(.+)")

VALID_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_SIZES_SENTENCE = f"The batch size must be one of {', '.join(map(str, VALID_BATCH_SIZES))}"


class HookNameError(ValueError):
    """A hook name that names no hook point; its message says what to write instead."""


def parse_hook(name: str) -> tuple[int | None, str]:
    """(layer or None, our hook name) from any accepted spelling: 'mlp', 'hook_mlp_out',
    'blocks.5.hook_mlp_out' (layer 5). Raises HookNameError with a sentence."""
    if not isinstance(name, str):
        raise HookNameError(f"A hook name must be text, not {name!r}; {HOOKS_SENTENCE}.")
    text = name.strip()
    layer = None
    match = _LAYERED.fullmatch(text)
    if match:
        layer, text = int(match.group(1)), match.group(2)
    hook = HOOK_ALIASES.get(text)
    if hook is None:
        shown = name if len(name) <= 60 else name[:59] + "…"
        raise HookNameError(f"Hook {shown!r} is unknown; {HOOKS_SENTENCE}.")
    return layer, hook


def refusal_sentence(hook: str, why: str, supported, architecture: str) -> str:
    """Why a model does not offer a hook point, and what it offers instead."""
    return f"Hook point {hook} is not available for {architecture}: {why}. Choose from {', '.join(supported)}."


def transformerlens_name(layer: int, hook: str) -> str:
    """blocks.5.hook_mlp_out for (5, 'mlp'): the column and key name other tools expect."""
    return f"blocks.{layer}.{TRANSFORMERLENS_NAMES[hook]}"


def file_name(layer: int, hook: str) -> str:
    return f"layer_{layer}_{hook}.npy"


_FILE = re.compile(r"layer_(\d+)_(" + "|".join(HOOK_TYPES) + r")\.npy")


def parse_file_name(name: str) -> tuple[int, str] | None:
    """(layer, hook) of an activation file's name, None for any other file."""
    match = _FILE.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None
