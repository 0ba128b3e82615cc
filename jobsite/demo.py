"""Tiny local models for demos and tests: built from a config, never downloaded.

Pure torch/transformers/tokenizers (no Django), so tests and the demo command share it.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
)

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
    """Save a randomly initialised causal LM and its tokenizer into `out_dir`."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    common = dict(vocab_size=len(tokenizer), bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    if arch == "gpt2":
        config = GPT2Config(n_layer=n_layer, n_embd=hidden, n_head=n_head, n_positions=max_positions, **common)
        model_class = GPT2LMHeadModel
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(
            num_hidden_layers=n_layer,
            hidden_size=hidden,
            num_attention_heads=n_head,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_positions,
            **common,
        )
        model_class = GPTNeoXForCausalLM
    else:
        raise ValueError(f"Unknown arch {arch!r}; choose gpt2 or gpt_neox.")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
