"""Head 2's one-token draft agreement along given outputs: the guesses are head 2's own (against the model run with
its last layer swapped for the head), and the walk counts as an engine drafting one token per step does."""

from __future__ import annotations

import torch
from tiny_models import tiny_model

from caftkit.core.architecture import find_model_parts
from caftkit.core.heads import attach_heads, get_heads
from caftkit.evaluation.draft_agreement import DraftAgreement, head_2_guesses, one_token_draft_agreement


def swapped_guesses(model, tokens: list[int]) -> list[int]:
    parts = find_model_parts(model)
    original = parts.layers[-1]
    parts.layers[len(parts.layers) - 1] = get_heads(model).layers[0]
    try:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].argmax(-1).tolist()
    finally:
        parts.layers[len(parts.layers) - 1] = original


def test_guesses_are_head_2s_and_the_walk_counts_like_an_engine():
    model = tiny_model("llama", seed=4)
    attach_heads(model, 2)
    with torch.no_grad():
        for param in get_heads(model).parameters():
            param.add_(0.05 * torch.randn_like(param))
    prompt, output = [1, 17, 23, 9], [40, 41, 12, 7, 88, 3, 5]
    guesses = head_2_guesses(model, prompt + output)
    assert guesses == swapped_guesses(model, prompt + output)
    # An output made of head 2's own guesses along the walk: every draft holds.
    agreeing, position = list(prompt) + [40], len(prompt) - 1
    while len(agreeing) < len(prompt) + 9:
        agreeing.append(head_2_guesses(model, agreeing + [0])[position])  # the guess of token position + 2
        agreeing.append(0)  # the bonus token after an accepted draft: any
        position += 2
    agreeing = agreeing[: len(prompt) + 9]
    result = one_token_draft_agreement(model, [prompt], [agreeing[len(prompt):]])
    assert result == DraftAgreement(drafted=4, accepted=4) and result.rate == 1.0
    # Against the naive walk on an arbitrary output.
    naive_drafted = naive_accepted = 0
    sequence, position = prompt + output, len(prompt) - 1
    while position + 2 < len(sequence):
        naive_drafted += 1
        hit = guesses[position] == sequence[position + 2]
        naive_accepted += hit
        position += 2 if hit else 1
    assert one_token_draft_agreement(model, [prompt], [output]) == DraftAgreement(naive_drafted, naive_accepted)
