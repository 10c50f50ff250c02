"""The README's command block runs as written, top to bottom, on a tiny model with small sizes added."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main
from caftkit.models import BUNDLED_MODEL

ROOT = Path(__file__).parents[1]

# What the test adds to each command so that it takes seconds: the README says so. Flags given later win, so these
# only shrink sizes; they never change what a command reads or where it writes.
SMALL_SIZES = {
    "distill": ["--max-samples", "8", "--max-new-tokens", "8", "--batch-size", "4"],
    "train-heads": ["--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.25"],
    "data molecules": ["--n", "24"],
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
               "bench generate", "bench precision"}
# What each command leaves behind, checked after it ran (paths from its own --output unless listed here).
WRITES = {"export": ["model/config.json", "model/README.md", "model-heads/heads_config.json"],
          "demo": ["demo-output/demo.json"], "compare": ["compare/report.md"]}


def readme_commands() -> list[list[str]]:
    """The `caft` lines of the README's command block, as argument lists without the comments."""
    blocks, block = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```") and block is None:
            block = []
        elif line.startswith("```"):
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(line)
    commands = next(block for block in blocks if block[0].startswith("caft distill"))
    return [shlex.split(line, comments=True)[1:] for line in commands if line.strip()]


def command_name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("bench", "data") else argv[0]


def small_run_of(argv: list[str], tiny: str) -> list[str]:
    name = command_name(argv)
    argv = [tiny if argv[i - 1] == "--model" and arg == BUNDLED_MODEL else arg for i, arg in enumerate(argv)]
    if name in TAKES_MODEL and "--model" not in argv:
        argv += ["--model", tiny]
    return argv + SMALL_SIZES.get(name, [])


def test_the_readme_command_block_runs_in_order(tmp_path, monkeypatch, single_thread):
    commands = readme_commands()
    names = [command_name(argv) for argv in commands]
    # Every command of the pipeline is shown, and every one taking long has its sizes here.
    assert {"distill", "train-heads", "data molecules", "finetune", "export", "eval", "compare", "generate", "demo",
            "bench train", "bench generate", "bench precision", "env"} <= set(names)
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


def _outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--output"]

