"""The task evaluations of an exported model's card: the Hub's `model-index` metadata and the "Evaluation" section.

Each value is read from a `caft eval` folder (`evaluation_record.TaskEvaluation`) of this model: the metrics the task
reports, each with its 95% interval over the test examples, how many examples, and how the answers were decoded.
The metadata holds every finite value as recorded; the text shows rates in percent, as `caft eval` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from huggingface_hub import EvalResult

from ..evaluation.comparison_report import format_value
from ..evaluation.evaluation_record import TaskEvaluation

# The Hub's task type of every evaluation: the answers are generated text.
TASK_TYPE = "text-generation"


def dataset_name(evaluation: TaskEvaluation) -> str:
    """How the `model-index` names the test data of an evaluation: the task and what `--data` read."""
    return f"{evaluation.task} ({evaluation.test_data})"


def eval_results(evaluations: Sequence[TaskEvaluation]) -> list:
    """The `huggingface_hub.EvalResult`s of the card's `model-index`: one per metric of each evaluation whose value
    is a number (a breakdown with no example in it has none). The dataset's type is the task (its test data is a
    local file or a source caftkit reads, not a Hub dataset), its name the task and the test data."""
    return [EvalResult(task_type=TASK_TYPE, dataset_type=evaluation.task,
                       dataset_name=dataset_name(evaluation), metric_type=interval.metric,
                       metric_name=evaluation.labels[interval.metric], metric_value=interval.value)
            for evaluation in evaluations for interval in evaluation.intervals if math.isfinite(interval.value)]


def _shown(value: float, rate: bool) -> str:
    return format_value(value, rate) if math.isfinite(value) else "n/a"


def decoding(evaluation: TaskEvaluation) -> str:
    """How the evaluation's answers were decoded, as the card's table says it."""
    return f"greedy, at most {evaluation.max_new_tokens} new tokens, weights in {evaluation.dtype}"


def evaluation_lines(evaluations: Sequence[TaskEvaluation]) -> list[str]:
    """The card's "Evaluation" section: one table row per metric, then where each row comes from and what each
    metric means."""
    confidences = sorted({interval.confidence for evaluation in evaluations for interval in evaluation.intervals})
    header = "/".join(f"{round(100 * confidence)}%" for confidence in confidences)
    lines = ["## Evaluation", "",
             "Scored by `caft eval` on task test data; each row is read from the `metrics.json` of the evaluation "
             f"named below. The {header} interval is a percentile bootstrap over the test examples (resampled with "
             "replacement): how much the value depends on which examples were drawn.", "",
             f"| task | test data | metric | value | {header} interval | examples | decoding |",
             "|---|---|---|---|---|---|---|"]
    for evaluation in evaluations:
        for interval in evaluation.intervals:
            lines.append(f"| {evaluation.task} | `{evaluation.test_data}` | {interval.metric} | "
                         f"{_shown(interval.value, interval.rate)} | [{_shown(interval.low, interval.rate)}, "
                         f"{_shown(interval.high, interval.rate)}] | {interval.n_examples} | {decoding(evaluation)} |")
    lines += ["", "Evaluations:", ""]
    lines += [f"- `{evaluation.folder}`: {evaluation.task} on `{evaluation.test_data}`, the model `{evaluation.model}`"
              f" ({evaluation.intervals[0].n_resamples} bootstrap resamples)" for evaluation in evaluations]
    # per task: two tasks may name different metrics alike (exact_match)
    definitions = {(evaluation.task, interval.metric): evaluation.definitions[interval.metric]
                   for evaluation in evaluations for interval in evaluation.intervals
                   if interval.metric in evaluation.definitions}
    if definitions:
        lines += ["", "Metrics:", "", *(f"- {task}, {name}: {text}" for (task, name), text in definitions.items())]
    return lines
