"""The settings of the training wing's commands (distill, train-heads, finetune, export), each declared once with its
help and checks, and the Trainer arguments head training and fine-tuning map them to.

Nothing here imports torch: the command line builds and checks these settings before loading anything heavy.
"""

from __future__ import annotations

import importlib.util
import typing
from dataclasses import dataclass, fields
from typing import Any

from ..core.weights import SCHEDULES
from ..data import BUNDLED_SHAREGPT
from ..models import MIXED_PRECISION, ModelSettings, resolve_mixed_precision
from ..settings import MAX_SEED, of_type, setting
from .tracking import trainer_report_to

# `CAFTConfig` fields that caftkit's own settings set (`trainer_arguments`, and the CAFT loss of each run): a
# `trainer` mapping may not set them behind those settings' backs.
_SET_BY_CAFTKIT = frozenset({
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "optim", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "max_length", "train_sampling_strategy", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "logging_steps", "bf16", "fp16", "use_cpu", "report_to",
    "seed", "data_seed", "dataloader_num_workers", "mode", "num_aux_heads", "num_heads", "heads_path", "alpha", "beta",
    "schedule", "train_heads", "freeze_unembedding", "trunk_cache_gb", "loss_type", "activation_checkpointing",
    "packing", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "schedule_end",
    "eval_on_start", "disable_tqdm", "completion_only_loss", "chat_template_path",
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

    data: str = setting(help="JSONL/JSON file, or a Hub dataset id in the local cache (owner/name[:split]), of "
                             "`messages`, `prompt`/`completion` or ShareGPT `conversations` records (only the "
                             "assistant's tokens are learnt; string prompts and completions are plain text for a "
                             "model without a chat template), or plain `text` records (every token is).")
    completion_only: bool = setting(True, help="only the completions (the assistant's turns) carry the loss; off: "
                                               "every token of a record, its prompt too.", trl="completion_only_loss")
    epochs: float = setting(1.0, help="passes over the training split.", above=0, trl="num_train_epochs")
    max_steps: int | None = setting(None, help="stop after this many optimisation steps instead of --epochs; the "
                                               "schedules are planned for them.", minimum=1)
    learning_rate: float | None = setting(None, help="peak learning rate.", above=0)
    lr_scheduler: str = setting("cosine", help="a transformers scheduler name (cosine, linear, constant, ...).",
                                trl="lr_scheduler_type")
    warmup: float = setting(0.05, help="warm-up steps, or a fraction of all steps when below 1.", minimum=0)
    weight_decay: float = setting(0.0, help="decoupled weight decay of the optimizer.", minimum=0)
    optim: str = setting("adamw_torch_fused", help="a transformers optimizer name (adamw_torch_fused, adamw_torch, "
                                                    "sgd, adafactor, ...).")
    batch_size: int = setting(8, help="sequences per device and step.", minimum=1, trl="per_device_train_batch_size")
    grad_accum: int = setting(1, help="micro-batches accumulated per optimisation step.", minimum=1,
                              trl="gradient_accumulation_steps")
    max_length: int = setting(1024, help="longer conversations are truncated to this many tokens (and counted).",
                              minimum=2)
    eval_fraction: float = setting(0.05, help="fraction of the records held out to measure each head's loss and "
                                              "accuracy.", above=0, below=1)
    eval_steps: int | None = setting(None, help="evaluate on the held-out split every this many steps (default: "
                                                "twice per epoch).", minimum=1)
    save_steps: int = setting(50, help="write a checkpoint every this many steps.", minimum=1)
    save_total_limit: int | None = setting(2, help="checkpoints kept (the oldest are removed); none keeps all.",
                                           minimum=1)
    logging_steps: int = setting(5, help="log the per-head training losses every this many steps.", minimum=1)
    seed: int = setting(0, help="seed of the split, the shuffling, initialisation and dropout.",
                        minimum=0, maximum=MAX_SEED)
    # One default for every command and `CAFTConfig`: bf16 where it is native (as TRL on a GPU), float32 elsewhere,
    # where emulated bf16 would be slower than float32.
    mixed_precision: str = setting("auto", help="bf16 autocast of the matrix multiplies: auto (bf16 where the device "
                                                "multiplies bf16 natively: recent GPUs, CPUs with AVX512-BF16 or "
                                                "AMX; float32 elsewhere), bf16, or no.", choices=MIXED_PRECISION)
    report_to: list[str] = setting(default_factory=list, help="where to log besides the console: comma-separated "
                                                               "integrations (tensorboard, trackio, ...).")
    trainer: dict[str, Any] = setting(default_factory=dict, help="further `CAFTConfig` (TRL `SFTConfig`, "
                                      "transformers `TrainingArguments`) fields, as a mapping, e.g. {adam_beta2: "
                                      "0.95}.")
    attn_implementation: str | None = setting(None, help="the attention kernels the model is loaded with: eager, "
                                                         "sdpa, flash_attention_2, flex_attention, ... (default: "
                                                         "transformers' choice for the model).")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `from_pretrained` these settings ask for."""
        return {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}

    def __post_init__(self):
        # Checked before the model settings' device, which imports torch: a bad value here fails at once.
        self.report_to = check_report_to(self.report_to)
        if self.trainer:
            self.trainer = check_trainer_fields(self.trainer)
        super().__post_init__()  # choices, numbers and bounds, then the device


def check_trainer_fields(trainer: dict[str, Any]) -> dict[str, Any]:
    """Refuse a `trainer` mapping that names no `CAFTConfig` field, one caftkit sets from its own settings, or a
    value not of its field's type (a bool, an integer, a number or text where the field takes only that). Returns
    the mapping with numbers YAML read as text (`1e-8`) made numbers where the field takes a number, not text."""
    from .trainer import CAFTConfig  # deferred: caft starts without TRL, and the trainer imports this module

    known = {field.name for field in fields(CAFTConfig)}
    unknown = sorted(set(trainer) - known)
    if unknown:
        raise ValueError(f"trainer: {unknown} are not CAFTConfig (SFTConfig, TrainingArguments) fields")
    set_by_caftkit = sorted(set(trainer) & _SET_BY_CAFTKIT)
    if set_by_caftkit:
        raise ValueError(f"trainer: {set_by_caftkit} are set from caftkit's own settings; use those (see --help)")
    types = typing.get_type_hints(CAFTConfig)
    checked = {}
    for name, value in trainer.items():
        kinds = typing.get_args(types[name]) if typing.get_args(types[name]) else (types[name],)
        if isinstance(value, str) and float in kinds and str not in kinds:
            try:
                value = float(value)
            except ValueError:
                pass
        if not any(value is None if kind is type(None) else of_type(value, kind, False) for kind in kinds):
            wanted = " or ".join(getattr(kind, "__name__", str(kind)) for kind in kinds)
            raise ValueError(f"trainer: {name} must be {wanted}, got {value!r}")
        checked[name] = value
    return checked


def trainer_arguments(settings: RunSettings, output_dir: str, num_train_examples: int) -> dict[str, Any]:
    """`CAFTConfig` keyword arguments common to every run: schedule, batches, evaluation twice per epoch unless
    `eval_steps` is set, checkpoints, reporting and seeds. `batch_size` is per process: a step takes
    `batch_size * grad_accum` examples from each."""
    from ..core.distributed import world_size  # deferred: caft starts without torch

    device = settings.device
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
        save_total_limit=None,  # rotated by caftkit, which removes only checkpoints the run wrote (checkpoints.py)
        logging_steps=settings.logging_steps,
        # Weights stay in `dtype`; with bf16 the matrix multiplies run under autocast.
        bf16=resolve_mixed_precision(settings.mixed_precision, device) == "bf16",
        use_cpu=device == "cpu",
        report_to=trainer_report_to(settings.report_to),  # tensorboard: see tracking.py
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        **settings.trainer,
    )


METHODS = ("lora", "full")

HEAD_WARMUP_CHOICES = ("no", "yes", "auto")
# The 4-bit data types of `--load-in-4bit` (`qlora.py`), as bitsandbytes names them.
QUANT_TYPES = ("nf4", "fp4")


# Usual peak learning rates for each method (LoRA adapters tolerate ten times the rate of full weights).
DEFAULT_LEARNING_RATES = {"lora": 2e-4, "full": 2e-5}
# The paper's n = 5: the next token and four auxiliary heads (t+2 .. t+5).
DEFAULT_NUM_AUX_HEADS = 4
# The settings `CAFTConfig` shares with the commands: declared here once, checked alike in both
# (`command_line.check_declared`).
CAFT_SETTINGS = ("num_aux_heads", "alpha", "beta", "schedule", "schedule_end", "train_heads", "freeze_unembedding",
                 "trunk_cache_gb")


@dataclass(kw_only=True)
class HeadTrainingSettings(RunSettings):
    """Everything `train_heads` is run with; recorded in `heads_config.json` under `training`."""

    init: str | None = setting(None, help="a heads folder to start from (the task warm-up); new heads are copies "
                                          "of the last layer otherwise.")
    num_aux_heads: int = setting(DEFAULT_NUM_AUX_HEADS,
                                 help="auxiliary heads to train, predicting tokens t+2 .. t+num_aux_heads+1 (with "
                                      "--init, at most as many as the folder has).", formerly=("num_heads",),
                                 minimum=1)
    alpha: float = setting(0.8, help="decay of the per-head loss weights alpha^(k-2) (at most 1: later heads never "
                                     "weigh more).", above=0, maximum=1)
    # Two passes: on 3,000 self-distilled answers of the bundled model, the t+2 head still gains in the second.
    epochs: float = setting(2.0, help="passes over the training split.", above=0, trl="num_train_epochs")
    learning_rate: float | None = setting(1e-3, help="peak learning rate.", above=0)
    trunk_cache_gb: float = setting(4.0, help="keep up to this many GB of the frozen base's outputs per batch, so "
                                              "that later epochs and held-out evaluations run only the heads "
                                              "(batches are then fixed, their order reshuffled each epoch); 0 turns "
                                              "it off.", minimum=0)



@dataclass(kw_only=True)
class FinetuneSettings(RunSettings):
    """Everything `finetune` is run with; recorded in `caft_run.json`."""

    heads: str | None = setting(None, help="a heads folder from `caft train-heads` (caft mode).")
    mode: str = setting("caft", help="caft: next-token loss plus the weighted auxiliary losses (eq. 4); ntp: the plain "
                                     "next-token baseline, everything else identical.", choices=("caft", "ntp"))
    method: str = setting("lora", help="lora (rank 8, alpha 16, dropout 0.1 on every linear projection of the decoder "
                                       "layers, heads excluded) or full (every weight but the unembedding).",
                          choices=METHODS)
    head_warmup: str = setting("auto", help="auto (the paper's rule: the heads are warmed up when the first "
                                            "auxiliary loss L2 on the held-out split exceeds --l2-warmup-threshold at "
                                            "the start); yes (one epoch of head training on the task's training split "
                                            "first, which may start from new heads); or no.",
                               choices=HEAD_WARMUP_CHOICES)
    l2_warmup_threshold: float = setting(4.0, help="the L2 above which --head-warmup auto warms the heads up (the "
                                                   "paper's rule).", minimum=0)
    num_aux_heads: int | None = setting(None, help="auxiliary heads (default: all the --heads folder holds, "
                                                   f"{DEFAULT_NUM_AUX_HEADS} without --heads; never more than it "
                                                   "holds).", formerly=("num_heads",), minimum=0)
    alpha: float = setting(0.8, help="decay of the auxiliary weights alpha^(k-1) (at most 1: later heads never "
                                     "weigh more).", above=0, maximum=1)
    beta: float = setting(0.01, help="overall weight of the auxiliary losses.", minimum=0)
    schedule: str = setting("rsine", help="gamma(step), the decay of the auxiliary weight over the run.",
                            choices=SCHEDULES)
    schedule_end: float = setting(1.0, help="fraction of the run over which gamma follows --schedule; gamma is 0 "
                                            "after it (0.25: the auxiliary weight reaches zero after the first "
                                            "quarter, a curriculum from multi-token to next-token prediction).",
                                  above=0, maximum=1)
    train_heads: bool = setting(False, help="also train the auxiliary heads during fine-tuning.")
    freeze_unembedding: bool = setting(True, help="keep lm_head frozen in full fine-tuning (with tied embeddings, "
                                                  "the input embeddings too).")
    lora_r: int = setting(8, help="LoRA rank.", minimum=1)
    lora_alpha: int = setting(16, help="LoRA scaling alpha.", minimum=1)
    lora_dropout: float = setting(0.1, help="LoRA dropout.", minimum=0, below=1)
    lora_target_modules: list[str] = setting(default_factory=lambda: ["all-linear"],
                                             help="the modules LoRA adapts: all-linear (every linear projection of "
                                                  "the decoder layers) or module names such as q_proj,v_proj.")
    load_in_4bit: bool = setting(False, help="QLoRA: load the base in 4 bits (bitsandbytes: pip install "
                                             "'caftkit[qlora]') and train LoRA adapters on it; the last decoder layer "
                                             "(which the heads copy) and the unembedding stay in --dtype, which the "
                                             "4-bit layers compute in. Needs --method lora; `caft export` merges the "
                                             "adapters into the full-precision base.")
    quant_type: str = setting("nf4", help="the 4-bit data type of --load-in-4bit: nf4 (normal float, the QLoRA "
                                          "paper's) or fp4.", choices=QUANT_TYPES, trl="bnb_4bit_quant_type")
    nested_quant: bool = setting(False, help="with --load-in-4bit, quantise the quantisation constants too (double "
                                             "quantisation: about 0.4 bits less per weight).",
                                 trl="use_bnb_nested_quant")
    learning_rate: float | None = setting(None, help="peak learning rate (default: "
                                                     f"{DEFAULT_LEARNING_RATES['lora']:g} with --method lora, "
                                                     f"{DEFAULT_LEARNING_RATES['full']:g} with full).", above=0)
    # The paper's fine-tuning schedule: 3% warm-up; more of the records held out than for the heads (5%).
    warmup: float = setting(0.03, help="warm-up steps, or a fraction of all steps when below 1.", minimum=0)
    eval_fraction: float = setting(0.1, help="fraction of the records held out for evaluation.", above=0, below=1)
    save_steps: int = setting(100, help="write a checkpoint every this many steps.", minimum=1)
    activation_checkpointing: bool = setting(False, help="recompute the decoder layers' activations in the backward "
                                                         "pass instead of keeping them: less memory, more time.",
                                             formerly=("gradient_checkpointing",))
    packing: bool = setting(False, help="pack several conversations into each training sequence of --max-length "
                                        "tokens (best-fit decreasing); attention and every head's targets stay within "
                                        "their conversation.")
    early_stopping_patience: int | None = setting(None, help="stop once the held-out next-token loss has not "
                                                             "improved for this many evaluations in a row; final/ then "
                                                             "holds the best checkpoint, and a checkpoint is written "
                                                             "at every evaluation.", minimum=1)
    early_stopping_threshold: float = setting(0.0, help="the least decrease of the held-out next-token loss that "
                                                        "counts as an improvement for --early-stopping-patience.",
                                              minimum=0)

    def __post_init__(self):
        super().__post_init__()
        if self.mode == "caft" and self.heads is None and self.head_warmup != "yes":
            raise ValueError("caft mode needs trained auxiliary heads: pass --heads (a folder from "
                             "`caft train-heads`), or --head-warmup yes to train new ones on this data first, or "
                             "--mode ntp for plain next-token fine-tuning")
        if self.num_aux_heads is not None and self.num_aux_heads < 1 and self.mode == "caft":
            raise ValueError(f"num_aux_heads must be at least 1 in caft mode, got {self.num_aux_heads}")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.method]
        self._check_4bit()

    def _check_4bit(self) -> None:
        """QLoRA's settings, and bitsandbytes training a 4-bit layer on the device, before anything loads."""
        if not self.load_in_4bit:
            if self.quant_type != "nf4" or self.nested_quant:
                raise ValueError("quant_type and nested_quant set how --load-in-4bit quantises the base; without it "
                                 "they do nothing")
            return
        if self.method != "lora":
            raise ValueError(f"load_in_4bit: QLoRA trains LoRA adapters on a frozen 4-bit base, and 4-bit weights "
                             f"cannot be fine-tuned themselves: use --method lora, not {self.method}")
        from .qlora import check_4bit_runs  # deferred: caft starts without torch

        check_4bit_runs(self.device, self.dtype, self.quant_type)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `from_pretrained` these settings ask for: with --load-in-4bit, QLoRA's."""
        kwargs = super().model_kwargs()
        if self.load_in_4bit:
            from .qlora import four_bit_loading  # deferred: caft starts without torch

            kwargs.update(four_bit_loading(self.model, self.quant_type, self.nested_quant, self.dtype, self.device))
        return kwargs


@dataclass(kw_only=True)
class DistillSettings(ModelSettings):
    """What `distill` generates with; written beside the output as `<name>.meta.json`."""

    data: str = setting(BUNDLED_SHAREGPT, help="sharegpt (the bundled ShareGPT prompts) or a JSONL/JSON file of "
                                               "`messages`, `prompt`/`completion` or ShareGPT `conversations` records.")
    max_samples: int | None = setting(1000, help="number of prompts to answer (the first ones that fit); 0 or none "
                                                 "for all.", minimum=0)
    max_new_tokens: int = setting(256, help="most tokens generated per answer.", minimum=1)
    max_prompt_tokens: int = setting(512, help="prompts longer than this (chat template included) are skipped and "
                                               "counted.", minimum=1)
    batch_size: int = setting(32, help="prompts generated together (grouped by length, left-padded).", minimum=1)
    temperature: float = setting(0.0, help="0 for greedy decoding, else the sampling temperature.", minimum=0)
    top_p: float = setting(1.0, help="nucleus sampling threshold when sampling.", above=0, maximum=1)
    seed: int = setting(0, help="sampling seed (each batch, or with --server each prompt, is seeded from it, so "
                                "resumed runs sample the same).", minimum=0, maximum=MAX_SEED)
    server: str | None = setting(None, help="base URL of an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp) "
                                            "serving --model, e.g. http://127.0.0.1:8000: it generates the answers "
                                            "instead of this process. caftkit renders the prompts, checks first that "
                                            "the server's tokenizer is --model's, and sends token ids "
                                            "(docs/distributed.md).")
    server_model: str | None = setting(None, help="with --server: the name the server knows the model by (default: "
                                                  "the only model it serves).")
    concurrency: int = setting(32, help="with --server: requests in flight at once.", minimum=1, maximum=4096)
    request_timeout: float = setting(600.0, help="with --server: seconds to wait for one answer before trying again.",
                                     above=0)
    retries: int = setting(8, help="with --server: tries of a request that fails for a passing reason (no "
                                   "connection, a timeout, HTTP 5xx or 429), waiting 1 s, then twice as long each "
                                   "time (at most 30 s); then the run stops and a rerun resumes.", minimum=1)

    def __post_init__(self):
        super().__post_init__()
        if self.max_samples == 0:
            self.max_samples = None
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            raise ValueError(f"server: {self.server!r} is not an http:// or https:// URL")
        unused = [name for name in ("server_model",) if getattr(self, name) is not None and self.server is None]
        if unused:
            raise ValueError(f"{unused[0]} is for --server: give the server's URL")


@dataclass(kw_only=True)
class ExportSettings:
    """What `caft export` writes: the run, the model folder, the heads folder, the dtype of the weights, and the
    evaluations its model card reports."""

    run: str = setting(help="the run folder written by `caft finetune`.")
    output: str = setting("model", help="the model folder to write.", formerly=("out",))
    heads_output: str | None = setting(None, help="where to copy the heads (default: <output>-heads).",
                                       formerly=("heads_out",))
    dtype: str | None = setting(None, help="dtype of the saved weights (default: the one the run trained in).")
    eagle3: bool = setting(False, help="also write head 2 as an EAGLE-3 draft of the exported model to "
                                       "<output>-eagle3, for vLLM and SGLang (see `caft export-heads`).")
    eval: list[str] = setting(default_factory=list, help="`caft eval --task` folders (comma-separated) of an export "
                                                      "of this run in this dtype (e.g. an earlier export to --output):"
                                                      " their metrics, with intervals, go into the card's model-index "
                                                      "and its Evaluation section.")


@dataclass(kw_only=True)
class ExportHeadsSettings(ModelSettings):
    """What `caft export-heads` writes: which heads of which model, in which engine format, where."""

    heads: str = setting(help="the heads folder (from `caft train-heads`, or <model>-heads from `caft export`).")
    format: str = setting("eagle3", help="eagle3: head 2 as an EAGLE-3 draft that vLLM and SGLang load beside the "
                                         "model (Llama- and Qwen3-family bases).", choices=("eagle3",))
    output: str = setting(help="the draft folder to write (config.json, model.safetensors).")


@dataclass(kw_only=True)
class DistillOutput:
    output: str = setting("distilled.jsonl", help="JSONL file to write (extended when it exists).")


@dataclass(kw_only=True)
class HeadsOutput:
    output: str = setting("heads", help="the heads folder to write.", trl="output_dir")
    resume: bool = setting(False, help="continue from the last checkpoint in <output>/checkpoints/.")
    keep_checkpoints: bool = setting(False, help="keep <output>/checkpoints/ after training ends.")


@dataclass(kw_only=True)
class RunOutput:
    output: str = setting("run", help="the run folder.", trl="output_dir")
    resume: bool = setting(False, help="continue from the last checkpoint in the run folder.")
