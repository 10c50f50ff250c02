"""A `caft eval` folder read back as a finished evaluation of a task: what a model card reports of it.

Everything comes from the folder's own files, which are only read (never repaired or extended): `metrics.json` (the
task, the settings, the export record of the model scored, each metric's value with its interval) and
`examples.jsonl` (which metrics the task reports on these examples, and their definitions).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files.json_text import decode_utf8, parse_json, read_json_file
from ..tasks.registry import get_task, task_names
from .paired import EXAMPLES_FILE, METRICS_FILE, MetricInterval
from .settings import LOSS

_INTERVAL_FIELDS = {field.name for field in dataclasses.fields(MetricInterval)}


@dataclass(frozen=True)
class TaskEvaluation:
    """One `caft eval --task` folder: the task, the test data, the model scored and how, and each metric the task
    reports with its interval."""

    folder: str
    task: str
    #: what `--data` read: the path or source given, or the task's default
    test_data: str
    #: the model as `caft eval --model` named it, and its `caft_export.json` (None: it is no `caft export` folder)
    model: str
    model_export: dict[str, Any] | None
    max_new_tokens: int
    dtype: str
    intervals: tuple[MetricInterval, ...]
    #: metric name -> the task's label for it (its own name when the task has none)
    labels: dict[str, str]
    #: metric name -> the task's one-line definition
    definitions: dict[str, str]


def _field(record: dict[str, Any], name: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}: field '{name}': missing or not what `caft eval` writes")
    return value


def _rows(path: Path) -> list[dict[str, Any]]:
    """The per-example rows of `examples.jsonl`, read without touching the file (a cut-off line is an error here)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the metrics of an evaluation are read with their examples")
    text = decode_utf8(path.read_bytes(), path)
    rows = [parse_json(line, f"{path}:{number}") for number, line in enumerate(text.split("\n"), start=1) if line]
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: holds a line that is not a JSON object; expected the rows `caft eval` writes")
    return rows


def read_task_evaluation(folder: str | os.PathLike) -> TaskEvaluation:
    """The evaluation `caft eval --task` wrote into `folder`; one line naming the file and field where it is not one
    (no `metrics.json`, the heads' `--task loss`, an unknown task, no intervals)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {folder} a folder `caft eval` wrote?")
    record = read_json_file(path, "the metrics `caft eval` writes")
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a JSON object; expected the metrics `caft eval` writes")
    task = record.get("task")
    if task == LOSS:
        raise ValueError(f"{path}: field 'task': {LOSS}, the heads' losses on conversations; a model card reports "
                         f"evaluations of a task ({', '.join(task_names())})")
    if task not in task_names():
        raise ValueError(f"{path}: field 'task': {task!r} is not a registered task ({', '.join(task_names())})")
    settings = _field(record, "settings", dict, path)
    intervals = record.get("intervals")
    if not intervals:
        raise ValueError(f"{path}: field 'intervals': none recorded (a caftkit before the intervals wrote it): run "
                         "the same `caft eval` command again to add them (the answers are kept, not generated again)")
    if not isinstance(intervals, list) or not all(isinstance(item, dict) and set(item) == _INTERVAL_FIELDS
                                                  for item in intervals):
        raise ValueError(f"{path}: field 'intervals': not the intervals `caft eval` writes")
    model_export = record.get("model_export")
    scored = get_task(task)
    definitions = {metric.name: metric.definition
                   for metric in scored.report_metrics(_rows(Path(folder) / EXAMPLES_FILE))}
    return TaskEvaluation(
        folder=str(folder), task=task,
        test_data=settings.get("data") or scored.default_test_data or f"the {task} task's bundled test set",
        model=_field(settings, "model", str, path), model_export=model_export if isinstance(model_export, dict)
        else None, max_new_tokens=_field(settings, "max_new_tokens", int, path),
        dtype=_field(settings, "dtype", str, path), intervals=tuple(MetricInterval(**item) for item in intervals),
        labels={item["metric"]: scored.headline_metrics().get(item["metric"], item["metric"]) for item in intervals},
        definitions=definitions)
