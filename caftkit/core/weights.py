"""How much each head's loss counts: the training modes, the schedules of gamma over a run, the per-head weights.

Plain Python, without torch: the settings that name a mode or a schedule are read and checked by the command line
before anything heavy is imported.
"""

from __future__ import annotations

import math

SCHEDULES = ("rsine", "sine", "linear", "constant")
MODES = ("caft", "ntp", "heads")


def gamma_schedule(name: str, step: int, total_steps: int, end: float = 1.0) -> float:
    """Value of the auxiliary-loss schedule gamma at `step` of `total_steps`.

    The schedule runs over the first `end` of the run (a fraction in (0, 1]) and gamma is 0 after it, so that with
    `end` < 1 the auxiliary weight reaches zero early (a curriculum from multi-token to next-token prediction).
    With `total = end * total_steps`:
    - `rsine` (reflected sine, the paper's default): `sin(pi/2 * (1 - step/total))`, 1 at the start, 0 at the end.
    - `sine`: `sin(pi/2 * step/total)`, 0 at the start, 1 at the end.
    - `linear`: `1 - step/total`.
    - `constant`: 1.
    """
    if not 0.0 < end <= 1.0:
        raise ValueError(f"the schedule's end must be in (0, 1], got {end}")
    if end < 1.0 and step >= end * total_steps:
        return 0.0
    span = end * total_steps
    progress = min(max(step / span, 0.0), 1.0) if span > 0 else 0.0
    if name == "rsine":
        return math.sin(math.pi / 2 * (1.0 - progress))
    if name == "sine":
        return math.sin(math.pi / 2 * progress)
    if name == "linear":
        return 1.0 - progress
    if name == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


def head_loss_weights(
    mode: str, num_aux_heads: int, *, alpha: float = 0.8, beta: float = 0.01, gamma: float = 1.0
) -> list[float]:
    """Weight of each head's mean cross-entropy in the training loss; index 0 is the main head (k = 1).

    There are n = `num_aux_heads` + 1 heads. For mode
    - `ntp`: `L = CE_1` (plain next-token fine-tuning);
    - `heads` (paper eq. 3): `L = sum_{k=2..n} alpha^(k-2) CE_k`, the main head only logged;
    - `caft` (paper eq. 4): `L = CE_1 + beta * gamma * sum_{k=2..n} alpha^(k-1) CE_k`.
    """
    last = num_aux_heads + 1  # heads k = 1 (the main one) .. last
    if mode == "ntp":
        return [1.0] + [0.0] * num_aux_heads
    if mode == "heads":
        return [0.0] + [alpha ** (k - 2) for k in range(2, last + 1)]
    if mode == "caft":
        return [1.0] + [beta * gamma * alpha ** (k - 1) for k in range(2, last + 1)]
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
