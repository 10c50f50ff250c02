"""`caft compare`: CAFT against next-token fine-tuning on the same data, seeds, steps and evaluation.

For each seed, both arms are fine-tuned with identical settings (`caft finetune --mode ntp` and `--mode caft`,
both LoRA or both full), exported, and scored on the same test examples with `caft eval`. The report gives each
metric for both arms, the difference caft - ntp and its paired bootstrap confidence interval
(`comparison_report`).

The folder is resumable: a finished fine-tuning run, export or evaluation is not redone, an interrupted
fine-tuning run resumes from its last checkpoint, and an interrupted evaluation keeps its answers.

    <output>/seed-<s>/<arm>/run/     the fine-tuning run (`caft finetune`)
    <output>/seed-<s>/<arm>/model/   the exported model (`caft export`)
    <output>/seed-<s>/<arm>/eval/    metrics.json, examples.jsonl (`caft eval`)
    <output>/timings.json            wall time of every stage that ran
    <output>/report.md, report.png, comparison.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .comparison_report import comparison_table, uniqueness_metric, write_report
from .export import export_run
from .finetuning import RUN_FILE, FinetuneSettings, finetune
from .resumable_jsonl import read_complete_records
from .task_eval import EXAMPLES_FILE, METRICS_FILE, EvalSettings, evaluate

ARMS = ("ntp", "caft")
TIMINGS_FILE = "timings.json"
REPORT_FILE = "report.md"
CHART_FILE = "report.png"
COMPARISON_FILE = "comparison.json"

# What each task's report compares: the per-example columns of `examples.jsonl` (report name -> column).
_TASK_COLUMNS = {
    "molecules": {"validity": "valid", "formula_match": "formula_match", "group_recall": "group_recall",
                  "groups_match": "groups_match", "exact_match": "exact_match", "tanimoto": "tanimoto"},
    "humaneval": {"pass@1": "passed"},
}
DEFINITIONS = {
    "molecules": {
        "validity": "the answer parses as a molecule (RDKit).",
        "formula_match": "the molecule has exactly the requested molecular formula.",
        "group_recall": "fraction of the requested functional groups present (0 for an invalid answer).",
        "groups_match": "every requested functional group is present.",
        "exact_match": "the canonical SMILES equals the reference molecule's.",
        "tanimoto": "Tanimoto similarity to the reference of Morgan fingerprints (radius 2, 2048 bits); 0 when "
                    "invalid.",
        "uniqueness": "distinct valid molecules / valid answers.",
    },
    "humaneval": {"pass@1": "the greedy completion passes the problem's tests."},
}


@dataclass
class CompareSettings:
    """What `compare` trains and evaluates; every arm and seed shares all of it but the mode and the seed."""

    train_data: str
    model: str = "smollm2-135m-instruct"
    task: str = "molecules"
    test_data: str | None = None
    test_examples: int | None = 500
    heads: str | None = None
    head_warmup: str = "yes"
    method: str = "lora"
    seeds: list[int] = field(default_factory=lambda: [0])
    finetune: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    eval_batch_size: int = 16
    n_resamples: int = 10000
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self):
        if self.task not in _TASK_COLUMNS:
            raise ValueError(f"caft compare scores generated answers: task must be one of "
                             f"{', '.join(_TASK_COLUMNS)}, got {self.task!r}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        reserved = {"model", "data", "mode", "method", "seed", "heads", "head_warmup", "dtype", "device"}
        clash = sorted(reserved & set(self.finetune))
        if clash:
            raise ValueError(f"finetune settings {clash} are set by compare itself; use its own keys")
        unknown = sorted(set(self.finetune) - set(FinetuneSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown finetune settings {unknown}; see `caft finetune --help`")

    def finetune_settings(self, mode: str, seed: int) -> FinetuneSettings:
        """The fine-tuning settings of one arm and seed."""
        return FinetuneSettings(model=self.model, data=self.train_data, mode=mode, method=self.method, seed=seed,
                                heads=self.heads if mode == "caft" else None,
                                head_warmup=self.head_warmup if mode == "caft" else "no", dtype=self.dtype,
                                device=self.device, **self.finetune)


class _Timings:
    """Wall time of each stage, kept on disk so that a resumed comparison reports the stages it did not redo."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 1)
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")


def _arm_dir(output: Path, seed: int, arm: str) -> Path:
    return output / f"seed-{seed}" / arm


def run_arm(output: Path, settings: CompareSettings, seed: int, arm: str, timings: _Timings,
            progress: bool = True) -> dict[str, Any]:
    """Fine-tune, export and evaluate one arm and seed, skipping what an earlier invocation finished."""
    root = _arm_dir(output, seed, arm)
    run_dir, model_dir, eval_dir = root / "run", root / "model", root / "eval"
    if not (run_dir / RUN_FILE).exists():
        from transformers.trainer_utils import get_last_checkpoint

        resume = run_dir.is_dir() and get_last_checkpoint(str(run_dir)) is not None
        started = time.perf_counter()
        finetune(str(run_dir), settings.finetune_settings(arm, seed), resume=resume)
        timings.record(f"seed-{seed}/{arm}/finetune", time.perf_counter() - started)
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        export_run(run_dir, model_dir)
        timings.record(f"seed-{seed}/{arm}/export", time.perf_counter() - started)
    if not (eval_dir / METRICS_FILE).exists():
        started = time.perf_counter()
        evaluate(eval_dir, EvalSettings(model=str(model_dir), task=settings.task, data=settings.test_data,
                                        max_examples=settings.test_examples, max_new_tokens=settings.max_new_tokens,
                                        batch_size=settings.eval_batch_size, dtype=settings.dtype,
                                        device=settings.device), progress=progress)
        timings.record(f"seed-{seed}/{arm}/eval", time.perf_counter() - started)
    return json.loads((eval_dir / METRICS_FILE).read_text())


def read_examples(eval_dir: Path) -> list[dict[str, Any]]:
    """The per-example rows `caft eval` wrote."""
    return read_complete_records(eval_dir / EXAMPLES_FILE, required=(), what="a per-example row of caft eval")


def arm_records(output: Path, settings: CompareSettings, arm: str) -> tuple[list[dict[str, list]], list[str]]:
    """Per-seed record sets of one arm (report name -> per-example values), and the example ids."""
    columns = _TASK_COLUMNS[settings.task]
    records, ids = [], None
    for seed in settings.seeds:
        rows = read_examples(_arm_dir(output, seed, arm) / "eval")
        seed_ids = [row["id"] for row in rows]
        if ids is not None and seed_ids != ids:
            raise ValueError(f"seed {seed} of {arm} was scored on other test examples than seed {settings.seeds[0]}")
        ids = seed_ids
        record = {name: [float(row[column]) for row in rows] for name, column in columns.items()}
        if settings.task == "molecules":
            record["answer"] = [row["canonical_smiles"] for row in rows]
        records.append(record)
    return records, ids or []


def _budget(output: Path, settings: CompareSettings) -> dict[str, Any]:
    run = json.loads((_arm_dir(output, settings.seeds[0], "caft") / "run" / RUN_FILE).read_text())
    used = run["settings"]
    return {"training examples": run["train_examples"], "held-out examples": run["held_out_examples"],
            "optimizer steps per run": run["optimizer_steps"], "epochs": used["epochs"],
            "batch size": used["batch_size"] * used["grad_accum"], "learning rate": used["learning_rate"]}


def compare(output: str, settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every arm and seed, then write the report; returns the table and where it is."""
    output_dir = Path(output)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings = _Timings(output_dir / TIMINGS_FILE)
    for seed in settings.seeds:
        for arm in ARMS:
            run_arm(output_dir, settings, seed, arm, timings, progress)

    ntp, ntp_ids = arm_records(output_dir, settings, "ntp")
    caft, caft_ids = arm_records(output_dir, settings, "caft")
    if ntp_ids != caft_ids:
        raise ValueError("the two arms were scored on different test examples; remove their eval/ folders")
    set_metrics = {"uniqueness": uniqueness_metric("answer", "validity")} if settings.task == "molecules" else {}
    rows = comparison_table(ntp, caft, metrics=list(_TASK_COLUMNS[settings.task]), set_metrics=set_metrics,
                            n_resamples=settings.n_resamples)
    context = {
        "base model": settings.model,
        "task": settings.task,
        "training data": settings.train_data,
        "test data": f"{settings.test_data or 'default'} ({len(ntp_ids)} examples)",
        "method": settings.method,
        "seeds": settings.seeds,
        "caft heads": f"{settings.heads or 'copies of the last layer'}, warm-up: {settings.head_warmup}",
        "budget (same for both arms)": _budget(output_dir, settings),
        "fine-tuning overrides": settings.finetune or "none",
        "wall time (s)": {arm: round(sum(v for k, v in timings.seconds.items() if f"/{arm}/" in k), 1)
                          for arm in ARMS},
    }
    write_report(output_dir / REPORT_FILE, output_dir / CHART_FILE, rows, context,
                 definitions={name: text for name, text in DEFINITIONS[settings.task].items()})
    result = {"settings": asdict(settings), "rows": [asdict(row) for row in rows], "timings_s": timings.seconds}
    (output_dir / COMPARISON_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
