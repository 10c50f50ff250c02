"""Where a training run logs besides the console: transformers' integrations (`--report-to`), with tensorboard's
event files kept inside the command's own output.

transformers writes them under the Trainer's `output_dir`; for `caft train-heads` that is the checkpoints folder,
removed when training ends, so the curves would go with it. Here tensorboard writes to `<output>/tensorboard`
instead, for head training, its task warm-up and fine-tuning alike: `tensorboard --logdir <output>` shows them.
"""

from __future__ import annotations

from pathlib import Path

TENSORBOARD = "tensorboard"
# The folder of a command's output that holds tensorboard's event files.
TENSORBOARD_DIR = "tensorboard"


def trainer_report_to(report_to: list[str]) -> list[str]:
    """The integrations the Trainer sets up itself: all but tensorboard, which `tracking_callbacks` adds."""
    return [name for name in report_to if name != TENSORBOARD]


def tracking_callbacks(report_to: list[str], output: str | Path) -> list:
    """The callbacks that log to tensorboard in `output/tensorboard` (none unless it was asked for)."""
    if TENSORBOARD not in report_to:
        return []
    from transformers.integrations import TensorBoardCallback  # deferred: caft starts without transformers

    class TensorBoardInOutput(TensorBoardCallback):
        """transformers' tensorboard logging, into one folder of the command's output. The folder is set where
        transformers reads it (the `TENSORBOARD_LOGGING_DIR` variable, a process-wide setting, is not used): every
        writer the callback opens goes there, including the one for an evaluation after training ended."""

        def __init__(self, log_dir: Path):
            super().__init__()
            self.logging_dir = str(log_dir)

    return [TensorBoardInOutput(Path(output) / TENSORBOARD_DIR)]
