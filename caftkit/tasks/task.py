"""The `Task` interface: what `caft data`, `caft eval --task`, `caft compare`, the charts and the demo need of a task.

A task says how its records are made (`data_command` with its `data_settings`: the `caft data <name>` command), which
examples it is scored on (`examples`, with `default_test_data`), how an answer is scored (`score`: the metrics of
`metrics.json` and one row per example in `examples.jsonl`), and what a comparison reports (`report_metrics`: each
metric's per-example column, or its function over the answers, whether it is a rate or a score in its own units,
and its one-line definition). Nothing here loads a model: `caft eval` generates the answers and hands them to the
task. A task is registered by one line in `registry.py` (or `register_task` at run time).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

from ..data import DataError, skipped_text, to_messages


@dataclass(frozen=True)
class TaskExample:
    """One prompt to answer: its id, the chat messages, the reference answer's text (the assistant turn a record
    gives, used to score the heads' losses on held-out task data; None when the task has none), and what
    scoring needs to know about it."""

    id: str
    messages: list[dict[str, str]]
    reference: dict[str, Any]
    answer: str | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The prompt and its reference answer as one conversation (the answer as the assistant's last turn)."""
        if self.answer is None:
            raise ValueError(f"{self.id}: the example has no reference answer")
        return [*self.messages, {"role": "assistant", "content": self.answer}]


def reference_records(records: Iterable[tuple[str, dict[str, Any]]], max_examples: int | None = None
                      ) -> Iterator[tuple[str, dict[str, Any], list[dict[str, str]]]]:
    """`(where, record, messages)` of the first `max_examples` records (None: all), each a conversation whose last
    turn is the assistant's reference answer; one that is not raises `DataError` naming where it is."""
    for where, record in islice(records, max_examples):
        messages = to_messages(record, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(where, "the last turn must be the assistant's reference answer", "messages")
        yield where, record, messages


@dataclass
class RecordStats:
    """What building a task's records found: items read, records written, and each reason an item was skipped."""

    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self, what: str, output: str | os.PathLike, source: str) -> str:
        """`12 records written to F from 15 molecules read; skipped: 3 duplicate molecule` (`source`: what was read)."""
        return f"{self.written} {what} written to {output} from {self.read} {source}; skipped: " \
               f"{skipped_text(self.skipped)}"


@dataclass(frozen=True)
class ReportMetric:
    """A metric a comparison reports, from the per-example `column` of `examples.jsonl`:

    - by default the column's mean over the examples;
    - with `within=(other, value)`, its mean over the examples whose column `other` equals `value` (a breakdown);
    - with `distinct_of=answer_column`, the distinct values of `answer_column` among the examples where `column` is
      true, over their number (uniqueness of the valid answers).

    A `rate` is a fraction of the examples (shown in percent, differences in percentage points); otherwise a score
    in `unit`. `definition` is the report's one line about it."""

    name: str
    definition: str
    column: str
    rate: bool = True
    unit: str = ""
    within: tuple[str, Any] | None = None
    distinct_of: str | None = None

    def __post_init__(self):
        if not self.rate and not self.unit:
            raise ValueError(f"metric {self.name}: a score needs its unit")
        if self.within is not None and self.distinct_of is not None:
            raise ValueError(f"metric {self.name}: a breakdown (within) or a uniqueness (distinct_of), not both")

    @property
    def per_example(self) -> bool:
        """Whether the metric is a plain mean of its column (else it is recomputed on the whole set of answers)."""
        return self.within is None and self.distinct_of is None


class Task(ABC):
    """A task caftkit fine-tunes and evaluates on. Subclasses set the class attributes and implement `examples`,
    `score` and `report_metrics`; the rest has defaults."""

    #: the name of `--task` and of `caft data <name>`
    name: ClassVar[str]
    #: one line for the command help: what the model is asked and how it is scored
    summary: ClassVar[str]
    #: what `--data` reads when it is not given (None: the task needs `--data`)
    default_test_data: ClassVar[str | None] = None
    #: most new tokens per answer when `--max-new-tokens` is not given
    max_new_tokens: ClassVar[int] = 256
    #: the settings class of `caft data <name>`, and the function that runs it (its docstring is the help);
    #: None for a task that builds no records
    data_settings: ClassVar[type | None] = None
    data_command: ClassVar[Callable[[Any], dict] | None] = None

    @abstractmethod
    def examples(self, source: str | None, max_examples: int | None, seed: int) -> list[TaskExample]:
        """The examples of `source` (None: `default_test_data`), the first `max_examples` of them (None: all);
        `seed` orders examples drawn from a larger set. Bad input raises `DataError` naming file, line and field."""

    def before_generation(self, settings: Any) -> None:
        """Refuse, before any answer is generated, what would make scoring impossible (`settings`: `caft eval`'s).
        Nothing by default: most tasks score any answer."""
        return None

    @abstractmethod
    def score(self, examples: list[TaskExample], answers: Mapping[str, str], settings: Any,
              progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The metrics of `metrics.json` and one row per example for `examples.jsonl` (`id` first), from the answers
        (example id -> text). `settings` are `caft eval`'s, for tasks with settings of their own."""

    @abstractmethod
    def report_metrics(self, rows: Sequence[Mapping[str, Any]]) -> list[ReportMetric]:
        """What a comparison of two arms reports, in order, given the rows one arm's evaluation wrote (a task whose
        metrics depend on the test set, such as a breakdown by answer length, reads it from them)."""

    def headline_metrics(self) -> dict[str, str]:
        """`metrics.json` keys -> labels: the few metrics a short summary (the demo's table) shows."""
        return {}
