"""The report of a comparison: `ComparisonRow`s (from `bootstrap.comparison_table`) as Markdown and a chart.

Values and differences are formatted alike everywhere (rates in percent, differences in percentage points); the
text holds nothing that is not in its arguments, so the same rows always give the same report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..files.atomic import write_text_atomically
from .bootstrap import ComparisonRow
from .charts import save_figure


def format_value(value: float, percent: bool) -> str:
    """An arm's metric for the report: `71.5%` for a rate, `0.412` otherwise."""
    return f"{_rounded(100 * value, 1):.1f}%" if percent else f"{_rounded(value, 3):.3f}"


def format_difference(value: float, percent: bool) -> str:
    """A difference for the report, signed: `+3.5 pp` (percentage points) for a rate, `-0.012` otherwise;
    a value that rounds to zero is written without a sign."""
    number = _rounded(100 * value, 1) if percent else _rounded(value, 3)
    text = f"{number:+.1f}" if percent else f"{number:+.3f}"
    if number == 0:
        text = text[1:]
    return f"{text} pp" if percent else text


def _rounded(value: float, digits: int) -> float:
    # round first so that -0.0004 prints as 0.000, not -0.000
    number = round(value, digits)
    return 0.0 if number == 0 else number


def format_context(value) -> str:
    """A context value for a report line: mappings as `key=value, ...`, lists comma-separated, floats short."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={format_context(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_context(item) for item in value)
    return str(value)


def _method(rows: Sequence[ComparisonRow]) -> tuple[float, int, int, int]:
    """The (confidence, n_examples, n_seeds, n_resamples) shared by every row."""
    settings = {(row.confidence, row.n_examples, row.n_seeds, row.n_resamples) for row in rows}
    if len(settings) != 1:
        raise ValueError(f"the rows come from different bootstraps (confidence, examples, seeds, resamples): "
                         f"{sorted(settings)}")
    return settings.pop()


def report_markdown(rows: Sequence[ComparisonRow], context: Mapping, *, definitions: Mapping[str, str] | None = None,
                    title: str = "CAFT vs next-token fine-tuning", chart: str | None = None) -> str:
    """The Markdown text of `write_report` (deterministic: everything in it comes from the arguments)."""
    if not rows:
        raise ValueError("no rows to report")
    lines = [f"# {title}", ""]
    if context:
        lines += ["## Context", ""]
        lines += [f"- **{key}**: {format_context(value)}" for key, value in context.items()]
        lines.append("")
    lines += ["## Results", ""] + results_section(rows)
    if definitions:
        lines += ["Definitions:", ""]
        lines += [f"- **{name}**: {text}" for name, text in definitions.items()]
        lines.append("")
    lines += ["## Reading", ""] + reading_section(rows)
    if chart is not None:
        lines += [f"![caft - ntp per metric, with {100 * rows[0].confidence:g}% CI]({chart})", ""]
    return "\n".join(lines)


def results_section(rows: Sequence[ComparisonRow], baseline: str = "ntp", arm: str = "caft") -> list[str]:
    """Markdown lines: how the interval was obtained, then the table of `rows` (each arm's value, the per-seed
    values when there are several seeds, the difference `arm - baseline` and its interval)."""
    confidence, n_examples, n_seeds, n_resamples = _method(rows)
    level = f"{100 * confidence:g}%"
    seeds = (f"{n_seeds} seeds per arm (seed k of {baseline} paired with seed k of {arm})" if n_seeds > 1
             else "one seed per arm")
    lines = [f"Both models answer the same {n_examples} test examples, {seeds}. Each arm's value is the mean over "
             f"seeds; the interval is a {level} paired percentile bootstrap interval of {arm} - {baseline} over "
             f"{n_resamples} resamples of the test examples" + (" and of the seeds." if n_seeds > 1 else ".")
             + " Rates are in percent and their differences in percentage points (pp).", ""]
    per_seed = n_seeds > 1 and all(len(row.ntp_per_seed) == len(row.caft_per_seed) == n_seeds for row in rows)
    seed_columns = f" {baseline} per seed | {arm} per seed |" if per_seed else ""
    lines += [f"| metric | {baseline} | {arm} | {arm} - {baseline} | {level} CI low | {level} CI high | CI excludes 0 |"
              + seed_columns,
              "|---|---:|---:|---:|---:|---:|:---:|" + ("---|---|" if per_seed else "")]
    for row in rows:
        line = (f"| {row.metric} | {format_value(row.ntp, row.percent)} | {format_value(row.caft, row.percent)} "
                f"| {format_difference(row.difference, row.percent)} "
                f"| {format_difference(row.low, row.percent)} | {format_difference(row.high, row.percent)} "
                f"| {'yes' if row.excludes_zero else 'no'} |")
        if per_seed:
            line += (f" {', '.join(format_value(v, row.percent) for v in row.ntp_per_seed)} "
                     f"| {', '.join(format_value(v, row.percent) for v in row.caft_per_seed)} |")
        lines.append(line)
    lines.append("")
    return lines


def reading_section(rows: Sequence[ComparisonRow], baseline: str = "ntp", arm: str = "caft") -> list[str]:
    """Markdown lines: one neutral sentence per metric saying whether its interval excludes zero."""
    level = f"{100 * _method(rows)[0]:g}%"
    lines = []
    for row in rows:
        interval = f"[{format_difference(row.low, row.percent)}, {format_difference(row.high, row.percent)}]"
        if row.percent:  # one unit for the pair: [+1.0, +6.0] pp
            interval = interval.replace(" pp", "") + " pp"
        verdict = "excludes zero" if row.excludes_zero else "contains zero"
        lines.append(f"- {row.metric}: the difference {arm} - {baseline} is "
                     f"{format_difference(row.difference, row.percent)}; its {level} CI {interval} {verdict}.")
    lines.append("")
    return lines


def plot_differences(rows: Sequence[ComparisonRow], path: str | os.PathLike,
                     title: str = "caft - ntp per metric", difference: str = "caft - ntp") -> Path:
    """Write a PNG bar chart of each metric's difference (`difference` names it) with its confidence interval.

    Rates (in percentage points) and other metrics (in their own units) get separate panels, since one axis
    cannot show both scales."""
    # deferred: matplotlib, and its process-wide backend, only where a chart is drawn
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen

    if not rows:
        raise ValueError("no rows to plot")
    confidence = _method(rows)[0]
    groups = [(unit, [row for row in rows if row.percent == is_rate])
              for unit, is_rate in (("percentage points", True), ("score, its own units", False))]
    groups = [(unit, group) for unit, group in groups if group]
    figure, axes_list = plt.subplots(1, len(groups), squeeze=False,
                                     figsize=(max(4.5, 1.2 * len(rows) + 2.5 * len(groups)), 4.2),
                                     width_ratios=[len(group) + 1 for _, group in groups])
    for axes, (unit, group) in zip(axes_list[0], groups):
        scale = 100.0 if group[0].percent else 1.0
        positions = np.arange(len(group))
        estimates = np.array([row.difference for row in group]) * scale
        lows = np.array([row.low for row in group]) * scale
        highs = np.array([row.high for row in group]) * scale
        axes.bar(positions, estimates, width=0.6, color="#4c72b0", alpha=0.8)
        # the interval is drawn as a line from low to high: a percentile interval need not contain the estimate,
        # which error bars (lengths either side of the bar) could not show
        axes.vlines(positions, lows, highs, color="black", linewidth=1.5)
        axes.scatter(np.concatenate([positions, positions]), np.concatenate([lows, highs]), marker="_", s=120,
                     color="black", zorder=3)
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_xticks(positions, [row.metric for row in group], rotation=20, ha="right")
        axes.set_xlim(-0.7, len(group) - 0.3)
        axes.set_ylabel(f"{difference} ({unit})")
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{title} ({100 * confidence:g}% CI)")
    return save_figure(figure, path)


def write_report(path_md: str | os.PathLike, path_png: str | os.PathLike, rows: Sequence[ComparisonRow],
                 context: Mapping, *, definitions: Mapping[str, str] | None = None,
                 title: str = "CAFT vs next-token fine-tuning") -> tuple[Path, Path]:
    """Write the Markdown report of a comparison and its bar chart; return both paths.

    The report has the title, a context section (each `context` item on a line, in order: budget, settings,
    wall times, ...), the table of `rows`, the `definitions` of the metrics if given (one line each), one neutral
    sentence per metric saying whether its interval excludes zero, and the chart (linked by a path relative to the
    report). Nothing that is not in the arguments (no date, no timing) goes into the text."""
    path_md, path_png = Path(path_md), Path(path_png)
    plot_differences(rows, path_png)
    chart = Path(os.path.relpath(path_png.resolve(), path_md.resolve().parent)).as_posix()
    text = report_markdown(rows, context, definitions=definitions, title=title, chart=chart)
    path_md.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path_md, text)
    return path_md, path_png


__all__ = ["format_context", "format_difference", "format_value", "plot_differences", "reading_section",
           "report_markdown", "results_section", "write_report"]
