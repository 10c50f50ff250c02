"""Batched greedy (or sampled) generation with `model.generate`: one stop-token rule for every caller.

Prompts of one batch are left-padded so that they all end where generation starts; a static KV cache holds
prompt and answer. Used by distillation and task evaluation (the demo scores through the latter).
"""

from __future__ import annotations

import torch

STOP_END_OF_TURN = "end_of_turn"
STOP_MAX_NEW_TOKENS = "max_new_tokens"


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """The ids generation stops on: the model's generation config's end-of-sequence ids and the tokenizer's."""
    configured = generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{tokenizer.name_or_path!r} defines no end-of-sequence token to stop generation on")
    return ids


@torch.no_grad()
def generate_batch(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0) -> list[tuple[list[int], str]]:
    """Answer token ids (end-of-turn token excluded) and stop reason of each prompt, generated as one batch
    (greedy when `temperature` is 0)."""
    eos_ids = stop_token_ids(model.generation_config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    width = max(len(ids) for ids in prompt_ids)
    device = next(model.parameters()).device
    # Left padding: every prompt ends at the same position, where generation starts.
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    sampling = temperature > 0
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        # A cache allocated once for prompt + answer: a growing cache is copied whole at every step, which
        # halves decoding speed on long prompts.
        cache_implementation="static",
    )
    answers = []
    for row in output[:, width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
        if stop is None:
            answers.append((row[:max_new_tokens], STOP_MAX_NEW_TOKENS))
        else:
            answers.append((row[:stop], STOP_END_OF_TURN))
    return answers
