"""The settings of the `caft bench` commands, declared once with their help and checks (nothing here imports torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..data import BUNDLED_SHAREGPT
from ..decoding.settings import default_tree_size
from ..models import ModelSettings, parse_dtype
from ..settings import MAX_SEED, refuse_former_names, setting
from ..training.settings import METHODS, FinetuneSettings


@dataclass(frozen=True)
class DraftShape:
    """How many heads draft, how many candidates each proposes, and how many drafts a pass verifies."""

    num_aux_heads: int
    candidates: int = 1
    tree_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> DraftShape:
        """`H` (H heads, one candidate each), `HxK` (K candidates per head) or `HxK:N` (N drafts verified per pass)."""
        try:
            heads, _, rest = text.strip().partition("x")
            candidates, _, size = rest.partition(":")
            shape = cls(int(heads), int(candidates) if candidates else 1, int(size) if size else None)
        except ValueError:
            shape = None
        if shape is None or min(shape.num_aux_heads, shape.candidates) < 1 or (
                shape.tree_size is not None and shape.tree_size < 1):
            raise ValueError(f"draft shape {text!r}: expected H, HxK or HxK:N (heads, candidates per head, "
                             "drafts per pass, each at least 1), e.g. 4 or 4x3:16")
        return shape

    @property
    def drafts_per_pass(self) -> int:
        return self.tree_size if self.tree_size is not None else default_tree_size(self.num_aux_heads, self.candidates)

    def __str__(self) -> str:
        if self.candidates == 1:
            return str(self.num_aux_heads)
        return f"{self.num_aux_heads}x{self.candidates}:{self.drafts_per_pass}"


@dataclass(kw_only=True)
class GenerationBenchSettings(ModelSettings):
    """The heads, prompts, batch sizes and draft shapes `caft bench generate` measures."""

    heads: str = setting(help="heads folder (from `caft train-heads` or `caft export`).")
    data: str = setting(BUNDLED_SHAREGPT, help="prompts: sharegpt (the bundled set) or a JSONL/JSON file of "
                                               "conversations.")
    exclude: str | None = setting(None, help="a JSONL file whose record ids are left out (e.g. the distilled data "
                                             "the heads learned from).")
    skip: int = setting(0, help="skip this many usable prompts first.", minimum=0)
    num_prompts: int = setting(16, help="prompts to generate for.", minimum=1)
    batch_sizes: list[int] = setting(default_factory=lambda: [1, 8], help="batch sizes to measure.", minimum=1)
    max_new_tokens: int = setting(128, help="most new tokens per answer.", minimum=1)
    drafts: list[str] | None = setting(None, help="draft shapes to measure: H (a chain through the first H heads), "
                                                  "HxK (a tree through the top K candidates of H heads) or HxK:N "
                                                  "(that tree cut to its N likeliest drafts per pass); default: a "
                                                  "chain through all heads.")
    draft_dtype: str | None = setting(None, help="draft with the heads in this dtype (e.g. bfloat16 for a float32 "
                                                 "model: cheaper drafts, the model still verifies in --dtype); "
                                                 "default: --dtype.")
    drafting: list[str] = setting(default_factory=lambda: ["fixed", "adaptive"],
                                  help="how each draft shape drafts: fixed (every head at every pass) and adaptive "
                                       "(each pass every head, the confident ones or none, by measured speed); each "
                                       "one asked for is measured.", choices=("fixed", "adaptive"))
    temperatures: list[float] = setting(default_factory=lambda: [0.0], help="0 decodes greedily; above 0 samples "
                                                                           "(with --top-p and --seed); each one "
                                                                           "asked for is measured.", minimum=0)
    top_p: float = setting(1.0, help="sampling: the top-p of every temperature above 0.", above=0, maximum=1)
    seed: int = setting(0, help="seed of the sampling, the same on every side.", minimum=0, maximum=MAX_SEED)
    repeats: int = setting(1, help="rounds of every prompt on every side, each starting with the heads' drafting "
                                   "memory forgotten; rows sum them and give each round's speedup, whose spread is "
                                   "what the machine's noise moves a ratio by.", minimum=1)
    output: str | None = setting(None, help="also write the JSON to this new file (an existing one is refused).")

    def __post_init__(self):
        super().__post_init__()
        if self.draft_dtype is not None:
            parse_dtype(self.draft_dtype)  # a typo fails before anything loads
        try:
            self.shapes = [DraftShape.parse(text) for text in self.drafts] if self.drafts else None
        except ValueError as error:
            raise ValueError(f"--drafts: {error}") from None


@dataclass(kw_only=True)
class TrainBenchSettings(ModelSettings):
    """The shape of the step `caft bench train` measures, and how often."""

    batch_size: int = setting(4, help="sequences per step.", minimum=1)
    seq_len: int = setting(512, help="tokens per sequence.", minimum=2)
    num_aux_heads: int = setting(4, help="auxiliary heads of the CAFT side (frozen, as in CAFT fine-tuning).",
                                 formerly=("num_heads",), minimum=1)
    steps: int = setting(5, help="timed steps per side (the median is reported).", minimum=1)
    warmup: int = setting(1, help="untimed steps before them.", minimum=0)
    repeats: int = setting(1, help="fresh processes per side, run in turn (plain, trl, ntp, caft, plain, ...) with "
                                   "their timed steps pooled: a slow spell of a shared machine falls on every side "
                                   "alike.", minimum=1)
    seed: int = setting(0, help="seed of the random tokens.", minimum=0, maximum=MAX_SEED)
    sweep: bool = setting(False, help="instead of one step shape, measure CAFT against caftkit's next-token step "
                                      "(ntp) along three axes from --seq-len and --num-aux-heads, one axis at a "
                                      "time: the sequence lengths, the numbers of heads and the vocabulary sizes "
                                      "below; prints a table.")
    sweep_seq_lens: list[int] = setting(default_factory=lambda: [256, 512, 1024, 2048, 4096],
                                        help="--sweep: the sequence lengths.", minimum=2)
    sweep_aux_heads: list[int] = setting(default_factory=lambda: [1, 2, 4, 8],
                                         help="--sweep: the numbers of auxiliary heads.", minimum=1)
    sweep_vocab_sizes: list[int] = setting(default_factory=lambda: [32000, 49152, 128256],
                                           help="--sweep: the vocabulary sizes (the model's architecture with that "
                                                "vocabulary and random weights).", minimum=2)
    plot: str | None = setting(None, help="--sweep: also draw the ratios along each axis to this new PNG file.")
    output: str | None = setting(None, help="also write the JSON to this new file (an existing one is refused).")

    def __post_init__(self):
        super().__post_init__()
        if self.plot is not None and not self.sweep:
            raise ValueError("--plot draws a sweep: add --sweep")
        if self.plot is not None and Path(self.plot).suffix.lower() != ".png":
            raise ValueError(f"{self.plot}: --plot writes a PNG file: name it .png")
        if self.plot is not None and self.output is not None and (
                os.path.realpath(self.plot) == os.path.realpath(self.output)):
            raise ValueError(f"{self.plot}: --plot and --output are one file; give each its own")


PRECISIONS = ("no", "bf16")


@dataclass(kw_only=True)
class PrecisionBenchSettings(ModelSettings):
    """Which fine-tuning run `caft bench precision` measures, for how many steps, and the tolerance."""

    data: str = setting(help="the task's training records, as for `caft finetune`.")
    mode: str = setting("caft", help="caft or ntp.", choices=("caft", "ntp"))
    method: str = setting("lora", help="lora or full.", choices=METHODS)
    heads: str | None = setting(None, help="a heads folder from `caft train-heads` (caft mode).")
    steps: int = setting(20, help="optimisation steps per side.", minimum=1)
    tolerance: float = setting(0.02, help="the largest relative loss difference accepted (0.02: 2%%).", minimum=0)
    seed: int = setting(0, help="seed of the run (split, shuffling, LoRA initialisation, dropout), the same on both "
                                "sides.", minimum=0, maximum=MAX_SEED)
    finetune: dict[str, Any] = setting(default_factory=dict, help="further `caft finetune` settings, e.g. "
                                                                  "{batch_size: 8, epochs: 1}.")
    output: str | None = setting(None, help="also write the JSON to this new file (an existing one is refused).")

    def finetune_settings(self) -> FinetuneSettings:
        """The fine-tuning run both sides start."""
        given = {"model", "data", "mode", "method", "heads", "seed", "device", "dtype", "mixed_precision"}
        self.finetune = refuse_former_names(self.finetune, FinetuneSettings, "--finetune")
        unknown = sorted(set(self.finetune) - {f.name for f in fields(FinetuneSettings)} | set(self.finetune) & given)
        if unknown:
            raise ValueError(f"--finetune: {unknown} are not further finetune settings (this command's own settings, "
                             f"and mixed_precision, are set by it); see `caft finetune --help`")
        return FinetuneSettings(model=self.model, data=self.data, mode=self.mode, method=self.method,
                                heads=self.heads, seed=self.seed, dtype=self.dtype, device=self.device,
                                **self.finetune)


@dataclass(kw_only=True)
class DistillBenchOutput:
    """Where `caft bench distill` also writes its JSON."""

    output: str | None = setting(None, help="also write the JSON to this new file (an existing one is refused).")
