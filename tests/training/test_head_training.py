"""`caft train-heads` on tiny models: held-out losses go down and equal a naive recomputation, the base stays
bit-identical, checkpoints resume, the warm-up starts from existing heads, and the folder is complete."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from reference import naive_head_losses
from safetensors.torch import load_file
from tiny_models import saved_model_dir, tiny_model
from tiny_tokenizer import tiny_tokenizer

from caftkit.cli import main
from caftkit.core.heads import HEADS_ATTRIBUTE, HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE, attach_heads, get_heads
from caftkit.data import tokenize_source
from caftkit.files.outputs import mark_output_folder
from caftkit.models import bf16_is_fast, resolve_device, resolve_mixed_precision
from caftkit.training.head_training import LOSS_CURVES_FILE, HeadTrainingSettings, train_heads
from caftkit.training.runs import CHECKPOINTS_DIR, split_held_out
from caftkit.training.settings import trainer_arguments

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_conversations(path, n: int = 48, seed: int = 0):
    """Question/answer records whose answers are predictable several tokens ahead (repeated words)."""
    rng = random.Random(seed)
    words = ["carbon", "oxygen", "ring", "bond", "acid"]
    lines = []
    for i in range(n):
        answer = " ".join(rng.choice(words) for _ in range(4))
        lines.append(json.dumps({"id": f"r{i}", "messages": [
            {"role": "user", "content": f"say {i % 5}"},
            {"role": "assistant", "content": f"{answer}. {answer}."},
        ]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def settings_for(data, **overrides) -> HeadTrainingSettings:
    values = dict(model="tiny", data=str(data), num_aux_heads=3, epochs=3, learning_rate=3e-3, batch_size=4,
                  eval_fraction=0.25, save_steps=10, logging_steps=3, warmup=0.0, lr_scheduler="constant",
                  mixed_precision="no")  # float32 throughout: the tests compare with float32 references
    values.update(overrides)
    return HeadTrainingSettings(**values)


def naive_held_out_metrics(model, tokenizer, settings: HeadTrainingSettings) -> dict[int, float]:
    """Each head's mean cross-entropy over every held-out target, from full logits, one example at a time."""
    data = tokenize_source(settings.data, tokenizer, settings.max_length)
    _, held_out = split_held_out(data.examples, settings.eval_fraction, settings.seed)
    n = get_heads(model).num_aux_heads + 1
    sums, counts = [0.0] * n, [0] * n
    for example in held_out:
        ids = torch.tensor([example["input_ids"]])
        labels = ids.masked_fill(torch.tensor([example["assistant_masks"]]) == 0, -100)
        with torch.no_grad():
            losses = naive_head_losses(model, {"input_ids": ids, "labels": labels}, n)
        for k in range(n):
            count = int((labels[:, k + 1:] != -100).sum())
            if count:
                sums[k] += float(losses[k]) * count
                counts[k] += count
    return {k + 1: sums[k] / counts[k] for k in range(n)}


def test_training_lowers_every_head_and_keeps_the_base_bit_identical(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    base_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.get_input_embeddings().requires_grad_(False)  # a caller's own choice of what trains next
    flags_before = {name: param.requires_grad for name, param in model.named_parameters()}
    settings = settings_for(write_conversations(tmp_path / "data.jsonl"))
    output = tmp_path / "heads"
    summary = train_heads(str(output), settings, model=model, tokenizer=tokenizer, progress=False)
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # `auto`, resolved
    # Training froze the base; the model comes back with the flags it came with (the heads stay trainable).
    flags_after = {name: param.requires_grad for name, param in model.named_parameters()}
    assert {name: flag for name, flag in flags_after.items() if not name.startswith(HEADS_ATTRIBUTE)} == flags_before
    assert False in flags_before.values() and True in flags_before.values()

    # Every base weight is exactly as it was; only the heads moved.
    for name, tensor in model.state_dict().items():
        if not name.startswith(HEADS_ATTRIBUTE):
            assert torch.equal(tensor, base_before[name]), name
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert sorted(after) == ["head_1", "head_2", "head_3", "head_4"]
    assert after["head_1"] == pytest.approx(before["head_1"], abs=1e-6)  # the main head is not trained
    for k in (2, 3, 4):
        assert after[f"head_{k}"]["loss"] < 0.8 * before[f"head_{k}"]["loss"], k
        assert after[f"head_{k}"]["accuracy"] > before[f"head_{k}"]["accuracy"], k

    # The reported held-out losses are those of the saved heads, recomputed naively from full logits.
    fresh = tiny_model("llama")
    attach_heads(fresh, output)
    naive = naive_held_out_metrics(fresh, tokenizer, settings)
    for k in (1, 2, 3, 4):
        assert after[f"head_{k}"]["loss"] == pytest.approx(naive[k], rel=1e-5), k

    # The folder: weights, config with the training record, log history, the loss-curve PNG; no checkpoints.
    config = json.loads((output / HEADS_CONFIG_FILE).read_text())
    assert config["num_heads"] == 3 and config["predicts_offsets"] == [2, 3, 4]
    assert config["training"]["held_out_after"] == after
    assert config["training"]["held_out_examples"] == 12 and config["training"]["train_examples"] == 36
    assert config["training"]["optimizer_steps"] == 27  # 3 epochs of 9 batches
    assert config["training"]["settings"]["learning_rate"] == 3e-3
    assert set(load_file(str(output / HEADS_WEIGHTS_FILE))) == set(get_heads(model).state_dict())
    assert (output / LOSS_CURVES_FILE).read_bytes().startswith(PNG_SIGNATURE)
    assert not (output / CHECKPOINTS_DIR).exists()


def test_bf16_autocast_trains_the_heads_and_reports_their_float32_losses_closely(tmp_path):
    """With bf16 autocast (the default where bf16 is native) the float32 weights still train, the base stays
    bit-identical, and the reported held-out losses are those of the saved heads up to bf16 rounding."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    base_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    settings = settings_for(write_conversations(tmp_path / "data.jsonl"), mixed_precision="bf16")
    # The heads run outside the model's forward: they must be under autocast too, not only the base.
    output_dtypes: dict[int, set] = {}
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output_dtypes.setdefault(id(module), set()).add(getattr(output, "dtype", None)))
    try:
        summary = train_heads(str(tmp_path / "heads"), settings, model=model, tokenizer=tokenizer, progress=False)
    finally:
        hook.remove()
    assert summary["mixed_precision"] == "bf16"
    assert output_dtypes[id(get_heads(model).layers[0].mlp.down_proj)] == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in get_heads(model).parameters())
    for name, tensor in model.state_dict().items():
        if not name.startswith(HEADS_ATTRIBUTE):
            assert torch.equal(tensor, base_before[name]), name
    before, after = summary["held_out_before"], summary["held_out_after"]
    fresh = tiny_model("llama")
    attach_heads(fresh, tmp_path / "heads")
    naive = naive_held_out_metrics(fresh, tokenizer, settings)
    for k in (2, 3, 4):
        assert after[f"head_{k}"]["loss"] < 0.8 * before[f"head_{k}"]["loss"], k
        assert after[f"head_{k}"]["loss"] == pytest.approx(naive[k], rel=2e-2), k


def test_mixed_precision_setting_maps_to_autocast():
    assert resolve_mixed_precision("no", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if bf16_is_fast("cpu") else "no")
    assert resolve_mixed_precision("auto", "meta") == "no"
    with pytest.raises(ValueError, match="mixed_precision must be one of no, bf16, auto"):
        resolve_mixed_precision("fp8", "cpu")
    assert trainer_arguments(settings_for("d.jsonl", mixed_precision="bf16"), "out", 8)["bf16"] is True
    assert trainer_arguments(settings_for("d.jsonl"), "out", 8)["bf16"] is False
    assert HeadTrainingSettings(model="m", data="d").mixed_precision == "auto"


def _torch_sees(monkeypatch, accelerator: str | None, count: int = 0) -> None:
    """Fake what `torch.accelerator` reports: `accelerator` ("cuda", "xpu", "mps") with `count` devices, or none."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: None if accelerator is None else torch.device(accelerator))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)


def test_device_auto_picks_a_visible_accelerator_and_a_missing_one_is_refused(monkeypatch):
    _torch_sees(monkeypatch, None)
    # the settings resolve `auto` once, when they are made
    assert HeadTrainingSettings(model="m", data="d").device == "cpu"
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert trainer_arguments(settings_for("d.jsonl"), "out", 8)["use_cpu"] is True
    for name in ("cuda", "cuda:1", "xpu", "mps"):
        with pytest.raises(ValueError, match=f"device '{name}': no {name[:4].rstrip(':').upper()} accelerator is "
                                             "visible to torch \\(it sees none; use --device auto or cpu\\)"):
            resolve_device(name)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N, xpu, mps or another torch device, "
                                         "got 'gpu'"):
        resolve_device("gpu")

    _torch_sees(monkeypatch, "cuda", 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="device 'cuda:2': torch sees 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="device 'mps': no MPS accelerator is visible to torch \\(it sees cuda"):
        resolve_device("mps")
    assert trainer_arguments(settings_for("d.jsonl"), "out", 8)["use_cpu"] is False
    assert trainer_arguments(settings_for("d.jsonl", device="cpu"), "out", 8)["use_cpu"] is True

    for accelerator in ("xpu", "mps"):
        _torch_sees(monkeypatch, accelerator, 1)
        assert resolve_device("auto") == accelerator
        assert HeadTrainingSettings(model="m", data="d").device == accelerator
        assert trainer_arguments(settings_for("d.jsonl"), "out", 8)["use_cpu"] is False
        with pytest.raises(ValueError, match=f"device 'cuda': no CUDA accelerator is visible to torch \\(it sees "
                                             f"{accelerator};"):
            resolve_device("cuda")


def test_resume_continues_to_the_same_heads(tmp_path):
    """Training stopped after a checkpoint and resumed ends with the heads of an uninterrupted run."""
    data = write_conversations(tmp_path / "data.jsonl")
    settings = settings_for(data, epochs=2, save_steps=5)
    complete = tmp_path / "complete"
    train_heads(str(complete), settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer(), progress=False,
                keep_checkpoints=True)
    # An interrupted run: its last checkpoint is step 15 of 18 (two checkpoints are kept: 15 and 18).
    partial = tmp_path / "partial"
    mark_output_folder(partial, "train-heads")  # as the interrupted run left it: its own folder
    (partial / CHECKPOINTS_DIR).mkdir(parents=True)
    source = complete / CHECKPOINTS_DIR
    shutil.copytree(source / "checkpoint-15", partial / CHECKPOINTS_DIR / "checkpoint-15")
    checkpoint_heads = load_file(str(partial / CHECKPOINTS_DIR / "checkpoint-15" / "caft_heads" / HEADS_WEIGHTS_FILE))
    assert not (partial / CHECKPOINTS_DIR / "checkpoint-15" / "model.safetensors").exists()  # heads only

    with pytest.raises(ValueError, match="resume it"):
        train_heads(str(partial), settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer(), progress=False)
    summary = train_heads(str(partial), settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer(),
                          progress=False, resume=True)
    assert summary["optimizer_steps"] == 18
    finished, resumed = load_file(str(complete / HEADS_WEIGHTS_FILE)), load_file(str(partial / HEADS_WEIGHTS_FILE))
    assert set(finished) == set(resumed)
    for name in finished:
        torch.testing.assert_close(resumed[name], finished[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(checkpoint_heads[name], finished[name]) or "norm" in name
    before = json.loads((complete / HEADS_CONFIG_FILE).read_text())["training"]["held_out_before"]
    assert summary["held_out_before"] == before  # kept from the first run, not re-measured on trained heads


def test_warm_up_starts_from_existing_heads(tmp_path):
    """`init` loads the given heads (checked against the base) and trains them further on the task data."""
    tokenizer = tiny_tokenizer()
    general = tmp_path / "general"
    train_heads(str(general), settings_for(write_conversations(tmp_path / "general.jsonl", seed=1), epochs=1),
                model=tiny_model("llama"), tokenizer=tokenizer, progress=False)
    task = write_conversations(tmp_path / "task.jsonl", seed=2)
    warm = tmp_path / "warm"
    summary = train_heads(str(warm), settings_for(task, init=str(general), epochs=1), model=tiny_model("llama"),
                          tokenizer=tokenizer, progress=False)
    # "Before" is measured on the general heads, not on fresh copies of the last layer.
    model = tiny_model("llama")
    attach_heads(model, general)
    naive = naive_held_out_metrics(model, tokenizer, settings_for(task))
    for k in (2, 3, 4):
        assert summary["held_out_before"][f"head_{k}"]["loss"] == pytest.approx(naive[k], rel=1e-5)
        assert summary["held_out_after"][f"head_{k}"]["loss"] < summary["held_out_before"][f"head_{k}"]["loss"]
    assert json.loads((warm / HEADS_CONFIG_FILE).read_text())["training"]["settings"]["init"] == str(general)

    with pytest.raises(ValueError, match="base"):
        train_heads(str(tmp_path / "other"), settings_for(task, init=str(general)), model=tiny_model("llama", seed=5),
                    tokenizer=tokenizer, progress=False)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("tiny-heads-model"), tiny_model("qwen2"))


def test_command_end_to_end(tiny_model_dir, tmp_path, capsys):
    data = write_conversations(tmp_path / "data.jsonl", n=24)
    config = tmp_path / "heads.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\nnum-aux-heads: 2\nepochs: 2\nlearning_rate: 0.003\n"
                      "batch_size: 4\n")
    output = tmp_path / "heads"
    assert main(["train-heads", "--config", str(config), "--output", str(output), "--eval-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "18 training and 6 held-out examples, 10 steps" in printed
    table = [line.split() for line in printed.splitlines() if line.startswith("head_")]
    assert [row[:2] for row in table] == [["head_1", "t+1"], ["head_2", "t+2"], ["head_3", "t+3"]]
    config_written = json.loads((output / HEADS_CONFIG_FILE).read_text())
    for name, _, _loss_before, loss_after, _acc_before, acc_after in table:
        after = config_written["training"]["held_out_after"][name]
        assert float(loss_after) == pytest.approx(after["loss"], abs=1e-4)
        assert float(acc_after) == pytest.approx(after["accuracy"], abs=1e-4)
    assert (output / LOSS_CURVES_FILE).read_bytes().startswith(PNG_SIGNATURE)
    history = json.loads((output / "log_history.json").read_text())
    assert any("loss_head_2" in entry for entry in history) and any("eval_loss_head_3" in entry for entry in history)
    # The measurement before training opens the history, at step 0.
    before = config_written["training"]["held_out_before"]
    assert history[0]["step"] == 0 and history[0]["eval_loss_head_2"] == before["head_2"]["loss"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n',
         r"data.jsonl:1: the conversation has no assistant turn"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n',
         r"data.jsonl:1: field 'messages\[1\].content': missing"),
        ("not json\n", r"data.jsonl:1: not valid JSON"),
        ("", r"data.jsonl: the file is empty"),
    ],
)
def test_bad_training_data_fails_before_loading_the_model(tiny_model_dir, tmp_path, capsys, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    assert main(["train-heads", "--model", str(tiny_model_dir), "--data", str(data),
                 "--output", str(tmp_path / "heads")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("caft: error: ") and len(error.splitlines()) == 1, error
    assert re.search(expected, error), error
    assert not (tmp_path / "heads").exists()


def test_the_last_checkpoint_is_the_newest_complete_one(tmp_path):
    """A checkpoint folder without a whole `trainer_state.json` (the Trainer writes it last, not atomically) is one
    a killed run was still writing: resuming takes the newest complete one before it."""
    from caftkit.training.checkpoints import last_checkpoint

    assert last_checkpoint(tmp_path / "absent") is None
    state = json.dumps({"global_step": 4, "log_history": [{"loss": 1.5}]})
    written = {4: state, 8: state, 12: None, 16: "", 20: state[:-1], 24: "[]", 100: None}
    for step, text in written.items():
        (tmp_path / f"checkpoint-{step}").mkdir()
        if text is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    (tmp_path / "checkpoint-x").mkdir()
    with pytest.warns(UserWarning, match=f"{tmp_path}: skipping checkpoint-12, checkpoint-16, checkpoint-20, "
                                         "checkpoint-24, checkpoint-100, which lack a whole trainer_state.json .*; "
                                         "the last complete checkpoint is checkpoint-8"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text(state)
    with pytest.warns(UserWarning, match="skipping checkpoint-24, checkpoint-100, which lack"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
