"""Head 2 as an EAGLE-3 draft: an independent implementation of the draft layer as the engines compute it (vLLM's
`llama_eagle3.py`, `qwen3_eagle3.py`), run on the written files, gives head 2's own logits; a draft with a weight
missing is refused before any engine sees it; bases the format cannot express are refused, naming why."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import saved_model_dir, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from caftkit.cli import main
from caftkit.core.architecture import find_model_parts
from caftkit.core.eagle3 import eagle3_draft, eagle3_refusal
from caftkit.core.heads import attach_heads, get_heads, save_heads
from caftkit.training.export_heads import read_eagle3_draft, write_eagle3_draft

TOKENS = torch.tensor([[1, 17, 23, 9, 40, 41, 12, 7, 88, 3]])


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def engine_draft_logits(config: dict, state: dict, model, tokens: torch.Tensor) -> torch.Tensor:
    """The EAGLE-3 draft's logits at every position, as an engine computes them from the draft's files: the
    auxiliary hidden state (the residual stream after `eagle_aux_hidden_state_layer_ids` layers of the base) through
    `fc`, the next tokens' embeddings and that state each normalised and concatenated into q/k/v, causal attention
    with the base's rotary positions, residual from the unnormalised state, MLP, final norm, `lm_head`."""
    eps = config["rms_norm_eps"]
    [layer_id] = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    with torch.no_grad():
        outputs = model(tokens, output_hidden_states=True)
        aux = outputs.hidden_states[layer_id]  # the residual stream after `layer_id` layers
        h = aux @ state["fc.weight"].T
        # the engine pairs the state at position t with the embedding of token t+1
        embeds = model.get_input_embeddings()(torch.roll(tokens, -1, dims=1))
        x = torch.cat([rms(embeds, state["midlayer.input_layernorm.weight"], eps),
                       rms(h, state["midlayer.hidden_norm.weight"], eps)], dim=-1)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        batch, time = tokens.shape

        def project(name: str, count: int) -> torch.Tensor:
            out = x @ state[f"midlayer.self_attn.{name}_proj.weight"].T
            if f"midlayer.self_attn.{name}_proj.bias" in state:
                out = out + state[f"midlayer.self_attn.{name}_proj.bias"]
            out = out.view(batch, time, count, head_dim)
            if f"midlayer.self_attn.{name}_norm.weight" in state:  # Qwen3's per-head norm, before rotary
                out = rms(out, state[f"midlayer.self_attn.{name}_norm.weight"], eps)
            return out.transpose(1, 2)

        q, k, v = project("q", heads), project("k", kv_heads), project("v", kv_heads)
        position_ids = torch.arange(time)[None]
        cos, sin = find_model_parts(model).rotary_emb(h, position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attention = attention.transpose(1, 2).reshape(batch, time, heads * head_dim)
        residual = h + attention @ state["midlayer.self_attn.o_proj.weight"].T
        normed = rms(residual, state["midlayer.post_attention_layernorm.weight"], eps)
        gate, up = normed @ state["midlayer.mlp.gate_proj.weight"].T, normed @ state["midlayer.mlp.up_proj.weight"].T
        mlp = (F.silu(gate) * up) @ state["midlayer.mlp.down_proj.weight"].T
        return rms(residual + mlp, state["norm.weight"], eps) @ state["lm_head.weight"].T


def head_2_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Head 2's logits, full and independent of caftkit's capture: the model run with its last layer swapped for
    the head."""
    parts = find_model_parts(model)
    original = parts.layers[-1]
    parts.layers[len(parts.layers) - 1] = get_heads(model).layers[0]
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        parts.layers[len(parts.layers) - 1] = original


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_the_engine_draft_computes_head_2(model_type, tmp_path):
    model = tiny_model(model_type, seed=2)
    attach_heads(model, 3)
    with torch.no_grad():  # heads that differ from the last layer, so that a wrong mapping shows
        for param in get_heads(model).parameters():
            param.add_(0.05 * torch.randn_like(param))
    write_eagle3_draft(model, tmp_path / "draft", {"test": True})
    config, state = read_eagle3_draft(tmp_path / "draft")
    assert config["architectures"] == [{"llama": "LlamaForCausalLMEagle3", "qwen3": "Eagle3Qwen3ForCausalLM"}[
        model_type]]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1]  # the input of layer 2 of 2
    assert config["num_hidden_layers"] == 1 and config["caftkit"]["head"] == 2
    expected = head_2_logits(model, TOKENS)
    drafted = engine_draft_logits(config, state, model, TOKENS)
    assert torch.allclose(drafted, expected, atol=1e-5)
    perturbed = dict(state)
    perturbed["midlayer.mlp.down_proj.weight"] = state["midlayer.mlp.down_proj.weight"] * 1.5
    assert not torch.allclose(engine_draft_logits(config, perturbed, model, TOKENS), expected, atol=1e-3)


def test_a_draft_missing_a_weight_is_refused(tmp_path):
    model = tiny_model("llama")
    attach_heads(model, 2)
    folder = write_eagle3_draft(model, tmp_path / "draft", {"test": True})
    state = load_file(str(folder / "model.safetensors"))
    del state["midlayer.hidden_norm.weight"]
    state["midlayer.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"draft: not a complete EAGLE-3 draft: missing midlayer.hidden_norm.weight; "
                                         r"unexpected midlayer.extra.weight"):
        read_eagle3_draft(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 65
    (folder / "config.json").write_text(json.dumps(config))
    state["midlayer.hidden_norm.weight"] = torch.ones(32)
    del state["midlayer.extra.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shapes: midlayer.mlp.down_proj.weight \(32, 64\) "
                                         r"\(expected \(32, 65\)"):
        read_eagle3_draft(folder)


@pytest.mark.parametrize("model_type, reason", [
    ("gpt2", "model_type 'gpt2': engines load EAGLE-3 drafts of llama, qwen3 bases only"),
    ("gemma3_text", "model_type 'gemma3_text'"),
])
def test_bases_the_format_cannot_express_are_refused(model_type, reason):
    model = tiny_model(model_type)
    attach_heads(model, 2)
    assert reason in eagle3_refusal(model)
    with pytest.raises(ValueError, match="cannot write these heads as an EAGLE-3 draft"):
        eagle3_draft(model, get_heads(model))


def test_export_heads_command_writes_the_draft_and_refuses_what_it_did_not_write(tmp_path, capsys):
    model = tiny_model("llama")
    attach_heads(model, 2)
    save_heads(get_heads(model), tmp_path / "heads")
    saved_model_dir(tmp_path / "model", tiny_model("llama"))
    command = ["export-heads", "--model", str(tmp_path / "model"), "--heads", str(tmp_path / "heads"), "--output"]
    assert main([*command, str(tmp_path / "draft")]) == 0
    assert "vllm serve" in capsys.readouterr().out
    config, state = read_eagle3_draft(tmp_path / "draft")
    assert torch.equal(state["midlayer.mlp.up_proj.weight"], get_heads(model).layers[0].mlp.up_proj.weight)
    assert main([*command, str(tmp_path / "draft")]) == 0  # an earlier draft is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main([*command, str(tmp_path / "mine")]) == 2
    assert "mine: exists and was not written by caft export-heads" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
