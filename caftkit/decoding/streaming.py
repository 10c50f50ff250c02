"""`caft generate`: one prompt answered through the model's chat template (greedily or sampled), streamed to the
terminal, plainly or by self-speculative decoding with the heads."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..core.heads import attach_heads, check_heads_fit
from ..data import render_prompt
from ..models import load_model, load_tokenizer
from .greedy import stop_token_ids
from .settings import GenerateSettings, Sampling
from .speculative import generate as speculative_generate


class _TokenStream(BaseStreamer):
    """A transformers streamer handing each generated token to `show`; its first `put` is the prompt."""

    def __init__(self, show):
        super().__init__()
        self.show = show
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.show(0, value.reshape(-1).tolist())

    def end(self):
        pass


def answer_prompt(settings: GenerateSettings, sampling: Sampling | None = None) -> dict[str, Any]:
    """Answer `settings.prompt` (greedily, or as `sampling` says), printing the text as it comes and a speed line on
    stderr; returns the tokens, the seconds, the forward passes and the mean tokens accepted per pass."""
    sampling = sampling or Sampling()
    if settings.speculative:
        check_heads_fit(settings.heads, settings.model)
    tokenizer = load_tokenizer(settings.model, settings.chat_template)
    model = load_model(settings.model, settings.dtype).to(settings.device).eval()
    if settings.speculative:
        attach_heads(model, settings.heads)
    messages = ([{"role": "system", "content": settings.system}] if settings.system else []) + [
        {"role": "user", "content": settings.prompt}]
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(settings.device)
    stop_ids = stop_token_ids(model.generation_config, tokenizer)
    answer: list[int] = []
    shown = ""

    def show(_row: int, tokens: list[int]) -> None:
        nonlocal shown
        answer.extend(tokens)
        # Decode the whole answer each time: a character may span tokens that arrive in different steps.
        text = tokenizer.decode(answer, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text

    started = time.perf_counter()
    if settings.speculative:
        result = speculative_generate(model, input_ids=ids, max_new_tokens=settings.max_new_tokens,
                                      eos_token_id=stop_ids, num_aux_heads=settings.num_aux_heads,
                                      candidates=settings.candidates, tree_size=settings.tree_size, on_tokens=show,
                                      draft_dtype=settings.draft_dtype, sampling=sampling,
                                      adaptive=settings.adaptive)
        passes, accepted = result.forward_passes, result.mean_accepted
    else:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                           eos_token_id=stop_ids, streamer=_TokenStream(show), **sampling.generate_kwargs(),
                           pad_token_id=tokenizer.pad_token_id or stop_ids[0])
        passes, accepted = len(answer), 1.0  # one token per forward pass
    seconds = time.perf_counter() - started
    print()
    print(f"[{len(answer)} tokens in {seconds:.2f} s, {len(answer) / max(seconds, 1e-9):.1f} tokens/s, "
          f"{passes} forward passes, {accepted:.2f} tokens per pass]", file=sys.stderr)
    return {"tokens": answer, "seconds": seconds, "forward_passes": passes, "mean_accepted": accepted}


