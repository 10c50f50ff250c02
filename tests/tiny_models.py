"""Tiny causal LMs of every supported architecture, built from configs in code (no download)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
HIDDEN = 32

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=8),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_COMMON, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    ),
    "phi3": lambda: Phi3Config(**_COMMON),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=256,
                               tie_word_embeddings=False,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}

ARCHITECTURES = sorted(CONFIGS)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32):
    """A 2-layer model of `model_type` with fixed random weights, in eval mode (no dropout), eager attention."""
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random weights with a larger spread than the default init, so that heads and layers differ visibly.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    return model.eval()


def random_batch(batch_size: int = 2, seq_len: int = 12, seed: int = 1, pad_last: int = 3) -> dict:
    """Token ids with right padding on the last row (`pad_last` positions), labels -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_last:
        attention_mask[-1, -pad_last:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def saved_model_dir(path, model):
    """`model` and the tiny tokenizer saved to `path`, as a folder any `caft` command loads; returns `path`."""
    from tiny_tokenizer import tiny_tokenizer

    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
