"""QLoRA (`caft finetune --load-in-4bit`, `CAFTTrainer(quantization_config=...)`) on tiny models, with bitsandbytes on
the CPU: the base is 4-bit but for the last decoder layer and the unembedding, a run with a head warm-up trains and
exports a plain float model that generates as the merged adapters do, and what cannot run is refused in one line."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import saved_model_dir, tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from caftkit import CAFTConfig, CAFTTrainer
from caftkit.cli import main
from caftkit.core.heads import attach_heads, base_fingerprint, get_heads
from caftkit.models import load_model
from caftkit.training.finetuning import FinetuneSettings
from caftkit.training.head_training import HeadTrainingSettings, train_heads
from caftkit.training.qlora import keep_training_exact

MOLECULES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C#N", "CC(C)O", "OCC(O)CO", "CC(=O)N", "CC#N", "OC(=O)c1ccccc1"]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"molecule {i % 10}"},
                          {"role": "assistant", "content": MOLECULES[i % 10]}]} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama with the tiny tokenizer, saved, a task, and heads trained for the model in full precision."""
    root = tmp_path_factory.mktemp("tiny-qlora")
    saved_model_dir(root / "model", tiny_model("llama"))
    (root / "task.jsonl").write_text("".join(json.dumps(record) + "\n" for record in chat_records(40)))
    train_heads(str(root / "heads"), HeadTrainingSettings(model=str(root / "model"), data=str(root / "task.jsonl"),
                                                           num_aux_heads=2, epochs=1, batch_size=4,
                                                           learning_rate=3e-3, eval_fraction=0.25), progress=False)
    return root


def projections(layer) -> dict[str, type]:
    return {name.rsplit(".", 1)[-1]: type(module) for name, module in layer.named_modules()
            if name.rsplit(".", 1)[-1] in PROJECTIONS}


def test_4bit_loading_keeps_the_layer_the_heads_copy_and_the_unembedding_in_the_compute_dtype(tiny_dir):
    """Every projection of layer 1 is a bitsandbytes Linear4bit (fp4, nested as asked); layer L and lm_head stay
    float32 `nn.Linear`s holding the checkpoint's weights, so heads trained on the full-precision base attach (their
    fingerprint is the float model's) and are copies of layer L in float32."""
    settings = FinetuneSettings(model=str(tiny_dir / "model"), data=str(tiny_dir / "task.jsonl"), mode="ntp",
                                load_in_4bit=True, quant_type="fp4", nested_quant=True, device="cpu")
    model = load_model(settings.model, settings.dtype, **settings.model_kwargs())
    full = load_model(settings.model, "float32")
    first, last = model.model.layers
    assert projections(first) == dict.fromkeys(PROJECTIONS, bnb.nn.Linear4bit)
    assert {module.weight.quant_state.quant_type for module in first.modules()
            if isinstance(module, bnb.nn.Linear4bit)} == {"fp4"}
    assert all(module.weight.quant_state.nested for module in first.modules() if isinstance(module, bnb.nn.Linear4bit))
    assert projections(last) == dict.fromkeys(PROJECTIONS, torch.nn.Linear)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    for (name, param), expected in zip(last.named_parameters(), full.model.layers[-1].parameters()):
        assert param.dtype == torch.float32 and torch.equal(param, expected), name
    assert base_fingerprint(model) == base_fingerprint(full)
    attach_heads(model, str(tiny_dir / "heads"))
    assert {param.dtype for param in get_heads(model).parameters()} == {torch.float32}
    # The 4-bit layers hold 4 bits of each weight, two to a byte, not a float copy.
    assert all(module.weight.dtype == torch.uint8
               and 2 * module.weight.numel() == module.weight.quant_state.shape.numel()
               for module in first.modules() if isinstance(module, bnb.nn.Linear4bit))


def test_after_an_evaluation_a_4bit_layer_gives_the_same_gradients(tmp_path):
    """bitsandbytes repacks a 4-bit layer for its CPU inference kernel (which has no backward) the first time the
    layer runs in eval mode without gradients, on CPUs with AVX512-BF16, as this one may be; `keep_training_exact`
    keeps it on the kernels it trains with: the LoRA gradients of one batch are identical before and after an
    evaluation. (Width 64: bitsandbytes' repacking takes whole blocks of 64 inputs.)"""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    keep_training_exact(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                             init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # gradients reach every A only through a non-zero B
                param.normal_(0, 0.02)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def gradients():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
        model.zero_grad()
        return grads

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    after = gradients()
    assert all(before[name].abs().sum() > 0 for name in before)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_qlora_finetune_with_a_head_warmup_exports_a_plain_float_model(tiny_dir, tmp_path, capsys):
    """`caft finetune --load-in-4bit` (TRL's `--use-bnb-nested-quant` too) warms the heads up on the 4-bit base and
    trains LoRA adapters on it; `caft export` merges them into the base loaded in float32: a plain checkpoint (no
    quantisation left) whose greedy generation is the merged PEFT model's, token for token."""
    run, out = tmp_path / "run", tmp_path / "model"
    assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "task.jsonl"), "--heads",
                 str(tiny_dir / "heads"), "--head-warmup", "yes", "--load-in-4bit", "--use-bnb-nested-quant",
                 "--epochs", "1", "--batch-size", "4", "--learning-rate", "3e-3", "--lora-r", "4",
                 "--eval-fraction", "0.2", "--beta", "0.5", "--device", "cpu", "--output", str(run)]) == 0
    assert f"next: caft export {run} --output model" in capsys.readouterr().out
    summary = json.loads((run / "caft_run.json").read_text())
    assert summary["settings"]["load_in_4bit"] and summary["settings"]["nested_quant"]
    assert summary["head_warmup"]["warmed_up"] and summary["optimizer_steps"] == 8
    assert all(value == value for value in summary["final_eval"].values())  # no nan
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    lora_b = [tensor for key, tensor in adapter.items() if "lora_B" in key]
    assert len(lora_b) == 2 * len(PROJECTIONS) and all(tensor.abs().sum() > 0 for tensor in lora_b)  # from zero
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}
    assert not any("caft_heads" in key for key in adapter)
    warmed = load_file(str(run / "warmup-heads" / "heads.safetensors"))
    general = load_file(str(tiny_dir / "heads" / "heads.safetensors"))
    assert {tensor.dtype for tensor in warmed.values()} == {torch.float32}
    assert any(not torch.equal(warmed[key], general[key]) for key in general)

    assert main(["export", str(run), "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(out / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert not any(part in key for key in weights for part in ("lora", "absmax", "quant", "caft_heads"))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, run / "final").merge_and_unload().eval()
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([tokenizer("<|im_start|>user\nmolecule 3<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=[],
                  pad_token_id=0)
    assert exported.generate(ids, **kwargs).tolist() == merged.generate(ids, **kwargs).tolist()
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    assert json.loads((tmp_path / "model-heads" / "heads_config.json").read_text())["base_fingerprint"] == (
        base_fingerprint(exported))


def test_caft_trainer_loads_a_named_model_in_4bit_and_refuses_a_quantised_last_layer(tiny_dir, tmp_path):
    """`CAFTTrainer(name, quantization_config=BitsAndBytesConfig(load_in_4bit=True))` loads the model in 4 bits
    itself (SFTTrainer would ignore the config once caftkit loaded it), with layer L and lm_head left unquantised
    for the heads; the adapters stay float32, the frozen heads unchanged by training. A 4-bit model whose layer L
    is quantised is refused, naming the layer and how to load it."""
    args = CAFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                      learning_rate=3e-3, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                      disable_tqdm=True, num_aux_heads=2)
    trainer = CAFTTrainer(str(tiny_dir / "model"), args, train_dataset=Dataset.from_list(chat_records(16)),
                          processing_class=tiny_tokenizer(), quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                          peft_config=LoraConfig(r=4, target_modules="all-linear"))
    first, last = trainer.model.get_base_model().model.layers
    adapted = {name: module.get_base_layer() for name, module in first.named_modules() if name.endswith("_proj")}
    assert adapted.keys() == {name for name, _ in first.named_modules() if name.endswith("_proj")}
    assert all(type(module) is bnb.nn.Linear4bit for module in adapted.values()) and len(adapted) == 7
    assert all(type(module.get_base_layer()) is torch.nn.Linear for name, module in last.named_modules()
               if name.endswith("_proj"))
    adapters = {name: param for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert adapters and all("lora_" in name and param.dtype == torch.float32 for name, param in adapters.items())
    heads_before = {key: value.clone() for key, value in get_heads(trainer.model).state_dict().items()}
    assert {value.dtype for value in heads_before.values()} == {torch.float32}
    trainer.train()
    assert all(torch.equal(value, get_heads(trainer.model).state_dict()[key]) for key, value in heads_before.items())

    quantised = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", device_map={"": "cpu"},
                                                     quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match=r"copies of the last decoder layer, model\.layers\.1, which this model holds "
                                         r"in 4 bits: load it with BitsAndBytesConfig\(llm_int8_skip_modules="):
        CAFTTrainer(quantised, args, train_dataset=Dataset.from_list(chat_records(4)),
                    processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"))


def test_what_qlora_cannot_run_is_refused_in_one_line_before_anything_loads(tiny_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """Full fine-tuning of a 4-bit base, quantisation settings without --load-in-4bit, and --load-in-4bit where
    bitsandbytes cannot be imported (an import failure injected through `sys.modules`) are each one line; nothing
    is written."""
    flags = ["finetune", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "task.jsonl"), "--mode", "ntp",
             "--output", str(tmp_path / "run")]
    assert main([*flags, "--load-in-4bit", "--method", "full"]) == 2
    assert capsys.readouterr().err == (
        "caft: error: load_in_4bit: QLoRA trains LoRA adapters on a frozen 4-bit base, and 4-bit weights cannot be "
        "fine-tuned themselves: use --method lora, not full\n")
    assert main([*flags, "--bnb-4bit-quant-type", "fp4"]) == 2
    assert capsys.readouterr().err == ("caft: error: quant_type and nested_quant set how --load-in-4bit quantises "
                                       "the base; without it they do nothing\n")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    assert main([*flags, "--load-in-4bit"]) == 2
    assert capsys.readouterr().err == ("caft: error: load_in_4bit: QLoRA needs the package bitsandbytes, which is not "
                                       "installed (pip install 'caftkit[qlora]')\n")
    assert not (tmp_path / "run").exists()
