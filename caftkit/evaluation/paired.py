"""Confidence intervals of one evaluation's metrics, and the paired difference of two evaluations of the same test
examples, from the per-example rows `caft eval` writes (`examples.jsonl`): what `caft eval` prints with its
metrics, what `caft compare-evals` prints, and how `caft compare` pairs its arms.

Each metric is one the task reports (`Task.report_metrics`): the mean of a per-example column, or a metric of the
whole set of answers (a breakdown, a uniqueness) recomputed on every bootstrap resample of the test examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files.json_text import read_json_file
from ..files.resumable_jsonl import read_complete_records
from ..tasks.registry import get_task, task_names
from ..tasks.task import ReportMetric
from .bootstrap import (
    ComparisonRow,
    SetMetric,
    comparison_table,
    draw_resamples,
    in_chunks,
    subset_mean_metric,
    uniqueness_metric,
)
from .comparison_report import format_difference, format_value

# The per-example rows and the metrics record of a `caft eval` folder.
EXAMPLES_FILE = "examples.jsonl"
METRICS_FILE = "metrics.json"
# Raw columns a set-level metric reads are kept in a record under this prefix, apart from the metrics' own names.
_COLUMN = "column:"


def read_examples(eval_dir: Path) -> list[dict[str, Any]]:
    """The per-example rows `caft eval` wrote into `eval_dir`."""
    return read_complete_records(eval_dir / EXAMPLES_FILE, required=(), what="a per-example row of caft eval")


def task_records(rows: Sequence[Mapping[str, Any]], metrics: Sequence[ReportMetric]) -> dict[str, list]:
    """One evaluation's record set for the bootstrap: each per-example metric's values by name, and the raw columns
    the set-level metrics read."""
    columns = {name for metric in metrics if not metric.per_example
               for name in (metric.column, metric.distinct_of, metric.within and metric.within[0]) if name}
    record: dict[str, list] = {metric.name: [float(row[metric.column]) for row in rows] for metric in metrics
                               if metric.per_example}
    record.update({_COLUMN + name: [row[name] for row in rows] for name in columns})
    return record


def set_metric(metric: ReportMetric) -> SetMetric:
    """The bootstrap's function of a metric computed on the whole set of answers."""
    if metric.distinct_of is not None:
        return uniqueness_metric(_COLUMN + metric.distinct_of, _COLUMN + metric.column)
    where_column, value = metric.within
    return subset_mean_metric(_COLUMN + metric.column, _COLUMN + where_column, value)


def paired_rows(baseline: Sequence[Mapping[str, list]], other: Sequence[Mapping[str, list]],
                metrics: Sequence[ReportMetric], n_resamples: int) -> list[ComparisonRow]:
    """`ComparisonRow`s of `other` against `baseline` (record sets per seed, paired by seed and by example), one per
    metric, rates in percent."""
    return comparison_table(list(baseline), list(other),
                            metrics=[metric.name for metric in metrics if metric.per_example],
                            set_metrics={metric.name: set_metric(metric) for metric in metrics
                                         if not metric.per_example},
                            percent={metric.name for metric in metrics if metric.rate}, n_resamples=n_resamples)


@dataclass(frozen=True)
class MetricInterval:
    """A metric of one evaluation with its percentile bootstrap interval over the test examples."""

    metric: str
    value: float
    low: float
    high: float
    rate: bool
    confidence: float
    n_examples: int
    n_resamples: int


def metric_intervals(rows: Sequence[Mapping[str, Any]], metrics: Sequence[ReportMetric], n_resamples: int,
                     confidence: float = 0.95, seed: int = 0) -> list[MetricInterval]:
    """Each metric of the rows with its `confidence` interval: the test examples resampled with replacement
    (`draw_resamples(len(rows), 1, n_resamples, seed)`, the same draws for every metric), the interval the
    quantiles of the resampled values (a breakdown with no example in a resample is left out of it)."""
    resamples = draw_resamples(len(rows), 1, n_resamples, seed)
    record = task_records(rows, metrics)
    intervals = []
    for metric in metrics:
        if metric.per_example:
            values = np.asarray(record[metric.name], dtype=float)
            value = float(values.mean())
            resampled = in_chunks(lambda rows, values=values: values[rows].mean(axis=1), resamples.examples)
        else:
            function = set_metric(metric)
            value = function(np.arange(len(rows)), record)
            resampled = np.array([function(indices, record) for indices in resamples.examples])
        resampled = resampled[~np.isnan(resampled)]
        low, high = (np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2]) if resampled.size
                     else (float("nan"), float("nan")))
        intervals.append(MetricInterval(metric.name, value, float(low), float(high), metric.rate, confidence,
                                        len(rows), n_resamples))
    return intervals


def format_intervals(intervals: Sequence[MetricInterval]) -> str:
    """A text table: each metric, its value and its interval (rates in percent)."""
    if not intervals:
        return ""
    first = intervals[0]
    width = max(len(interval.metric) for interval in intervals)
    lines = [f"{round(100 * first.confidence)}% intervals (bootstrap over the {first.n_examples} test examples, "
             f"{first.n_resamples} resamples):"]
    for interval in intervals:
        lines.append(f"  {interval.metric:<{width}}  {format_value(interval.value, interval.rate):>8}  "
                     f"[{format_value(interval.low, interval.rate)}, {format_value(interval.high, interval.rate)}]")
    return "\n".join(lines)


def _evaluation(folder: str) -> tuple[str, list[dict[str, Any]]]:
    """The task and the per-example rows of a `caft eval` folder."""
    path = Path(folder)
    task = read_json_file(path / METRICS_FILE).get("task")
    if task not in task_names():
        raise ValueError(f"{path / METRICS_FILE}: field 'task': {task!r} has no per-example metrics to compare "
                         f"(a task of {', '.join(task_names())} has)")
    return task, read_examples(path)


def compare_evaluations(baseline: str, other: str, n_resamples: int) -> tuple[str, list[ComparisonRow]]:
    """The task and the paired difference `other - baseline` of every metric the task reports, with its interval:
    two evaluations of the same task on the same test examples."""
    (task, baseline_rows), (other_task, other_rows) = _evaluation(baseline), _evaluation(other)
    if other_task != task:
        raise ValueError(f"{other}: an evaluation of {other_task}, and {baseline} one of {task}: compare evaluations "
                         f"of one task")
    if [row.get("id") for row in other_rows] != [row.get("id") for row in baseline_rows]:
        raise ValueError(f"{other}: scored on other test examples than {baseline} (the ids of {EXAMPLES_FILE} "
                         f"differ): evaluate both on the same --data and --max-examples")
    metrics = get_task(task).report_metrics(baseline_rows)
    return task, paired_rows([task_records(baseline_rows, metrics)], [task_records(other_rows, metrics)], metrics,
                             n_resamples)


def format_paired(rows: Sequence[ComparisonRow], baseline: str, other: str) -> str:
    """A text table of a paired comparison: both values, the difference and its interval."""
    first = rows[0]
    width = max(len(row.metric) for row in rows)
    lines = [f"{other} against {baseline}: {first.n_examples} test examples, {round(100 * first.confidence)}% "
             f"intervals from {first.n_resamples} paired resamples",
             f"  {'metric':<{width}}  {'baseline':>9}  {'other':>9}  difference [interval]"]
    for row in rows:
        lines.append(f"  {row.metric:<{width}}  {format_value(row.ntp, row.percent):>9}  "
                     f"{format_value(row.caft, row.percent):>9}  {format_difference(row.difference, row.percent)} "
                     f"[{format_difference(row.low, row.percent)}, {format_difference(row.high, row.percent)}]"
                     f"{'' if row.excludes_zero else '  (interval holds 0)'}")
    return "\n".join(lines)
