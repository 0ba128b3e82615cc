"""Tiny local models for demos and tests: built from a config, never downloaded.

Pure torch/transformers/tokenizers (no Django), so tests and the demo command share it.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from jobsite.paths import RANDOM_WEIGHTS_MARKER

SPECIAL_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; the same texts always give the same tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        # Every byte stays encodable, whatever the training texts contain.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
    )


def _tiny_config(family: str, n_layer: int, hidden: int, n_head: int, max_positions: int) -> dict:
    """Keyword arguments of AutoConfig.for_model for a tiny model of each family jobsite knows
    ("<model type>-<variant>" for a variant of its blocks)."""
    gpt = dict(n_layer=n_layer, n_embd=hidden, n_head=n_head, n_positions=max_positions)
    head_dim = hidden // n_head
    neox = dict(num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=n_head,
                intermediate_size=4 * hidden, max_position_embeddings=max_positions)
    opt = dict(hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=n_layer, num_attention_heads=n_head,
               word_embed_proj_dim=hidden, max_position_embeddings=max_positions)
    falcon = dict(hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=n_head,
                  max_position_embeddings=max_positions)
    llama = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
                 num_attention_heads=n_head, num_key_value_heads=max(1, n_head // 2),
                 max_position_embeddings=max_positions)
    configs = {
        "gpt2": gpt, "gpt_bigcode": gpt,
        "gptj": dict(gpt, rotary_dim=head_dim // 2),
        "gpt_neox": neox, "gpt_neox-sequential": dict(neox, use_parallel_residual=False),
        "llama": llama, "mistral": llama, "qwen2": llama, "phi3": llama, "olmo2": llama,
        "qwen3": dict(llama, head_dim=head_dim),
        "mixtral": dict(llama, num_local_experts=4, num_experts_per_tok=2),
        "gemma": dict(llama, head_dim=head_dim),
        "gemma2": dict(llama, head_dim=head_dim, query_pre_attn_scalar=head_dim),
        "gemma3_text": dict(llama, head_dim=head_dim, query_pre_attn_scalar=head_dim),
        "opt": opt, "opt-post-norm": dict(opt, do_layer_norm_before=False),
        "bloom": dict(hidden_size=hidden, n_layer=n_layer, n_head=n_head),
        "falcon": falcon, "falcon-sequential": dict(falcon, parallel_attn=False),
        "phi": dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=n_layer,
                    num_attention_heads=n_head, max_position_embeddings=max_positions, partial_rotary_factor=0.5),
    }
    return configs[family]


TINY_FAMILIES = ("gpt2", "gpt_bigcode", "gptj", "gpt_neox", "gpt_neox-sequential", "llama", "mistral", "mixtral",
                 "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "opt", "opt-post-norm", "bloom",
                 "falcon", "falcon-sequential", "phi")


def build_tiny_family(out_dir: str, texts: list[str], family: str, *, n_layer: int = 3, hidden: int = 32,
                      n_head: int = 4, vocab_size: int = 300, max_positions: int = 256, seed: int = 0) -> str:
    """Save a randomly initialised causal LM of any family in TINY_FAMILIES, its tokenizer, and
    the marker that says its weights are random (so no one takes its output for text)."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    config = AutoConfig.for_model(
        family.split("-")[0], vocab_size=len(tokenizer), bos_token_id=special_id, eos_token_id=special_id,
        pad_token_id=special_id, **_tiny_config(family, n_layer, hidden, n_head, max_positions),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    mark_random_weights(out_dir)
    return str(out_dir)


def mark_random_weights(model_dir: str | os.PathLike) -> None:
    with open(os.path.join(model_dir, RANDOM_WEIGHTS_MARKER), "w", encoding="utf-8") as marker:
        marker.write("This model was initialised with random weights for a demo or a test: it runs, but what it "
                     "writes is noise. The causal_lm query generator refuses it.\n")


def build_tiny_causal_lm(
    out_dir: str,
    texts: list[str],
    *,
    arch: str = "gpt2",
    n_layer: int = 4,
    hidden: int = 64,
    n_head: int = 4,
    vocab_size: int = 512,
    max_positions: int = 1024,
    seed: int = 0,
) -> str:
    """Save a randomly initialised GPT-2 or GPT-NeoX causal LM (the demo's and most tests' model) and
    its tokenizer into `out_dir`."""
    if arch not in ("gpt2", "gpt_neox"):
        raise ValueError(f"Unknown arch {arch!r}; choose gpt2 or gpt_neox.")
    return build_tiny_family(out_dir, texts, arch, n_layer=n_layer, hidden=hidden, n_head=n_head,
                             vocab_size=vocab_size, max_positions=max_positions, seed=seed)
