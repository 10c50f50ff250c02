"""Training the auxiliary heads (paper eq. 3): the base frozen and run without gradients, only the heads learn.

Used twice in the CAFT flow: once per base model on self-distilled general data (`caft distill` output), and
as the task warm-up, one epoch on a task's own training set starting from those heads (`init`). The result is
a `heads/` folder (weights, config with the training metadata and each head's held-out loss and accuracy
before and after, and a PNG of the per-head loss curves).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..core.distributed import is_main_process, launch_record, wait_for_everyone
from ..core.heads import HEADS_ATTRIBUTE, HEADS_CONFIG_FILE, attach_heads, check_heads_fit, get_heads, save_heads
from ..data import tokenize_source
from ..evaluation.charts import plot_head_losses
from ..files.atomic import write_json
from ..files.outputs import OUTPUT_MARKER, claim, output_folder, remove_claimed
from ..models import check_positions, load_model, load_tokenizer, resolve_device, resolve_mixed_precision
from .checkpoints import ClaimedCheckpointRotation
from .settings import HeadTrainingSettings, trainer_arguments
from .tracking import TENSORBOARD_DIR, tracking_callbacks

CHECKPOINTS_DIR = "checkpoints"
LOSS_CURVES_FILE = "loss_curves.png"
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


# The command whose marker a heads folder it trained holds.
TRAIN_HEADS_COMMAND = "train-heads"
_CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
TRAINER_STATE_FILE = "trainer_state.json"


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _is_complete_checkpoint(path: Path) -> bool:
    """Whether `path` holds a whole `trainer_state.json`. The Trainer writes it last and not atomically: a run
    killed while writing it leaves the file empty or cut short, which no longer parses as one JSON object."""
    try:
        return isinstance(json.loads((path / TRAINER_STATE_FILE).read_bytes()), dict)
    except (OSError, ValueError):
        return False


def last_checkpoint(directory: Path) -> str | None:
    """The newest complete `checkpoint-N` folder in `directory`, or None.

    A folder without a whole `trainer_state.json` (written last) is a checkpoint a killed run was still writing,
    and resuming from it would fail, so the one before it is taken."""
    if not Path(directory).is_dir():
        return None
    found = sorted((path for path in Path(directory).iterdir() if _CHECKPOINT_NAME.fullmatch(path.name)),
                   key=_checkpoint_step)
    complete = [path for path in found if _is_complete_checkpoint(path)]
    newest = complete[-1] if complete else None
    skipped = [path.name for path in found if newest is None or _checkpoint_step(path) > _checkpoint_step(newest)]
    if skipped:
        which = "which lacks a whole" if len(skipped) == 1 else "which lack a whole"
        them = "it" if len(skipped) == 1 else "them"
        warnings.warn(f"{directory}: skipping {', '.join(skipped)}, {which} {TRAINER_STATE_FILE} (a run killed "
                      f"while writing {them}); the last complete checkpoint is {newest.name if newest else 'none'}",
                      UserWarning, stacklevel=2)
    return str(newest) if newest else None


def train_heads(output: str, settings: HeadTrainingSettings, *, resume: bool = False,
                keep_checkpoints: bool = False, progress: bool = True, model=None, tokenizer=None
                ) -> dict[str, Any]:
    """Train auxiliary heads on `settings.data` and write them to the folder `output`.

    Checkpoints go to `output/checkpoints/` while training runs (removed at the end unless
    `keep_checkpoints`); `resume=True` continues from the last one. `model` and `tokenizer` may be given
    already loaded (`settings.model` is then only recorded); the heads stay attached to the model, and its other
    parameters get back the `requires_grad` they came with (training freezes them). `output` must be new, empty,
    or a folder of `caft train-heads` (`outputs.output_folder`); it is locked while training runs. Returns the
    held-out metrics before and after training and what the data held.
    """
    with output_folder(output, TRAIN_HEADS_COMMAND, main_process=is_main_process()):
        return _train_heads(Path(output), settings, resume, keep_checkpoints, progress, model, tokenizer)


def _train_heads(output_dir: Path, settings: HeadTrainingSettings, resume: bool, keep_checkpoints: bool,
                 progress: bool, model, tokenizer) -> dict[str, Any]:
    from datasets import Dataset

    from .trainer import CAFTConfig, CAFTTrainer

    run_dir = output_dir / CHECKPOINTS_DIR
    checkpoint = last_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    if not resume and last_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir}: holds checkpoints of an earlier run: resume it (--resume) or choose a new output")
    if not resume and output_dir.is_dir() and any(
            path not in (run_dir, output_dir / OUTPUT_MARKER, output_dir / TENSORBOARD_DIR)
            for path in output_dir.iterdir()):
        raise ValueError(f"{output_dir}: already exists and is not empty: choose a new output folder (the heads "
                         "written there would replace what it holds)")
    if settings.init and model is None:  # a model given is checked against the heads' fingerprint as they attach
        check_heads_fit(settings.init, settings.model)

    if tokenizer is None:
        tokenizer = load_tokenizer(settings.model, settings.chat_template)
    # The data is read and checked before the model is loaded: bad input fails fast.
    data = tokenize_source(settings.data, tokenizer, settings.max_length, settings.completion_only)
    check_positions(settings.model if model is None else model,
                    max(len(example["input_ids"]) for example in data.examples), settings.data)
    train_examples, held_out = split_held_out(data.examples, settings.eval_fraction, settings.seed)
    if model is None:
        model = load_model(settings.model, settings.dtype, **settings.model_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Eq. 3 freezes the base. A model passed in gets its flags back at the end: the task warm-up inside
    # `caft finetune` goes on to fine-tune this very model.
    trainable_before = {name for name, param in model.named_parameters() if param.requires_grad}
    attach_heads(model, settings.init if settings.init else settings.num_aux_heads, trainable=True)
    heads = get_heads(model)
    num_aux_heads = min(settings.num_aux_heads, heads.num_aux_heads) if settings.init else heads.num_aux_heads

    args = CAFTConfig(
        mode="heads",
        num_aux_heads=num_aux_heads,
        alpha=settings.alpha,
        trunk_cache_gb=settings.trunk_cache_gb,
        activation_checkpointing=False,  # the base runs without gradients; the heads are one layer each
        disable_tqdm=not progress,
        # The held-out split is measured before the first step inside `train()` (it is then in the log history,
        # which checkpoints keep for a resumed run). Calling `evaluate()` before `train()` instead would leave
        # the model unwrapped by DDP: accelerate marks it prepared for evaluation.
        eval_on_start=checkpoint is None,
        **trainer_arguments(settings, str(run_dir), len(train_examples)),
    )
    if is_main_process():
        claim(output_dir, CHECKPOINTS_DIR)
    rotation = ClaimedCheckpointRotation(output_dir, run_dir, settings.save_total_limit)
    trainer = CAFTTrainer(model, args, train_dataset=Dataset.from_list(train_examples),
                          eval_dataset=Dataset.from_list(held_out), processing_class=tokenizer,
                          callbacks=[*tracking_callbacks(settings.report_to, output_dir), rotation])
    trainer.train(resume_from_checkpoint=checkpoint)
    history = trainer.state.log_history
    start = next((entry for entry in history if entry.get("step") == 0 and "eval_loss_head_2" in entry), None)
    if start is None:
        raise RuntimeError(f"{run_dir}: the log history has no held-out measurement before training")
    before = per_head_metrics(start)
    last_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss_head_2" in entry), None)
    if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
        after = per_head_metrics(last_eval)  # the held-out split was just measured on the final heads
    else:
        after = per_head_metrics(trainer.evaluate())
    for name, param in model.named_parameters():
        if f"{HEADS_ATTRIBUTE}." not in name:
            param.requires_grad_(name in trainable_before)

    device = resolve_device(settings.device)
    summary = {
        "settings": asdict(settings),
        "train_examples": len(train_examples),
        "held_out_examples": len(held_out),
        "data": {"records": data.stats.read, "dropped_or_truncated": data.stats.skipped},
        "device": device,
        "launch": launch_record(trainer.accelerator),
        "mixed_precision": resolve_mixed_precision(settings.mixed_precision, device),
        "trunk_cache": None if trainer.trunk_cache is None else {
            "batches": len(trainer.trunk_cache), "gb": round(trainer.trunk_cache.bytes / 2**30, 3),
            "hits": trainer.trunk_cache.hits, "misses": trainer.trunk_cache.misses},
        "optimizer_steps": trainer.state.global_step,
        "train_runtime_s": round(sum(e.get("train_runtime", 0.0) for e in trainer.state.log_history), 1),
        "held_out_before": before,
        "held_out_after": after,
    }
    save_heads(get_heads(model), output_dir, training=summary)
    if is_main_process():
        write_json(output_dir / LOG_HISTORY_FILE, history, indent=1)
        plot_head_losses(history, output_dir / LOSS_CURVES_FILE,
                         title=f"Head training on {Path(settings.data).name}: per-head loss")
        if not keep_checkpoints:
            remove_claimed(output_dir, CHECKPOINTS_DIR)
    wait_for_everyone()  # the heads folder is complete before any process goes on to read it
    return summary


def format_head_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    """A plain-text table of each head's held-out loss and top-1 accuracy before and after training."""
    lines = [f"{'head':<8}{'predicts':>9}{'loss before':>13}{'loss after':>12}{'acc before':>12}{'acc after':>11}"]
    for name in after:
        k = int(name.split("_")[1])
        b, a = before.get(name, {}), after[name]
        lines.append(f"{name:<8}{'t+' + str(k):>9}{b.get('loss', float('nan')):>13.4f}{a['loss']:>12.4f}"
                     f"{b.get('accuracy', float('nan')):>12.4f}{a['accuracy']:>11.4f}")
    return "\n".join(lines)


__all__ = ["HeadTrainingSettings", "train_heads", "split_held_out", "per_head_metrics", "format_head_table",
           "HEADS_CONFIG_FILE"]
