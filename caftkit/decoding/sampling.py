"""How the next token is chosen: greedy, or sampled after the same logits processing as transformers' `generate()`.

`Sampling` (in `settings.py`) holds the settings (temperature 0 is greedy, the default); `TokenChooser` applies
them to logits of any leading shape with its own seeded generator, so that speculative decoding can choose a token
at every position of a verified block in one call. The processing is transformers' own warpers, in the order
`generate()` applies them: temperature, then top-k, then top-p (each keeping at least one token).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

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
    """Chooses tokens from logits `[..., vocab]`: their argmax when greedy, else a sample of the processed
    distribution, drawn with this chooser's generator (seeded once)."""

    def __init__(self, sampling: Sampling, device: torch.device | str):
        self.sampling = sampling
        self.processors = sampling_processors(sampling)
        self.generator = None
        if not sampling.greedy and sampling.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from, `[..., vocab]` (float32): softmax of the processed logits."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        # The warpers do not read the tokens so far; they take them only for the processor interface.
        processed = self.processors(flat.new_zeros(flat.shape[0], 0, dtype=torch.long), flat)
        return processed.softmax(-1).reshape(logits.shape)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return logits.argmax(-1)
        probabilities = self.probabilities(logits)
        flat = probabilities.reshape(-1, probabilities.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).reshape(logits.shape[:-1])
