"""Settings shared by head training and fine-tuning, and the Trainer arguments they both map to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.distributed import world_size
from ..models import resolve_device, resolve_mixed_precision


@dataclass
class RunSettings:
    """The model, the data, and how a `caft train-heads` or `caft finetune` run trains on it."""

    model: str
    data: str
    epochs: float = 1.0
    learning_rate: float | None = None
    lr_scheduler: str = "cosine"
    warmup: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    eval_fraction: float = 0.05
    eval_steps: int | None = None
    save_steps: int = 50
    logging_steps: int = 5
    seed: int = 0
    dtype: str = "float32"
    mixed_precision: str = "no"
    device: str = "auto"
    report_to: list[str] = field(default_factory=list)


def trainer_arguments(settings: RunSettings, output_dir: str, num_train_examples: int) -> dict[str, Any]:
    """`CAFTConfig` keyword arguments common to every run: schedule, batches, evaluation twice per epoch unless
    `eval_steps` is set, checkpoints, reporting and seeds. `batch_size` is per process: a step takes
    `batch_size * grad_accum` examples from each."""
    device = resolve_device(settings.device)
    steps_per_epoch = -(-num_train_examples // (settings.batch_size * settings.grad_accum * world_size()))
    return dict(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=None,  # truncated (and counted) by `data.tokenize_source`
        train_sampling_strategy="group_by_length",  # less padding: the base runs on every padded position
        eval_strategy="steps",
        eval_steps=settings.eval_steps or max(1, steps_per_epoch // 2),
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=settings.logging_steps,
        # Weights stay in `dtype`; with bf16 the matrix multiplies run under autocast.
        bf16=resolve_mixed_precision(settings.mixed_precision, device) == "bf16",
        use_cpu=device == "cpu",
        report_to=settings.report_to,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
    )
