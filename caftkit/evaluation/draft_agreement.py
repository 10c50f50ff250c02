"""How often head 2's guess would be accepted as a one-token draft, measured on given greedy outputs: the figure an
engine serving head 2 as an EAGLE-3 draft (`core/eagle3.py`) should report as its acceptance rate.

An engine drafting one token per step proposes, at the last accepted position t, head 2's guess of token t+2 and
accepts it when the model's greedy token there is the same; it then goes on from t+2, or from t+1 when the guess
was rejected. Walking an output the same way, with head 2's greedy guess at every position computed in one forward
pass, counts the drafts proposed and accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.architecture import find_model_parts
from ..core.heads import get_heads
from ..core.layer_call import capture_layer_inputs


@dataclass(frozen=True)
class DraftAgreement:
    """Drafts proposed and accepted along the outputs."""

    drafted: int
    accepted: int

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def head_2_guesses(model, tokens: list[int]) -> list[int]:
    """Head 2's greedy guess of token t+2 at every position t of `tokens` (the heads attached to `model`)."""
    parts = find_model_parts(model)
    ids = torch.tensor([tokens], device=next(model.parameters()).device)
    with capture_layer_inputs(parts) as capture:
        model(input_ids=ids, use_cache=False)
    call = capture.layer_call
    out = get_heads(model).layers[0](call.hidden_states, *call.args, **call.kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    return parts.lm_head(parts.final_norm(hidden))[0].argmax(-1).tolist()


def one_token_draft_agreement(model, prompts: list[list[int]], outputs: list[list[int]]) -> DraftAgreement:
    """Drafts of head 2 proposed and accepted along each greedy output (one token per step), as an engine serving
    it as a one-token draft would count them: the first draft is proposed once the model's first token is known."""
    drafted = accepted = 0
    for prompt, output in zip(prompts, outputs):
        sequence = prompt + output
        guesses = head_2_guesses(model, sequence)
        position = len(prompt) - 1  # the model's token at position + 1 is the first output token
        while position + 2 < len(sequence):
            drafted += 1
            if guesses[position] == sequence[position + 2]:
                accepted += 1
                position += 2
            else:
                position += 1
    return DraftAgreement(drafted, accepted)
