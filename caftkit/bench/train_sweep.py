"""`caft bench train --sweep`: how the cost of a CAFT step over caftkit's next-token step grows with the sequence
length, the number of auxiliary heads and the vocabulary.

One axis moves at a time from the base shape (`--seq-len`, `--num-aux-heads`, the model's vocabulary). The first
two axes run the model's own weights; the vocabulary axis runs the model's architecture with each vocabulary and
random weights (a step's cost does not depend on the values of the weights). Each point measures the `ntp` and
`caft` sides of `caft bench train`, each in fresh processes (their times and peak memory), and both steps in turn
in one more process (`ntp+caft`), whose paired time ratio is set beside CAFT's FLOP floor.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.charts import save_figure
from ..models import resolve_model_path
from .train_step import PAIRED, caft_ratios, measure_sides, step_flops

SWEEP_SIDES = ("ntp", "caft", PAIRED)
AXES = ("seq_len", "num_aux_heads", "vocab_size")
_AXIS_LABELS = {"seq_len": "sequence length (tokens)", "num_aux_heads": "auxiliary heads",
                "vocab_size": "vocabulary (tokens, random weights)"}


@dataclass(frozen=True)
class SweepPoint:
    """One step shape of the sweep; `vocab_size` None means the model's own weights and vocabulary."""

    seq_len: int
    num_aux_heads: int
    vocab_size: int | None = None


def sweep_points(seq_len: int, num_aux_heads: int, seq_lens: list[int], aux_heads: list[int],
                 vocab_sizes: list[int]) -> list[tuple[str, int, SweepPoint]]:
    """`(axis, value, point)` for every value of every axis, the other two at the base shape, in axis order."""
    return ([("seq_len", value, SweepPoint(value, num_aux_heads)) for value in seq_lens]
            + [("num_aux_heads", value, SweepPoint(seq_len, value)) for value in aux_heads]
            + [("vocab_size", value, SweepPoint(seq_len, num_aux_heads, value)) for value in vocab_sizes])


def run_sweep(model: str, batch_size: int, seq_len: int, num_aux_heads: int, seq_lens: list[int],
              aux_heads: list[int], vocab_sizes: list[int], steps: int, warmup: int, dtype: str, device: str,
              seed: int, repeats: int = 1) -> dict:
    """Measure every point of the sweep (a point on two axes, the base shape, is measured once) and return one row
    per (axis, value): both sides' median step time and peak memory, CAFT's ratios (the time ratio also from steps
    taken in turn in one process) and its FLOP floor."""
    resolve_model_path(model)  # convert the bundled model once, before the timed processes
    measured: dict[SweepPoint, dict] = {}
    rows = []
    points = sweep_points(seq_len, num_aux_heads, seq_lens, aux_heads, vocab_sizes)
    shapes = len({point for _, _, point in points})
    for axis, value, point in points:
        if point not in measured:
            weights = f"vocabulary {point.vocab_size}, random weights" if point.vocab_size else "the model's weights"
            print(f"caft bench train --sweep: shape {len(measured) + 1} of {shapes}: {point.seq_len} tokens, "
                  f"{point.num_aux_heads} auxiliary head{'s' if point.num_aux_heads != 1 else ''}, {weights}",
                  file=sys.stderr, flush=True)
            measured[point] = measure_sides(SWEEP_SIDES, model, batch_size, point.seq_len, point.num_aux_heads,
                                            steps, warmup, dtype, device, seed, repeats, point.vocab_size)
        results = measured[point]
        ratios = caft_ratios(results)["ntp"]
        floor = step_flops(model, batch_size, point.seq_len, point.num_aux_heads, point.vocab_size)["ratio"]
        rows.append({"axis": axis, "value": value, "seq_len": point.seq_len, "num_aux_heads": point.num_aux_heads,
                     "vocab_size": point.vocab_size, "weights": "model" if point.vocab_size is None else "random",
                     "ntp_step_seconds": results["ntp"]["median_step_seconds"],
                     "caft_step_seconds": results["caft"]["median_step_seconds"],
                     "ntp_peak_memory_bytes": results["ntp"]["peak_memory_bytes"],
                     "caft_peak_memory_bytes": results["caft"]["peak_memory_bytes"],
                     "time_ratio": ratios["time_ratio"], "paired_time_ratio": ratios["paired_time_ratio"],
                     "flop_floor_time_ratio": floor, "time_over_flop_floor": ratios["paired_time_ratio"] / floor,
                     "peak_memory_ratio": ratios["peak_memory_ratio"],
                     "memory_kind": results["caft"]["memory_kind"]})
    return {"model": model, "device": device, "dtype": dtype, "batch_size": batch_size, "seq_len": seq_len,
            "num_aux_heads": num_aux_heads, "steps": steps, "warmup": warmup, "repeats": repeats, "points": rows}


def sweep_table(sweep: dict) -> str:
    """The sweep as a Markdown table, one row per (axis, value)."""
    lines = ["| axis | value | ntp step | CAFT step | time ratio | paired | FLOP floor | paired over floor | ntp peak "
             "| CAFT peak | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sweep["points"]:
        lines.append(f"| {row['axis']} | {row['value']} | {row['ntp_step_seconds']:.2f} s | "
                     f"{row['caft_step_seconds']:.2f} s | {row['time_ratio']:.3f} | {row['paired_time_ratio']:.3f} | "
                     f"{row['flop_floor_time_ratio']:.3f} | {row['time_over_flop_floor']:.3f} | "
                     f"{row['ntp_peak_memory_bytes'] / 1e9:.2f} GB | {row['caft_peak_memory_bytes'] / 1e9:.2f} GB | "
                     f"{row['peak_memory_ratio']:.3f} |")
    return "\n".join(lines)


def plot_sweep(sweep: dict, path: str | os.PathLike) -> Path:
    """Draw CAFT's time ratio (steps taken in turn in one process), its FLOP floor and its peak-memory ratio over
    caftkit's next-token step along each axis of `sweep`, one panel per axis, to the PNG file `path`."""
    # deferred: matplotlib, and its process-wide backend, only where a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen

    axes_present = [axis for axis in AXES if any(row["axis"] == axis for row in sweep["points"])]
    # An axis held at the base shape is one point, the same on every panel: it gets a panel only when nothing varied.
    swept = [axis for axis in axes_present
             if len({row["value"] for row in sweep["points"] if row["axis"] == axis}) > 1]
    axes_present = swept or axes_present
    # At least 7 inches wide: the legend's one row below the panels needs it.
    figure, panels = plt.subplots(1, len(axes_present), figsize=(max(7.0, 4.5 * len(axes_present)), 4.2),
                                  squeeze=False, layout="constrained")
    for panel, axis in zip(panels[0], axes_present):
        rows = [row for row in sweep["points"] if row["axis"] == axis]
        values = [row["value"] for row in rows]
        # markers on every series: an axis may have a single value
        lines = [panel.plot(values, [row["paired_time_ratio"] for row in rows], "o-", color="C0")[0],
                 panel.plot(values, [row["flop_floor_time_ratio"] for row in rows], "_--", color="black",
                            markersize=14)[0],
                 panel.plot(values, [row["peak_memory_ratio"] for row in rows], "s-", color="C1")[0]]
        panel.axhline(1.0, color="grey", linewidth=0.8)
        if axis == "seq_len":
            panel.set_xscale("log", base=2)
        panel.set_xticks(values, [str(value) for value in values])
        panel.set_xlabel(_AXIS_LABELS[axis])
        panel.set_ylabel("CAFT / next-token step")
        panel.grid(alpha=0.3)
    figure.legend(lines, ["time ratio (paired steps)", "FLOP floor of the time ratio", "peak memory ratio"],
                  loc="outside lower center", ncol=3)
    figure.suptitle(f"{sweep['model']}, batch {sweep['batch_size']}, {sweep['dtype']}, {sweep['device']}")
    return save_figure(figure, path)
