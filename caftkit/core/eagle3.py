"""Head 2 as an EAGLE-3 draft: the engine draft format a caftkit head maps onto exactly, so that vLLM and SGLang
serve it.

An EAGLE-3 draft layer reads an auxiliary hidden state of the base (the residual stream after some of its layers,
through a linear `fc`) and the embedding of the next token, normalises each (`hidden_norm`, `input_layernorm`),
concatenates them into q/k/v, and is otherwise a decoder layer, followed by a final norm and an unembedding. Head 2
of caftkit is a copy of layer L reading the input of layer L and predicting token t+2 through the base's final norm
and unembedding. Hence, exactly:

- the auxiliary hidden state is the residual stream after L-1 layers, the input of layer L
  (`eagle_config.eagle_aux_hidden_state_layer_ids = [num_hidden_layers - 1]`), and `fc` is the identity;
- the embedding half of `q_proj`, `k_proj` and `v_proj` is zero, the other half the head's own projection, so the
  token embedding (and `input_layernorm`, kept at ones) changes nothing;
- `hidden_norm` is the head's input norm, and the residual is the unnormalised hidden state
  (`norm_before_residual = false`);
- every other weight of the layer is the head's; `norm` is the base's final norm, `lm_head` its unembedding.

Only the first draft token is exact: an engine drafts further tokens by feeding the draft's own output state back,
which is not what heads 3..n read (they stay caftkit's own). Families: the bases whose layer the engines' EAGLE-3
layers reproduce (`EAGLE3_ARCHITECTURES`); any other is refused, naming why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from .architecture import find_model_parts, unwrap_model
from .heads import AuxiliaryHeads, base_fingerprint

# Base model type -> the architecture name engines load an EAGLE-3 draft of it by.
EAGLE3_ARCHITECTURES = {"llama": "LlamaForCausalLMEagle3", "qwen3": "Eagle3Qwen3ForCausalLM"}
# Settings of the base a draft layer must share to compute what its layer does; anything else the engines' draft
# layers would compute differently.
_UNSUPPORTED = {"mlp_bias": lambda bias: bias is True, "hidden_act": lambda act: act != "silu",
                "use_sliding_window": lambda used: used is True}


def _base_config(model: nn.Module):
    return unwrap_model(model).config.get_text_config()


def eagle3_refusal(model: nn.Module) -> str | None:
    """Why the base's heads cannot be written as an exact EAGLE-3 draft; None when they can."""
    config = _base_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in EAGLE3_ARCHITECTURES:
        return (f"model_type {model_type!r}: engines load EAGLE-3 drafts of {', '.join(EAGLE3_ARCHITECTURES)} bases "
                "only")
    for name, refused in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and refused(value):
            return f"{name}={value!r}: an EAGLE-3 draft layer of vLLM and SGLang does not compute it"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window layers: an EAGLE-3 draft layer attends over the whole sequence"
    return None


def _layer_shapes(config, hidden: int, two_hidden: int) -> dict[str, tuple[int, ...]]:
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "midlayer.input_layernorm.weight": (hidden,),
        "midlayer.hidden_norm.weight": (hidden,),
        "midlayer.post_attention_layernorm.weight": (hidden,),
        "midlayer.self_attn.q_proj.weight": (q_out, two_hidden),
        "midlayer.self_attn.k_proj.weight": (kv_out, two_hidden),
        "midlayer.self_attn.v_proj.weight": (kv_out, two_hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, q_out),
        "midlayer.mlp.gate_proj.weight": (config.intermediate_size, hidden),
        "midlayer.mlp.up_proj.weight": (config.intermediate_size, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, config.intermediate_size),
    }
    if getattr(config, "attention_bias", False):
        shapes.update({"midlayer.self_attn.q_proj.bias": (q_out,), "midlayer.self_attn.k_proj.bias": (kv_out,),
                       "midlayer.self_attn.v_proj.bias": (kv_out,), "midlayer.self_attn.o_proj.bias": (hidden,)})
    if config.model_type == "qwen3":
        shapes.update({"midlayer.self_attn.q_norm.weight": (head_dim,),
                       "midlayer.self_attn.k_norm.weight": (head_dim,)})
    return shapes


def eagle3_layout(draft_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight an engine loads from an EAGLE-3 draft with this config, and its shape: one layer (`midlayer.`,
    q/k/v reading the embedding and the hidden state concatenated), `fc`, `norm` and `lm_head`."""
    config = AutoConfig.for_model(**{key: value for key, value in draft_config.items() if key != "architectures"})
    hidden = config.hidden_size
    aux = len(draft_config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    return {**_layer_shapes(config, hidden, 2 * hidden),
            "fc.weight": (hidden, aux * draft_config["target_hidden_size"]), "norm.weight": (hidden,),
            "lm_head.weight": (draft_config["draft_vocab_size"], hidden)}


def check_eagle3_draft(draft_config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a draft whose weights are not exactly the layout an engine loads: a missing key would be left at its
    initial value by some engine releases, silently; an extra one may be ignored or refused; a wrong shape fails
    late. `source` names the draft in the error."""
    expected = eagle3_layout(draft_config)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
                   for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"unexpected {', '.join(extra)}"] if extra else []) + ([f"wrong shapes: {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise ValueError(f"{source}: not a complete EAGLE-3 draft: {'; '.join(problems)}")


def eagle3_draft(model: nn.Module, heads: AuxiliaryHeads) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the weights of head 2 (the first auxiliary head) as an EAGLE-3 draft of `model`, checked
    against the layout engines load."""
    refusal = eagle3_refusal(model)
    if refusal is not None:
        raise ValueError(f"cannot write these heads as an EAGLE-3 draft: {refusal}")
    base = unwrap_model(model)
    config = _base_config(model)
    parts = find_model_parts(base)
    head = {name: tensor.detach().to("cpu").clone() for name, tensor in heads.layers[0].state_dict().items()}
    hidden = config.hidden_size
    state: dict[str, torch.Tensor] = {}
    for name, tensor in head.items():
        key = f"midlayer.{name}"
        if name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            # the first half reads the token's embedding: zero, so that only the hidden state counts
            tensor = torch.cat([torch.zeros_like(tensor), tensor], dim=1)
        elif name == "input_layernorm.weight":
            key = "midlayer.hidden_norm.weight"
        state[key] = tensor.contiguous()
    reference = state["midlayer.hidden_norm.weight"]
    state["midlayer.input_layernorm.weight"] = torch.ones_like(reference)  # normalises the (ignored) embedding
    state["fc.weight"] = torch.eye(hidden, dtype=reference.dtype)
    state["norm.weight"] = parts.final_norm.weight.detach().to("cpu").clone()
    state["lm_head.weight"] = parts.lm_head.weight.detach().to("cpu").clone()
    draft_config = {
        **config.to_dict(),
        "architectures": [EAGLE3_ARCHITECTURES[config.model_type]],
        "num_hidden_layers": 1,
        "tie_word_embeddings": False,
        "draft_vocab_size": parts.lm_head.weight.shape[0],
        "target_hidden_size": hidden,
        "norm_before_residual": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [len(parts.layers) - 1], "use_aux_hidden_state": True},
        "caftkit": {"head": 2, "base_fingerprint": base_fingerprint(base)},
    }
    for name in ("layer_types", "auto_map", "_name_or_path"):
        draft_config.pop(name, None)
    check_eagle3_draft(draft_config, state, "the draft written from these heads")
    return draft_config, state
