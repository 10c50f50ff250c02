"""Auxiliary heads: copies of the last decoder layer that predict tokens t+2..t+n.

Head k (k = 2..n) is an independent copy of layer L, initialised from its weights. It reads z, the hidden
state entering layer L, with exactly the attention mask, position embeddings and position ids layer L got
(captured by a forward pre-hook, the KV cache left out: `core/layer_call.py`), then goes through the model's own
final norm and `lm_head`.

The heads live on the model as `model.caft_heads`, so optimizers, checkpoints and sharding see them, but they
never run in the model's own forward and `save_pretrained()` leaves them out: the model's logits,
`generate()` output, hidden states and saved checkpoint are exactly what they are without heads.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files.atomic import atomic_path, write_json
from ..files.json_text import read_json_file
from ..models import read_model_config
from .architecture import find_model_parts, unwrap_model
from .distributed import is_main_process, whole_tensor
from .layer_call import LayerCall

HEADS_ATTRIBUTE = "caft_heads"
HEADS_WEIGHTS_FILE = "heads.safetensors"
HEADS_CONFIG_FILE = "heads_config.json"
HEADS_FORMAT_VERSION = 1


def without_adapters(layer: nn.Module) -> nn.Module:
    """`layer` as the base model has it: where adapters wrap some of its modules (PEFT's LoRA layers, which hold
    the module they adapt as their base layer), a copy with each wrapper replaced by that module; else `layer`
    itself. Heads are copies of layer L and its fingerprint is of its base weights, adapters on it or not (QLoRA
    wraps the model before the head warm-up)."""

    def wrapped(module: nn.Module) -> bool:
        return callable(getattr(module, "get_base_layer", None))

    if not any(wrapped(module) for module in layer.modules()):
        return layer

    def unwrap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if wrapped(child):
                setattr(module, name, child.get_base_layer())
            else:
                unwrap(child)

    copied = copy.deepcopy(layer)
    unwrap(copied)
    return copied


class HeadsMismatchError(ValueError):
    """Heads were trained for a different base model than the one they are attached to."""


# What `base_fingerprint` records; a heads folder must hold every one of them.
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "last_layer_sha256")


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model a set of heads belongs to.

    The hash covers layer L's weights rounded to bfloat16, so the same base loaded in float32 or bfloat16
    gives the same fingerprint, while a different model (or a fine-tuned layer L) does not.
    """
    parts = find_model_parts(model)
    config = unwrap_model(model).config.get_text_config()
    digest = hashlib.sha256()
    for name, tensor in sorted(without_adapters(parts.last_layer).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return {
        "model_type": parts.model_type,
        "hidden_size": int(getattr(config, "hidden_size", None) or config.n_embd),
        "vocab_size": int(parts.lm_head.weight.shape[0]),
        "num_hidden_layers": len(parts.layers),
        "last_layer_sha256": digest.hexdigest(),
    }


def _check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], source: str) -> None:
    differing = [key for key in expected if expected.get(key) != actual.get(key)]
    if differing:
        details = ", ".join(f"{key}: heads {expected.get(key)!r} vs model {actual.get(key)!r}" for key in differing)
        raise HeadsMismatchError(
            f"{source}: these heads were trained for another base model ({details}). Train heads for this model "
            "with `caft train-heads`, or pass check_base=False if you know the layer L they copy is compatible."
        )


class AuxiliaryHeads(nn.Module):
    """`num_aux_heads` copies of the last decoder layer; head i (0-based) predicts token t + i + 2."""

    def __init__(self, last_layer: nn.Module, num_aux_heads: int):
        super().__init__()
        if num_aux_heads < 1:
            raise ValueError(f"num_aux_heads must be at least 1, got {num_aux_heads}")
        last_layer = without_adapters(last_layer)
        self.layers = nn.ModuleList(copy.deepcopy(last_layer) for _ in range(num_aux_heads))
        self.metadata: dict[str, Any] = {}

    @property
    def num_aux_heads(self) -> int:
        return len(self.layers)

    def forward(self, call: LayerCall, num_aux_heads: int | None = None) -> list[torch.Tensor]:
        """Run the first `num_aux_heads` heads on a captured call of layer L; returns their outputs before the norm."""
        return [self.head_output(index, call.hidden_states, call)
                for index in range(num_aux_heads or self.num_aux_heads)]

    def head_output(self, index: int, hidden_states: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Head `index` (0-based) on `hidden_states`, with the other arguments of the captured call of layer L."""
        out = self.layers[index](hidden_states, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def from_former_num_heads(num_heads: int | None, num_aux_heads, where: str):
    """`num_aux_heads`; the former name `num_heads` is refused with the current one (code written before the rename
    gets a `TypeError` that says what to write)."""
    if num_heads is not None:
        raise TypeError(f"{where}(num_heads=...) was renamed num_aux_heads")
    return num_aux_heads


def get_heads(model: nn.Module) -> AuxiliaryHeads | None:
    """The heads attached to `model` (looked up through PEFT/DDP wrappers), or None."""
    return getattr(unwrap_model(model), HEADS_ATTRIBUTE, None)


def _set_save_exclusion(model: nn.Module, heads: AuxiliaryHeads | None, previous: AuxiliaryHeads | None) -> None:
    # `save_pretrained` drops the keys listed in the instance's `_keys_to_ignore_on_save`; listing the heads
    # there keeps every saved checkpoint a plain transformers one.
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    if previous is not None:
        ignored -= {f"{HEADS_ATTRIBUTE}.{key}" for key in previous.state_dict()}
    if heads is not None:
        ignored |= {f"{HEADS_ATTRIBUTE}.{key}" for key in heads.state_dict()}
    model._keys_to_ignore_on_save = ignored


def attach_heads(
    model: nn.Module,
    heads: int | str | os.PathLike | AuxiliaryHeads | None = None,
    *,
    num_aux_heads: int = 4,
    trainable: bool = False,
    check_base: bool = True,
    num_heads: int | None = None,
) -> nn.Module:
    """Attach auxiliary heads to a causal LM and return the model.

    `attach_heads(model, num_aux_heads=4)` makes 4 new heads, copies of layer L (the paper's n = num_aux_heads + 1);
    `attach_heads(model, "heads/")` loads a folder written by `save_heads`; `heads` may also be a number of
    new heads or an `AuxiliaryHeads` module. Heads loaded from disk are checked against
    a fingerprint of this model's base (`check_base`). `trainable` sets `requires_grad` on the heads (they are
    frozen by default, as in CAFT fine-tuning). Attach before wrapping with PEFT, a Trainer or FSDP. `num_heads`,
    the former name of `num_aux_heads`, is refused naming it.
    """
    num_aux_heads = from_former_num_heads(num_heads, num_aux_heads, "attach_heads")
    base = unwrap_model(model)
    parts = find_model_parts(base)
    if isinstance(heads, AuxiliaryHeads):
        module = heads
    elif heads is None or isinstance(heads, int):
        module = AuxiliaryHeads(parts.last_layer, num_aux_heads if heads is None else heads)
        module.metadata = {"base_fingerprint": base_fingerprint(base), "training": None}
    else:
        module = load_heads(heads, base, check_base=check_base)
    param = next(parts.last_layer.parameters())
    module.to(device=param.device, dtype=param.dtype)
    module.requires_grad_(trainable)
    previous = get_heads(base)
    base.add_module(HEADS_ATTRIBUTE, module)
    _set_save_exclusion(base, module, previous)
    return model


def detach_heads(model: nn.Module) -> AuxiliaryHeads | None:
    """Remove the heads from `model` (the model is left exactly as before `attach_heads`); returns them."""
    base = unwrap_model(model)
    heads = get_heads(base)
    if heads is not None:
        delattr(base, HEADS_ATTRIBUTE)
        _set_save_exclusion(base, None, heads)
    return heads


def keep_lora_out_of_heads(peft_config, model: nn.Module) -> None:
    """Add the heads of `model`, where it has any, to a PEFT config's `exclude_modules` (a pattern, or a list of
    names, as the config already holds): the heads are frozen copies, trained only as themselves."""
    heads = get_heads(model)
    if heads is None:
        return
    excluded = peft_config.exclude_modules
    pattern = rf".*{HEADS_ATTRIBUTE}\..*"
    if excluded is None:
        peft_config.exclude_modules = pattern
    elif isinstance(excluded, str):
        peft_config.exclude_modules = rf"(?:{excluded})|(?:{pattern})"
    else:
        peft_config.exclude_modules = [*excluded, *(f"{HEADS_ATTRIBUTE}.{name}"
                                                   for name, _ in heads.named_modules() if name)]


def save_heads(heads: AuxiliaryHeads, directory: str | os.PathLike, training: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `heads.safetensors` and `heads_config.json` (architecture, base fingerprint, training) to a folder.

    Under several processes every one must call it (sharded heads are gathered); the main process writes.
    `state_dict` gives the weights already gathered (keys as in `heads.state_dict()`), and then only the process
    that writes needs to call it."""
    directory = Path(directory)
    if state_dict is None:
        # Sharded heads (FSDP2) are gathered whole on every process.
        state_dict = {key: whole_tensor(tensor.detach()) for key, tensor in heads.state_dict().items()}
    state = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items()}
    if not is_main_process():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    layer = heads.layers[0]
    config = {
        "format_version": HEADS_FORMAT_VERSION,
        "num_heads": heads.num_aux_heads,
        "predicts_offsets": list(range(2, heads.num_aux_heads + 2)),
        "layer_class": type(layer).__name__,
        "dtype": str(next(heads.parameters()).dtype).removeprefix("torch."),
        "base_fingerprint": heads.metadata.get("base_fingerprint"),
        "training": training if training is not None else heads.metadata.get("training"),
    }
    if heads.metadata.get("previous_base_fingerprints"):  # heads re-fitted after `rebase_heads` keep their history
        config["previous_base_fingerprints"] = heads.metadata["previous_base_fingerprints"]
    # Weights first, config last: an interrupted save never leaves a config naming weights that are not there.
    with atomic_path(directory / HEADS_WEIGHTS_FILE) as weights:
        save_file(state, str(weights), metadata={"format": "pt"})
    write_json(directory / HEADS_CONFIG_FILE, config)
    return directory


def rebase_heads(directory: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Record `model` as the base of the heads saved in `directory`, so that they attach to it.

    For a fine-tuned model whose layer L changed under the heads it was trained with (LoRA merged or full
    fine-tuning): the heads belong to that model now. The fingerprint they had moves to
    `previous_base_fingerprints` (oldest first). Returns the new config."""
    config = read_heads_config(directory)
    fingerprint = base_fingerprint(unwrap_model(model))
    if config["base_fingerprint"] != fingerprint:
        config["previous_base_fingerprints"] = config.get("previous_base_fingerprints", []) + [
            config["base_fingerprint"]]
        config["base_fingerprint"] = fingerprint
        write_json(Path(directory) / HEADS_CONFIG_FILE, config)
    return config


def heads_state_from_model_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The heads' entries of a whole model's state dict (e.g. gathered from FSDP shards, whatever wrapper prefixes
    its keys), keyed as in `AuxiliaryHeads.state_dict()`; None when it has none."""
    marker = f"{HEADS_ATTRIBUTE}."
    found = {key.split(marker, 1)[1]: tensor for key, tensor in model_state.items() if marker in key}
    return found or None


def read_heads_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a `heads/` folder, with a clear error when the folder or a file is missing or broken."""
    directory = Path(directory)
    config_path = directory / HEADS_CONFIG_FILE
    for path in (config_path, directory / HEADS_WEIGHTS_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a heads folder holds {HEADS_CONFIG_FILE} and "
                                    f"{HEADS_WEIGHTS_FILE}")
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object of the heads' settings")
    for key in ("num_heads", "base_fingerprint", "layer_class"):
        if key not in config:
            raise ValueError(f"{config_path}: field {key!r} is missing")
    count = config["num_heads"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{config_path}: field 'num_heads' must be a whole number of at least 1, got {count!r}")
    fingerprint = config["base_fingerprint"]
    missing = [key for key in FINGERPRINT_FIELDS if not isinstance(fingerprint, dict) or fingerprint.get(key) is None]
    if missing:
        # An empty or partial fingerprint would let the heads attach to any base without a check.
        raise ValueError(f"{config_path}: field 'base_fingerprint' lacks {', '.join(missing)}; these heads cannot be "
                         "checked against a base model (save them again with caftkit.save_heads)")
    return config


def check_heads_fit(directory: str | os.PathLike, model: str) -> dict[str, Any]:
    """Before `model` (a name or folder) loads: `directory` is a complete heads folder made for a model of this
    shape (architecture, hidden size, number of layers, as the model's config gives them). Returns the heads'
    config. The fingerprint of layer L's weights is compared once the model has loaded (`load_heads`)."""
    config = read_heads_config(directory)
    model_config = read_model_config(model)
    if model_config is None:
        return config
    text = model_config.get_text_config()
    shape = {"model_type": getattr(model_config, "model_type", None),
             "hidden_size": getattr(text, "hidden_size", None) or getattr(text, "n_embd", None),
             "num_hidden_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)}
    expected = {key: config["base_fingerprint"].get(key) for key, value in shape.items() if value is not None}
    _check_fingerprint(expected, shape, str(Path(directory) / HEADS_CONFIG_FILE))
    return config


def load_heads(directory: str | os.PathLike, model: nn.Module, *, check_base: bool = True) -> AuxiliaryHeads:
    """Rebuild the heads saved in `directory` for `model` (not attached; see `attach_heads`)."""
    config = read_heads_config(directory)
    base = unwrap_model(model)
    parts = find_model_parts(base)
    config_path = Path(directory) / HEADS_CONFIG_FILE
    if config["layer_class"] != type(parts.last_layer).__name__:
        raise HeadsMismatchError(
            f"{config_path}: field 'layer_class' is {config['layer_class']!r} but the model's last layer is "
            f"{type(parts.last_layer).__name__}: these heads belong to another architecture"
        )
    if check_base:
        _check_fingerprint(config["base_fingerprint"], base_fingerprint(base), str(config_path))
    heads = AuxiliaryHeads(parts.last_layer, int(config["num_heads"]))
    weights = Path(directory) / HEADS_WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:  # a file cut off or overwritten
        raise ValueError(f"{weights}: cannot read the heads' weights: {' '.join(str(error).split())}") from None
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HeadsMismatchError(
            f"{Path(directory) / HEADS_WEIGHTS_FILE}: weights do not fit {config['num_heads']} copies of "
            f"{config['layer_class']} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    heads.metadata = {key: config.get(key) for key in ("base_fingerprint", "training", "previous_base_fingerprints")}
    return heads
