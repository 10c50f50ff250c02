"""Plots of training logs: per-head loss curves from a Trainer's `log_history`."""

from __future__ import annotations

import os
import re
from pathlib import Path

_HEAD_LOSS = re.compile(r"^(eval_)?loss_head_(\d+)$")


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Lay out `figure` (unless it has a layout engine of its own), write it as a PNG to `path` (parent folders
    created) and free it."""
    import matplotlib.pyplot as plt  # deferred: matplotlib, and its process-wide backend, only where a chart is drawn

    if figure.get_layout_engine() is None:
        figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def head_loss_series(log_history: list[dict]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """`{"train"|"eval": {k: [(step, loss), ...]}}` of every `loss_head_k` / `eval_loss_head_k` in the log."""
    series: dict[str, dict[int, list[tuple[int, float]]]] = {"train": {}, "eval": {}}
    for entry in log_history:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            match = _HEAD_LOSS.match(key)
            if match:
                split = "eval" if match.group(1) else "train"
                series[split].setdefault(int(match.group(2)), []).append((step, float(value)))
    return series


# Where a Trainer log keeps the schedules drawn beside the losses: the learning rate, and CAFT's gamma.
SCHEDULE_KEYS = {"learning_rate": "learning rate", "caft_gamma": "gamma (auxiliary-loss weight)"}
# A series with this many points or fewer gets markers: a single logged value drawn as a line is invisible.
_SPARSE_POINTS = 12


def schedule_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """`{key: [(step, value), ...]}` of every key of `SCHEDULE_KEYS` the log holds."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        for key in SCHEDULE_KEYS:
            if key in entry:
                series.setdefault(key, []).append((int(entry.get("step", 0)), float(entry[key])))
    return series


def _draw(axes, points: list[tuple[int, float]], **style):
    steps, values = zip(*points)
    marker = style.pop("marker", "o" if len(points) <= _SPARSE_POINTS else None)
    return axes.plot(steps, values, marker=marker, markersize=4, **style)[0]


def plot_head_losses(log_history: list[dict], path: str | os.PathLike, title: str = "Per-head loss") -> Path:
    """Write `head_losses_figure` of the log as a PNG to `path`."""
    return save_figure(head_losses_figure(log_history, title), path)


def head_losses_figure(log_history: list[dict], title: str = "Per-head loss"):
    """A figure with one panel per head (training loss as a line, held-out loss dashed with markers, against the
    step) and a panel for the learning rate and gamma where the log has them; one legend, outside the panels.
    Series of few points get markers, so that a value logged once is seen."""
    # deferred: matplotlib, and its process-wide backend, only where a chart is drawn
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen

    series = head_loss_series(log_history)
    heads = sorted(set(series["train"]) | set(series["eval"]))
    if not heads:
        raise ValueError("the log has no per-head losses to plot")
    schedules = schedule_series(log_history)
    panels = len(heads) + bool(schedules)
    columns = min(3, panels)
    rows = -(-panels // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.8 * columns, 2.9 * rows + 0.8), squeeze=False,
                                sharex=True, layout="constrained")
    cells = list(grid.flat)
    legend = {}
    for axes, k in zip(cells, heads):
        if k in series["train"]:
            legend["training"] = _draw(axes, series["train"][k], color="C0")
        if k in series["eval"]:
            legend["held-out"] = _draw(axes, series["eval"][k], color="C3", marker="o", linestyle="--")
        axes.set_title("main head (t+1)" if k == 1 else f"head {k} (t+{k})", fontsize=10)
        axes.grid(alpha=0.3)
    for axes in grid[:, 0][: -(-len(heads) // columns)]:
        axes.set_ylabel("cross-entropy (nats)")
    if schedules:
        axes = cells[len(heads)]
        axes.set_title("schedules", fontsize=10)
        if "learning_rate" in schedules:
            legend[SCHEDULE_KEYS["learning_rate"]] = _draw(axes, schedules["learning_rate"], color="C2")
            axes.set_ylabel("learning rate")
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if "caft_gamma" in schedules:
            gamma_axes = axes.twinx() if "learning_rate" in schedules else axes
            legend[SCHEDULE_KEYS["caft_gamma"]] = _draw(gamma_axes, schedules["caft_gamma"], color="C1")
            gamma_axes.set_ylabel("gamma")
        axes.grid(alpha=0.3)
    for index in range(panels, rows * columns):
        grid.flat[index].set_visible(False)
        # the panel above an empty cell is the lowest of its column: it shows the step axis
        grid.flat[index - columns].xaxis.set_tick_params(labelbottom=True)
        grid.flat[index - columns].set_xlabel("optimisation step")
    for axes in grid[-1]:
        axes.set_xlabel("optimisation step")
    figure.suptitle(title)
    figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=len(legend), fontsize=9)
    return figure
