"""`caft bench precision`: bf16 autocast against float32 over the first steps of a real fine-tuning run.

Both sides are the same `caft finetune` run (data, seed, mode, heads, schedule over the whole run), one with
`mixed_precision="no"` and one with `"bf16"`, each in a fresh process so that its peak memory is its own, each
stopped after `steps` optimisation steps. The learning-rate and gamma schedules are those of the full run, not
of a run `steps` long, so the steps measured are the ones the real run takes.

What it answers: how much the autocast saves (median step time and peak memory, bf16 / float32) and whether the
training losses stay close enough to float32's to trust it: the largest relative difference, over the logged
steps and the heads, of each head's training loss, checked against a tolerance.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..evaluation.charts import head_loss_series
from ..models import bf16_is_fast
from ..training.finetuning import FinetuneSettings, finetune
from ..training.runs import LOG_HISTORY_FILE
from .memory import memory_kind, peak_memory_bytes, reset_peak_memory
from .settings import PRECISIONS


def step_timer_and_stop(steps: int, device: str = "cpu"):
    """A TrainerCallback that times every optimisation step, ends training after `steps` of them, and starts the
    peak-memory measurement (`memory.reset_peak_memory`) when training starts, after loading and warm-up."""
    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak_memory(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._started)
            if state.global_step >= steps:
                control.should_training_stop = True
            return control

    return StepTimer()


def run_side(settings: FinetuneSettings, steps: int, output: str) -> dict[str, Any]:
    """Run one side in this process: `settings` fine-tuned for `steps` steps into `output`, losses logged at
    every step, without head warm-up. Returns the step times, the process's peak memory during training and the
    training loss of each head per step."""
    # the head warm-up is not what is measured: it would run before the fine-tuning steps on both sides
    settings = replace(settings, logging_steps=1, save_steps=10**9, eval_steps=10**9, head_warmup="no")
    timer = step_timer_and_stop(steps, settings.device)
    summary = finetune(output, settings, callbacks=[timer])
    history = json.loads((Path(output) / LOG_HISTORY_FILE).read_text())
    train = head_loss_series(history)["train"]
    return {
        "mixed_precision": settings.mixed_precision,
        "steps": summary["optimizer_steps"],
        "step_seconds": timer.seconds,
        "median_step_seconds": statistics.median(timer.seconds),
        "peak_memory_bytes": peak_memory_bytes(settings.device),
        "memory_kind": memory_kind(settings.device),
        "train_loss_per_head": {str(k): [[step, loss] for step, loss in series] for k, series in train.items()},
        "held_out_per_head": summary["held_out_per_head"],
    }


def largest_relative_difference(reference: dict[str, list], other: dict[str, list]) -> dict[str, Any]:
    """The largest |other - reference| / reference over the steps logged by both, per head and overall.

    `reference` and `other` map a head number to `[[step, loss], ...]`, as `run_side` returns them."""
    per_head = {}
    for head, series in reference.items():
        theirs = dict(other.get(head, []))
        differences = [abs(theirs[step] - loss) / abs(loss) for step, loss in series if step in theirs and loss]
        if not differences:
            raise ValueError(f"head {head}: no step logged by both sides")
        per_head[head] = max(differences)
    return {"per_head": per_head, "largest": max(per_head.values())}


def bench_precision(settings: FinetuneSettings, steps: int = 20, tolerance: float = 0.02,
                    workdir: str | None = None) -> dict[str, Any]:
    """Run both sides, each in a fresh process, and return the ratios (bf16 / float32) with the raw figures.

    `settings` is the fine-tuning run to measure; its `mixed_precision` is replaced on each side. The run folders
    go into a new temporary folder inside `workdir` (default: the system's), removed afterwards."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance is a relative difference between 0 and 1, got {tolerance}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="caft-bench-precision-", dir=workdir) as scratch:
        for precision in PRECISIONS:
            side = replace(settings, mixed_precision=precision)
            print(f"caft bench precision: mixed_precision={precision}, {steps} steps in a fresh process...",
                  file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "caftkit.bench.precision", json.dumps(asdict(side)), str(steps),
                       str(Path(scratch) / precision)]
            completed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if completed.returncode != 0:
                raise RuntimeError(f"the mixed_precision={precision} side failed:\n{completed.stderr[-4000:]}")
            results[precision] = json.loads(completed.stdout.strip().splitlines()[-1])
    reference, bf16 = results["no"], results["bf16"]
    losses = largest_relative_difference(reference["train_loss_per_head"], bf16["train_loss_per_head"])
    return {
        "model": settings.model,
        "data": settings.data,
        "mode": settings.mode,
        "method": settings.method,
        "device": settings.device,
        "bf16_native": bf16_is_fast(settings.device),
        "steps": steps,
        "time_ratio": bf16["median_step_seconds"] / reference["median_step_seconds"],
        "peak_memory_ratio": bf16["peak_memory_bytes"] / reference["peak_memory_bytes"],
        "memory_kind": reference["memory_kind"],
        "largest_relative_loss_difference": losses["largest"],
        "relative_loss_difference_per_head": losses["per_head"],
        "tolerance": tolerance,
        "within_tolerance": losses["largest"] <= tolerance,
        "float32": reference,
        "bf16": bf16,
    }


if __name__ == "__main__":
    settings_json, step_count, run_output = sys.argv[1:]
    measured = run_side(FinetuneSettings(**json.loads(settings_json)), int(step_count), run_output)
    print(json.dumps(measured))


