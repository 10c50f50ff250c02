"""The settings of `caft generate`, declared once with their help and checks (nothing here imports torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..command_line import setting
from ..models import ModelSettings, parse_dtype


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
    top_k: int = setting(1, help="candidates per head; above 1, each pass verifies a tree of drafts instead of a "
                                 "chain.", minimum=1)
    tree_size: int | None = setting(None, help="drafts verified per pass with --top-k above 1 (default: num_aux_heads "
                                               "* top_k).", minimum=1)
    max_new_tokens: int = setting(256, help="most new tokens.", minimum=1)
    draft_dtype: str | None = setting(None, help="with --speculative, draft with the heads in this dtype (e.g. "
                                                 "bfloat16 for a float32 model: cheaper drafts, same text); default: "
                                                 "--dtype.")

    def __post_init__(self):
        super().__post_init__()
        if self.speculative and self.heads is None:
            raise ValueError("--speculative needs --heads (a heads folder)")
        if self.draft_dtype is not None:
            parse_dtype(self.draft_dtype)  # a typo fails before anything loads


def default_tree_size(num_aux_heads: int, top_k: int) -> int:
    """Drafted tokens verified per pass when none is given: `num_aux_heads * top_k` (for 4 heads with 3 candidates,
    12: the best of the tree sizes measured on the bundled model in docs/benchmarks.md)."""
    return num_aux_heads * top_k
