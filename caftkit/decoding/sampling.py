"""How the next token is chosen: greedy, or sampled after the same logits processing as transformers' `generate()`.

`Sampling` (in `settings.py`) holds the settings (temperature 0 is greedy, the default); `TokenChooser` applies
them to logits of any leading shape, so that speculative decoding can choose a token at every position of a verified
block in one call. The processing is transformers' own warpers, in the order `generate()` applies them: temperature,
then top-k, then top-p (each keeping at least one token).

Each new token of a row is drawn with a uniform number of its own, fixed at the start of the generation (the n-th
new token of row r reads `uniforms[r, n]`), by inverting the processed distribution's cumulative sum. A uniform
drawn independently of the text before it gives an exact sample of the distribution given that text, whichever
tree or chain of drafts the position was verified in; and the tokens depend only on the seed, not on how many
drafts each pass verified. So with a seed, speculative sampling gives the very tokens of plain sampling, whatever
the drafting policy decided (it decides from timings), and `SeededSampler` makes transformers' `generate()` draw
the same ones.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .settings import Sampling


def sampling_processors(sampling: Sampling) -> LogitsProcessorList:
    """transformers' warpers for `sampling`, in `generate()`'s order (none when greedy)."""
    processors = LogitsProcessorList()
    if sampling.greedy:
        return processors
    if sampling.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    return processors


class TokenChooser:
    """Chooses tokens from logits `[rows, ..., vocab]`: their argmax when greedy, else a sample of the processed
    distribution drawn with the uniform of its row and new-token index (`uniforms`, `[rows, max_new_tokens]`, drawn
    once from a generator seeded with `sampling.seed`, or from torch's global one without a seed)."""

    def __init__(self, sampling: Sampling, device: torch.device | str, rows: int = 1, max_new_tokens: int = 1):
        self.sampling = sampling
        self.processors = sampling_processors(sampling)
        self.uniforms = None
        if not sampling.greedy:
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(sampling.seed)
            self.uniforms = torch.rand(rows, max(1, max_new_tokens), generator=generator, device=device,
                                       dtype=torch.float64)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from, `[..., vocab]` (float32): softmax of the processed logits."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        # The warpers do not read the tokens so far; they take them only for the processor interface.
        processed = self.processors(flat.new_zeros(flat.shape[0], 0, dtype=torch.long), flat)
        return processed.softmax(-1).reshape(logits.shape)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        """The token chosen at each position of `logits` (`[rows, ..., vocab]`): `rows[i]` is the generation row
        of `logits[i]` (default: the i-th) and `index[i, ...]` the new-token index each position chooses (default:
        0); indices past the last are read as the last (their tokens are past the end and cut)."""
        if self.sampling.greedy:
            return logits.argmax(-1)
        if rows is None:
            rows = torch.arange(logits.shape[0], device=logits.device)
        if index is None:
            index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        rows = rows.reshape(-1, *([1] * (index.dim() - 1))).expand_as(index)
        uniform = self.uniforms[rows, index.clamp(max=self.uniforms.shape[1] - 1)]
        cumulative = self.probabilities(logits).double().cumsum(-1)
        # The first token whose cumulative probability passes the uniform, scaled by the total against rounding.
        token = torch.searchsorted(cumulative, (uniform * cumulative[..., -1]).unsqueeze(-1).contiguous(),
                                   right=True).squeeze(-1)
        return token.clamp(max=logits.shape[-1] - 1)


class SeededSampler(LogitsProcessor):
    """Makes transformers' greedy `generate()` sample as `chooser` does: at each step it draws every row's token
    with that row's uniform for the step, and leaves only it possible. Give it with `do_sample=False`, so that
    nothing else warps the logits."""

    def __init__(self, chooser: TokenChooser, prompt_length: int):
        self.chooser, self.prompt_length = chooser, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        index = torch.full((scores.shape[0],), input_ids.shape[1] - self.prompt_length, device=scores.device)
        token = self.chooser(scores, index=index)
        return torch.full_like(scores, -torch.inf).scatter(1, token[:, None], 0.0)
