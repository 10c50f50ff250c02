"""QLoRA: LoRA adapters trained on a base whose linear projections bitsandbytes holds in 4 bits (`caft finetune
--load-in-4bit`, TRL's `load_in_4bit`).

Two parts of the base stay in the compute dtype (`--dtype`), besides the embeddings and norms, which bitsandbytes
never quantises:

- the last decoder layer: the auxiliary heads are copies of it and check its weights against their fingerprint, so
  that heads trained on the full-precision base attach to the 4-bit one unchanged. The heads already hold n - 1
  copies of it in that dtype; one more costs 1/L of the decoder;
- the unembedding, whose weight the chunked cross-entropy of every head reads itself.

The adapters go on before any Trainer sees the model (`with_lora_adapters`): transformers trains a 4-bit model
only through adapters, the head warm-up (which trains the heads alone) included. `caft export` merges them into
the base loaded again in full precision: the exported model is a plain checkpoint, not a quantised one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import PartialState
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, set_seed

from ..core.architecture import find_model_parts, unwrap_model
from ..core.distributed import world_size
from ..core.heads import keep_lora_out_of_heads
from ..models import parse_dtype, pretrained_source

INSTALL = "pip install 'caftkit[qlora]'"


def import_bitsandbytes():
    """bitsandbytes, or one line naming the package and the caftkit extra that installs it."""
    try:
        import bitsandbytes  # deferred: optional extra, caftkit[qlora]
    except ImportError:
        raise ValueError(f"load_in_4bit: QLoRA needs the package bitsandbytes, which is not installed ({INSTALL})"
                         ) from None
    return bitsandbytes


def check_4bit_runs(device: str, dtype: str, quant_type: str = "nf4") -> None:
    """Refuse, in one line and before any model loads, a device where bitsandbytes cannot train through a 4-bit
    layer: its 4-bit kernels are quantised, run forward and backward on one small layer in `dtype`."""
    bnb = import_bitsandbytes()
    compute_dtype = parse_dtype(dtype)
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type=quant_type).to(device)
        inputs = torch.ones(2, 64, dtype=compute_dtype, device=device, requires_grad=True)
        layer(inputs).float().sum().backward()
        if inputs.grad is None or not torch.isfinite(inputs.grad).all():
            raise RuntimeError("no finite gradient through the 4-bit layer")
    except Exception as error:  # whatever bitsandbytes raises where it has no kernel for this device or dtype
        text = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"load_in_4bit: QLoRA needs bitsandbytes with a supported device; bitsandbytes "
                         f"{bnb.__version__} does not train a 4-bit layer on {device} in {dtype} ({text})") from None


def kept_in_compute_dtype(model) -> list[str]:
    """The qualified names of the modules of `model` (a model or a skeleton of it) that stay unquantised: the last
    decoder layer and the unembedding."""
    base = unwrap_model(model)
    parts = find_model_parts(base)
    names = {id(module): name for name, module in base.named_modules()}
    return [names[id(parts.last_layer)], names[id(parts.lm_head)]]


def _skeleton(name_or_path: str):
    """`name_or_path` built from its config on the meta device: its module names, without weights or memory."""
    path, offline = pretrained_source(name_or_path)
    config = AutoConfig.from_pretrained(path, **offline)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def four_bit_config(kept: list[str], quant_type: str, nested_quant: bool, dtype: str):
    """transformers' `BitsAndBytesConfig` of a 4-bit base, as TRL's `get_quantization_config` makes it (computing
    in `dtype`), with the modules `kept` left unquantised."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested_quant,
                              bnb_4bit_compute_dtype=parse_dtype(dtype), llm_int8_skip_modules=kept)


def keeping(config, kept: list[str]):
    """A copy of the `BitsAndBytesConfig` `config` that also leaves the modules `kept` unquantised."""
    config = copy.deepcopy(config)
    # A skip list of one's own replaces transformers' default one (the unembedding): both are kept here.
    config.llm_int8_skip_modules = sorted(set(config.llm_int8_skip_modules or []) | set(kept))
    return config


def four_bit_loading(name_or_path: str, quant_type: str, nested_quant: bool, dtype: str,
                     device: str) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load `name_or_path` for QLoRA on `device`: a bitsandbytes model
    cannot be moved after loading, so it loads where it trains (each process on its own device)."""
    config = four_bit_config(kept_in_compute_dtype(_skeleton(name_or_path)), quant_type, nested_quant, dtype)
    if device != "cpu" and world_size() > 1:
        device = str(PartialState().device)
    return {"quantization_config": config, "device_map": {"": device}}


def is_4bit(model) -> bool:
    """Whether `model` (or the model inside its PEFT or DDP wrappers) was loaded in 4 bits."""
    return bool(getattr(unwrap_model(model), "is_loaded_in_4bit", False))


def quantized_last_layer(model) -> str | None:
    """The qualified name of the last decoder layer of `model` where it holds 4-bit projections, else None."""
    last_layer = find_model_parts(unwrap_model(model)).last_layer
    if any(type(param).__name__ == "Params4bit" for param in last_layer.parameters()):
        return kept_in_compute_dtype(model)[0]
    return None


def keep_training_exact(model) -> None:
    """Keep every 4-bit layer of `model` on the kernels it trains with, in evaluation too.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weights in place the first time the layer
    runs in eval mode without gradients, into the layout of an inference kernel that has no backward; the layer
    keeps that layout, so training after the first evaluation takes gradients through it. Measured on the bundled
    SmolLM2-135M (NF4, float32 compute, LoRA r 8): after one evaluation the LoRA gradients of the same batch moved
    by up to 0.26, and three AdamW steps lowered the loss from 8.82 to 8.55 instead of from 8.83 to 7.34. With the
    repacking off, evaluation multiplies as training does and the gradients after it are identical."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def with_lora_adapters(model, lora_config, seed: int):
    """`model` wrapped with LoRA adapters (`lora_config`, the auxiliary heads left out), initialised from `seed`
    as SFTTrainer initialises its own."""
    keep_training_exact(model)
    keep_lora_out_of_heads(lora_config, model)
    set_seed(seed)
    return get_peft_model(model, lora_config)


def trainer_model_kwargs(name_or_path: str, init_kwargs: dict[str, Any] | None,
                         quantization_config) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments of `CAFTTrainer` loading `name_or_path` itself: `model_init_kwargs`
    with `quantization_config` (given once, as SFTTrainer asks); a 4-bit config keeps the last decoder layer and
    the unembedding unquantised."""
    kwargs = dict(init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config: given both to CAFTTrainer and in args.model_init_kwargs; give it "
                             "once")
        kwargs["quantization_config"] = quantization_config
    config = kwargs.get("quantization_config")
    if isinstance(config, dict):
        config = BitsAndBytesConfig(**config)
    if getattr(config, "load_in_4bit", False):
        kwargs["quantization_config"] = keeping(config, kept_in_compute_dtype(_skeleton(name_or_path)))
    return kwargs


def prepare_4bit_model(model, needs_heads: bool) -> bool:
    """For a 4-bit `model` (returns whether it is one): refuse it when the heads need its last decoder layer and
    that layer is quantised, and keep its 4-bit layers training exactly (`keep_training_exact`)."""
    if not is_4bit(model):
        return False
    name = quantized_last_layer(model)
    if needs_heads and name is not None:
        kept = kept_in_compute_dtype(model)
        raise ValueError(f"the auxiliary heads are copies of the last decoder layer, {name}, which this model holds "
                         f"in 4 bits: load it with BitsAndBytesConfig(llm_int8_skip_modules={kept}), or give "
                         "CAFTTrainer the model's name and quantization_config=")
    keep_training_exact(model)
    return True


def restore_adapter_dtype(model) -> None:
    """Put the trainable weights of a 4-bit `model` back in float32, where PEFT makes adapters (its
    `autocast_adapter_dtype`): SFTTrainer casts them to bfloat16 on a quantised base (the QLoRA paper's setting),
    where an Adam update smaller than about 1/256 of its weight is rounded away. Measured on the tests' tiny llama,
    12 steps at the default 2e-4: in bfloat16, 38% of the entries of LoRA's A matrices moved at all; in float32,
    all of them. Call it with the heads frozen: they keep the dtype of the layer they copy."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
