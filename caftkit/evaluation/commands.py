"""The `caft eval` and `caft compare-evals` commands.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

import dataclasses
import textwrap

from ..tasks.registry import get_task, task_names
from .settings import LOSS, CompareEvalsSettings, EvalOutput, EvalSettings


def eval_command(settings: EvalSettings, where: EvalOutput) -> dict:
    """Score a model on a task and write `metrics.json` and the per-example results; print a table.

    The tasks are listed below (each registered task, then loss). Answers are greedy and are appended to
    `generations.jsonl` as they come: rerunning the command resumes.
    """
    from ..files.outputs import output_folder
    from .paired import MetricInterval, format_intervals
    from .task_eval import evaluate, format_metrics

    output = where.output or f"eval-{settings.task}"
    with output_folder(output, "eval"):
        result = evaluate(output, settings)
    print(format_metrics(result["metrics"]))
    if result.get("intervals"):
        print(format_intervals([MetricInterval(**interval) for interval in result["intervals"]]))
    print(f"results written to {output}")
    return result


def compare_evals_command(settings: CompareEvalsSettings) -> dict:
    """The paired difference of two evaluations of one task on the same test examples: for each metric the task
    reports, OTHER minus BASELINE with its 95% percentile bootstrap interval (the test examples resampled alike for
    both). Reads the folders `caft eval` wrote; evaluates nothing."""
    from .paired import compare_evaluations, format_paired

    task, rows = compare_evaluations(settings.baseline, settings.other, settings.n_resamples)
    print(format_paired(rows, settings.baseline, settings.other))
    return {"task": task, "rows": [dataclasses.asdict(row) for row in rows]}


def eval_tasks_help() -> str:
    """The tasks of `caft eval --task`, one paragraph each: what each registered task scores, then `loss`."""
    summaries = {name: get_task(name).summary for name in task_names()}
    summaries[LOSS] = ("each head's loss and top-1 accuracy over the assistant tokens of --data (with --heads, the "
                       "auxiliary heads too)")
    return "tasks:\n" + "\n".join(textwrap.fill(f"{name}: {summary}.", width=100, initial_indent="  ",
                                                subsequent_indent="    ") for name, summary in summaries.items())
