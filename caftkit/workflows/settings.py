"""The settings of `caft compare` and `caft demo`, declared once with their help and checks (nothing here imports
torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..evaluation.settings import EvalSettings
from ..models import ModelSettings
from ..settings import MAX_SEED, check_settings, refuse_former_names, setting
from ..tasks.registry import get_task, task_names
from ..training.settings import HEAD_WARMUP_CHOICES, METHODS, FinetuneSettings

DEFAULT_ARMS = {"ntp": {"mode": "ntp"}, "caft": {"mode": "caft"}}

# Fine-tuning settings that compare sets itself, per arm.
_ARM_KEYS = {"model", "data", "mode", "method", "seed", "heads", "head_warmup", "dtype", "device"}

_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ArmSettings:
    """One arm of a comparison: how its models are fine-tuned, on which seeds, and what it is measured against."""

    mode: str
    method: str = "lora"
    seeds: list[int] = field(default_factory=lambda: [0])
    heads: str | None = None
    head_warmup: str = "auto"
    baseline: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class CompareSettings(ModelSettings):
    """What `compare` trains and evaluates. The top-level method, seeds, heads and head warm-up are the defaults of
    every arm; `finetune` holds the fine-tuning settings every arm shares, which an arm's own `finetune` overrides."""

    data: str = setting(help="the task's training records (e.g. from `caft data molecules`).",
                        formerly=("train_data",))
    task: str = setting("molecules", help=f"how the exported models are scored: {', '.join(task_names())} (the "
                                          "registered tasks; see `caft eval`).")
    test_data: str | None = setting(None, help="the test examples (default: the task's own: moses:test for molecules, "
                                               "the bundled HumanEval set; math needs a file from `caft data math`).")
    test_examples: int | None = setting(500, help="score the first this many test examples; 0 or none for all.",
                                        minimum=0)
    heads: str | None = setting(None, help="heads folder of the caft arms (from `caft train-heads`); the default of "
                                           "every arm.")
    head_warmup: str = setting("auto", help="the caft arms' head warm-up on the task (see `caft finetune`); the "
                                            "default of every arm.", choices=HEAD_WARMUP_CHOICES)
    method: str = setting("lora", help="lora or full; the default of every arm.", choices=METHODS)
    seeds: list[int] = setting(default_factory=lambda: [0], help="training seeds; the default of every arm.",
                               minimum=0, maximum=MAX_SEED)
    finetune: dict[str, Any] = setting(default_factory=dict, help="further `caft finetune` settings shared by every "
                                                                  "arm, e.g. {epochs: 1, batch_size: 16}.")
    arms: dict[str, Any] | None = setting(None, help="the arms, a mapping from a name to its settings: mode (ntp or "
                                                     "caft, required), method, seeds, heads, head_warmup, baseline "
                                                     "(caft arms: the ntp arm to measure against) and finetune (its "
                                                     "overrides of the shared settings). Default: ntp and caft.")
    max_new_tokens: int | None = setting(None, help="most tokens per answer in the evaluation (default: the "
                                                    "task's).", minimum=1)
    eval_batch_size: int = setting(16, help="prompts generated together in the evaluation.", minimum=1)
    allow_unsandboxed: bool = setting(False, help="humaneval: score the programs even where they cannot be isolated, "
                                                  "as `caft eval --allow-unsandboxed` (see its help).")
    n_resamples: int = setting(10000, help="bootstrap resamples of the confidence intervals.", minimum=1)
    ln_diagnostic: bool = setting(True, help="score every caft arm's final model and its baseline's under the heads "
                                             "that arm fine-tuned with, on the test examples' reference answers: the "
                                             "paper's Ln (eq. 3), which it expects to end lower with CAFT.")

    def __post_init__(self):
        super().__post_init__()
        get_task(self.task)
        if self.test_examples == 0:
            self.test_examples = None
        self.finetune = refuse_former_names(self.finetune, FinetuneSettings, "finetune")
        _check_finetune_keys(self.finetune, "finetune settings")
        if self.arms is not None and not self.arms:  # an empty mapping is a mistake, not a wish for the defaults
            raise ValueError("arms: give at least one arm (or leave arms out for ntp and caft)")
        self.arm_settings = {name: self._arm(name, values) for name, values in (self.arms or DEFAULT_ARMS).items()}
        self.baselines = {name: self._baseline(name, arm) for name, arm in self.arm_settings.items()
                          if arm.mode == "caft"}
        for name in self.arm_settings:  # every setting of every arm is checked before anything runs
            for seed in self.arm_settings[name].seeds:
                try:
                    self.finetune_settings(name, seed)
                except ValueError as error:
                    raise ValueError(f"arm {name}: {error}") from None

    def _arm(self, name: str, values: dict[str, Any]) -> ArmSettings:
        if not isinstance(name, str) or not _ARM_NAME.fullmatch(name) or name.startswith("seed-"):
            raise ValueError(f"arm name {name!r}: use letters, digits, '.', '_' and '-' (a folder name)")
        if not isinstance(values, dict):
            raise ValueError(f"arm {name}: expected a mapping of arm settings, got {values!r}")
        known = {f.name for f in fields(ArmSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"arm {name}: unknown settings {unknown}; expected some of {sorted(known)}")
        if "mode" not in values:
            raise ValueError(f"arm {name}: give its mode, ntp or caft")
        defaults = {"method": self.method, "seeds": list(self.seeds), "heads": self.heads,
                    "head_warmup": self.head_warmup}
        arm = ArmSettings(**{**defaults, **values})
        try:
            check_settings(arm)
        except ValueError as error:
            raise ValueError(f"arm {name}: {error}") from None
        arm.finetune = refuse_former_names(arm.finetune, FinetuneSettings, f"arm {name}: finetune")
        if arm.mode not in ("ntp", "caft"):
            raise ValueError(f"arm {name}: mode must be ntp or caft, got {arm.mode!r}")
        if not arm.seeds or len(set(arm.seeds)) != len(arm.seeds) or min(arm.seeds) < 0:
            raise ValueError(f"arm {name}: seeds must be a non-empty list of distinct seeds (integers >= 0), got "
                             f"{arm.seeds}")
        _check_finetune_keys(arm.finetune, f"arm {name}: finetune settings")
        if arm.mode == "ntp" and arm.baseline is not None:
            raise ValueError(f"arm {name}: an ntp arm is a baseline; only caft arms name one")
        return arm

    def _baseline(self, name: str, arm: ArmSettings) -> str:
        ntp_arms = {other: settings for other, settings in self.arm_settings.items() if settings.mode == "ntp"}
        if arm.baseline is not None:
            if arm.baseline not in ntp_arms:
                raise ValueError(f"arm {name}: baseline {arm.baseline!r} is not an ntp arm of this comparison "
                                 f"(ntp arms: {sorted(ntp_arms) or 'none'})")
            baseline = arm.baseline
        else:
            same_method = sorted(other for other, settings in ntp_arms.items() if settings.method == arm.method)
            if len(same_method) != 1:
                raise ValueError(f"arm {name}: name its baseline; the ntp arms with method {arm.method} are "
                                 f"{same_method or 'none'}")
            baseline = same_method[0]
        if not set(arm.seeds) & set(self.arm_settings[baseline].seeds):
            raise ValueError(f"arm {name}: no seed in common with its baseline {baseline} "
                             f"({arm.seeds} against {self.arm_settings[baseline].seeds})")
        return baseline

    def finetune_settings(self, arm_name: str, seed: int) -> FinetuneSettings:
        """The fine-tuning settings of one arm and seed."""
        arm = self.arm_settings[arm_name]
        caft = arm.mode == "caft"
        return FinetuneSettings(model=self.model, data=self.data, mode=arm.mode, method=arm.method, seed=seed,
                                heads=arm.heads if caft else None, head_warmup=arm.head_warmup if caft else "no",
                                dtype=self.dtype, device=self.device, **{**self.finetune, **arm.finetune})

    def eval_settings(self, model_dir: Path) -> EvalSettings:
        """How every exported model is scored."""
        return EvalSettings(model=str(model_dir), task=self.task, data=self.test_data, max_examples=self.test_examples,
                            max_new_tokens=self.max_new_tokens, batch_size=self.eval_batch_size, dtype=self.dtype,
                            device=self.device, allow_unsandboxed=self.allow_unsandboxed)


def _check_finetune_keys(values: dict[str, Any], what: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a mapping, got {values!r}")
    clash = sorted(_ARM_KEYS & set(values))
    if clash:
        raise ValueError(f"{what} {clash} are set by compare itself; use its own keys")
    unknown = sorted(set(values) - {f.name for f in fields(FinetuneSettings)})
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; see `caft finetune --help`")


@dataclass(kw_only=True)
class CompareOutput:
    output: str = setting("compare", help="the comparison folder.")


@dataclass(kw_only=True)
class DemoSettings(ModelSettings):
    """Where the demo writes and how much each of its stages does."""

    output: str = setting("demo-output", help="folder for every artefact.")
    distill_prompts: int = setting(48, help="ShareGPT prompts to self-distil.", minimum=2)
    distill_new_tokens: int = setting(96, help="most tokens per distilled answer.", minimum=1)
    molecules: int = setting(480, help="molecule-design records from the MOSES train split to fine-tune on (some "
                                       "held out): 55 steps of 8 with the defaults.", minimum=2)
    eval_molecules: int = setting(40, help="MOSES test molecules to score the exported model on.", minimum=1)
    epochs: float = setting(1.0, help="passes of head training and fine-tuning.", above=0)
