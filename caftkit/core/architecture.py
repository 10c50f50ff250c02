"""Find the parts of a decoder-only transformers model that CAFT needs.

CAFT splits a causal LM into a trunk (embeddings and layers 1..L-1), the last decoder layer L, the final
norm and the unembedding (`lm_head`). Every auxiliary head is a copy of layer L that reads the hidden state
entering layer L, so the one thing this module has to know per architecture is where those parts live.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Attribute paths, relative to the causal-LM model, for the architectures caftkit is tested on. Anything else
# goes through `_find_generic`, which looks for the usual names.
_KNOWN_PATHS: dict[str, dict[str, str | None]] = {
    **{
        model_type: {"layers": "model.layers", "norm": "model.norm", "rotary": "model.rotary_emb"}
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
    },
    "gpt2": {"layers": "transformer.h", "norm": "transformer.ln_f", "rotary": None},
    "gpt_neox": {"layers": "gpt_neox.layers", "norm": "gpt_neox.final_layer_norm", "rotary": "gpt_neox.rotary_emb"},
}

_GENERIC_LAYER_NAMES = ("layers", "h", "blocks", "block")
_GENERIC_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "final_norm")


class UnsupportedModelError(ValueError):
    """The model's decoder layers, final norm or unembedding could not be found."""


@dataclass
class ModelParts:
    """The modules of a causal LM that the auxiliary heads are built from and read.

    `layers[-1]` is layer L; `final_norm` and `lm_head` are shared by the main head and every auxiliary head.
    `logit_scale` and `logit_softcap` reproduce what the model's forward does to `lm_head`'s output
    (Gemma 2 soft-caps its logits, Granite and Cohere scale them), so that head losses match the model's own.
    """

    model_type: str
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module | None
    logit_scale: float
    logit_softcap: float | None

    @property
    def last_layer(self) -> nn.Module:
        return self.layers[-1]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers `PreTrainedModel` inside PEFT, DDP or accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(
            model, "_orig_mod"
        ):
            model = getattr(model, "module", None) or model._orig_mod
        else:
            return model


def _get_path(root: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _find_generic(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, nn.Module | None]:
    backbone = getattr(model, "base_model", None) or model
    for candidate in (backbone, getattr(backbone, "decoder", None)):
        if candidate is None:
            continue
        layers = next(
            (getattr(candidate, n) for n in _GENERIC_LAYER_NAMES
             if isinstance(getattr(candidate, n, None), nn.ModuleList)),
            None,
        )
        if layers is not None:
            norm = next((getattr(candidate, n) for n in _GENERIC_NORM_NAMES if hasattr(candidate, n)), None)
            return layers, norm, getattr(candidate, "rotary_emb", None)
    return None, None, None


def _logit_transform(config) -> tuple[float, float | None]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scale = 1.0 / text_config.logits_scaling  # Granite divides its logits
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


def find_model_parts(model: nn.Module) -> ModelParts:
    """Locate layers, final norm, rotary embedding and `lm_head` of a causal LM (wrappers are looked through).

    Raises `UnsupportedModelError` naming what is missing when the model is not a decoder-only LM that
    caftkit can handle.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `config`: not a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model; CAFT needs a decoder-only LM")
    model_type = getattr(config, "model_type", "unknown")
    paths = _KNOWN_PATHS.get(model_type)
    if paths is not None:
        layers = _get_path(model, paths["layers"])
        norm = _get_path(model, paths["norm"])
        rotary = _get_path(model, paths["rotary"])
    else:
        layers, norm, rotary = _find_generic(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    missing = [
        name
        for name, part in (("decoder layers", layers), ("final norm", norm), ("lm_head", lm_head))
        if part is None
    ]
    if missing:
        raise UnsupportedModelError(
            f"cannot find the {', '.join(missing)} of {type(model).__name__} (model_type={model_type!r}); "
            "caftkit needs a decoder-only causal LM with a ModuleList of layers, a final norm and an output embedding"
        )
    if len(layers) < 1:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers")
    if getattr(lm_head, "weight", None) is None:
        # A PEFT-wrapped lm_head still has its base weight; the fused loss asks for a plain nn.Linear itself.
        raise UnsupportedModelError(f"the output embedding of {type(model).__name__} ({type(lm_head).__name__}) "
                                    "has no weight")
    scale, softcap = _logit_transform(config)
    return ModelParts(model_type, layers, norm, lm_head, rotary, scale, softcap)
