"""The README's command block runs as written, top to bottom, on a tiny model with small sizes added."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from tiny_models import saved_model_dir, tiny_model
from tiny_tokenizer import tiny_tokenizer

from caftkit.cli import main
from caftkit.core.heads import get_heads
from caftkit.models import BUNDLED_MODEL

ROOT = Path(__file__).parents[1]

# What the test adds to each command so that it takes seconds: the README says so. Flags given later win, so these
# only shrink sizes; they never change what a command reads or where it writes.
SMALL_SIZES = {
    "distill": ["--max-samples", "8", "--max-new-tokens", "8", "--batch-size", "4"],
    "train-heads": ["--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.25"],
    "data molecules": ["--n", "24"],
    "data math": ["--n", "24"],  # the math comparison then fine-tunes on 24 problems, not 3,200 (6 min of CI time)
    "finetune": ["--max-steps", "2", "--batch-size", "2"],
    "eval": ["--max-examples", "2", "--max-new-tokens", "8"],
    "compare": ["--test-examples", "2", "--max-new-tokens", "8",
                "--finetune", "{max_steps: 2, batch_size: 2, eval_fraction: 0.25}"],
    "generate": ["--max-new-tokens", "8"],
    "demo": ["--distill-prompts", "4", "--distill-new-tokens", "8", "--molecules", "24", "--eval-molecules", "4"],
    "bench train": ["--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "16"],
    "bench generate": ["--num-prompts", "2", "--max-new-tokens", "8", "--batch-sizes", "1"],
    "bench precision": ["--steps", "2"],
}
# Commands that load a model: the bundled one (named or by default) becomes the tiny one.
TAKES_MODEL = {"distill", "train-heads", "finetune", "eval", "compare", "generate", "demo", "bench train",
               "bench generate", "bench precision", "export-heads"}
# What each command leaves behind, checked after it ran (paths from its own --output unless listed here).
WRITES = {"export": ["model/config.json", "model/README.md", "model-heads/heads_config.json"],
          "export-heads": ["heads-eagle3/config.json", "heads-eagle3/model.safetensors"],
          "demo": ["demo-output/demo.json"]}


def readme_blocks() -> list[tuple[str, list[str]]]:
    """The README's fenced blocks: (language, lines) each."""
    blocks, block, language = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```") and block is None:
            block, language = [], line[3:].strip()
        elif line.startswith("```"):
            blocks.append((language, block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def readme_commands() -> list[list[str]]:
    """The `caft` lines of the README's command block, as argument lists without the comments."""
    commands = next(block for _, block in readme_blocks() if block[0].startswith("caft distill"))
    return [shlex.split(line, comments=True)[1:] for line in commands if line.strip()]


def command_name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("bench", "data") else argv[0]


def small_run_of(argv: list[str], tiny: str) -> list[str]:
    name = command_name(argv)
    argv = [tiny if argv[i - 1] == "--model" and arg == BUNDLED_MODEL else arg for i, arg in enumerate(argv)]
    if name in TAKES_MODEL and "--model" not in argv:
        argv += ["--model", tiny]
    return argv + SMALL_SIZES.get(name, [])


@pytest.mark.long(100)
def test_the_readme_command_block_runs_in_order(tmp_path, monkeypatch, single_thread):
    commands = readme_commands()
    names = [command_name(argv) for argv in commands]
    # Every command of the pipeline is shown, and every one taking long has its sizes here.
    assert {"distill", "train-heads", "data molecules", "data math", "finetune", "export", "export-heads", "eval",
            "compare", "generate", "demo", "bench train", "bench generate", "bench precision", "env"} <= set(names)
    assert set(SMALL_SIZES) <= set(names)
    tiny = str(saved_model_dir(tmp_path / "tiny-model", tiny_model("llama")))
    work = tmp_path / "work"
    shutil.copytree(ROOT / "configs", work / "configs")
    monkeypatch.chdir(work)
    for argv in commands:
        run = small_run_of(argv, tiny)
        status = main(run)
        assert status == 0, f"`caft {' '.join(run)}` exited with {status}"
        for written in WRITES.get(command_name(argv), []) or _outputs(argv):
            assert (work / written).exists(), f"`caft {' '.join(argv)}` did not write {written}"
    # The pieces fit: the fine-tuned model's heads were re-fitted from the exported ones, and the comparison
    # reports every arm of the committed config.
    tuned = json.loads((work / "model-heads-tuned" / "heads_config.json").read_text())
    assert tuned["num_heads"] == json.loads((work / "model-heads" / "heads_config.json").read_text())["num_heads"]
    report = (work / "compare" / "report.md").read_text()
    for arm in ("caft-beta0.1", "caft-beta0.5", "caft-full"):
        assert arm in report
    math_report = (work / "compare-math" / "report.md").read_text()
    assert "## caft-curriculum against ntp" in math_report and "## The paper's Ln" in math_report
    # the model exported again with its evaluations: its card reports each task
    card = ModelCard.load(work / "model" / "README.md")
    assert {result.dataset_type for result in card.data.eval_results} == {"molecules", "humaneval", "math"}
    assert "## Evaluation" in card.text


def _outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--output"]



def test_the_readme_python_block_trains_as_written(tmp_path, monkeypatch, single_thread):
    """The Python API block runs as written, given the three names it leaves to the reader (a model, a dataset
    TRL accepts, a tokenizer): four frozen heads are attached, CAFT trains the model under them, and every head's
    loss is logged with the decaying weight."""
    python = [block for language, block in readme_blocks() if language == "python"]
    assert len(python) == 1
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": f"molecule {i}"},
                                               {"role": "assistant", "content": "CC(=O)O" * (1 + i % 3)}]}
                                 for i in range(24)])
    names = {"model": model, "dataset": dataset, "tokenizer": tiny_tokenizer()}
    exec(compile("\n".join(python[0]), "README.md python block", "exec"), names)
    trainer, model = names["trainer"], names["model"]
    # 24 examples, batch 8, the default one epoch (as `caft finetune`); the first step warms up from 0
    assert trainer.state.global_step == 3
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {f"loss_head_{k}" for k in range(1, 6)} | {f"accuracy_head_{k}" for k in range(1, 6)} <= logged
    assert "caft_gamma" in logged
    heads = get_heads(model)
    assert len(heads.layers) == 4
    last_layer = model.model.layers[-1].state_dict()
    for head in heads.layers:  # copies of the last layer as it was, kept frozen while the model moved
        for name, tensor in head.state_dict().items():
            assert torch.equal(tensor, before[f"model.layers.{len(model.model.layers) - 1}.{name}"]), name
    assert any(not torch.equal(tensor, before[f"model.layers.{len(model.model.layers) - 1}.{name}"])
               for name, tensor in last_layer.items())
    assert (tmp_path / "run").is_dir()


def test_the_readme_distributed_block_runs_with_cpu_processes(tmp_path):
    """The torchrun line runs as written on two CPU processes (gloo) instead of eight GPUs. accelerate runs FSDP
    only on GPUs (with `--cpu` it starts one process), so the fsdp2 line's config must exist and its caftkit
    command runs in one process, on the heads the torchrun line made."""
    lines = next(block for _, block in readme_blocks() if block and block[0].startswith("torchrun"))
    assert [line.split()[0] for line in lines] == ["torchrun", "accelerate"]
    saved_model_dir(tmp_path / "tiny-model", tiny_model("llama", seed=1))
    chats = "".join(json.dumps({"id": f"m{i}", "messages": [
        {"role": "user", "content": f"molecule {i}"},
        {"role": "assistant", "content": "CC(=O)O" * (1 + i % 3)}]}) + "\n" for i in range(16))
    (tmp_path / "distilled.jsonl").write_text(chats)
    (tmp_path / "task.jsonl").write_text(chats)
    small = ["--model", str(tmp_path / "tiny-model"), "--max-steps", "2", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def on_cpu(argv: list[str]) -> list[str]:
        return ["cpu" if argv[i - 1] == "--device" and arg == "cuda" else arg for i, arg in enumerate(argv)]

    torchrun = on_cpu(shlex.split(lines[0]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                *["2" if torchrun[i - 1] == "--nproc_per_node" else arg for i, arg in enumerate(torchrun)][1:]]
    accelerate = on_cpu(shlex.split(lines[1]))
    assert accelerate[:3] == ["accelerate", "launch", "--config_file"] and (ROOT / accelerate[3]).exists()
    module = accelerate.index("-m")
    one_process = [sys.executable, *accelerate[module:]]
    for command in (torchrun, one_process):
        result = subprocess.run(command + small, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
    heads = json.loads((tmp_path / "heads" / "heads_config.json").read_text())["training"]
    assert heads["launch"] == {"processes": 2, "distribution": "MULTI_CPU"}
    assert heads["optimizer_steps"] == 2
    run = json.loads((tmp_path / "run" / "caft_run.json").read_text())
    assert run["launch"] == {"processes": 1, "distribution": "NO"}
    assert run["heads"] == str(Path("run") / "heads") and run["settings"]["heads"] == "heads"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# The README's commands are found by a shell that has only what `make demo` made: a clean environment that ran the
# activation line the README gives, nothing else.
ACTIVATION = ". .venv/bin/activate"


def programs_of_readme() -> set[str]:
    """The programs the README's caft command blocks start, and tensorboard, which the demo prints."""
    programs = {"tensorboard"}
    for _, lines in readme_blocks():
        for line in lines:
            words = shlex.split(line, comments=True) if line.strip() else []
            if words and words[0] in ("caft", "tensorboard"):
                programs.add(words[0])
    return programs


def test_the_readme_says_how_to_reach_the_venvs_commands():
    assert f"`{ACTIVATION}`" in (ROOT / "README.md").read_text()


def test_the_readme_commands_run_after_the_activation_line_alone(tmp_path):
    """`env -i` leaves PATH at the system's and HOME in a temporary folder: the activation line of the README (on
    this suite's venv, `.venv` under `make test`) is what puts `caft` and `tensorboard` on PATH, and they run."""
    venv = Path(sys.executable).parent.parent
    assert "caft" in programs_of_readme()
    checks = " && ".join(f'test "$(command -v {program})" = "{venv}/bin/{program}"' for program in
                         sorted(programs_of_readme()))
    script = f"{ACTIVATION.replace('.venv', shlex.quote(str(venv)))} && {checks} && caft --version && " \
             "tensorboard --version_tb"
    done = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", "bash", "--noprofile", "--norc",
                           "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("caft ")
    without = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", "bash", "--noprofile",
                              "--norc", "-c", "command -v caft"], capture_output=True, text=True, cwd=tmp_path)
    assert without.returncode != 0  # the activation line is what makes the difference
