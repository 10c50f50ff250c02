"""`CAFTTrainer`: TRL's `SFTTrainer` with the multi-token loss of Concept-Aware Fine-Tuning.

Everything SFTTrainer does (datasets in conversational or prompt-completion form, chat templates,
assistant-only loss, packing, PEFT, accelerate) is kept; only the loss, its logging, and the saving of
trainable heads in checkpoints are overridden.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig, SFTTrainer

from ..core.architecture import find_model_parts, unwrap_model
from ..core.distributed import average_gradients
from ..core.heads import (
    HEADS_WEIGHTS_FILE,
    attach_heads,
    from_former_num_heads,
    get_heads,
    heads_state_from_model_state,
    keep_lora_out_of_heads,
    save_heads,
)
from ..core.multitoken import count_targets, head_statistics, weighted_loss
from ..core.samplers import FixedBatchesSampler, SeededLengthGroupedSampler
from ..core.trunk_cache import TrunkCache, trunk_is_deterministic
from ..core.weights import MODES, SCHEDULES, gamma_schedule, head_loss_weights
from ..models import pretrained_source, resolve_device, resolve_mixed_precision
from ..settings import check_declared
from .model_card import CAFT_PAPER, CARD_FILE, adapter_card, run_folder_card
from .qlora import prepare_4bit_model, restore_adapter_dtype, trainer_model_kwargs
from .settings import CAFT_SETTINGS, DEFAULT_LEARNING_RATES, FinetuneSettings, HeadTrainingSettings

CHECKPOINT_HEADS_DIR = "caft_heads"


@dataclass
class CAFTConfig(SFTConfig):
    r"""Configuration of [`CAFTTrainer`]: every field of TRL's `SFTConfig`, plus the CAFT settings below.

    The training loss (paper eq. 4) is `L = CE_1 + beta * gamma(step) * sum_{k=2..n} alpha^(k-1) * CE_k`, where
    `CE_k` is the mean cross-entropy of head k (predicting token t+k) over its valid targets and n - 1 =
    `num_aux_heads` auxiliary heads. `mode="heads"` trains the heads alone (eq. 3) and `mode="ntp"` is plain
    next-token fine-tuning through the same code path.
    """

    # CAFT computes its loss itself (`compute_loss`), so SFTTrainer's own loss is never used. It is pinned to plain
    # negative log-likelihood so that no TRL default routes a step through another loss (DFT). SFTTrainer also wraps
    # the model instance's `forward` with a fused LM head; the wrapper acts only on `fused_lm_head=True`, which
    # caftkit never passes, so training, generation and export run the model's own forward.
    loss_type: str = field(
        default="nll",
        metadata={"help": "SFTTrainer's loss; CAFT computes its own, so only `nll` (the default) is accepted."},
    )
    mode: str = field(
        default="caft",
        metadata={"help": "`caft`: next-token loss plus weighted auxiliary-head losses (eq. 4). `ntp`: the plain "
                  "next-token baseline, heads not run. `heads`: train only the auxiliary heads (eq. 3), base frozen.",
                  "choices": list(MODES)},
    )
    num_aux_heads: int = field(
        default=4,
        metadata={"help": "Number of auxiliary heads (they predict tokens t+2 .. t+num_aux_heads+1). Ignored when "
                  "`heads_path` is set or heads are already attached, except that it may select fewer of them."},
    )
    num_heads: int | None = field(
        default=None,
        metadata={"help": "Former name of `num_aux_heads`: refused, naming it."},
    )
    heads_path: str | None = field(
        default=None,
        metadata={"help": "A `heads/` folder (from `caft train-heads`) to attach. Without it, heads already attached "
                  "to the model are used, or new ones are copied from the last layer."},
    )
    alpha: float = field(default=0.8, metadata={"help": "Decay of the auxiliary-head weights: head k gets alpha^(k-1) "
                                                  "in `caft` mode and alpha^(k-2) in `heads` mode."})
    beta: float = field(default=0.01, metadata={"help": "Overall weight of the auxiliary losses in `caft` mode."})
    schedule: str = field(
        default="rsine",
        metadata={"help": "gamma(step) over training in `caft` mode: `rsine` sin(pi/2 (1 - step/total)) (high early, "
                  "low late), `sine` sin(pi/2 step/total), `linear` 1 - step/total, `constant` 1.",
                  "choices": list(SCHEDULES)},
    )
    schedule_end: float = field(
        default=1.0,
        metadata={"help": "Fraction of the run, in (0, 1], over which gamma follows `schedule`; gamma is 0 after it "
                  "(0.25: the auxiliary weight reaches zero after the first quarter)."},
    )
    train_heads: bool = field(
        default=False,
        metadata={"help": "Also train the auxiliary heads during `caft` fine-tuning (frozen by default). Always on in "
                  "`heads` mode."},
    )
    freeze_unembedding: bool = field(
        default=True,
        metadata={"help": "Freeze `lm_head` in `caft`/`ntp` full fine-tuning, as the paper recommends. With tied "
                  "embeddings this freezes the input embeddings too."},
    )
    loss_impl: str = field(
        default="fused",
        metadata={"help": "How the chunked cross-entropy gets its gradients: `fused` computes them in the forward "
                  "pass (fastest), `checkpoint` recomputes each chunk in backward through the `lm_head` module "
                  "(needed for a PEFT-wrapped or FSDP-sharded `lm_head`).", "choices": ["fused", "checkpoint"]},
    )
    trunk_cache_gb: float = field(
        default=0.0,
        metadata={"help": "Head training (`mode='heads'`) only: keep up to this many GB of the frozen base's "
                  "per-batch outputs, so that later epochs and repeated evaluations run only the heads. Training "
                  "batches are then formed once and only their order changes between epochs. 0 turns it off; it "
                  "is also off when the base has dropout."},
    )
    l2_warning_threshold: float = field(
        default=4.0,
        metadata={"help": "Warn once when the first auxiliary loss L2 exceeds this: the paper's sign that the heads "
                  "are too unstable for the task and need a warm-up on its training set."},
    )
    # `caft finetune`'s defaults, so that a config built here trains as the command does (TRL's are 3 epochs at 2e-5,
    # a linear schedule without warm-up, activation checkpointing on).
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training set."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate. Unset: 2e-4 when the model trains through LoRA adapters (a "
                  "`peft_config`, or a PEFT model) and 2e-5 otherwise, as `caft finetune --method lora|full`."},
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up steps, or a fraction of all steps when "
                                                        "below 1."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Former name of `activation_checkpointing` (off unless set: activations are kept)."},
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "CAFT never builds full logits, so evaluation reports losses and per-head metrics only."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Unset: as `caft finetune --mixed-precision auto`, on where the "
                  "device multiplies bf16 natively (a GPU with bf16, a TPU, a CPU with AVX512-BF16 or AMX), off "
                  "elsewhere."},
    )

    def __post_init__(self):
        # TRL turns bf16 on when it is unset; transformers then refuses a machine without a bf16 accelerator unless
        # use_cpu is set, and on a CPU without native bf16 it emulates it, slower than float32. Unset, it follows
        # the command line's `auto` instead: the same config trains alike from both.
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_native(self.use_cpu)
            if self.bf16 and not self.use_cpu and not is_torch_bf16_gpu_available() and not is_torch_xla_available():
                # No accelerator: training runs on the CPU anyway, and transformers takes bf16 there only when told.
                self.use_cpu = True
        super().__post_init__()
        if self.run_name is None:
            # Unnamed, trackio (and W&B) make up a name at each start of logging, and the evaluation that follows
            # training, logged after the run was closed, opened a second run. One name per config keeps it one.
            self.run_name = f"{self.output_dir} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.num_aux_heads = from_former_num_heads(self.num_heads, self.num_aux_heads, "CAFTConfig")
        if self.loss_type != "nll":
            raise ValueError(f"CAFTConfig computes the CAFT loss itself: loss_type must be 'nll', "
                             f"got {self.loss_type!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        # The CAFT settings are declared once, for the command line: the same types, choices and bounds here.
        check_declared(self, (FinetuneSettings, HeadTrainingSettings), CAFT_SETTINGS)
        if self.loss_impl not in ("fused", "checkpoint"):
            raise ValueError(f"loss_impl must be 'fused' or 'checkpoint', got {self.loss_impl!r}")
        if self.num_aux_heads < 1 and self.mode != "ntp":
            raise ValueError(f"num_aux_heads must be at least 1 in {self.mode} mode, got {self.num_aux_heads}")


def bf16_native(use_cpu: bool) -> bool:
    """Whether the device the Trainer will use multiplies bf16 natively: the CPU with `use_cpu`, else the accelerator
    torch sees (a TPU counts), else the CPU."""
    if not use_cpu and is_torch_xla_available():
        return True
    return resolve_mixed_precision("auto", "cpu" if use_cpu else resolve_device("auto")) == "bf16"


class _HeadTotals:
    """Running sums of per-head loss, valid targets and top-1 hits between two log calls."""

    def __init__(self):
        self.loss = self.count = self.correct = None

    def add(self, loss_sums, counts, correct):
        loss = torch.stack([s.detach().double() for s in loss_sums])
        if self.loss is None:
            self.loss, self.count, self.correct = loss, counts.detach().clone(), correct.detach().clone()
        else:
            self.loss += loss
            self.count += counts
            self.correct += correct


class CAFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the CAFT multi-token loss; see `CAFTConfig` for the settings.

    `model` may be a transformers model (heads are attached if it has none), a model id or folder, or the
    bundled name `smollm2-135m-instruct`. With a `peft_config`, LoRA is kept out of the heads. QLoRA: a
    `quantization_config` (`BitsAndBytesConfig(load_in_4bit=True)`) loads a named model in 4 bits, its last
    decoder layer (which the heads copy) and unembedding unquantised (`qlora.py`); a 4-bit model given must hold
    that layer unquantised too.
    """

    # `compute_loss` normalises by the valid targets of the whole optimisation step (all micro-batches and
    # processes), so the Trainer must not divide it again by the gradient-accumulation steps.
    loss_is_scaled_for_ga = True
    # TRL's model-card hooks: the tags pushed with the model, the method's name and its paper.
    _tag_names = ["trl", "caftkit", "concept-aware-fine-tuning"]
    _name = "CAFT"
    _paper = CAFT_PAPER

    def __init__(self, model, args: CAFTConfig | None = None, *pos, peft_config=None, quantization_config=None,
                 **kwargs):
        if args is None:
            args = CAFTConfig("caft-output")
        if not isinstance(args, CAFTConfig):
            raise TypeError(f"CAFTTrainer needs a CAFTConfig, got {type(args).__name__}")
        if isinstance(model, str):
            path, offline = pretrained_source(model)
            init_kwargs = trainer_model_kwargs(model, args.model_init_kwargs, quantization_config)
            model = AutoModelForCausalLM.from_pretrained(path, **{**offline, **init_kwargs})
            quantization_config = None  # used here, not by SFTTrainer (which would load the model again)
        four_bit = prepare_4bit_model(model, needs_heads=args.mode != "ntp")
        self._prepare_heads(model, args)
        if args.learning_rate is None:
            adapters = peft_config is not None or isinstance(model, PeftModel)
            args.learning_rate = DEFAULT_LEARNING_RATES["lora" if adapters else "full"]
        if peft_config is not None:
            keep_lora_out_of_heads(peft_config, model)  # frozen copies, trained only as themselves
        if four_bit and get_heads(model) is not None:
            get_heads(model).requires_grad_(False)  # out of SFTTrainer's bf16 cast of a 4-bit model's weights
        self._step_counts: torch.Tensor | None = None
        self._head_totals = {"train": _HeadTotals(), "eval": _HeadTotals()}
        self._warned_unstable_heads = False
        super().__init__(model, args, *pos, peft_config=peft_config, quantization_config=quantization_config,
                         **kwargs)
        if four_bit:
            restore_adapter_dtype(self.model)
        # PEFT marks every non-LoRA weight frozen; in head training the heads must stay trainable.
        heads = get_heads(self.model)
        if heads is not None and (args.mode == "heads" or args.train_heads):
            heads.requires_grad_(True)
        self.trunk_cache = None
        if args.mode == "heads" and args.trunk_cache_gb > 0:
            if trunk_is_deterministic(unwrap_model(self.model), heads):
                self.trunk_cache = TrunkCache(int(args.trunk_cache_gb * 2**30))
            else:
                warnings.warn("the base model has dropout: its outputs differ between epochs and are not cached",
                              UserWarning, stacklevel=2)

    @staticmethod
    def _prepare_heads(model, args: CAFTConfig) -> None:
        base = unwrap_model(model)
        if args.mode != "ntp":
            if args.heads_path is not None:
                attach_heads(base, args.heads_path)
            elif get_heads(base) is None:
                if base is not model:
                    raise ValueError("attach heads (caftkit.attach_heads) before wrapping the model with PEFT")
                attach_heads(base, args.num_aux_heads)
        if args.mode == "heads":
            # Eq. 3: only the auxiliary layers learn.
            base.requires_grad_(False)
            get_heads(base).requires_grad_(True)
            return
        heads = get_heads(base)
        if heads is not None:
            heads.requires_grad_(args.train_heads)
        if args.freeze_unembedding:
            find_model_parts(base).lm_head.requires_grad_(False)

    @property
    def num_aux_heads(self) -> int:
        """Auxiliary heads the loss runs: none in `ntp` mode."""
        if self.args.mode == "ntp":
            return 0
        return min(self.args.num_aux_heads, get_heads(self.model).num_aux_heads)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if not isinstance(sampler, LengthGroupedSampler):
            return sampler
        # Batches are formed at the size of the whole step (all processes): accelerate hands each process its
        # consecutive slice of them, so that any number of processes sees the batches one process would.
        step_batch = sampler.batch_size * self.args.world_size
        if self.trunk_cache is not None:
            # Cached trunk outputs are per batch: the same batches must come back every epoch.
            return FixedBatchesSampler(sampler.lengths, step_batch, seed=seed)
        return SeededLengthGroupedSampler(step_batch, lengths=sampler.lengths, seed=seed)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # accelerate puts autocast around the model's forward only; the heads and the chunked cross-entropy run
        # outside it, in `compute_loss`, and must be under the same mixed precision.
        if self.args.bf16 or self.args.fp16:
            return self.accelerator.autocast()
        return super().autocast_smart_context_manager(cache_enabled)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Every head's mean is taken over its valid targets in the whole optimisation step: all accumulated
        # micro-batches, on all processes. Counted here, where the whole step's batches are known.
        n = self.num_aux_heads
        counts = torch.zeros(n + 1, dtype=torch.long, device=device)
        for batch in batch_samples:
            counts += count_targets(batch, n).to(device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._step_counts = counts
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._averages_gradients_itself(model):
            average_gradients(p for p in model.parameters() if p.requires_grad)
        return loss

    def _averages_gradients_itself(self, model) -> bool:
        """Whether this optimisation step's gradients are averaged over processes here rather than by DDP.

        DDP averages through hooks that its forward arms only when that forward records gradients: in head
        training it runs without them (the base is frozen). And a model that accelerate did not wrap at all
        (e.g. one already prepared for evaluation) is not synchronised either. FSDP and DeepSpeed reduce
        gradients in their own backward."""
        if self.accelerator.num_processes == 1 or not self.accelerator.sync_gradients:
            return False
        if self.accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            return False
        return self.args.mode == "heads" or not isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def current_gamma(self) -> float:
        """gamma(step) of the configured schedule at the current optimisation step."""
        return gamma_schedule(self.args.schedule, self.state.global_step, self.state.max_steps, self.args.schedule_end)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        split = "train" if model.training else "eval"
        mode = self.args.mode
        n = self.num_aux_heads
        stats = head_statistics(
            model,
            inputs,
            num_aux_heads=n,
            train_trunk=mode != "heads",
            heads_need_grad=mode != "ntp",
            main_needs_grad=mode != "heads",
            impl=self.args.loss_impl,
            trunk_cache=self.trunk_cache,
        )
        if split == "train" and self._step_counts is not None:
            counts = self._step_counts
            # Each process divides by the global count; DDP then averages gradients over processes.
            scale = self.accelerator.num_processes
        else:
            counts, scale = stats.counts, 1
        weights = head_loss_weights(mode, n, alpha=self.args.alpha, beta=self.args.beta, gamma=self.current_gamma())
        loss = weighted_loss(stats, weights, counts) * scale
        self._head_totals[split].add(stats.loss_sums, stats.counts, stats.correct)
        if split == "train" and "attention_mask" in inputs:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
            self._metrics[split]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if self.model.training else "eval"
        totals = self._head_totals[split]
        if totals.loss is not None:
            loss, count, correct = totals.loss, totals.count, totals.correct
            if self.accelerator.num_processes > 1:
                loss = self.accelerator.reduce(loss.to(self.accelerator.device), reduction="sum")
                count = self.accelerator.reduce(count.to(self.accelerator.device), reduction="sum")
                correct = self.accelerator.reduce(correct.to(self.accelerator.device), reduction="sum")
            prefix = "eval_" if split == "eval" else ""
            for k, (s, c, h) in enumerate(zip(loss.tolist(), count.tolist(), correct.tolist()), start=1):
                if c > 0:
                    logs[f"{prefix}loss_head_{k}"] = s / c
                    logs[f"{prefix}accuracy_head_{k}"] = h / c
            if split == "train" and self.args.mode == "caft":
                logs["caft_gamma"] = self.current_gamma()
            self._warn_if_unstable(logs.get(f"{prefix}loss_head_2"))
            self._head_totals[split] = _HeadTotals()
        super().log(logs, start_time)

    def _warn_if_unstable(self, l2: float | None) -> None:
        if l2 is None or self._warned_unstable_heads or self.args.mode != "caft":
            return
        if l2 > self.args.l2_warning_threshold:
            self._warned_unstable_heads = True
            warnings.warn(
                f"auxiliary loss L2 = {l2:.2f} > {self.args.l2_warning_threshold}: the heads predict this task's "
                "tokens "
                "too badly to help (the paper's rule of thumb). Warm them up first: one epoch of head training "
                "(mode='heads') on this task's training set, starting from these heads.",
                UserWarning,
                stacklevel=2,
            )

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """The run folder's README.md, which TRL writes with each checkpoint: a caftkit run (CAFT or next-token) of
        its base, named even when it is a local folder, and how to export it."""
        if not self.is_world_process_zero():
            return
        method = "lora" if hasattr(self.model, "peft_config") else "full"
        run_folder_card(self._base_name(), self.args.mode, method).save(Path(self.args.output_dir) / CARD_FILE)

    def _base_name(self) -> str | None:
        return getattr(unwrap_model(self.model).config, "_name_or_path", None) or None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.mode == "heads":
            # Head training (eq. 3) leaves the base untouched: a checkpoint holds the heads, not another copy of
            # the base model.
            if self.args.should_save:
                target = Path(output_dir if output_dir is not None else self.args.output_dir)
                target.mkdir(parents=True, exist_ok=True)
                torch.save(self.args, target / TRAINING_ARGS_NAME)
        else:
            super()._save(output_dir, state_dict)
            if hasattr(self.model, "peft_config") and self.args.should_save:
                # PEFT writes a blank template card (and a local folder as `base_model`) beside the adapter.
                target = Path(output_dir if output_dir is not None else self.args.output_dir)
                adapter_card(self._base_name(), self.args.mode).save(target / CARD_FILE)
        heads = get_heads(self.model)
        # The model's own checkpoint leaves the heads out (it stays a plain transformers checkpoint); heads that
        # train are saved beside it so that resuming restores them.
        if heads is not None and any(p.requires_grad for p in heads.parameters()) and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            # Under FSDP only the main process gets here, with the model's state already gathered whole.
            gathered = heads_state_from_model_state(state_dict) if state_dict is not None else None
            save_heads(heads, Path(output_dir) / CHECKPOINT_HEADS_DIR, state_dict=gathered,
                       training={"mode": self.args.mode, "global_step": self.state.global_step})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.args.mode != "heads":  # head-training checkpoints hold only the heads (see `_save`)
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_checkpoint_heads(resume_from_checkpoint, model if model is not None else self.model)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_checkpoint_heads(self.state.best_model_checkpoint, self.model)

    @staticmethod
    def _load_checkpoint_heads(checkpoint: str, model) -> None:
        """Restore heads that trained from `checkpoint`: the model's own weights there leave them out (`_save`)."""
        heads_file = Path(checkpoint) / CHECKPOINT_HEADS_DIR / HEADS_WEIGHTS_FILE
        heads = get_heads(model)
        if heads is not None and heads_file.is_file():
            heads.load_state_dict(load_file(str(heads_file)))
