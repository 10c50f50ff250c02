"""CAFTTrainer end to end on tiny models: the loss goes down, accumulation is exact, heads are saved and restored."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

from caftkit import CAFTConfig, CAFTTrainer
from caftkit.core.heads import attach_heads, get_heads
from caftkit.training.settings import CAFT_SETTINGS, FinetuneSettings, HeadTrainingSettings
from caftkit.training.trainer import CHECKPOINT_HEADS_DIR

MOLECULES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C#N", "CC(C)O", "OCC(O)CO", "CC(=O)N"]


def chat_dataset(n: int = 32) -> Dataset:
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"molecule {i % 8}"},
                      {"role": "assistant", "content": MOLECULES[i % 8]}]}
        for i in range(n)
    ])


def config(tmp_path, **overrides) -> CAFTConfig:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                  logging_steps=4, report_to=[], save_strategy="no", assistant_only_loss=True, use_cpu=True,
                  seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  bf16=False)  # float32: exact comparisons (TRL turns bf16 autocast on by default)
    values.update(overrides)
    return CAFTConfig(**values)


def losses(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_caft_training_lowers_every_head_loss(tmp_path):
    trainer = CAFTTrainer(model=tiny_model("llama"), args=config(tmp_path, train_heads=True, num_aux_heads=3),
                          train_dataset=chat_dataset(), eval_dataset=chat_dataset(8), processing_class=tiny_tokenizer())
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for k in range(1, 5):
        assert after[f"eval_loss_head_{k}"] < before[f"eval_loss_head_{k}"]
    assert after["eval_loss"] < before["eval_loss"]
    train_l1 = losses(trainer, "loss_head_1")
    assert len(train_l1) == 3 and train_l1[-1] < train_l1[0]
    assert 0.0 <= losses(trainer, "accuracy_head_2")[-1] <= 1.0
    # rsine: gamma falls from 1 to 0 over the 12 steps, logged after steps 4, 8, 12.
    assert losses(trainer, "caft_gamma") == pytest.approx([0.8660254, 0.5, 0.0])


def test_a_schedule_that_ends_early_is_zero_after_its_end_in_training(tmp_path):
    trainer = CAFTTrainer(model=tiny_model("llama"), args=config(tmp_path, max_steps=8, logging_steps=2,
                                                                 schedule_end=0.5, beta=0.5),
                          train_dataset=chat_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    # rsine over the first 4 of the 8 steps, logged after steps 2, 4, 6, 8: then nothing
    assert losses(trainer, "caft_gamma") == pytest.approx([math.sin(math.pi / 4), 0.0, 0.0, 0.0])
    # with gamma 0 every auxiliary weight is 0, whatever beta
    trainer.state.global_step = 5
    assert trainer.current_gamma() == 0.0
    with pytest.raises(ValueError, match=r"schedule_end must be > 0 and <= 1, got 1.5"):
        config(tmp_path, schedule_end=1.5)


# The training settings whose defaults the Python API and `caft finetune` share.
SHARED_DEFAULTS = ("num_train_epochs", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "bf16",
                   "activation_checkpointing", "mode", "alpha", "beta", "schedule", "schedule_end", "train_heads",
                   "freeze_unembedding")


def test_the_python_api_has_the_command_lines_defaults(tmp_path):
    from peft import LoraConfig

    from caftkit.training.finetuning import finetune_arguments

    command = CAFTConfig(**finetune_arguments(FinetuneSettings(model="m", data="d", heads="h", num_aux_heads=4),
                                            str(tmp_path), 64))
    api = CAFTConfig(output_dir=str(tmp_path))
    assert {name: getattr(api, name) for name in SHARED_DEFAULTS} == {
        name: getattr(command, name) for name in SHARED_DEFAULTS}
    assert (api.num_train_epochs, api.lr_scheduler_type, api.warmup_steps, api.activation_checkpointing) == (
        1.0, "cosine", 0.03, False)
    # The learning rate follows the method: through LoRA adapters as `--method lora`, else as `--method full`.
    for method, peft_config in (("lora", LoraConfig(target_modules="all-linear")), ("full", None)):
        args = CAFTConfig(output_dir=str(tmp_path / method), use_cpu=True, report_to=[], num_aux_heads=2)
        trainer = CAFTTrainer(model=tiny_model("llama"), args=args, train_dataset=chat_dataset(8),
                              processing_class=tiny_tokenizer(), peft_config=peft_config)
        expected = FinetuneSettings(model="m", data="d", heads="h", method=method).learning_rate
        assert trainer.args.learning_rate == expected == {"lora": 2e-4, "full": 2e-5}[method]


# Every setting CAFTConfig shares with the commands, with values the command line refuses (and one it takes).
SHARED_SETTING_VALUES = {
    "num_aux_heads": ([True, 1.5, "2", 0], 3),
    "alpha": ([0.0, 2.0, float("nan"), -1, "0.5", None], 0.5),
    "beta": ([float("nan"), float("inf"), -0.1, "0.5", True], 0.2),
    "schedule": (["cosine", 1, None], "linear"),
    "schedule_end": ([0.0, 1.5, float("nan"), "1"], 0.25),
    "train_heads": (["yes", 1, None], True),
    "freeze_unembedding": (["no", 0], False),
    "trunk_cache_gb": ([-1.0, float("inf"), "4"], 2.0),
}


def heads_of(settings_class) -> dict:
    """A heads folder for fine-tuning settings: caft mode refuses to run without one."""
    return {"heads": "h"} if settings_class is FinetuneSettings else {}


def test_the_table_covers_every_shared_setting():
    assert set(SHARED_SETTING_VALUES) == set(CAFT_SETTINGS)


@pytest.mark.parametrize("name, value", [(name, value) for name, (refused, _) in SHARED_SETTING_VALUES.items()
                                         for value in refused])
def test_caft_config_refuses_what_the_command_line_refuses(tmp_path, name, value):
    """The same refusal, word for word, from CAFTConfig and from the command's settings (a 0 for num_aux_heads:
    in caft mode; the Python API may not build what the command line refuses)."""
    settings_class = HeadTrainingSettings if name == "trunk_cache_gb" else FinetuneSettings
    with pytest.raises(ValueError) as from_settings:
        settings_class(model="m", data="d", **heads_of(settings_class), **{name: value})
    with pytest.raises(ValueError) as from_config:
        config(tmp_path, **{name: value})
    assert str(from_config.value) == str(from_settings.value)


@pytest.mark.parametrize("name", list(SHARED_SETTING_VALUES))
def test_caft_config_takes_what_the_command_line_takes(tmp_path, name):
    value = SHARED_SETTING_VALUES[name][1]
    settings_class = HeadTrainingSettings if name == "trunk_cache_gb" else FinetuneSettings
    assert getattr(settings_class(model="m", data="d", **heads_of(settings_class), **{name: value}), name) == value
    assert getattr(config(tmp_path, **{name: value}), name) == value


def test_frozen_parts_stay_frozen_in_caft_mode(tmp_path):
    model = tiny_model("qwen2")
    trainer = CAFTTrainer(model=model, args=config(tmp_path, max_steps=3), train_dataset=chat_dataset(),
                          processing_class=tiny_tokenizer())
    heads_before = {k: v.clone() for k, v in get_heads(model).state_dict().items()}
    lm_head_before = model.lm_head.weight.detach().clone()
    layer0_before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert all(torch.equal(heads_before[k], v) for k, v in get_heads(model).state_dict().items())
    assert torch.equal(lm_head_before, model.lm_head.weight)
    assert not torch.equal(layer0_before, model.model.layers[0].mlp.up_proj.weight)


def test_head_training_changes_only_the_heads(tmp_path):
    model = tiny_model("llama")
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = CAFTTrainer(model=model, args=config(tmp_path, mode="heads", num_aux_heads=2),
                          train_dataset=chat_dataset(), eval_dataset=chat_dataset(8), processing_class=tiny_tokenizer())
    heads_before = {k: v.clone() for k, v in get_heads(model).state_dict().items()}
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert all(torch.equal(base_before[k], v) for k, v in model.state_dict().items() if not k.startswith("caft_heads"))
    assert any(not torch.equal(heads_before[k], v) for k, v in get_heads(model).state_dict().items())
    assert after["eval_loss_head_2"] < before["eval_loss_head_2"]
    assert after["eval_loss_head_3"] < before["eval_loss_head_3"]
    assert after["eval_loss_head_1"] == pytest.approx(before["eval_loss_head_1"], rel=1e-6)


def _train_weights(tmp_path, name, **overrides):
    model = tiny_model("llama")
    args = config(tmp_path / name, max_steps=overrides.pop("max_steps", 2), learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant",
                  max_grad_norm=0.0, beta=0.5, num_aux_heads=2, train_heads=True, **overrides)
    trainer = CAFTTrainer(model=model, args=args, train_dataset=chat_dataset(16), processing_class=tiny_tokenizer())
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses(trainer, "loss")


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    big, big_losses = _train_weights(tmp_path, "big", per_device_train_batch_size=4, logging_steps=1)
    accumulated, acc_losses = _train_weights(tmp_path, "acc", per_device_train_batch_size=2,
                                             gradient_accumulation_steps=2, logging_steps=1)
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)


def test_trainable_heads_are_checkpointed_and_restored(tmp_path):
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, train_heads=True, num_aux_heads=2)
    model = tiny_model("llama")
    trainer = CAFTTrainer(model=model, args=args, train_dataset=chat_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = load_file(str(checkpoint / CHECKPOINT_HEADS_DIR / "heads.safetensors"))
    assert json.loads((checkpoint / CHECKPOINT_HEADS_DIR / "heads_config.json").read_text())["num_heads"] == 2
    model_keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert not any("caft_heads" in key for key in model_keys)

    fresh = tiny_model("llama")
    resumed = CAFTTrainer(model=fresh, args=args, train_dataset=chat_dataset(), processing_class=tiny_tokenizer())
    resumed._load_from_checkpoint(str(checkpoint))
    for key, value in get_heads(fresh).state_dict().items():
        assert torch.equal(value, saved[key])


def test_unstable_heads_warn_once(tmp_path):
    args = config(tmp_path, max_steps=4, logging_steps=1, l2_warning_threshold=0.0, num_aux_heads=2)
    trainer = CAFTTrainer(model=tiny_model("llama"), args=args, train_dataset=chat_dataset(),
                          processing_class=tiny_tokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    unstable = [w for w in caught if "auxiliary loss L2" in str(w.message)]
    assert len(unstable) == 1


def test_ntp_mode_runs_no_head(tmp_path):
    model = attach_heads(tiny_model("llama"), 2)
    trainer = CAFTTrainer(model=model, args=config(tmp_path, mode="ntp", max_steps=2, logging_steps=1),
                          train_dataset=chat_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "loss_head_1" in logged and "loss_head_2" not in logged
    assert logged["loss"] == pytest.approx(logged["loss_head_1"], rel=1e-5)


def test_config_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        config(tmp_path, mode="mtp")


def test_lora_stays_out_of_the_heads(tmp_path):
    from peft import LoraConfig

    model = tiny_model("llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = CAFTTrainer(model=model, args=config(tmp_path, max_steps=3, logging_steps=1, num_aux_heads=2),
                          train_dataset=chat_dataset(), processing_class=tiny_tokenizer(), peft_config=lora)
    names = [name for name, _ in trainer.model.named_parameters()]
    assert any("lora_A" in name and "caft_heads" not in name for name in names)
    assert not any("lora" in name and "caft_heads" in name for name in names)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    trainer.train()
    assert "loss_head_3" in trainer.state.log_history[0]


def test_trl_loss_type_is_pinned_to_nll(tmp_path):
    assert config(tmp_path).loss_type == "nll"
    with pytest.raises(ValueError, match="computes the CAFT loss itself: loss_type must be 'nll', got 'dft'"):
        config(tmp_path, loss_type="dft")


def test_bf16_unset_follows_the_command_lines_auto(tmp_path, monkeypatch):
    """Unset, bf16 is on where the device multiplies bf16 natively and off elsewhere, as `--mixed-precision auto`,
    on any machine (TRL's default, on everywhere, stops with an error on a machine without a bf16 accelerator); an
    explicit choice is kept."""
    import caftkit.models
    from caftkit.training.finetuning import finetune_arguments

    for native in (True, False):
        monkeypatch.setattr(caftkit.models, "bf16_is_fast", lambda device, native=native: native)
        api = CAFTConfig(output_dir=str(tmp_path))
        command = CAFTConfig(**finetune_arguments(FinetuneSettings(model="m", data="d", heads="h", num_aux_heads=4),
                                                str(tmp_path), 64))
        assert (api.bf16, command.bf16) == (native, native)
        assert CAFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is native
        assert CAFTConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
