"""The report of a `caft compare` folder: the arms, a summary, one section and chart per CAFT arm, the heads.

It reads what the comparison wrote (`<output>/seed-<s>/<arm>/run/caft_run.json`, the warm-up heads) and the rows of
`bootstrap.comparison_table`; it trains and scores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.heads import HEADS_CONFIG_FILE
from ..evaluation.bootstrap import ComparisonRow
from ..evaluation.comparison_report import (
    format_context,
    format_value,
    plot_differences,
    reading_section,
    results_section,
)
from ..evaluation.paired import read_examples
from ..files.atomic import write_text_atomically
from ..files.json_text import read_json_file
from ..tasks.registry import get_task
from ..training.finetuning import RUN_FILE, WARMUP_HEADS_DIR

if TYPE_CHECKING:  # the settings live with the comparison, which imports this module
    from .compare import CompareSettings

REPORT_FILE = "report.md"


def arm_dir(output: Path, seed: int, arm: str) -> Path:
    """The folder of one arm and seed."""
    return output / f"seed-{seed}" / arm


def run_summary(output: Path, seed: int, arm: str) -> dict[str, Any]:
    return read_json_file(arm_dir(output, seed, arm) / "run" / RUN_FILE)


def _budget(run: dict[str, Any]) -> dict[str, Any]:
    used = run["settings"]
    return {"training examples": run["train_examples"], "held-out examples": run["held_out_examples"],
            "optimizer steps per run": run["optimizer_steps"], "epochs": used["epochs"],
            "batch size": used["batch_size"] * used["grad_accum"], "learning rate": used["learning_rate"]}


@dataclass
class ArmComparison:
    """One CAFT arm against its baseline, over the seeds both ran."""

    arm: str
    baseline: str
    seeds: list[int]
    rows: list[ComparisonRow]


def _arm_overview(output: Path, settings: CompareSettings, timings) -> list[str]:
    lines = ["| arm | mode | method | seeds | heads, warm-up | own settings | baseline | wall time (s) |",
             "|---|---|---|---|---|---|---|---:|"]
    for name, arm in settings.arm_settings.items():
        heads = f"{arm.heads or 'copies of the last layer'}, {arm.head_warmup}" if arm.mode == "caft" else "-"
        own = format_context(arm.finetune) if arm.finetune else "-"
        lines.append(f"| {name} | {arm.mode} | {arm.method} | {format_context(arm.seeds)} | {heads} | {own} "
                     f"| {settings.baselines.get(name, '-')} | {timings.arm_total(name):.0f} |")
    return lines + [""]


def _summary_table(comparisons: list[ArmComparison], settings: CompareSettings) -> list[str]:
    """Each metric of every arm: the mean over its seeds in the comparison, with the per-seed values."""
    values: dict[str, dict[str, tuple[float, tuple[float, ...], bool]]] = {}
    for comparison in comparisons:
        for row in comparison.rows:
            values.setdefault(row.metric, {})
            values[row.metric].setdefault(comparison.baseline, (row.ntp, row.ntp_per_seed, row.percent))
            values[row.metric][comparison.arm] = (row.caft, row.caft_per_seed, row.percent)
    arms = [name for name in settings.arm_settings if any(name in by_arm for by_arm in values.values())]
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for metric, by_arm in values.items():
        cells = []
        for name in arms:
            mean, per_seed, percent = by_arm[name]
            seeds = f" ({', '.join(format_value(v, percent) for v in per_seed)})" if len(per_seed) > 1 else ""
            cells.append(format_value(mean, percent) + seeds)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines + [""]


def _held_out_table(output: Path, settings: CompareSettings) -> list[str]:
    """The main head's held-out loss and top-1 accuracy at the end of each arm's fine-tuning, per seed: a smoother
    signal than the task metrics, which greedy decoding makes jumpy from seed to seed."""
    lines = ["| arm | seeds | next-token loss | mean | top-1 accuracy | mean |", "|---|---|---|---:|---|---:|"]
    for name, arm in settings.arm_settings.items():
        heads = [run_summary(output, seed, name)["held_out_per_head"]["head_1"] for seed in arm.seeds]
        losses, accuracies = [head["loss"] for head in heads], [head["accuracy"] for head in heads]
        lines.append(f"| {name} | {format_context(arm.seeds)} | {', '.join(f'{v:.4f}' for v in losses)} | "
                     f"{sum(losses) / len(losses):.4f} | {', '.join(f'{v:.4f}' for v in accuracies)} | "
                     f"{sum(accuracies) / len(accuracies):.4f} |")
    return lines + [""]


def _heads_table(output: Path, settings: CompareSettings) -> list[str]:
    """Held-out top-1 accuracy of each auxiliary head of every CAFT run: at the start (the given heads on the task),
    after the warm-up, and at the end of fine-tuning (the heads frozen, the model moved under them)."""
    lines = []
    for name, arm in settings.arm_settings.items():
        if arm.mode != "caft":
            continue
        for seed in arm.seeds:
            run = run_summary(output, seed, name)
            record = run.get("head_warmup") or {}
            warm_config = arm_dir(output, seed, name) / "run" / WARMUP_HEADS_DIR / HEADS_CONFIG_FILE
            training = read_json_file(warm_config).get("training", {}) if warm_config.exists() else {}
            start = training.get("held_out_before") or record.get("held_out_at_start") or {}
            warmed = training.get("held_out_after") or {}
            end = run.get("held_out_per_head", {})
            for head in sorted((h for h in end if h != "head_1"), key=lambda h: int(h.split("_")[1])):
                k = int(head.split("_")[1])
                cell = [start.get(head, {}).get("accuracy"), warmed.get(head, {}).get("accuracy"),
                        end[head].get("accuracy")]
                text = ["-" if value is None else f"{value:.3f}" for value in cell]
                lines.append(f"| {name} | {seed} | t+{k} | {text[0]} | {text[1]} | {text[2]} |")
    if not lines:
        return []
    return ["| arm | seed | head | top-1 at start | after warm-up | after fine-tuning |",
            "|---|---:|---|---:|---:|---:|",
            *lines, ""]


def write_comparison_report(output: Path, settings: CompareSettings, comparisons: list[ArmComparison],
                            timings, ln_lines: list[str] = ()) -> Path:
    """Write `report.md` (context, arms, summary, one section per CAFT arm with its chart, heads, the Ln diagnostic's
    `ln_lines`) and the charts."""
    first = next(iter(settings.arm_settings))
    first_seed = settings.arm_settings[first].seeds[0]
    first_rows = read_examples(arm_dir(output, first_seed, first) / "eval")
    n_examples = len(first_rows)
    context = {
        "base model": settings.model,
        "task": settings.task,
        "training data": settings.data,
        "test data": f"{settings.test_data or 'default'} ({n_examples} examples)",
        "budget (every run)": _budget(run_summary(output, first_seed, first)),
        "shared fine-tuning settings": settings.finetune or "defaults",
        "evaluation": f"greedy, batch {settings.eval_batch_size}, dtype {settings.dtype}",
    }
    lines = ["# CAFT against next-token fine-tuning", "", "## Context", ""]
    lines += [f"- **{key}**: {format_context(value)}" for key, value in context.items()]
    lines += ["", "## Arms", ""] + _arm_overview(output, settings, timings)
    if comparisons:
        lines += ["## Summary", "", "Each arm's mean over the seeds it is compared on; per-seed values in brackets.",
                  ""] + _summary_table(comparisons, settings)
    else:
        lines += ["No CAFT arm, so no difference to report: each arm's metrics are in "
                  "`seed-<s>/<arm>/eval/metrics.json`.", ""]
    for comparison in comparisons:
        title = f"{comparison.arm} against {comparison.baseline}"
        chart = f"report-{comparison.arm}.png"
        plot_differences(comparison.rows, output / chart, title=f"{comparison.arm} - {comparison.baseline} per metric",
                         difference=f"{comparison.arm} - {comparison.baseline}")
        lines += [f"## {title}", ""]
        lines += results_section(comparison.rows, comparison.baseline, comparison.arm)
        lines += reading_section(comparison.rows, comparison.baseline, comparison.arm)
        lines += [f"![{comparison.arm} - {comparison.baseline} per metric, with "
                  f"{100 * comparison.rows[0].confidence:g}% CI]({chart})", ""]
    lines += ["## Held-out next-token loss", "",
              "The main head on the held-out split of the training data at the end of fine-tuning (every arm's "
              "own split: the same examples for the same seed).", ""] + _held_out_table(output, settings)
    heads = _heads_table(output, settings)
    if heads:
        lines += ["## Auxiliary heads: held-out top-1 accuracy", "",
                  "On the held-out split of the training data: the given heads at the start, after the warm-up on "
                  "the task (eq. 3, the base frozen), and at the end of fine-tuning (the heads frozen while the model "
                  "moved under them).", ""] + heads
    lines += list(ln_lines)
    lines += ["## Definitions", ""]
    lines += [f"- **{metric.name}**: {metric.definition}" + (f" Unit: {metric.unit}." if metric.unit else "")
              for metric in get_task(settings.task).report_metrics(first_rows)]
    path = output / REPORT_FILE
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path
