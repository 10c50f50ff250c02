"""Settings shared by head training and fine-tuning, and the Trainer arguments they both map to."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ..command_line import setting
from ..core.distributed import world_size
from ..models import MIXED_PRECISION, ModelSettings, resolve_device, resolve_mixed_precision

# `CAFTConfig` fields that caftkit's own settings set (`trainer_arguments`, and the CAFT loss of each run): a
# `trainer` mapping may not set them behind those settings' backs.
_SET_BY_CAFTKIT = frozenset({
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "optim", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "max_length", "train_sampling_strategy", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "logging_steps", "bf16", "fp16", "use_cpu", "report_to",
    "seed", "data_seed", "dataloader_num_workers", "mode", "num_aux_heads", "num_heads", "heads_path", "alpha", "beta",
    "schedule", "train_heads", "freeze_unembedding", "trunk_cache_gb", "loss_type", "activation_checkpointing",
    "packing", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
})
# Each logging integration transformers offers and the modules it needs (any one of them): checked with
# `find_spec`, which imports nothing, so a missing back-end is refused at once instead of after the model loads.
REPORT_TO_MODULES = {
    "azure_ml": ("azureml",), "clearml": ("clearml",), "codecarbon": ("codecarbon",), "comet_ml": ("comet_ml",),
    "dagshub": ("dagshub",), "dvclive": ("dvclive",), "flyte": ("flytekit",), "mlflow": ("mlflow",),
    "neptune": ("neptune",), "swanlab": ("swanlab",), "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",), "wandb": ("wandb",),
}


def check_report_to(names: list[str]) -> list[str]:
    """The logging integrations to use (`none` drops out): each must be one transformers knows and be installed."""
    names = [name for name in names if name != "none"]
    for name in names:
        if name not in REPORT_TO_MODULES:
            raise ValueError(f"report_to: {name!r} is not a logging integration; expected none or some of "
                             f"{', '.join(REPORT_TO_MODULES)}")
        if not any(importlib.util.find_spec(module) for module in REPORT_TO_MODULES[name]):
            raise ValueError(f"report_to: {name} is not installed (pip install {REPORT_TO_MODULES[name][0]})")
    return names


@dataclass(kw_only=True)
class RunSettings(ModelSettings):
    """The model, the data, and how a `caft train-heads` or `caft finetune` run trains on it."""

    data: str = setting(help="JSONL/JSON file of `messages`, `prompt`/`completion` or ShareGPT `conversations` "
                             "records.")
    epochs: float = setting(1.0, help="passes over the training split.")
    max_steps: int | None = setting(None, help="stop after this many optimisation steps instead of --epochs; the "
                                               "schedules are planned for them.")
    learning_rate: float | None = setting(None, help="peak learning rate.")
    lr_scheduler: str = setting("cosine", help="a transformers scheduler name (cosine, linear, constant, ...).")
    warmup: float = setting(0.05, help="warm-up steps, or a fraction of all steps when below 1.")
    weight_decay: float = setting(0.0, help="decoupled weight decay of the optimizer.")
    optim: str = setting("adamw_torch_fused", help="a transformers optimizer name (adamw_torch_fused, adamw_torch, "
                                                    "sgd, adafactor, ...).")
    batch_size: int = setting(8, help="sequences per device and step.")
    grad_accum: int = setting(1, help="micro-batches accumulated per optimisation step.")
    max_length: int = setting(1024, help="longer conversations are truncated to this many tokens (and counted).")
    eval_fraction: float = setting(0.05, help="fraction of the records held out to measure each head's loss and "
                                              "accuracy.")
    eval_steps: int | None = setting(None, help="evaluate on the held-out split every this many steps (default: "
                                                "twice per epoch).")
    save_steps: int = setting(50, help="write a checkpoint every this many steps.")
    save_total_limit: int | None = setting(2, help="checkpoints kept (the oldest are removed); none keeps all.")
    logging_steps: int = setting(5, help="log the per-head training losses every this many steps.")
    seed: int = setting(0, help="seed of the split, the shuffling, initialisation and dropout.")
    mixed_precision: str = setting("no", help="bf16 autocast of the matrix multiplies: no, bf16, or auto (bf16 "
                                              "where the device multiplies bf16 natively).", choices=MIXED_PRECISION)
    report_to: list[str] = setting(default_factory=list, help="where to log besides the console: comma-separated "
                                                               "integrations (tensorboard, trackio, ...).")
    trainer: dict[str, Any] = setting(default_factory=dict, help="further `CAFTConfig` (TRL `SFTConfig`, "
                                      "transformers `TrainingArguments`) fields, as a mapping, e.g. {adam_beta2: "
                                      "0.95}.")

    def __post_init__(self):
        super().__post_init__()
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        resolve_mixed_precision(self.mixed_precision, "cpu")  # checks the name
        self.report_to = check_report_to(self.report_to)
        if self.trainer:
            check_trainer_fields(self.trainer)


def check_trainer_fields(trainer: dict[str, Any]) -> None:
    """Refuse a `trainer` mapping that names no `CAFTConfig` field, or one caftkit sets from its own settings."""
    from dataclasses import fields

    from .trainer import CAFTConfig

    known = {field.name for field in fields(CAFTConfig)}
    unknown = sorted(set(trainer) - known)
    if unknown:
        raise ValueError(f"trainer: {unknown} are not CAFTConfig (SFTConfig, TrainingArguments) fields")
    set_by_caftkit = sorted(set(trainer) & _SET_BY_CAFTKIT)
    if set_by_caftkit:
        raise ValueError(f"trainer: {set_by_caftkit} are set from caftkit's own settings; use those (see --help)")


def trainer_arguments(settings: RunSettings, output_dir: str, num_train_examples: int) -> dict[str, Any]:
    """`CAFTConfig` keyword arguments common to every run: schedule, batches, evaluation twice per epoch unless
    `eval_steps` is set, checkpoints, reporting and seeds. `batch_size` is per process: a step takes
    `batch_size * grad_accum` examples from each."""
    device = resolve_device(settings.device)
    steps_per_epoch = -(-num_train_examples // (settings.batch_size * settings.grad_accum * world_size()))
    return dict(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        optim=settings.optim,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=None,  # truncated (and counted) by `data.tokenize_source`
        train_sampling_strategy="group_by_length",  # less padding: the base runs on every padded position
        eval_strategy="steps",
        eval_steps=settings.eval_steps or max(1, steps_per_epoch // 2),
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        # Weights stay in `dtype`; with bf16 the matrix multiplies run under autocast.
        bf16=resolve_mixed_precision(settings.mixed_precision, device) == "bf16",
        use_cpu=device == "cpu",
        report_to=settings.report_to,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        **settings.trainer,
    )
