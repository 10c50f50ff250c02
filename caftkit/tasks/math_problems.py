"""The math task: word problems and arithmetic whose answer is a number; scored by exact match of the final number.

In the tokenizers of small models such as SmolLM2 every digit is a token of its own, so a four-digit number is a
four-token concept: the kind of concept CAFT's auxiliary heads are meant to help with. The problems are generated
offline and seeded by `reasoning-gym` (the `math` extra: `pip install 'caftkit[math]'`):

- `gsm_symbolic`: GSM8K-derived templates with new names and numbers (GSM-Symbolic); the assistant's answer is the
  worked solution, ending in `#### <number>`.
- `chain_sum`: sums and differences of `--min-terms`..`--max-terms` numbers of `--min-digits`..`--max-digits`
  digits; the assistant answers with the number.
- `products`: products of such numbers; the assistant answers with the number.

reasoning-gym draws problem i of seed s from `Random(s + i)`, so two sets whose seeds are less than their size apart
share problems: a training set is built with `--exclude` naming the test set, and every problem whose question is
in it is left out and counted (as are repeats within the set).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ..data import DataError, iter_raw_records, to_messages
from ..files.atomic import atomic_path
from .settings import MathDataSettings
from .task import RecordStats, ReportMetric, Task, TaskExample, reference_records

# The arithmetic families' shape settings, passed to reasoning-gym as they are named there.
_SHAPE_SETTINGS = ("min_terms", "max_terms", "min_digits", "max_digits")
# A digit-count group is reported in a comparison only when the test set has this many answers of that length:
# fewer make an interval that says nothing (and a bootstrap resample could miss the group).
MIN_GROUP_EXAMPLES = 50

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL_MARK = "####"


def reasoning_gym():
    """The `reasoning_gym` package; one clear error when the `math` extra is not installed."""
    try:
        import reasoning_gym  # deferred: optional extra, caftkit[math]
    except ImportError:
        raise ImportError("the math task needs reasoning-gym: pip install 'caftkit[math]'") from None
    return reasoning_gym


def normalize_number(text: str) -> str | None:
    """A number written as text in one canonical form: thousands separators dropped, a trailing `.0` dropped,
    `-0` as `0` (`"1,234.50"` -> `"1234.5"`); None when `text` is not a number."""
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def final_number(answer: str) -> str | None:
    """The final number an answer gives, normalised: the number after the last `####` when the answer has one (the
    GSM8K convention), else the last number in the answer; None when it gives none."""
    text = answer.rsplit(_FINAL_MARK, 1)[1] if _FINAL_MARK in answer else answer
    numbers = _NUMBER.findall(text)
    for number in reversed(numbers):
        normalized = normalize_number(number)
        if normalized is not None:
            return normalized
    return None


def digit_count(number: str) -> int:
    """Digits of a normalised number's integer part, without its sign (`"-61"` -> 2, `"0.5"` -> 1)."""
    return len(number.lstrip("-").split(".")[0])


def _problems(settings: MathDataSettings, count: int, start: int) -> list[dict[str, Any]]:
    """`count` problems of the family, drawn from indices `start`.. of reasoning-gym's dataset of `settings.seed`."""
    shape = ({name: getattr(settings, name) for name in _SHAPE_SETTINGS} if settings.family != "gsm_symbolic"
             else {})
    dataset = reasoning_gym().create_dataset(settings.family, seed=settings.seed, size=start + count, **shape)
    return [dataset[index] for index in range(start, start + count)]


def math_record(problem: Mapping[str, Any], family: str, seed: int) -> dict[str, Any]:
    """The `messages` record of one reasoning-gym problem; `meta` keeps the final number, its digit count and where
    the problem came from."""
    answer = normalize_number(str(problem["answer"]))
    if answer is None:
        raise ValueError(f"reasoning-gym gave a {family} answer that is not a number: {problem['answer']!r}")
    reply = problem["metadata"]["answer_cot"] if family == "gsm_symbolic" else answer
    return {"messages": [{"role": "user", "content": problem["question"]},
                         {"role": "assistant", "content": reply}],
            "meta": {"answer": answer, "digits": digit_count(answer), "family": family, "seed": seed,
                     "index": problem["metadata"]["source_index"]}}


def _excluded_questions(paths: Sequence[str]) -> set[str]:
    return {to_messages(record, where)[0]["content"] for path in paths for where, record in iter_raw_records(path)}


def iter_math_records(settings: MathDataSettings, stats: RecordStats) -> Iterator[dict[str, Any]]:
    """`settings.n` records of distinct problems, none of them in the `exclude` files, drawn in index order."""
    excluded = _excluded_questions(settings.exclude)
    seen: set[str] = set()
    start = 0
    # a small space of problems (two one-digit terms) cannot give n distinct ones: stop after this many draws
    limit = 20 * settings.n + 1000
    while stats.written < settings.n:
        if stats.read >= limit:
            raise ValueError(f"{settings.family}: only {stats.written} distinct problems in {stats.read} drawn; ask "
                             "for fewer (--n) or for larger numbers (--max-digits, --max-terms)")
        batch = _problems(settings, settings.n - stats.written, start)
        start += len(batch)
        for problem in batch:
            stats.read += 1
            question = problem["question"]
            if question in excluded:
                stats.skip("in an --exclude file")
            elif question in seen:
                stats.skip("repeat")
            else:
                seen.add(question)
                stats.written += 1
                yield math_record(problem, settings.family, settings.seed)


def math_data_command(settings: MathDataSettings) -> dict:
    """Build math records (`messages` JSONL) with reasoning-gym: GSM-Symbolic word problems or arithmetic.

    The user asks the problem; the assistant answers with the worked solution ending in `#### <number>`
    (gsm_symbolic) or with the number (chain_sum, products). A `meta` field keeps the final number, its digit
    count, the family, the seed and the problem's index. Problems are drawn in index order from the seed;
    repeats, and problems whose question is in an --exclude file (the test set, when building training data),
    are skipped and counted. Needs the math extra: pip install 'caftkit[math]'.
    """
    stats = RecordStats()
    output = Path(settings.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as staging, staging.open("w", encoding="utf-8") as handle:
        for record in iter_math_records(settings, stats):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(stats.summary(f"{settings.family} records", output, "problems drawn"))
    return stats.__dict__


def write_math_records(output: str | os.PathLike, **settings: Any) -> dict:
    """`caft data math` from Python: `write_math_records("test.jsonl", family="chain_sum", n=2000, seed=10**6)`."""
    return math_data_command(MathDataSettings(output=str(output), **settings))


class MathTask(Task):
    """Answer a math problem with a number; exact match of the final number, also by the answer's digit count."""

    name = "math"
    summary = ("greedy answers to math problems (`caft data math`), scored by exact match of the final number "
               "(after '####' when the answer has one, else the last number; thousands separators and a trailing .0 "
               "ignored), overall and by the digit count of the reference answer")
    default_test_data = None  # a test set is built with `caft data math` from a committed config
    max_new_tokens = 256  # a worked solution; arithmetic answers are a few tokens and stop at the end of the turn

    data_settings = MathDataSettings
    data_command = staticmethod(math_data_command)

    def examples(self, source: str | None, max_examples: int | None, seed: int = 0) -> list[TaskExample]:
        """The problems of a JSONL file of math records (`caft data math`, or any `messages` records whose last
        assistant turn ends with the answer), in file order; `seed` is not used."""
        if source is None:
            raise ValueError("--task math needs --data: a test set written by `caft data math` (configs/math/ holds "
                             "the committed ones)")
        examples = []
        for where, record, messages in reference_records(iter_raw_records(source), max_examples):
            meta = record.get("meta") or {}
            given = meta.get("answer")
            answer = normalize_number(str(given)) if given is not None else final_number(messages[-1]["content"])
            if answer is None:
                field_name = "meta.answer" if given is not None else "messages"
                raise DataError(where, f"no reference number in {given or messages[-1]['content']!r}", field_name)
            examples.append(TaskExample(where, messages[:-1], {"answer": answer, "digits": digit_count(answer)},
                                        answer=messages[-1]["content"]))
        if not examples:
            raise DataError(source, "no math records")
        return examples

    def score(self, examples: list[TaskExample], answers: Mapping[str, str], settings: Any = None,
              progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Exact match of each answer's final number with the reference; overall, and per digit count of the
        reference (`exact_match_<d>_digits` and `n_<d>_digits`)."""
        rows = []
        for example in examples:
            predicted = final_number(answers[example.id])
            rows.append({"id": example.id, "prompt": example.messages[-1]["content"], "output": answers[example.id],
                         "reference": example.reference["answer"], "predicted": predicted,
                         "answered": predicted is not None, "exact_match": predicted == example.reference["answer"],
                         "digits": example.reference["digits"]})
        n = len(rows)
        metrics: dict[str, float] = {"n": n, "exact_match": sum(row["exact_match"] for row in rows) / n,
                                     "answered": sum(row["answered"] for row in rows) / n}
        for digits in sorted({row["digits"] for row in rows}):
            group = [row for row in rows if row["digits"] == digits]
            metrics[f"n_{digits}_digits"] = len(group)
            metrics[f"exact_match_{digits}_digits"] = sum(row["exact_match"] for row in group) / len(group)
        return metrics, rows

    def report_metrics(self, rows: Sequence[Mapping[str, Any]]) -> list[ReportMetric]:
        metrics = [ReportMetric("exact_match", "the final number of the answer equals the reference's.", "exact_match"),
                   ReportMetric("answered", "the answer gives a number at all.", "answered")]
        counts: dict[int, int] = {}
        for row in rows:
            counts[row["digits"]] = counts.get(row["digits"], 0) + 1
        for digits, count in sorted(counts.items()):
            if count >= MIN_GROUP_EXAMPLES:
                metrics.append(ReportMetric(f"exact_match_{digits}_digits",
                                            f"exact match on the {count} problems whose answer has {digits} digits.",
                                            "exact_match", within=("digits", digits)))
        return metrics

    def headline_metrics(self) -> dict[str, str]:
        return {"exact_match": "exact match", "answered": "gives a number"}
