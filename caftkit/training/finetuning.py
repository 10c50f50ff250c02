"""CAFT fine-tuning of a model on a task (paper eq. 4), or the plain next-token baseline through the same path.

A run folder holds the Trainer's checkpoints (`checkpoint-N/`), the final weights (`final/`: a LoRA adapter or
a full model, heads never included), the heads the run used (`heads/`; warmed up on the task when asked),
`caft_run.json` (settings, data counts, final held-out metrics: what `caft export` writes into the model card),
`log_history.json` and `head_losses.png` (L1..Ln over the steps); with `--report-to tensorboard`, `tensorboard/`
(and `warmup-heads/tensorboard/` for the warm-up).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import EarlyStoppingCallback

from ..core.architecture import unwrap_model
from ..core.distributed import is_main_process, launch_record, wait_for_everyone
from ..core.heads import attach_heads, check_heads_fit, get_heads, read_heads_config, save_heads
from ..evaluation.head_metrics import head_metrics
from ..files.atomic import write_json
from ..files.outputs import claim, output_folder, remove_claimed
from .checkpoints import last_checkpoint
from .head_training import HeadTrainingSettings, train_heads
from .qlora import with_lora_adapters
from .runs import (
    CHECKPOINTS_DIR,
    checkpoint_to_resume,
    load_run_data,
    per_head_metrics,
    run_callbacks,
    write_log_history,
)
from .settings import DEFAULT_NUM_AUX_HEADS, FinetuneSettings, trainer_arguments
from .trainer import CAFTConfig

# The command whose marker a run folder holds.
FINETUNE_COMMAND = "finetune"
RUN_FILE = "caft_run.json"
FINAL_DIR = "final"
RUN_HEADS_DIR = "heads"
WARMUP_HEADS_DIR = "warmup-heads"
HEAD_LOSSES_FILE = "head_losses.png"


def lora_config(settings: FinetuneSettings):
    """The paper's LoRA: rank 8, alpha 16, dropout 0.1 on every linear projection of the decoder layers (the
    unembedding and the auxiliary heads excluded)."""
    targets = settings.lora_target_modules
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")


def aux_head_count(settings: FinetuneSettings) -> int:
    """The auxiliary heads a run trains with: `num_aux_heads` where given, else all its heads folder holds, else
    the default. More than the folder holds is refused (before any work, not a run recording heads it lacks)."""
    held = read_heads_config(settings.heads)["num_heads"] if settings.mode == "caft" and settings.heads else None
    if settings.num_aux_heads is None:
        return DEFAULT_NUM_AUX_HEADS if held is None else held
    if held is not None and settings.num_aux_heads > held:
        raise ValueError(f"num_aux_heads is {settings.num_aux_heads}, but {settings.heads} holds {held} heads")
    return settings.num_aux_heads


def settings_as_recorded(settings: FinetuneSettings) -> FinetuneSettings:
    """`settings` as a run records them in its run file: the auxiliary head count resolved (`aux_head_count`)."""
    return replace(settings, num_aux_heads=aux_head_count(settings))


def warmup_settings(settings: FinetuneSettings, heads_dir: str | None) -> HeadTrainingSettings:
    """The head training of the task warm-up: one epoch on the run's training split, from `heads_dir`. Runs whose
    warm-up settings are equal get the same warmed-up heads (`caft compare` shares them between its arms)."""
    return HeadTrainingSettings(
        model=settings.model, data=settings.data, init=heads_dir, num_aux_heads=aux_head_count(settings),
        alpha=settings.alpha,
        epochs=1.0, batch_size=settings.batch_size, grad_accum=settings.grad_accum, max_length=settings.max_length,
        eval_fraction=settings.eval_fraction, save_steps=settings.save_steps, seed=settings.seed, dtype=settings.dtype,
        mixed_precision=settings.mixed_precision, device=settings.device, report_to=settings.report_to,
        attn_implementation=settings.attn_implementation, chat_template=settings.chat_template,
        completion_only=settings.completion_only)


# The metric early stopping and the best checkpoint follow: the main head's held-out loss, which caft and ntp runs
# share. The trainer's `eval_loss` would not do: in caft mode it holds the auxiliary losses weighted by gamma(step),
# which falls over the run by design.
BEST_MODEL_METRIC = "eval_loss_head_1"


def finetune_arguments(settings: FinetuneSettings, output_dir: str, num_train_examples: int) -> dict[str, Any]:
    """`CAFTConfig` keyword arguments of a fine-tuning run: the CAFT loss, memory and packing, early stopping, and
    the arguments every run shares (`trainer_arguments`)."""
    arguments = trainer_arguments(settings, output_dir, num_train_examples)
    arguments.update(
        mode=settings.mode, num_aux_heads=settings.num_aux_heads, alpha=settings.alpha, beta=settings.beta,
        schedule=settings.schedule, schedule_end=settings.schedule_end, train_heads=settings.train_heads,
        freeze_unembedding=settings.freeze_unembedding,
        activation_checkpointing=settings.activation_checkpointing, packing=settings.packing,
    )
    if settings.packing:
        # Packed sequences are --max-length long; conversations were already truncated to it by `tokenize_source`.
        arguments["max_length"] = settings.max_length
    if settings.early_stopping_patience is not None:
        # The best metric is only recorded when a checkpoint is written: write one at every evaluation.
        arguments.update(save_steps=arguments["eval_steps"], load_best_model_at_end=True,
                         metric_for_best_model=BEST_MODEL_METRIC, greater_is_better=False)
    return arguments


def _callbacks(settings: FinetuneSettings, output: Path, given: list | None) -> list:
    callbacks = list(given or []) + run_callbacks(settings, output, output)
    if settings.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(settings.early_stopping_patience, settings.early_stopping_threshold))
    return callbacks


def _warm_up_heads(output: Path, settings: FinetuneSettings, heads_dir: str | None, model, tokenizer) -> Path:
    """One epoch of head training (eq. 3) on the task's training split, starting from `heads_dir`."""
    target = output / WARMUP_HEADS_DIR
    try:
        read_heads_config(target)
        return target  # done by an earlier, interrupted invocation of this run (or given by `caft compare`)
    except FileNotFoundError:
        pass
    # A warm-up killed part-way left its checkpoints: it continues from the last one.
    resume = last_checkpoint(target / CHECKPOINTS_DIR) is not None
    train_heads(str(target), warmup_settings(settings, heads_dir), resume=resume, model=model, tokenizer=tokenizer)
    return target


def finetune(output: str, settings: FinetuneSettings, *, resume: bool = False, model=None, tokenizer=None,
             callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune `settings.model` on `settings.data` into the run folder `output`; see the module docstring.

    `output` must be new, empty, or a run folder of `caft finetune` (`outputs.output_folder`); it is locked for the
    run. `model` and `tokenizer` replace loading `settings.model`; `callbacks` are further `TrainerCallback`s of the
    fine-tuning Trainer (not of the head warm-up)."""
    with output_folder(output, FINETUNE_COMMAND, main_process=is_main_process()):
        return _finetune(Path(output), settings, resume, model, tokenizer, callbacks)


def _finetune(run_dir: Path, settings: FinetuneSettings, resume: bool, model, tokenizer,
              callbacks: list | None) -> dict[str, Any]:
    checkpoint = checkpoint_to_resume(run_dir, resume, earlier_run=(run_dir / RUN_FILE).exists())
    if settings.mode == "caft" and settings.heads and model is None:
        check_heads_fit(settings.heads, settings.model)
    settings = settings_as_recorded(settings)  # what the run records is what it uses

    run, model = load_run_data(settings, model, tokenizer, packed=settings.packing)
    run_dir.mkdir(parents=True, exist_ok=True)

    heads_dir, warmup_record = settings.heads, None
    if settings.mode == "caft":
        # Without --heads (refused but with --head-warmup yes), new heads are copies of the last layer, trained on the
        # task by the warm-up below.
        attach_heads(model, heads_dir if heads_dir else settings.num_aux_heads)
    if settings.load_in_4bit:
        # QLoRA: the adapters go on before any Trainer takes the model (heads attached, and left out of them):
        # transformers trains a 4-bit model only through adapters, the head warm-up's included.
        model = with_lora_adapters(model, lora_config(settings), settings.seed)
    if settings.mode == "caft":
        warm = settings.head_warmup == "yes"
        if settings.head_warmup == "auto":
            start = head_metrics(model, run.held_out, pad_token_id=run.tokenizer.pad_token_id,
                                 batch_size=settings.batch_size)
            l2 = start["head_2"]["loss"]
            warm = l2 > settings.l2_warmup_threshold
            warmup_record = {"l2_at_start": l2, "threshold": settings.l2_warmup_threshold, "warmed_up": warm,
                             "held_out_at_start": start}
        if warm:
            heads_dir = str(_warm_up_heads(run_dir, settings, heads_dir, model, run.tokenizer))
            attach_heads(model, heads_dir)
            warmup_record = {**(warmup_record or {}), "warmed_up": True, "heads": heads_dir}
        # The heads the run trains with, kept with the run (and exported beside the model).
        save_heads(get_heads(model), run_dir / RUN_HEADS_DIR)

    args = CAFTConfig(**finetune_arguments(settings, str(run_dir), len(run.train_examples)))
    trainer = run.trainer(model, args, _callbacks(settings, run_dir, callbacks),
                          peft_config=lora_config(settings) if settings.method == "lora" and not settings.load_in_4bit
                          else None)
    trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.evaluate()
    # Under bf16, accelerate wrapped the model's forward in autocast; the model handed back computes as saved.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)

    final_dir = run_dir / FINAL_DIR
    if is_main_process():
        if final_dir.exists():  # left by a run killed after writing it: this run's own, claimed when written
            remove_claimed(run_dir, FINAL_DIR)
        claim(run_dir, FINAL_DIR)
    wait_for_everyone()
    trainer.save_model(str(final_dir))
    if is_main_process():
        # The generation config as training left it: the Trainer aligns its end-of-sequence tokens with the
        # tokenizer's (a chat model's end of turn). A LoRA adapter's folder has none, and an export that took the
        # base's would not stop where the fine-tuned model stops.
        unwrap_model(trainer.model).generation_config.save_pretrained(final_dir)
    history = trainer.state.log_history
    summary = {
        "settings": asdict(settings),
        "base_model": settings.model,
        "heads": str(run_dir / RUN_HEADS_DIR) if settings.mode == "caft" else None,
        "head_warmup": warmup_record,
        **run.record(),
        "device": settings.device,
        "launch": launch_record(trainer.accelerator),
        "mixed_precision": "bf16" if trainer.args.bf16 else "no",  # what `auto` became on this device
        "optimizer_steps": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "final_eval": {key: value for key, value in final.items() if isinstance(value, (int, float))},
        "held_out_per_head": per_head_metrics(final),
    }
    if is_main_process():
        write_log_history(history, run_dir, HEAD_LOSSES_FILE,
                          f"{settings.mode} fine-tuning on {Path(settings.data).name}: per-head loss")
        write_json(run_dir / RUN_FILE, summary)
    wait_for_everyone()
    return summary


