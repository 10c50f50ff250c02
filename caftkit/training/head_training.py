"""Training the auxiliary heads (paper eq. 3): the base frozen and run without gradients, only the heads learn.

Used twice in the CAFT flow: once per base model on self-distilled general data (`caft distill` output), and
as the task warm-up, one epoch on a task's own training set starting from those heads (`init`). The result is
a `heads/` folder (weights, config with the training metadata and each head's held-out loss and accuracy
before and after, and a PNG of the per-head loss curves).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..core.distributed import is_main_process, launch_record, wait_for_everyone
from ..core.heads import HEADS_ATTRIBUTE, HEADS_CONFIG_FILE, attach_heads, check_heads_fit, get_heads, save_heads
from ..files.outputs import OUTPUT_MARKER, claim, output_folder, remove_claimed
from ..models import resolve_mixed_precision
from .runs import (
    CHECKPOINTS_DIR,
    checkpoint_to_resume,
    load_run_data,
    per_head_metrics,
    run_callbacks,
    write_log_history,
)
from .settings import HeadTrainingSettings, trainer_arguments
from .tracking import TENSORBOARD_DIR
from .trainer import CAFTConfig

LOSS_CURVES_FILE = "loss_curves.png"
# The command whose marker a heads folder it trained holds.
TRAIN_HEADS_COMMAND = "train-heads"


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
    run_dir = output_dir / CHECKPOINTS_DIR
    checkpoint = checkpoint_to_resume(run_dir, resume)
    if not resume and output_dir.is_dir() and any(
            path not in (run_dir, output_dir / OUTPUT_MARKER, output_dir / TENSORBOARD_DIR)
            for path in output_dir.iterdir()):
        raise ValueError(f"{output_dir}: already exists and is not empty: choose a new output folder (the heads "
                         "written there would replace what it holds)")
    if settings.init and model is None:  # a model given is checked against the heads' fingerprint as they attach
        check_heads_fit(settings.init, settings.model)

    run, model = load_run_data(settings, model, tokenizer)
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
        **trainer_arguments(settings, str(run_dir), len(run.train_examples)),
    )
    if is_main_process():
        claim(output_dir, CHECKPOINTS_DIR)
    trainer = run.trainer(model, args, run_callbacks(settings, output_dir, run_dir))
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

    summary = {
        "settings": asdict(settings),
        **run.record(),
        "device": settings.device,
        "launch": launch_record(trainer.accelerator),
        "mixed_precision": resolve_mixed_precision(settings.mixed_precision, settings.device),
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
        write_log_history(history, output_dir, LOSS_CURVES_FILE,
                          f"Head training on {Path(settings.data).name}: per-head loss")
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


__all__ = ["HeadTrainingSettings", "train_heads", "format_head_table", "HEADS_CONFIG_FILE"]
