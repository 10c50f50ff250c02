"""What the training runs share: `caft train-heads`, `caft finetune` and the head warm-up inside it.

Each run refuses to mix with an earlier run's checkpoints unless resuming it, reads and checks its data before it
loads the model, holds out a seeded split to measure each head on, trains a `CAFTTrainer` that logs where asked and
rotates only the checkpoints it wrote, and keeps its log history with a plot of the per-head losses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data import TokenizedData, tokenize_source
from ..evaluation.charts import plot_head_losses
from ..files.atomic import write_json
from ..models import check_positions, load_model, load_tokenizer
from .checkpoints import ClaimedCheckpointRotation, last_checkpoint
from .settings import RunSettings
from .tracking import tracking_callbacks
from .trainer import CAFTTrainer

# Where head training keeps its checkpoints inside its output folder (a fine-tuning run keeps them at its top).
CHECKPOINTS_DIR = "checkpoints"
LOG_HISTORY_FILE = "log_history.json"


def split_held_out(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random split into (train, held-out); the held-out part has at least one example."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {fraction}")
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples to hold one out, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    size = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held_out = sorted(order[:size])
    kept = sorted(order[size:])
    return [examples[i] for i in kept], [examples[i] for i in held_out]


def per_head_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """`{"head_2": {"loss": ..., "accuracy": ...}, ...}` from evaluation metrics (`eval_loss_head_k`, ...)."""
    heads = {}
    for key, value in metrics.items():
        if key.startswith("eval_loss_head_"):
            k = int(key.rsplit("_", 1)[1])
            heads[f"head_{k}"] = {"loss": value, "accuracy": metrics.get(f"eval_accuracy_head_{k}")}
    return dict(sorted(heads.items(), key=lambda item: int(item[0].split("_")[1])))


def checkpoint_to_resume(checkpoints_dir: Path, resume: bool, earlier_run: bool = False) -> str | None:
    """The checkpoint a run continues from: with `resume`, the last complete one in `checkpoints_dir` (an error if
    there is none); without, None, once the folder is seen to hold no earlier run the new one would mix with (a
    checkpoint, or what the caller found of one: `earlier_run`)."""
    checkpoint = last_checkpoint(checkpoints_dir)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"{checkpoints_dir}: no checkpoint to resume from")
    if not resume and (checkpoint is not None or earlier_run):
        raise ValueError(f"{checkpoints_dir}: holds an earlier run: resume it (--resume) or choose a new output "
                         "folder")
    return checkpoint if resume else None


@dataclass
class RunData:
    """A run's tokenizer, its data tokenized and checked, and the split of it into training and held-out examples."""

    tokenizer: Any
    data: TokenizedData
    train_examples: list[dict]
    held_out: list[dict]

    def record(self) -> dict[str, Any]:
        """What a run's summary says of its data: the examples in each split, the records read and those dropped
        or truncated."""
        return {
            "train_examples": len(self.train_examples),
            "held_out_examples": len(self.held_out),
            "data": {"records": self.data.stats.read, "dropped_or_truncated": self.data.stats.skipped},
        }

    def trainer(self, model, args, callbacks: list, peft_config=None):
        """A `CAFTTrainer` of `model` with `args` (a `CAFTConfig`) on the training split, evaluating on the held-out
        one."""
        return CAFTTrainer(model, args, train_dataset=Dataset.from_list(self.train_examples),
                           eval_dataset=Dataset.from_list(self.held_out), processing_class=self.tokenizer,
                           peft_config=peft_config, callbacks=callbacks)


def load_run_data(settings: RunSettings, model=None, tokenizer=None, *, packed: bool = False) -> tuple[RunData, Any]:
    """A run's data (`settings.data` tokenized with the tokenizer given or `settings.model`'s, checked against the
    model's positions and split) and then its model (given, or loaded): bad input fails before the model loads.
    A tokenizer without a pad token pads with its end-of-sequence token. `packed`: sequences are packed to
    `--max-length` whatever each conversation's length."""
    if tokenizer is None:
        tokenizer = load_tokenizer(settings.model, settings.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = tokenize_source(settings.data, tokenizer, settings.max_length, settings.completion_only)
    longest = max(len(example["input_ids"]) for example in data.examples)
    check_positions(settings.model if model is None else model, settings.max_length if packed else longest,
                    settings.data)
    train_examples, held_out = split_held_out(data.examples, settings.eval_fraction, settings.seed)
    if model is None:
        model = load_model(settings.model, settings.dtype, **settings.model_kwargs())
    return RunData(tokenizer, data, train_examples, held_out), model


def run_callbacks(settings: RunSettings, output: Path, checkpoints_dir: Path) -> list:
    """The callbacks every run's Trainer has: logging where `settings.report_to` asks (into the output folder
    `output`), and the rotation of the checkpoints it writes into `checkpoints_dir` (only those)."""
    return [*tracking_callbacks(settings.report_to, output),
            ClaimedCheckpointRotation(output, checkpoints_dir, settings.save_total_limit)]


def write_log_history(history: list[dict], folder: Path, plot_file: str, title: str) -> None:
    """The Trainer's log history into `folder` as `log_history.json`, and its per-head losses as the plot
    `plot_file`."""
    write_json(folder / LOG_HISTORY_FILE, history, indent=1)
    plot_head_losses(history, folder / plot_file, title=title)
