"""`caft finetune` and `caft export` on tiny models: the exported model is the fine-tuned one, ntp is TRL's loss,
a killed run resumes to the same weights, and the run folder holds what it promises."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import saved_model_dir, tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM, TrainerCallback

from caftkit.cli import main
from caftkit.core.heads import HEADS_ATTRIBUTE, attach_heads, base_fingerprint
from caftkit.decoding.speculative import generate
from caftkit.files.outputs import claimed, mark_output_folder
from caftkit.training.checkpoints import last_checkpoint
from caftkit.training.export import export_run
from caftkit.training.export_heads import read_eagle3_draft
from caftkit.training.finetuning import (
    FINAL_DIR,
    HEAD_LOSSES_FILE,
    RUN_FILE,
    RUN_HEADS_DIR,
    FinetuneSettings,
    aux_head_count,
    finetune,
    warmup_settings,
)
from caftkit.training.head_training import HeadTrainingSettings, train_heads
from caftkit.training.runs import LOG_HISTORY_FILE

MOLECULES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C#N", "CC(C)O", "OCC(O)CO", "CC(=O)N", "CC#N", "OC(=O)c1ccccc1"]


def write_task(path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"molecule {i % 10}"},
        {"role": "assistant", "content": MOLECULES[i % 10]},
    ]}) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama with the tiny tokenizer, saved, and general heads trained for it."""
    root = tmp_path_factory.mktemp("tiny-finetune")
    model_dir = saved_model_dir(root / "model", tiny_model("llama"))
    data = write_task(root / "general.jsonl", 24)
    train_heads(str(root / "heads"), HeadTrainingSettings(model=str(model_dir), data=str(data), num_aux_heads=2,
                                                           epochs=1, batch_size=4, learning_rate=3e-3,
                                                           eval_fraction=0.25),
                progress=False)
    return root


def settings_for(tiny_dir, data, **overrides) -> FinetuneSettings:
    values = dict(model=str(tiny_dir / "model"), data=str(data), heads=str(tiny_dir / "heads"), num_aux_heads=2,
                  epochs=2, batch_size=4, learning_rate=3e-3, eval_fraction=0.2, save_steps=4, logging_steps=2,
                  lora_r=4, lora_alpha=8, warmup=0.0, beta=0.5,
                  head_warmup="no")  # the heads are trained for this model; the tests of the warm-up ask for it
    values.update(overrides)
    return FinetuneSettings(**values)


def caft_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_export_stops_where_the_fine_tuned_model_stops(tiny_dir, tmp_path, method):
    """The tokenizer's end of turn (<|im_end|>, id 5) is not the config's eos_token_id (2): training aligns the
    generation config with the tokenizer, and the export keeps that config, so plain `generate()` on the exported
    model stops at the end of the turn, where the fine-tuned model stops."""
    data = write_task(tmp_path / "task.jsonl")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    assert model.generation_config.eos_token_id == 2 and tokenizer.eos_token_id == 5
    run, out = tmp_path / "run", tmp_path / "model"
    finetune(str(run), settings_for(tiny_dir, data, method=method, mode="ntp", heads=None, epochs=6,
                                    learning_rate=1e-2), model=model, tokenizer=tokenizer)
    trained_eos = model.generation_config.eos_token_id
    assert 5 in (trained_eos if isinstance(trained_eos, list) else [trained_eos])
    export_run(run, out)
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert exported.generation_config.eos_token_id == trained_eos
    ids = torch.tensor([tokenizer("<|im_start|>user\nmolecule 3<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    fine_tuned = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                       do_sample=False)[0, ids.shape[1]:].tolist()
    plain = exported.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                              do_sample=False)[0, ids.shape[1]:].tolist()
    assert plain == fine_tuned
    assert plain[-1] == 5 and len(plain) < 24, f"the model did not end its turn: {plain}"
    # With the base's generation config (eos 2 only), the same model would have run past the end of its turn.
    past_the_turn = exported.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                      eos_token_id=2)[0, ids.shape[1]:].tolist()
    assert past_the_turn[:len(plain)] == plain and len(past_the_turn) > len(plain)


PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, TrainerCallback
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits.double(), sys.argv[3])
assert not any(name.startswith("caftkit") for name in sys.modules), "caftkit was imported"
"""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_exported_model_has_the_fine_tuned_logits_without_caftkit(tiny_dir, tmp_path, method):
    """The exported checkpoint, loaded in a fresh process by plain transformers (caftkit never imported),
    gives the logits of the fine-tuned model as caftkit holds it after training, within 1e-5."""
    data = write_task(tmp_path / "task.jsonl")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    run = tmp_path / "run"
    summary = finetune(str(run), settings_for(tiny_dir, data, method=method), model=model, tokenizer=tokenizer)
    ids = torch.tensor([tokenizer("<|im_start|>user\nmolecule 3<|im_end|>\n<|im_start|>assistant\nCC")["input_ids"]])
    trained = summary and caft_logits(model.eval(), ids)
    assert not torch.allclose(trained, caft_logits(tiny_model("llama"), ids), atol=1e-3)  # training changed it

    out = tmp_path / "model"
    written = export_run(run, out)
    assert written["heads"] == str(tmp_path / "model-heads")
    assert set(load_file(str(tmp_path / "model-heads" / "heads.safetensors"))) == set(
        load_file(str(run / RUN_HEADS_DIR / "heads.safetensors")))
    weights = load_file(str(out / "model.safetensors"))
    assert not any(HEADS_ATTRIBUTE in key or "lora" in key for key in weights)
    # The exported heads are the exported model's: they attach to it (fingerprint checked) and draft for it.
    exported_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    heads_config = json.loads((tmp_path / "model-heads" / "heads_config.json").read_text())
    assert heads_config["base_fingerprint"] == base_fingerprint(exported_model)
    assert heads_config["previous_base_fingerprints"] == [base_fingerprint(tiny_model("llama"))]
    attach_heads(exported_model, str(tmp_path / "model-heads"))
    plain = exported_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    eos_token_id=[], pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert generate(exported_model, input_ids=ids, max_new_tokens=8, eos_token_id=[]).sequences == [plain]
    if method == "lora":  # head 2 of the exported heads as an EAGLE-3 draft of the exported model, beside it
        drafted = export_run(run, tmp_path / "served", eagle3=True)
        assert drafted["draft"] == str(tmp_path / "served-eagle3")
        config, state = read_eagle3_draft(drafted["draft"])
        assert config["caftkit"]["base_fingerprint"] == base_fingerprint(exported_model)
        head_2 = {key.split(".", 2)[2]: value for key, value in load_file(
            str(tmp_path / "served-heads" / "heads.safetensors")).items() if key.startswith("layers.0.")}
        assert torch.equal(state["midlayer.mlp.down_proj.weight"], head_2["mlp.down_proj.weight"])
        assert torch.equal(state["midlayer.hidden_norm.weight"], head_2["input_layernorm.weight"])
    # ... and re-fitting them to the exported model (`caft train-heads --init model-heads`) is accepted too.
    train_heads(str(tmp_path / "tuned"), HeadTrainingSettings(
        model=str(out), data=str(data), init=str(tmp_path / "model-heads"), epochs=1, batch_size=4,
        learning_rate=3e-3, eval_fraction=0.25), progress=False)
    tuned = json.loads((tmp_path / "tuned" / "heads_config.json").read_text())
    assert tuned["base_fingerprint"] == heads_config["base_fingerprint"]
    assert tuned["previous_base_fingerprints"] == heads_config["previous_base_fingerprints"]
    before, after = tuned["training"]["held_out_before"], tuned["training"]["held_out_after"]
    assert after["head_2"]["loss"] < before["head_2"]["loss"]
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                   check=True, env=env, cwd=tmp_path)
    exported = torch.load(tmp_path / "l.pt")
    difference = (exported - trained).abs().max().item()
    print(f"{method}: exported vs fine-tuned logits, max abs difference {difference:.2e}")
    assert difference < 1e-5
    card = (out / "README.md").read_text()
    assert f"- {method} fine-tuning, 2 epoch(s)" in card and "| 2 | t+2 |" in card


def test_ntp_loss_is_trl_sft_loss(tiny_dir, tmp_path):
    """`mode=ntp` computes exactly the loss TRL's SFTTrainer computes on the same batch."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from caftkit import CAFTConfig, CAFTTrainer

    records = [{"messages": [{"role": "user", "content": f"molecule {i}"},
                             {"role": "assistant", "content": MOLECULES[i]}]} for i in range(6)]
    common = dict(per_device_train_batch_size=6, report_to=[], use_cpu=True, bf16=False, assistant_only_loss=True,
                  save_strategy="no", disable_tqdm=True)
    ntp = CAFTTrainer(tiny_model("llama"), CAFTConfig(str(tmp_path / "a"), mode="ntp", **common),
                      train_dataset=Dataset.from_list(records), processing_class=tiny_tokenizer())
    sft = SFTTrainer(tiny_model("llama"), SFTConfig(str(tmp_path / "b"), **common),
                     train_dataset=Dataset.from_list(records), processing_class=tiny_tokenizer())
    batch = next(iter(sft.get_train_dataloader()))
    ntp_batch = next(iter(ntp.get_train_dataloader()))
    assert torch.equal(batch["input_ids"], ntp_batch["input_ids"]) and torch.equal(batch["labels"], ntp_batch["labels"])
    sft.model.train(), ntp.model.train()
    expected = sft.compute_loss(sft.model, batch)
    actual = ntp.compute_loss(ntp.model, batch)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_run_folder_and_head_warmup(tiny_dir, tmp_path):
    data = write_task(tmp_path / "task.jsonl")
    run = tmp_path / "run"
    summary = finetune(str(run), settings_for(tiny_dir, data, head_warmup="yes", epochs=1),
                       model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert summary["head_warmup"]["warmed_up"] is True
    # The warm-up trained the general heads one epoch on the task; the run used (and kept) the warmed heads.
    warm = load_file(str(run / "warmup-heads" / "heads.safetensors"))
    general = load_file(str(tiny_dir / "heads" / "heads.safetensors"))
    used = load_file(str(run / RUN_HEADS_DIR / "heads.safetensors"))
    assert all(torch.equal(warm[k], used[k]) for k in warm)
    assert any(not torch.equal(warm[k], general[k]) for k in warm)
    assert (run / HEAD_LOSSES_FILE).read_bytes().startswith(b"\x89PNG")
    recorded = json.loads((run / RUN_FILE).read_text())
    assert recorded["held_out_per_head"]["head_3"]["loss"] > 0 and recorded["train_examples"] == 32
    assert (run / FINAL_DIR / "adapter_model.safetensors").is_file()


FINETUNE_COMMAND = [sys.executable, "-m", "caftkit.cli", "finetune"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def finetune_complete_and_killed(flags: list[str], complete: Path, interrupted: Path, marker: str) -> None:
    """`caft finetune FLAGS` run to the end into `complete`, and again into `interrupted`, killed (SIGKILL) as soon
    as the file `interrupted/marker` exists."""
    subprocess.run(FINETUNE_COMMAND + flags + ["--output", str(complete)], check=True, env=SUBPROCESS_ENV,
                   capture_output=True)
    process = subprocess.Popen(FINETUNE_COMMAND + flags + ["--output", str(interrupted)], env=SUBPROCESS_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not (interrupted / marker).is_file():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_same_tensors(path_a: Path, path_b: Path) -> None:
    first, second = load_file(str(path_a)), load_file(str(path_b))
    assert set(first) == set(second)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-6)


def test_killed_finetune_resumes_to_the_same_weights(tiny_dir, tmp_path):
    """A fine-tune killed (SIGKILL) after a checkpoint and resumed with --resume ends with the weights of an
    uninterrupted run with the same seed; a newer checkpoint whose trainer_state.json was cut short (a kill while
    the Trainer wrote it) is named and skipped."""
    data = write_task(tmp_path / "task.jsonl", 60)
    flags = ["--model", str(tiny_dir / "model"), "--data", str(data), "--heads", str(tiny_dir / "heads"),
             "--num-aux-heads", "2", "--epochs", "3", "--batch-size", "4", "--learning-rate", "0.003",
             "--save-steps", "3", "--logging-steps", "3", "--lora-r", "4", "--lora-alpha", "8"]
    interrupted = tmp_path / "interrupted"
    finetune_complete_and_killed(flags, tmp_path / "complete", interrupted, "checkpoint-6/trainer_state.json")
    assert not (interrupted / RUN_FILE).exists(), "the run must be killed before it finished"
    newest = max(interrupted.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    cut_short = interrupted / "checkpoint-1000"
    shutil.copytree(newest, cut_short)
    state = (cut_short / "trainer_state.json").read_bytes()
    (cut_short / "trainer_state.json").write_bytes(state[:len(state) // 2])
    resumed = subprocess.run(FINETUNE_COMMAND + flags + ["--output", str(interrupted), "--resume"], check=True,
                             env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert "skipping checkpoint-1000, which lacks a whole trainer_state.json" in resumed.stderr
    assert_same_tensors(tmp_path / "complete" / FINAL_DIR / "adapter_model.safetensors",
                        interrupted / FINAL_DIR / "adapter_model.safetensors")


def _saved_whole(checkpoint: Path) -> bool:
    """Whether the save of `checkpoint` has ended: trainer_state.json is written last, and a kill while writing it
    leaves it empty or cut short."""
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_bytes()), dict)
    except (OSError, ValueError):
        return False


def _half_written_checkpoint(run: Path) -> Path | None:
    """A checkpoint folder whose save has begun but not ended."""
    return next((path for path in run.glob("checkpoint-*") if not _saved_whole(path)), None)


def _start_and_kill_when(flags: list[str], run: Path, moment) -> tuple[bool, str]:
    """Start `caft finetune FLAGS` into `run` (resuming when it holds a complete checkpoint) and SIGKILL it as soon
    as `moment(run)` holds while it is stopped; returns whether it was killed before it finished, and what it printed
    to stderr."""
    resume = ["--resume"] if last_checkpoint(run) is not None else []
    process = subprocess.Popen(FINETUNE_COMMAND + flags + ["--output", str(run), *resume], env=SUBPROCESS_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    killed = False
    while process.poll() is None and time.monotonic() < deadline:
        if run.is_dir() and moment(run):
            # Frozen first, then looked at again: the run may have moved on (a save finished) between the look and
            # the kill; it is killed only in the state the moment names, else it goes on.
            process.send_signal(signal.SIGSTOP)
            if moment(run):
                process.send_signal(signal.SIGKILL)
                killed = True
                break
            process.send_signal(signal.SIGCONT)
        time.sleep(0.0005)
    _, stderr = process.communicate()
    return killed and process.returncode == -signal.SIGKILL, stderr


@pytest.mark.long(30)
def test_killed_at_random_moments_even_inside_a_checkpoint_save_the_run_ends_with_the_same_weights(tiny_dir,
                                                                                                    tmp_path):
    """A fine-tune that saves at every step is killed (SIGKILL) three times: while a checkpoint is half written,
    after a randomly chosen complete checkpoint plus a random delay, and inside a save again; each restart resumes
    from the newest complete checkpoint (naming the half-written one it skips), and the run ends with the weights
    of an uninterrupted one."""
    rng = random.Random(20)
    data = write_task(tmp_path / "task.jsonl", 40)
    flags = ["--model", str(tiny_dir / "model"), "--data", str(data), "--heads", str(tiny_dir / "heads"),
             "--num-aux-heads", "2", "--epochs", "2", "--batch-size", "4", "--learning-rate", "0.003",
             "--save-steps", "1", "--save-total-limit", "3", "--logging-steps", "3", "--lora-r", "4",
             "--lora-alpha", "8"]
    complete, run = tmp_path / "complete", tmp_path / "run"
    subprocess.run(FINETUNE_COMMAND + flags + ["--output", str(complete)], check=True, env=SUBPROCESS_ENV,
                   capture_output=True)
    after_step = rng.randint(5, 9)

    def inside_a_save(run: Path) -> bool:
        return _half_written_checkpoint(run) is not None and last_checkpoint(run) is not None

    def after_a_random_checkpoint(run: Path) -> bool:
        if not _saved_whole(run / f"checkpoint-{after_step}"):
            return False
        time.sleep(rng.uniform(0, 0.05))
        return True

    skipped_named = False
    for moment in (inside_a_save, after_a_random_checkpoint, inside_a_save):
        killed, stderr = _start_and_kill_when(flags, run, moment)
        assert killed, f"the run ended before the kill; stderr: {stderr[-2000:]}"
        if moment is inside_a_save:
            partial = _half_written_checkpoint(run)
            assert partial is not None, "the kill came after the save had finished"
            _, stderr = _start_and_kill_when(
                flags, run, lambda run, partial=partial: not partial.exists() or _saved_whole(partial))
            skipped_named |= partial.name in stderr
    assert skipped_named, "resuming never named the half-written checkpoint it skipped"
    finished, stderr = _start_and_kill_when(flags, run, lambda run: False)
    assert not finished and (run / RUN_FILE).exists(), stderr[-2000:]
    weights = Path(FINAL_DIR) / "adapter_model.safetensors"
    assert_same_tensors(complete / weights, run / weights)


@pytest.mark.parametrize("mode", ["ntp", "caft"])
def test_finetune_trains_on_plain_text_records(tiny_dir, tmp_path, mode):
    """`text` records (language-model fine-tuning, no chat template involved) train in both modes, every token of
    each text carrying the next-token loss and the heads' losses."""
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(MOLECULES[i % 10: i % 10 + 3])}) + "\n" for i in range(20)))
    summary = finetune(str(tmp_path / "run"), settings_for(tiny_dir, data, mode=mode, epochs=1, max_steps=2))
    assert summary["train_examples"] + summary["held_out_examples"] == 20
    history = json.loads((tmp_path / "run" / LOG_HISTORY_FILE).read_text())
    heads = {key for entry in history for key in entry if key.startswith("loss_head_")}
    assert heads == ({"loss_head_1"} if mode == "ntp" else {"loss_head_1", "loss_head_2", "loss_head_3"})
    assert all(math.isfinite(entry["loss"]) for entry in history if "loss" in entry)


def test_the_attention_implementation_is_the_one_asked_for(tiny_dir, tmp_path):
    """`--attn-implementation` reaches `from_pretrained`: eager trains and is recorded; a name transformers does
    not know is refused when the model loads, nothing trained."""
    data = write_task(tmp_path / "task.jsonl", 12)
    seen = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.config._attn_implementation)

    finetune(str(tmp_path / "run"), settings_for(tiny_dir, data, mode="ntp", max_steps=1,
                                                 attn_implementation="eager"), callbacks=[Recorder()])
    assert seen == ["eager"]
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["settings"]["attn_implementation"] == "eager"
    with pytest.raises(ValueError, match="no-such-kernel"):
        finetune(str(tmp_path / "other"), settings_for(tiny_dir, data, mode="ntp", max_steps=1,
                                                       attn_implementation="no-such-kernel"))


def test_finetune_command_and_bad_input(tiny_dir, tmp_path, capsys):
    data = write_task(tmp_path / "task.jsonl", 20)
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(data), "--heads",
                 str(tiny_dir / "heads"), "--num-aux-heads", "2", "--mode", "ntp", "--output", str(run),
                 "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "18 training and 2 held-out examples, 5 steps" in printed
    assert f"next: caft export {run} --output model" in printed
    assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(data), "--mode", "ntp", "--output",
                 str(run)]) == 2
    assert "holds an earlier run: resume it (--resume)" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(data), "--output",
                 str(tmp_path / "r2"), "--method", "qlora"]) == 2
    assert "argument --method: 'qlora' is not one of lora, full" in capsys.readouterr().err
    # more heads asked for than the folder holds: refused before anything loads or is written
    assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(data), "--heads",
                 str(tiny_dir / "heads"), "--num-aux-heads", "1000", "--output", str(tmp_path / "r3")]) == 2
    assert f"num_aux_heads is 1000, but {tiny_dir / 'heads'} holds 2 heads" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_checkpoint_rotation_removes_only_checkpoints_the_run_wrote(tiny_dir, tmp_path):
    """In its own run folder, with a user's `checkpoint-1-backup/` and notes added, rotation to one checkpoint keeps
    the user's entries and only the newest of the run's checkpoints; the marker lists what the run wrote."""
    data = write_task(tmp_path / "task.jsonl", 20)
    run = tmp_path / "run"
    mark_output_folder(run, "finetune")
    (run / "checkpoint-1-backup").mkdir()
    (run / "checkpoint-1-backup" / "model.pt").write_bytes(b"the user's")
    (run / "notes.txt").write_text("mine")
    summary = finetune(str(run), settings_for(tiny_dir, data, epochs=1, save_steps=1, save_total_limit=1))
    steps = summary["optimizer_steps"]
    assert steps >= 3
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1-backup", f"checkpoint-{steps}"]
    assert (run / "checkpoint-1-backup" / "model.pt").read_bytes() == b"the user's"
    assert (run / "notes.txt").read_text() == "mine"
    assert claimed(run) == {FINAL_DIR, f"checkpoint-{steps}"}


def test_the_number_of_auxiliary_heads_defaults_to_what_the_folder_holds(tiny_dir, tmp_path):
    """Without --num-aux-heads a run uses every head of its folder (2 here), 4 without a folder; fewer is allowed,
    more refused; the warm-up trains the count the run uses."""
    data = write_task(tmp_path / "task.jsonl", 4)
    assert aux_head_count(settings_for(tiny_dir, data, num_aux_heads=None)) == 2
    assert aux_head_count(settings_for(tiny_dir, data, num_aux_heads=1)) == 1
    assert aux_head_count(settings_for(tiny_dir, data, num_aux_heads=None, heads=None, head_warmup="yes")) == 4
    assert aux_head_count(settings_for(tiny_dir, data, num_aux_heads=None, mode="ntp")) == 4
    assert warmup_settings(settings_for(tiny_dir, data, num_aux_heads=None), None).num_aux_heads == 2
    with pytest.raises(ValueError, match="num_aux_heads is 3, but .* holds 2 heads"):
        aux_head_count(settings_for(tiny_dir, data, num_aux_heads=3))


@pytest.mark.parametrize("threshold, warmed", [(0.0, True), (1e9, False)])
def test_auto_head_warmup_follows_l2_at_the_start(tiny_dir, tmp_path, threshold, warmed):
    """`head_warmup=auto` measures L2 on the held-out split with the given heads and warms up only above the
    threshold; the recorded L2 is the naive held-out loss of those heads."""
    from test_head_training import naive_held_out_metrics

    from caftkit.core.heads import attach_heads

    data = write_task(tmp_path / "task.jsonl")
    settings = settings_for(tiny_dir, data, head_warmup="auto", epochs=1, l2_warmup_threshold=threshold)
    summary = finetune(str(tmp_path / "run"), settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    record = summary["head_warmup"]
    assert record["warmed_up"] is warmed
    assert (tmp_path / "run" / "warmup-heads").exists() is warmed
    model = attach_heads(tiny_model("llama"), tiny_dir / "heads")
    naive = naive_held_out_metrics(model, tiny_tokenizer(), HeadTrainingSettings(model="tiny", data=str(data),
                                                                                 eval_fraction=0.2))
    assert record["l2_at_start"] == pytest.approx(naive[2], rel=1e-5)


def test_trainer_settings_reach_the_trainer(tiny_dir, tmp_path, capsys):
    """--max-steps, --optim, --save-total-limit, --lora-target-modules and --trainer reach the run; a --trainer
    field that caftkit sets from its own settings, or that is no trainer field, is refused before loading."""
    from caftkit.training.finetuning import lora_config
    from caftkit.training.settings import trainer_arguments

    settings = settings_for(tiny_dir, "d.jsonl", max_steps=3, optim="sgd", save_total_limit=1,
                            lora_target_modules=["q_proj", "v_proj"], trainer={"adam_beta2": 0.95,
                                                                               "max_grad_norm": 0.5})
    arguments = trainer_arguments(settings, "out", 8)
    # caftkit rotates the checkpoints itself (only those the run wrote): the Trainer gets no limit
    assert (arguments["max_steps"], arguments["optim"], arguments["save_total_limit"]) == (3, "sgd", None)
    assert (arguments["adam_beta2"], arguments["max_grad_norm"]) == (0.95, 0.5)
    assert lora_config(settings).target_modules == {"q_proj", "v_proj"}
    assert lora_config(settings_for(tiny_dir, "d.jsonl")).target_modules == "all-linear"

    data = write_task(tmp_path / "task.jsonl", 20)
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(data), "--heads",
                 str(tiny_dir / "heads"), "--num-aux-heads", "2", "--output", str(run), "--batch-size", "4",
                 "--max-steps", "2", "--trainer", "{max_grad_norm: 0.5, adam_epsilon: 1e-7}"]) == 0
    summary = json.loads((run / RUN_FILE).read_text())
    # YAML reads 1e-7 as text: a number field takes it as the number
    assert summary["optimizer_steps"] == 2 and summary["settings"]["trainer"] == {"max_grad_norm": 0.5,
                                                                                  "adam_epsilon": 1e-7}
    capsys.readouterr()
    for trainer, message in (("{seed: 3}", "trainer: ['seed'] are set from caftkit's own settings"),
                             ("{adam_beta3: 1}", "trainer: ['adam_beta3'] are not CAFTConfig"),
                             ("{adam_beta2: abc}", "trainer: adam_beta2 must be float, got 'abc'"),
                             ("{eval_on_start: false}", "trainer: ['eval_on_start'] are set from caftkit's own"),
                             ("{dataloader_pin_memory: 2}", "trainer: dataloader_pin_memory must be bool, got 2")):
        assert main(["finetune", "--model", str(tiny_dir / "model"), "--data", str(data), "--output",
                     str(tmp_path / "refused"), "--trainer", trainer]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


@pytest.mark.long(60)
def test_a_killed_head_warm_up_continues_on_the_rerun(tiny_dir, tmp_path):
    """A fine-tune killed (SIGKILL) during its head warm-up, after a warm-up checkpoint, is started again with the
    same command: the warm-up continues from its checkpoint and ends with the heads of an uninterrupted one."""
    data = write_task(tmp_path / "task.jsonl", 60)
    flags = ["--model", str(tiny_dir / "model"), "--data", str(data), "--heads", str(tiny_dir / "heads"),
             "--num-aux-heads", "2", "--batch-size", "2", "--head-warmup", "yes", "--save-steps", "4",
             "--max-steps", "1", "--lora-r", "4", "--lora-alpha", "8"]
    interrupted = tmp_path / "interrupted"
    finetune_complete_and_killed(flags, tmp_path / "complete", interrupted,
                                 "warmup-heads/checkpoints/checkpoint-8/trainer_state.json")
    assert not (interrupted / "warmup-heads" / "heads_config.json").exists(), "killed before the warm-up ended"
    subprocess.run(FINETUNE_COMMAND + flags + ["--output", str(interrupted)], check=True, env=SUBPROCESS_ENV,
                   capture_output=True)
    assert_same_tensors(tmp_path / "complete" / "warmup-heads" / "heads.safetensors",
                        interrupted / "warmup-heads" / "heads.safetensors")


class _RecordTraining(TrainerCallback):
    """Records whether the model trains with activation checkpointing, and the first training batch."""

    def __init__(self):
        self.checkpointing = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing = model.is_activation_checkpointing


@pytest.mark.parametrize("method", ["lora", "full"])
def test_activation_checkpointing_changes_memory_not_the_run(tiny_dir, tmp_path, method):
    """With --activation-checkpointing the model trains with checkpointing on, and the CAFT losses of every logged
    step and the final weights equal those of the same run without it (within 1e-5)."""
    data = write_task(tmp_path / "task.jsonl", 24)
    runs = {}
    for checkpointing in (False, True):
        record = _RecordTraining()
        run = tmp_path / f"run-{checkpointing}"
        finetune(str(run), settings_for(tiny_dir, data, method=method, epochs=1, logging_steps=1,
                                        activation_checkpointing=checkpointing), callbacks=[record])
        assert record.checkpointing is checkpointing
        history = json.loads((run / "log_history.json").read_text())
        runs[checkpointing] = ([entry["loss"] for entry in history if "loss" in entry], run / FINAL_DIR)
    (plain_losses, plain_final), (checkpointed_losses, checkpointed_final) = runs[False], runs[True]
    assert len(plain_losses) == 5  # 20 training examples, batches of 4
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    plain, checkpointed = load_file(str(plain_final / weights)), load_file(str(checkpointed_final / weights))
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_packed_batches_score_like_separate_conversations(tiny_dir, tmp_path):
    """With --packing a training batch holds several conversations in one row, and its per-head loss sums and
    target counts equal those of the same conversations scored one by one: attention and the heads' targets t+k
    never reach into the next conversation."""
    from datasets import Dataset

    from caftkit.core.multitoken import head_statistics
    from caftkit.data import tokenize_source
    from caftkit.training.finetuning import finetune_arguments
    from caftkit.training.trainer import CAFTConfig, CAFTTrainer

    settings = settings_for(tiny_dir, write_task(tmp_path / "task.jsonl", 12), method="full", packing=True,
                            max_length=64, batch_size=2)
    tokenizer = tiny_tokenizer()
    examples = tokenize_source(settings.data, tokenizer, settings.max_length).examples
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32)
    attach_heads(model, settings.heads)
    trainer = CAFTTrainer(model, CAFTConfig(**finetune_arguments(settings, str(tmp_path / "run"), len(examples))),
                          train_dataset=Dataset.from_list(examples), eval_dataset=Dataset.from_list(examples[:2]),
                          processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    positions = batch["position_ids"]
    starts = (positions == 0).nonzero().tolist()
    assert len(starts) > batch["input_ids"].shape[0], "no row holds more than one conversation"
    model.eval()
    with torch.no_grad():
        packed = head_statistics(model, batch, num_aux_heads=2)
        separate = None
        for row in range(positions.shape[0]):
            bounds = [column for r, column in starts if r == row] + [int((positions[row] >= 0).sum())]
            for start, end in zip(bounds, bounds[1:]):
                alone = {key: batch[key][row:row + 1, start:end] for key in ("input_ids", "labels")}
                stats = head_statistics(model, alone, num_aux_heads=2)
                sums = torch.stack([s.double() for s in stats.loss_sums])
                separate = (sums, stats.counts) if separate is None else (separate[0] + sums,
                                                                          separate[1] + stats.counts)
    assert packed.counts.tolist() == separate[1].tolist()
    torch.testing.assert_close(torch.stack([s.double() for s in packed.loss_sums]), separate[0], rtol=1e-5,
                               atol=1e-6)


def test_early_stopping_keeps_the_best_checkpoint(tiny_dir, tmp_path):
    """--early-stopping-patience 1 with a threshold no evaluation can meet stops at the second evaluation, and
    final/ holds the weights of the checkpoint whose held-out next-token loss was lower."""
    data = write_task(tmp_path / "task.jsonl", 40)
    run = tmp_path / "run"
    summary = finetune(str(run), settings_for(tiny_dir, data, epochs=4, eval_steps=2, save_steps=100,
                                              early_stopping_patience=1, early_stopping_threshold=1e9))
    assert summary["optimizer_steps"] == 4  # of 32 planned
    history = json.loads((run / "log_history.json").read_text())
    evaluations = {entry["step"]: entry["eval_loss_head_1"] for entry in history if "eval_loss_head_1" in entry}
    best_step = min((2, 4), key=lambda step: evaluations[step])
    assert Path(summary["best_checkpoint"]).name == f"checkpoint-{best_step}"
    assert_same_tensors(run / f"checkpoint-{best_step}" / "adapter_model.safetensors",
                        run / FINAL_DIR / "adapter_model.safetensors")


def test_export_never_replaces_what_it_did_not_write(tiny_dir, tmp_path, capsys):
    """`caft export` refuses, before loading anything, an output or heads folder that exists and is not an earlier
    export (a user's folder, the run's own heads, the working directory); an earlier export is replaced whole."""
    run = tmp_path / "run"
    finetune(str(run), settings_for(tiny_dir, write_task(tmp_path / "task.jsonl", 20), epochs=1))
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    run_heads_before = {path.name: path.read_bytes() for path in (run / RUN_HEADS_DIR).iterdir()}
    for flags, refused in ((["--output", str(mine)], mine),
                           (["--output", str(tmp_path / "model"), "--heads-output", str(mine)], mine),
                           (["--output", str(tmp_path / "model"), "--heads-output", str(run / RUN_HEADS_DIR)],
                            run / RUN_HEADS_DIR)):
        assert main(["export", str(run), *flags]) == 2
        assert capsys.readouterr().err == (f"caft: error: {refused}: exists and was not written by caft "
                                           "export: choose another output (nothing was changed)\n")
        assert [path.name for path in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
        assert not (tmp_path / "model").exists()
    assert {path.name: path.read_bytes() for path in (run / RUN_HEADS_DIR).iterdir()} == run_heads_before
    # A second export over the first replaces it whole, and leaves no temporary folder behind.
    for _ in range(2):
        assert main(["export", str(run), "--output", str(tmp_path / "model")]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine", "model", "model-heads", "run", "task.jsonl"]
    assert json.loads((tmp_path / "model" / "caft_export.json").read_text())["heads"] == str(tmp_path / "model-heads")


def test_tensorboard_holds_every_head_loss_the_run_and_its_warm_up_logged(tiny_dir, tmp_path):
    data = write_task(tmp_path / "task.jsonl", 24)
    run = tmp_path / "run"
    finetune(str(run), settings_for(tiny_dir, data, max_steps=4, logging_steps=1, eval_steps=2, head_warmup="yes",
                                    report_to=["tensorboard"]))
    history = json.loads((run / "log_history.json").read_text())
    events = _tensorboard_events(run / "tensorboard")
    logged = [entry for entry in history if "loss_head_1" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    for tag in ("loss", "loss_head_1", "loss_head_2", "accuracy_head_1", "accuracy_head_2", "caft_gamma",
                "learning_rate"):
        scalars = events.Scalars(f"train/{tag}")
        assert [scalar.step for scalar in scalars] == [1, 2, 3, 4], tag
        # Event files hold float32.
        assert [scalar.value for scalar in scalars] == pytest.approx([entry[tag] for entry in logged], rel=1e-6)
    held_out = [entry for entry in history if "eval_loss_head_2" in entry]
    assert [scalar.step for scalar in events.Scalars("eval/loss_head_2")] == [entry["step"] for entry in held_out]
    assert [scalar.value for scalar in events.Scalars("eval/loss_head_2")] == pytest.approx(
        [entry["eval_loss_head_2"] for entry in held_out], rel=1e-6)
    # Nothing went where transformers writes by default.
    assert not list(run.rglob("runs"))
    # The warm-up's curves outlive its checkpoints, which are removed when it ends.
    warmup = run / "warmup-heads"
    assert not (warmup / "checkpoints").exists()
    warmup_history = json.loads((warmup / "log_history.json").read_text())
    warmup_logged = [entry for entry in warmup_history if "loss_head_2" in entry and "eval_loss_head_2" not in entry]
    assert warmup_logged
    assert [scalar.value for scalar in _tensorboard_events(warmup / "tensorboard").Scalars("train/loss_head_2")] == \
        pytest.approx([entry["loss_head_2"] for entry in warmup_logged], rel=1e-6)


def test_trackio_gets_one_run_per_fine_tuning_with_its_final_evaluation(tiny_dir, tmp_path):
    """The held-out evaluation after training is logged into the run's own trackio run, not a second one (an
    unnamed run got a new random name when logging restarted after training ended)."""
    data = write_task(tmp_path / "task.jsonl", 24)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "caftkit.cli", "finetune", "--model", str(tiny_dir / "model"), "--data",
               str(data), "--mode", "ntp", "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1",
               "--report-to", "trackio", "--output", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    with sqlite3.connect(next((tmp_path / "trackio").glob("*.db"))) as database:
        rows = database.execute("SELECT run_name, metrics FROM metrics ORDER BY step").fetchall()
    (name,) = {name for name, _ in rows}
    assert name.startswith(f"{tmp_path / 'run'} 20")  # the output folder and the start time
    logged = [json.loads(metrics) for _, metrics in rows]
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert [entry["train/loss_head_1"] for entry in logged if "train/loss_head_1" in entry] == pytest.approx(
        [entry["loss_head_1"] for entry in history if "loss_head_1" in entry])
    final = json.loads((tmp_path / "run" / "caft_run.json").read_text())["final_eval"]
    assert logged[-1]["eval/loss"] == pytest.approx(final["eval_loss"])


def _tensorboard_events(folder: Path) -> EventAccumulator:
    """Every event file of `folder` (training opens one, an evaluation after it another), read as one run."""
    assert next(folder.glob("events.out.tfevents.*"), None) is not None, folder
    events = EventAccumulator(str(folder))
    events.Reload()
    return events
