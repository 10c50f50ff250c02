"""The settings of `caft generate`, declared once with their help and checks (nothing here imports torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models import ModelSettings, parse_dtype
from ..settings import MAX_SEED, check_settings, setting


@dataclass(kw_only=True)
class Sampling:
    """How each new token is chosen: greedy (`temperature` 0, the default) or sampled at `temperature` from the
    `top_k` likeliest tokens (0: all) within the smallest set of probability `top_p`, transformers' `generate()`
    processing; `seed` seeds the sampler. `Sampling(temperature=0.7, top_p=0.9, seed=0)`."""

    temperature: float = setting(0.0, help="0 decodes greedily; above 0 samples at this temperature (with "
                                            "--speculative too: the text has plain sampling's distribution).",
                                 minimum=0)
    top_p: float = setting(1.0, help="sampling: keep the smallest set of likeliest tokens whose probability reaches "
                                     "this (1: all).", above=0, maximum=1)
    top_k: int = setting(0, help="sampling: keep only this many likeliest tokens (0: all). Not the candidates per "
                                 "head of a draft tree: that is --candidates.", minimum=0)
    seed: int | None = setting(None, help="seed of the sampler (none: torch's global generator).",
                               minimum=0, maximum=MAX_SEED)

    def __post_init__(self):
        check_settings(self)
        if self.temperature == 0 and (self.top_p != 1 or self.top_k):
            raise ValueError("top_p and top_k shape sampling: give a temperature above 0 (the candidates per head of "
                             "a draft tree are --candidates)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The same choice as keyword arguments of transformers' `generate()` (seed it with `torch.manual_seed`)."""
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None}


@dataclass(kw_only=True)
class GenerateSettings(ModelSettings):
    """The prompt, and how `caft generate` answers it."""

    prompt: str = setting(help="the user message.")
    system: str | None = setting(None, help="an optional system message.")
    heads: str | None = setting(None, help="heads folder for --speculative (from `caft train-heads`, or "
                                           "<model>-heads from `caft export`).")
    speculative: bool = setting(False, help="draft with the heads (self-speculative decoding): the same text, "
                                            "faster when the heads guess well.")
    num_aux_heads: int | None = setting(None, help="heads used for drafting (default: all).", formerly=("num_heads",),
                                        minimum=0)
    candidates: int = setting(1, help="candidates per head; above 1, each pass verifies a tree of drafts instead of a "
                                 "chain.", minimum=1)
    tree_size: int | None = setting(None, help="drafts verified per pass with --candidates above 1 (default: "
                                               "num_aux_heads * candidates).", minimum=1)
    max_new_tokens: int = setting(256, help="most new tokens.", minimum=1)
    adaptive: bool = setting(True, help="with --speculative, let each pass draft through every head, as far as the "
                                        "heads are confident, or not at all, whichever gave the most tokens per "
                                        "second so far (never much slower than plain decoding); --no-adaptive drafts "
                                        "through every head at every pass.")
    draft_dtype: str | None = setting(None, help="with --speculative, draft with the heads in this dtype (e.g. "
                                                 "bfloat16 for a float32 model: cheaper drafts, same text); default: "
                                                 "--dtype.")

    def __post_init__(self):
        super().__post_init__()
        if self.speculative and self.heads is None:
            raise ValueError("--speculative needs --heads (a heads folder)")
        if self.draft_dtype is not None:
            parse_dtype(self.draft_dtype)  # a typo fails before anything loads


def default_tree_size(num_aux_heads: int, candidates: int) -> int:
    """Drafted tokens verified per pass when none is given: `num_aux_heads * candidates` (for 4 heads with 3 candidates,
    12: the best of the tree sizes measured on the bundled model in docs/benchmarks.md)."""
    return num_aux_heads * candidates
