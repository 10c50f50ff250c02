"""Plots of training logs: per-head loss curves from a Trainer's `log_history`."""

from __future__ import annotations

import os
import re
from pathlib import Path

_HEAD_LOSS = re.compile(r"^(eval_)?loss_head_(\d+)$")


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Lay out `figure`, write it as a PNG to `path` (parent folders created) and free it."""
    import matplotlib.pyplot as plt

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


def plot_head_losses(log_history: list[dict], path: str | os.PathLike, title: str = "Per-head loss") -> Path:
    """Write a PNG of each head's training loss (lines) and held-out loss (markers) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    series = head_loss_series(log_history)
    heads = sorted(set(series["train"]) | set(series["eval"]))
    if not heads:
        raise ValueError("the log has no per-head losses to plot")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, k in enumerate(heads):
        colour = colours[i % len(colours)]
        label = "main head (t+1)" if k == 1 else f"head {k} (t+{k})"
        if k in series["train"]:
            steps, losses = zip(*series["train"][k])
            axes.plot(steps, losses, color=colour, label=f"{label} train")
        if k in series["eval"]:
            steps, losses = zip(*series["eval"][k])
            axes.plot(steps, losses, color=colour, marker="o", linestyle="--", label=f"{label} held-out")
    axes.set_xlabel("optimisation step")
    axes.set_ylabel("cross-entropy (nats)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return save_figure(figure, path)
