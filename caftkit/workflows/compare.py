"""`caft compare`: CAFT arms against next-token fine-tuning on the same data, seeds, steps and evaluation.

An arm is one way of fine-tuning: a mode (`ntp` or `caft`), a method (LoRA or full), its seeds, its heads and
warm-up, and its own overrides of the shared fine-tuning settings (`beta: 0.5`, ...). Each CAFT arm is measured
against a baseline arm, the ntp arm of the same method unless it names another. For each arm and seed the model is
fine-tuned (`caft finetune`), exported and scored on the same test examples (`caft eval`). The report gives, per
CAFT arm, each metric for it and its baseline, the difference and its paired bootstrap confidence interval over the
seeds both ran (`comparison_report`), and the held-out top-1 accuracy of the heads before and after warm-up.

Without `arms`, the comparison has two: `ntp` and `caft`, with the top-level method, seeds, heads and warm-up.
With `arms`, those top-level values are the defaults of every arm.

The folder is resumable: a finished fine-tuning run, export or evaluation is not redone, an interrupted
fine-tuning run resumes from its last checkpoint, and an interrupted evaluation keeps its answers. A finished
step is reused only when it was made with the settings asked for now; otherwise the comparison stops and names
the settings that differ. CAFT arms of one seed whose head warm-up is the same (it does not depend on beta, the
schedule or the method) share it: the warmed-up heads of the first are copied into the next.

    <output>/seed-<s>/<arm>/run/     the fine-tuning run (`caft finetune`)
    <output>/seed-<s>/<arm>/model/   the exported model (`caft export`)
    <output>/seed-<s>/<arm>/eval/    metrics.json, examples.jsonl (`caft eval`)
    <output>/timings.json            wall time of every stage that ran
    <output>/report.md, report-<arm>.png, comparison.json
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..command_line import setting, with_current_names
from ..core.heads import HEADS_CONFIG_FILE
from ..evaluation.bootstrap import comparison_table, uniqueness_metric
from ..evaluation.task_eval import EXAMPLES_FILE, METRICS_FILE, EvalSettings, evaluate
from ..models import ModelSettings
from ..resumable_jsonl import read_complete_records
from ..training.export import export_run
from ..training.finetuning import (
    HEAD_WARMUP_CHOICES,
    METHODS,
    RUN_FILE,
    WARMUP_HEADS_DIR,
    FinetuneSettings,
    finetune,
    warmup_settings,
)
from ..training.head_training import last_checkpoint
from .compare_report import REPORT_FILE, ArmComparison, arm_dir, write_comparison_report

DEFAULT_ARMS = {"ntp": {"mode": "ntp"}, "caft": {"mode": "caft"}}
TIMINGS_FILE = "timings.json"
COMPARISON_FILE = "comparison.json"
ARM_SETTINGS_FILE = "arm_settings.json"

# What each task's report compares: the per-example columns of `examples.jsonl` (report name -> column).
_TASK_COLUMNS = {
    "molecules": {"validity": "valid", "formula_match": "formula_match", "group_recall": "group_recall",
                  "groups_match": "groups_match", "exact_match": "exact_match", "tanimoto": "tanimoto"},
    "humaneval": {"pass@1": "passed"},
}
# Fine-tuning settings that compare sets itself, per arm.
_ARM_KEYS = {"model", "data", "mode", "method", "seed", "heads", "head_warmup", "dtype", "device"}
# Settings that do not change what a finished step produced, so a step made with other values is reused.
_NOT_COMPARED = {"device", "report_to", "save_steps", "logging_steps"}
_EVAL_NOT_COMPARED = {"model", "device", "batch_size", "workers"}
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ArmSettings:
    """One arm of a comparison: how its models are fine-tuned, on which seeds, and what it is measured against."""

    mode: str
    method: str = "lora"
    seeds: list[int] = field(default_factory=lambda: [0])
    heads: str | None = None
    head_warmup: str = "yes"
    baseline: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class CompareSettings(ModelSettings):
    """What `compare` trains and evaluates. The top-level method, seeds, heads and head warm-up are the defaults of
    every arm; `finetune` holds the fine-tuning settings every arm shares, which an arm's own `finetune` overrides."""

    data: str = setting(help="the task's training records (e.g. from `caft data molecules`).",
                        formerly=("train_data",))
    task: str = setting("molecules", help="how the exported models are scored (see `caft eval`).",
                        choices=tuple(_TASK_COLUMNS))
    test_data: str | None = setting(None, help="the test examples (default: moses:test for molecules, the bundled "
                                               "HumanEval set).")
    test_examples: int | None = setting(500, help="score the first this many test examples; 0 or none for all.")
    heads: str | None = setting(None, help="heads folder of the caft arms (from `caft train-heads`); the default of "
                                           "every arm.")
    head_warmup: str = setting("yes", help="the caft arms' head warm-up on the task (see `caft finetune`); the "
                                           "default of every arm.", choices=HEAD_WARMUP_CHOICES)
    method: str = setting("lora", help="lora or full; the default of every arm.", choices=METHODS)
    seeds: list[int] = setting(default_factory=lambda: [0], help="training seeds; the default of every arm.")
    finetune: dict[str, Any] = setting(default_factory=dict, help="further `caft finetune` settings shared by every "
                                                                  "arm, e.g. {epochs: 1, batch_size: 16}.")
    arms: dict[str, Any] | None = setting(None, help="the arms, a mapping from a name to its settings: mode (ntp or "
                                                     "caft, required), method, seeds, heads, head_warmup, baseline "
                                                     "(caft arms: the ntp arm to measure against) and finetune (its "
                                                     "overrides of the shared settings). Default: ntp and caft.")
    max_new_tokens: int | None = setting(None, help="most tokens per answer in the evaluation (default: the "
                                                    "task's).")
    eval_batch_size: int = setting(16, help="prompts generated together in the evaluation.")
    n_resamples: int = setting(10000, help="bootstrap resamples of the confidence intervals.")

    def __post_init__(self):
        super().__post_init__()
        if self.test_examples == 0:
            self.test_examples = None
        self.finetune = with_current_names(self.finetune, FinetuneSettings, "finetune")
        _check_finetune_keys(self.finetune, "finetune settings")
        self.arm_settings = {name: self._arm(name, values) for name, values in (self.arms or DEFAULT_ARMS).items()}
        if not self.arm_settings:
            raise ValueError("arms: give at least one arm")
        self.baselines = {name: self._baseline(name, arm) for name, arm in self.arm_settings.items()
                          if arm.mode == "caft"}
        for name in self.arm_settings:  # every setting of every arm is checked before anything runs
            for seed in self.arm_settings[name].seeds:
                self.finetune_settings(name, seed)

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
        arm.finetune = with_current_names(arm.finetune, FinetuneSettings, f"arm {name}: finetune")
        if arm.mode not in ("ntp", "caft"):
            raise ValueError(f"arm {name}: mode must be ntp or caft, got {arm.mode!r}")
        if not arm.seeds or len(set(arm.seeds)) != len(arm.seeds):
            raise ValueError(f"arm {name}: seeds must be a non-empty list of distinct seeds, got {arm.seeds}")
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
                            device=self.device)


def _check_finetune_keys(values: dict[str, Any], what: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a mapping, got {values!r}")
    clash = sorted(_ARM_KEYS & set(values))
    if clash:
        raise ValueError(f"{what} {clash} are set by compare itself; use its own keys")
    unknown = sorted(set(values) - {f.name for f in fields(FinetuneSettings)})
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; see `caft finetune --help`")


class _Timings:
    """Wall time of each stage, kept on disk so that a resumed comparison reports the stages it did not redo."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 1)
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")

    def arm_total(self, arm: str) -> float:
        return round(sum(value for key, value in self.seconds.items() if key.split("/")[1:2] == [arm]), 1)


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _differences(done: dict[str, Any], wanted: Any, ignored: set[str]) -> list[str]:
    """`key=done (asked: wanted)` for every setting of the dataclass `wanted` that differs from the recorded `done`.
    A setting the earlier step did not record counts as its default: what that step ran with."""
    defaults = {f.name: f.default for f in fields(wanted) if f.default is not MISSING}
    defaults.update({f.name: f.default_factory() for f in fields(wanted) if f.default_factory is not MISSING})
    done = {**_as_json(defaults), **done}
    return [f"{key}={done.get(key)!r} (asked: {value!r})" for key, value in _as_json(asdict(wanted)).items()
            if key not in ignored and done.get(key) != value]


def _check_reusable(root: Path, settings: FinetuneSettings, eval_settings: EvalSettings) -> None:
    """Stop when a finished or started step of this arm and seed was made with other settings than asked now."""
    recorded = []
    if (root / ARM_SETTINGS_FILE).exists():
        recorded.append((root / ARM_SETTINGS_FILE, json.loads((root / ARM_SETTINGS_FILE).read_text())["finetune"]))
    if (root / "run" / RUN_FILE).exists():
        recorded.append((root / "run" / RUN_FILE, json.loads((root / "run" / RUN_FILE).read_text())["settings"]))
    differing = []
    for path, done in recorded:
        differing += [f"{path}: {item}" for item in _differences(done, settings, _NOT_COMPARED)]
    metrics = root / "eval" / METRICS_FILE
    if metrics.exists():
        done = json.loads(metrics.read_text()).get("settings", {})
        differing += [f"{metrics}: {item}" for item in _differences(done, eval_settings, _EVAL_NOT_COMPARED)]
    if differing:
        raise ValueError(f"{root} was made with other settings than asked now: {'; '.join(differing)}. Remove "
                         f"that folder to redo it, or choose another --output")


def _share_warmup(output: Path, settings: CompareSettings, arm_name: str, seed: int, run_dir: Path) -> str | None:
    """Copy the warmed-up heads of another arm of this seed whose warm-up is this arm's; returns that arm."""
    arm = settings.arm_settings[arm_name]
    if arm.mode != "caft" or arm.head_warmup == "no" or (run_dir / WARMUP_HEADS_DIR).exists():
        return None
    # settings that do not change the warmed-up heads (where and how often it saved, logged, ran) are not compared
    ignored = _NOT_COMPARED | {"save_total_limit"}
    wanted = {key: value for key, value in _as_json(asdict(warmup_settings(settings.finetune_settings(arm_name, seed),
                                                                           arm.heads))).items()
              if key not in ignored}
    for other in settings.arm_settings:
        source = arm_dir(output, seed, other) / "run" / WARMUP_HEADS_DIR
        config = source / HEADS_CONFIG_FILE
        if other == arm_name or not config.exists():
            continue
        done = json.loads(config.read_text()).get("training", {}).get("settings", {})
        if {key: value for key, value in done.items() if key not in ignored} == wanted:
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, run_dir / WARMUP_HEADS_DIR)
            return other
    return None


def run_arm(output: Path, settings: CompareSettings, seed: int, arm: str, timings: _Timings,
            progress: bool = True) -> dict[str, Any]:
    """Fine-tune, export and evaluate one arm and seed, skipping what an earlier invocation finished."""
    root = arm_dir(output, seed, arm)
    run_dir, model_dir, eval_dir = root / "run", root / "model", root / "eval"
    finetune_settings = settings.finetune_settings(arm, seed)
    eval_settings = settings.eval_settings(model_dir)
    _check_reusable(root, finetune_settings, eval_settings)
    if not (run_dir / RUN_FILE).exists():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / ARM_SETTINGS_FILE).exists():
            (root / ARM_SETTINGS_FILE).write_text(json.dumps({"finetune": asdict(finetune_settings)}, indent=2) + "\n")
        resume = last_checkpoint(run_dir) is not None
        shared_from = None if resume else _share_warmup(output, settings, arm, seed, run_dir)
        if shared_from is not None:
            (root / ARM_SETTINGS_FILE).write_text(json.dumps(
                {"finetune": asdict(finetune_settings), "warmup_shared_from": shared_from}, indent=2) + "\n")
        started = time.perf_counter()
        finetune(str(run_dir), finetune_settings, resume=resume)
        timings.record(f"seed-{seed}/{arm}/finetune", time.perf_counter() - started)
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        export_run(run_dir, model_dir)
        timings.record(f"seed-{seed}/{arm}/export", time.perf_counter() - started)
    if not (eval_dir / METRICS_FILE).exists():
        started = time.perf_counter()
        evaluate(eval_dir, eval_settings, progress=progress)
        timings.record(f"seed-{seed}/{arm}/eval", time.perf_counter() - started)
    return json.loads((eval_dir / METRICS_FILE).read_text())


def read_examples(eval_dir: Path) -> list[dict[str, Any]]:
    """The per-example rows `caft eval` wrote."""
    return read_complete_records(eval_dir / EXAMPLES_FILE, required=(), what="a per-example row of caft eval")


def arm_records(output: Path, settings: CompareSettings, arm: str, seeds: list[int] | None = None
                ) -> tuple[list[dict[str, list]], list[str]]:
    """Per-seed record sets of one arm (report name -> per-example values), and the example ids."""
    columns = _TASK_COLUMNS[settings.task]
    records, ids = [], None
    seeds = settings.arm_settings[arm].seeds if seeds is None else seeds
    for seed in seeds:
        rows = read_examples(arm_dir(output, seed, arm) / "eval")
        seed_ids = [row["id"] for row in rows]
        if ids is not None and seed_ids != ids:
            raise ValueError(f"seed {seed} of {arm} was scored on other test examples than seed {seeds[0]}")
        ids = seed_ids
        record = {name: [float(row[column]) for row in rows] for name, column in columns.items()}
        if settings.task == "molecules":
            record["answer"] = [row["canonical_smiles"] for row in rows]
        records.append(record)
    return records, ids or []


def compare_arms(output: Path, settings: CompareSettings) -> list[ArmComparison]:
    """Every CAFT arm against its baseline, paired by seed on the seeds both ran."""
    set_metrics = {"uniqueness": uniqueness_metric("answer", "validity")} if settings.task == "molecules" else {}
    comparisons = []
    for arm, baseline in settings.baselines.items():
        seeds = [seed for seed in settings.arm_settings[arm].seeds if seed in settings.arm_settings[baseline].seeds]
        base_records, base_ids = arm_records(output, settings, baseline, seeds)
        arm_records_, ids = arm_records(output, settings, arm, seeds)
        if ids != base_ids:
            raise ValueError(f"{arm} and {baseline} were scored on different test examples; remove their eval/ "
                             f"folders")
        rows = comparison_table(base_records, arm_records_, metrics=list(_TASK_COLUMNS[settings.task]),
                                set_metrics=set_metrics, n_resamples=settings.n_resamples)
        comparisons.append(ArmComparison(arm, baseline, seeds, rows))
    return comparisons


def compare(output: str, settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every arm and seed, then write the report; returns the comparisons and where they are."""
    output_dir = Path(output)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings = _Timings(output_dir / TIMINGS_FILE)
    seeds = sorted({seed for arm in settings.arm_settings.values() for seed in arm.seeds})
    for seed in seeds:  # seed by seed: a comparison stopped early already has every arm of its first seeds
        for name, arm in settings.arm_settings.items():
            if seed in arm.seeds:
                run_arm(output_dir, settings, seed, name, timings, progress)
    comparisons = compare_arms(output_dir, settings)
    write_comparison_report(output_dir, settings, comparisons, timings)
    result = _as_json({"settings": asdict(settings),
              "comparisons": [{"arm": c.arm, "baseline": c.baseline, "seeds": c.seeds,
                               "rows": [asdict(row) for row in c.rows]} for c in comparisons],
              "timings_s": timings.seconds})
    (output_dir / COMPARISON_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


@dataclass(kw_only=True)
class CompareOutput:
    output: str = setting("compare", help="the comparison folder.")


def compare_command(settings: CompareSettings, where: CompareOutput) -> dict:
    """Fine-tune with next-token loss and with CAFT on the same data, seeds and steps; evaluate every arm; report.

    Each arm is fine-tuned with `caft finetune` (its mode, method, seeds, heads and warm-up, and the shared
    settings with its own overrides), exported and scored on the same test examples with `caft eval`. Without
    --arms there are two, ntp and caft, alike in everything but the loss. `report.md` gives, for each caft arm
    against its baseline (the ntp arm of the same method unless it names one), each metric, the difference and
    its 95% confidence interval (paired bootstrap over the test examples, and over the seeds both arms ran), the
    per-seed values, and the heads' held-out top-1 accuracy before and after warm-up. Rerunning the command
    resumes: finished runs, exports and evaluations are kept when made with the same settings, an interrupted run
    continues from its last checkpoint.
    """
    result = compare(where.output, settings)
    for comparison in result["comparisons"]:
        arm, baseline = comparison["arm"], comparison["baseline"]
        print(f"{arm} against {baseline}, seeds {', '.join(map(str, comparison['seeds']))}:")
        for row in comparison["rows"]:
            print(f"  {row['metric']:<14} {baseline} {row['ntp']:.4f}  {arm} {row['caft']:.4f}  "
                  f"difference {row['difference']:+.4f}  95% CI [{row['low']:+.4f}, {row['high']:+.4f}]")
    print(f"report written to {Path(where.output) / REPORT_FILE}")
    return result
