"""Heads of caftkit: architecture discovery, invisibility to the model, save/load, base fingerprints, capture."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ARCHITECTURES, HIDDEN, VOCAB, random_batch, tiny_model

from caftkit.core.architecture import UnsupportedModelError, find_model_parts
from caftkit.core.heads import (
    HEADS_ATTRIBUTE,
    HEADS_CONFIG_FILE,
    HEADS_WEIGHTS_FILE,
    AuxiliaryHeads,
    HeadsMismatchError,
    attach_heads,
    base_fingerprint,
    detach_heads,
    get_heads,
    load_heads,
    save_heads,
)

# Where each architecture keeps its parts, written out independently of caftkit's own table.
EXPECTED_PATHS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3"),
                    ("model.layers", "model.norm", "lm_head")),
    "gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
}


def _get(root, path):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _assert_state_dicts_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _left_padded_batch():
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[2, :5] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask


# Tiny models: one thread each (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# --- 1. find_model_parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_find_model_parts(arch):
    model = tiny_model(arch)
    parts = find_model_parts(model)
    layers_path, norm_path, head_path = EXPECTED_PATHS[arch]
    assert parts.model_type == model.config.model_type
    assert parts.layers is _get(model, layers_path)
    assert len(parts.layers) == 2
    assert parts.last_layer is parts.layers[-1]
    assert parts.final_norm is _get(model, norm_path)
    assert parts.lm_head is _get(model, head_path)
    assert parts.lm_head is model.get_output_embeddings()
    assert isinstance(parts.lm_head, torch.nn.Linear)
    assert parts.lm_head.weight.shape == (VOCAB, HIDDEN)
    assert parts.logit_scale == 1.0
    assert parts.logit_softcap == (30.0 if arch == "gemma3_text" else None)


def test_find_model_parts_rejects_plain_module():
    with pytest.raises(UnsupportedModelError, match=r"\bLinear\b"):
        find_model_parts(torch.nn.Linear(4, 4))


def test_find_model_parts_rejects_encoder_decoder():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration"):
        find_model_parts(model)
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration"):
        attach_heads(model, 2)
    assert not hasattr(model, HEADS_ATTRIBUTE)


# --- 2. heads are invisible to forward, hidden states and generate ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_do_not_change_outputs(arch):
    model = tiny_model(arch)
    model.generation_config.pad_token_id = 0
    batch = _model_inputs(random_batch(batch_size=3, seq_len=12, pad_last=4))
    left_ids, left_mask = _left_padded_batch()
    gen_kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        before = model(**batch, output_hidden_states=True)
        gen_before = model.generate(input_ids=left_ids, attention_mask=left_mask, **gen_kwargs)

    attach_heads(model, 3)
    assert get_heads(model).num_aux_heads == 3
    # The heads really differ from a no-op: make them differ from layer L, so that running one would show.
    with torch.no_grad():
        for p in get_heads(model).parameters():
            p.add_(1.0)

    with torch.no_grad():
        after = model(**batch, output_hidden_states=True)
        gen_after = model.generate(input_ids=left_ids, attention_mask=left_mask, **gen_kwargs)

    assert torch.equal(before.logits, after.logits)
    assert len(before.hidden_states) == len(after.hidden_states) == 3
    for h_before, h_after in zip(before.hidden_states, after.hidden_states):
        assert torch.equal(h_before, h_after)
    assert gen_before.shape == (3, 10 + 8)
    assert torch.equal(gen_before, gen_after)


# --- 3. save_pretrained leaves heads out; detach_heads -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_pretrained_excludes_heads(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "plain")
    attach_heads(model, 3)
    # The heads are part of the model's state (optimizers and sharding see them) yet must not be saved.
    assert any(key.startswith(f"{HEADS_ATTRIBUTE}.layers.2.") for key in model.state_dict())
    model.save_pretrained(tmp_path / "with_heads")

    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    with_heads = load_file(str(tmp_path / "with_heads" / "model.safetensors"))
    assert not any(HEADS_ATTRIBUTE in key for key in with_heads)
    assert any(key.endswith("weight") for key in plain)
    _assert_state_dicts_equal(plain, with_heads)
    assert sorted(p.name for p in (tmp_path / "with_heads").glob("*.safetensors")) == ["model.safetensors"]

    heads = detach_heads(model)
    assert isinstance(heads, AuxiliaryHeads) and heads.num_aux_heads == 3
    assert not hasattr(model, HEADS_ATTRIBUTE)
    assert get_heads(model) is None
    assert not any(HEADS_ATTRIBUTE in key for key in model.state_dict())
    assert not any(HEADS_ATTRIBUTE in key for key in (model._keys_to_ignore_on_save or ()))
    assert detach_heads(model) is None

    model.save_pretrained(tmp_path / "detached")
    _assert_state_dicts_equal(plain, load_file(str(tmp_path / "detached" / "model.safetensors")))


# --- 4. initialisation: independent copies of layer L -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_new_heads_copy_last_layer(arch):
    model = tiny_model(arch)
    parts = find_model_parts(model)
    layer_state = {k: v.clone() for k, v in parts.last_layer.state_dict().items()}
    attach_heads(model, 3)
    heads = get_heads(model)
    assert heads.num_aux_heads == len(heads.layers) == 3
    for head in heads.layers:
        assert type(head) is type(parts.last_layer)
        assert head is not parts.last_layer
        _assert_state_dicts_equal(head.state_dict(), layer_state)
    assert all(not p.requires_grad for p in heads.parameters())

    name, param = next((n, p) for n, p in heads.layers[0].named_parameters() if p.dim() > 1)
    with torch.no_grad():
        param.add_(1.0)
    _assert_state_dicts_equal(parts.last_layer.state_dict(), layer_state)
    for other in heads.layers[1:]:
        assert torch.equal(other.state_dict()[name], layer_state[name])
    assert not torch.equal(heads.layers[0].state_dict()[name], layer_state[name])


# --- 5. save_heads / load_heads round trip -----------------------------------------------------------------------


def _perturb(heads: AuxiliaryHeads, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(arch, tmp_path):
    model = tiny_model(arch, seed=0)
    attach_heads(model, 3)
    heads = get_heads(model)
    _perturb(heads)  # so that loaded weights cannot come from layer L by accident
    save_heads(heads, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE])

    loaded = load_heads(tmp_path, model)
    assert loaded.num_aux_heads == 3
    _assert_state_dicts_equal(loaded.state_dict(), heads.state_dict())

    config = json.loads((tmp_path / HEADS_CONFIG_FILE).read_text())
    assert config["num_heads"] == 3
    assert config["predicts_offsets"] == [2, 3, 4]
    assert config["layer_class"] == type(find_model_parts(model).last_layer).__name__
    assert config["dtype"] == "float32"
    fingerprint = config["base_fingerprint"]
    assert set(fingerprint) >= {"model_type", "hidden_size", "vocab_size", "num_hidden_layers", "last_layer_sha256"}
    assert fingerprint["model_type"] == model.config.model_type
    assert fingerprint["hidden_size"] == HIDDEN
    assert fingerprint["vocab_size"] == VOCAB
    assert fingerprint["num_hidden_layers"] == 2
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint["last_layer_sha256"])
    assert fingerprint == base_fingerprint(model)

    fresh = tiny_model(arch, seed=0)
    assert attach_heads(fresh, tmp_path) is fresh
    fresh_heads = get_heads(fresh)
    assert fresh_heads is not None and fresh_heads.num_aux_heads == 3
    _assert_state_dicts_equal(fresh_heads.state_dict(), heads.state_dict())
    assert fresh_heads.metadata["base_fingerprint"] == fingerprint
    # The base itself is untouched by attaching heads from disk.
    _assert_state_dicts_equal(
        {k: v for k, v in fresh.state_dict().items() if not k.startswith(HEADS_ATTRIBUTE)},
        tiny_model(arch, seed=0).state_dict(),
    )


# --- 6. heads for another base are refused; broken folders -------------------------------------------------------


@pytest.fixture(scope="module")
def llama_heads_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_heads")
    model = attach_heads(tiny_model("llama", seed=0), 2)
    save_heads(get_heads(model), directory)
    return directory


def test_heads_refused_on_other_weights(llama_heads_dir):
    other = tiny_model("llama", seed=5)
    with pytest.raises(HeadsMismatchError, match="last_layer_sha256") as info:
        attach_heads(other, llama_heads_dir)
    assert HEADS_CONFIG_FILE in str(info.value)
    assert not hasattr(other, HEADS_ATTRIBUTE)
    with pytest.raises(HeadsMismatchError, match="last_layer_sha256"):
        load_heads(llama_heads_dir, other)

    attach_heads(other, llama_heads_dir, check_base=False)
    heads = get_heads(other)
    assert heads.num_aux_heads == 2
    _assert_state_dicts_equal(heads.state_dict(), load_file(str(llama_heads_dir / HEADS_WEIGHTS_FILE)))


def test_heads_refused_on_other_architecture(llama_heads_dir):
    qwen = tiny_model("qwen2", seed=0)
    with pytest.raises(HeadsMismatchError):
        attach_heads(qwen, llama_heads_dir)
    with pytest.raises(HeadsMismatchError):
        attach_heads(qwen, llama_heads_dir, check_base=False)
    assert not hasattr(qwen, HEADS_ATTRIBUTE)


def test_missing_heads_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(HEADS_CONFIG_FILE)):
        attach_heads(tiny_model("llama"), tmp_path / "does_not_exist")


def test_corrupted_heads_config(llama_heads_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / HEADS_WEIGHTS_FILE).write_bytes((llama_heads_dir / HEADS_WEIGHTS_FILE).read_bytes())
    (broken / HEADS_CONFIG_FILE).write_text('{\n  "num_heads": 2,\n  "layer_class": oops\n}\n')
    with pytest.raises(ValueError) as info:
        attach_heads(tiny_model("llama"), broken)
    message = str(info.value)
    assert str(broken / HEADS_CONFIG_FILE) in message
    assert re.search(r"line 3\b", message)
    assert not isinstance(info.value, HeadsMismatchError)


# --- 7. fingerprint ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fingerprint_is_dtype_independent(arch):
    model = tiny_model(arch)
    fingerprint = base_fingerprint(model)
    assert fingerprint["model_type"] == model.config.model_type
    assert fingerprint["hidden_size"] == HIDDEN
    assert fingerprint["vocab_size"] == VOCAB
    assert fingerprint["num_hidden_layers"] == 2

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert next(find_model_parts(bf16).last_layer.parameters()).dtype == torch.bfloat16
    assert base_fingerprint(bf16) == fingerprint

    changed = copy.deepcopy(model)
    with torch.no_grad():
        param = next(p for p in find_model_parts(changed).last_layer.parameters() if p.dim() > 1)
        param.view(-1)[0] += 1.0
    changed_fingerprint = base_fingerprint(changed)
    assert changed_fingerprint["last_layer_sha256"] != fingerprint["last_layer_sha256"]
    assert {k: v for k, v in changed_fingerprint.items() if k != "last_layer_sha256"} == {
        k: v for k, v in fingerprint.items() if k != "last_layer_sha256"
    }

    # Layers other than L do not take part in the fingerprint.
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in find_model_parts(other).layers[0].parameters() if p.dim() > 1).view(-1)[0] += 1.0
    assert base_fingerprint(other) == fingerprint


def test_adapters_on_the_last_layer_change_neither_its_fingerprint_nor_the_heads_copied_from_it(llama_heads_dir):
    """QLoRA wraps the model with LoRA before the head warm-up: heads attached then (new or from a folder) are
    copies of layer L's own modules, its adapters left out, and the fingerprint is the unwrapped model's."""
    from peft import LoraConfig, get_peft_model

    plain = tiny_model("llama")
    adapted = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear",
                                                             init_lora_weights="gaussian"))
    assert any("lora_A" in name for name, _ in find_model_parts(adapted).last_layer.named_parameters())
    assert base_fingerprint(adapted) == base_fingerprint(plain)
    attach_heads(adapted, 2)
    copied = get_heads(adapted).layers[0]
    assert not any("lora" in name or "base_layer" in name for name, _ in copied.named_modules())
    assert all(torch.equal(tensor, find_model_parts(plain).last_layer.state_dict()[key])
               for key, tensor in copied.state_dict().items())
    attach_heads(adapted, str(llama_heads_dir))  # the fingerprint of a folder's heads is checked as they attach


def test_the_former_name_num_heads_is_refused_with_the_current_one():
    """`num_heads`, the name of the auxiliary-head count before `num_aux_heads`, is refused by `attach_heads`,
    `generate` and `CAFTConfig` with a TypeError naming `num_aux_heads`."""
    from caftkit.decoding.speculative import generate
    from caftkit.training.trainer import CAFTConfig

    with pytest.raises(TypeError, match=r"^attach_heads\(num_heads=...\) was renamed num_aux_heads$"):
        attach_heads(tiny_model("llama"), num_heads=3)
    model = attach_heads(tiny_model("llama"), num_aux_heads=3)
    assert not hasattr(get_heads(model), "num_heads")
    ids = random_batch(1, 6, pad_last=0)["input_ids"]
    with pytest.raises(TypeError, match=r"^generate\(num_heads=...\) was renamed num_aux_heads$"):
        generate(model, input_ids=ids, max_new_tokens=5, num_heads=2)
    with pytest.raises(TypeError, match=r"^CAFTConfig\(num_heads=...\) was renamed num_aux_heads$"):
        CAFTConfig(output_dir="unused", num_heads=2, report_to=[], use_cpu=True, bf16=False)


@pytest.mark.parametrize("change, message", [
    ({"base_fingerprint": {}}, "field 'base_fingerprint' lacks model_type, hidden_size, vocab_size, "
                               "num_hidden_layers, last_layer_sha256"),
    ({"base_fingerprint": None}, "field 'base_fingerprint' lacks model_type"),
    ({"num_heads": 0}, "field 'num_heads' must be a whole number of at least 1, got 0"),
    ({"num_heads": "2"}, "field 'num_heads' must be a whole number of at least 1, got '2'"),
])
def test_a_heads_config_is_checked_as_a_whole(llama_heads_dir, tmp_path, change, message):
    """A fingerprint without every field would skip the check against the base; it is refused, naming the file."""
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / HEADS_WEIGHTS_FILE).write_bytes((llama_heads_dir / HEADS_WEIGHTS_FILE).read_bytes())
    config = json.loads((llama_heads_dir / HEADS_CONFIG_FILE).read_text())
    (edited / HEADS_CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError) as refused:
        attach_heads(tiny_model("llama"), edited)
    assert str(refused.value).startswith(f"{edited / HEADS_CONFIG_FILE}: {message}")
