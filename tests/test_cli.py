"""The `caft` command line: the parser of every command, configs, and the one-line refusals before anything loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.cli import main
from caftkit.command_line import Command, run_command


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_model("llama"))


def test_unknown_config_key_is_an_error_naming_the_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("batch_size: 2\nlearning_rate: 0.1\n")
    assert main(["bench", "train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"{config}:2: unknown setting 'learning_rate'" in error


def test_malformed_config_names_the_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("batch_size: 2\nseq_len: [16\n")
    assert main(["bench", "train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"{config}:3: not valid YAML" in error


@pytest.mark.parametrize("command", [
    ["finetune", "--data", "task.jsonl"],
    ["eval", "--model", "smollm2-135m-instruct", "--task", "molecules"],
    ["generate", "--prompt", "Hello"],
])
def test_unknown_device_is_refused_before_anything_loads(command, tmp_path, capsys):
    output = tmp_path / "out"
    assert main([*command, "--output", str(output), "--device", "gpu"] if command[0] != "generate"
                else [*command, "--device", "gpu"]) == 2
    assert ("device must be auto, cpu, cuda, cuda:N, xpu, mps or another torch device, got 'gpu'"
            in capsys.readouterr().err)
    assert not output.exists()
    assert main([*command, "--output", str(output), "--device", "meta"] if command[0] != "generate"
                else [*command, "--device", "meta"]) == 2
    assert "device 'meta': holds shapes without data, nothing runs on it; use auto or cpu" in capsys.readouterr().err
    assert not output.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["bench", "train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid_for_their_command(path):
    """Every example config holds only settings of the command it is for (named in its first comment line), each a
    valid value."""
    from caftkit.cli import commands
    from caftkit.command_line import read_config

    first_line = path.read_text().splitlines()[0]
    command = re.search(r"`caft ([a-z -]+?) --config", first_line).group(1)
    assert read_config(path, *commands()[command].settings)


def test_version_and_env(capsys):
    import importlib.metadata

    import torch
    import transformers

    import caftkit
    from caftkit.models import bf16_is_fast

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"caft {caftkit.__version__}\n"
    assert caftkit.__version__ == importlib.metadata.version("caftkit")

    assert main(["env"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["torch"] == torch.__version__
    assert report["packages"]["transformers"] == transformers.__version__
    assert report["cpu"] == {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "bf16_native": bf16_is_fast("cpu")}
    assert report["cuda"]["available"] is torch.cuda.is_available()


def _subparser(parser, name: str):
    """The parser of command `name` ("bench train" for a sub-command)."""
    import argparse

    for word in name.split(" "):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def test_every_flag_of_every_command_has_help_and_shows_the_field_default():
    import argparse
    import dataclasses

    from caftkit.cli import commands
    from caftkit.command_line import build_parser
    from caftkit.settings import default_of, fields_of

    parser = build_parser("caft", "", commands(), "0")
    for name, command in commands().items():
        sub = _subparser(parser, name)
        actions = {action.dest: action for action in sub._actions if action.help != argparse.SUPPRESS}
        for cls in command.settings:
            for field, _ in fields_of(cls):
                action = actions[field.name]
                assert len(action.help) > 15, (name, field.name)
                default = default_of(field)
                if default is dataclasses.MISSING:
                    assert action.help.endswith("(required)"), (name, field.name)
                elif default not in (None, "", [], {}):
                    shown = ",".join(map(str, default)) if isinstance(default, list) else default
                    assert action.help.endswith(f"(default: {shown})"), (name, field.name, action.help)
        # nothing given means every setting at its declared default
        if command.settings:
            assert vars(sub.parse_args([])) == {"_command": command}


def test_finetune_settings_from_yaml_equal_the_same_flags(tmp_path, capsys):
    from caftkit.cli import COMMANDS
    from caftkit.command_line import build_parser, build_settings_group

    config = tmp_path / "finetune.yaml"
    config.write_text("data: task.jsonl\nlearning-rate: 2e-4\nresume: yes\ntrain_heads: true\nmax-steps: 10\n"
                      "mode: ntp\nlora-target-modules: [q_proj, v_proj]\ntrainer: {adam_beta2: 0.95}\n"
                      "report-to: none\nfreeze_unembedding: off\noutput: run-a\n")
    command = COMMANDS["finetune"]
    from_yaml = build_settings_group(command.settings, {}, config)
    flags = ["--data", "task.jsonl", "--learning-rate", "2e-4", "--resume", "--train-heads", "--max-steps", "10",
             "--mode", "ntp", "--lora-target-modules", "q_proj,v_proj", "--trainer", "{adam_beta2: 0.95}",
             "--report-to", "none", "--no-freeze-unembedding", "--output", "run-a"]
    given = vars(_subparser(build_parser("caft", "", COMMANDS, "0"), "finetune").parse_args(flags))
    given.pop("_command")
    from_flags = build_settings_group(command.settings, given)
    assert from_yaml == from_flags
    settings, where = from_yaml
    assert settings.learning_rate == 2e-4 and isinstance(settings.learning_rate, float)
    assert (settings.train_heads, settings.freeze_unembedding, where.resume) == (True, False, True)
    assert settings.report_to == [] and settings.trainer == {"adam_beta2": 0.95}
    # --no-resume after --resume wins, as the last flag does
    given = vars(_subparser(build_parser("caft", "", COMMANDS, "0"), "finetune").parse_args(
        ["--resume", "--no-resume"]))
    assert given["resume"] is False
    assert main(["finetune", "--data", "task.jsonl", "--mode", "sft"]) == 2
    assert capsys.readouterr().err == ("caft: error: argument --mode: 'sft' is not one of caft, ntp "
                                       "(see caft finetune --help)\n")


def test_trl_names_work_as_flags_and_in_yaml_and_trl_only_flags_name_caftkits(tmp_path, capsys):
    """A TRL user's `--per-device-train-batch-size 4 --gradient-accumulation-steps 2 --num-train-epochs 2
    --lr-scheduler-type linear --output-dir out` means caftkit's batch size, accumulation, epochs, scheduler and
    output; a TRL flag with no caftkit setting of the same meaning is refused naming the one to use."""
    from caftkit.cli import COMMANDS
    from caftkit.command_line import build_parser, build_settings_group

    command = COMMANDS["finetune"]
    trl = ["--data", "task.jsonl", "--mode", "ntp", "--per-device-train-batch-size", "4",
           "--gradient_accumulation_steps", "2", "--num-train-epochs", "2", "--lr-scheduler-type", "linear",
           "--output-dir", "out"]
    ours = ["--data", "task.jsonl", "--mode", "ntp", "--batch-size", "4", "--grad-accum", "2", "--epochs", "2",
            "--lr-scheduler", "linear", "--output", "out"]
    built = []
    for flags in (trl, ours):
        given = vars(_subparser(build_parser("caft", "", COMMANDS, "0"), "finetune").parse_args(flags))
        given.pop("_command")
        built.append(build_settings_group(command.settings, given))
    config = tmp_path / "trl.yaml"
    config.write_text("data: task.jsonl\nmode: ntp\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 2\n"
                      "num_train_epochs: 2\nlr_scheduler_type: linear\noutput_dir: out\n")
    built.append(build_settings_group(command.settings, {}, config))
    assert built[0] == built[1] == built[2]
    settings, where = built[0]
    assert (settings.batch_size, settings.grad_accum, settings.epochs, settings.lr_scheduler, where.output) == (
        4, 2, 2.0, "linear", "out")
    assert main(["finetune", "--data", "task.jsonl", "--bf16", "--warmup-ratio", "0.1", "--output",
                 str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err == ("caft: error: unrecognized arguments: --bf16 --warmup-ratio 0.1 (--bf16 is "
                                       "--mixed-precision bf16 here; --warmup-ratio is --warmup, a fraction of all "
                                       "steps when below 1 here)\n")
    assert not (tmp_path / "never").exists()


def test_a_logging_back_end_that_is_not_installed_is_refused_before_anything(tmp_path, capsys):
    import importlib.util

    assert importlib.util.find_spec("wandb") is None  # not a dependency of caftkit
    output = tmp_path / "run"
    assert main(["finetune", "--data", "task.jsonl", "--report-to", "wandb", "--output", str(output)]) == 2
    assert capsys.readouterr().err == "caft: error: report_to: wandb is not installed (pip install wandb)\n"
    assert not output.exists()
    assert main(["train-heads", "--data", "d.jsonl", "--report-to", "tensorbord", "--output", str(output)]) == 2
    assert "report_to: 'tensorbord' is not a logging integration; expected none or some of" in capsys.readouterr().err
    assert not output.exists()


def test_a_misspelt_boolean_and_none_for_an_optional_count(tmp_path, capsys):
    assert main(["finetune", "--data", "task.jsonl", "--resume", "flase"]) == 2
    assert "caft: error: unrecognized arguments: flase" in capsys.readouterr().err
    source = tmp_path / "molecules.smi"
    source.write_text("CC(=O)O\nN#Cc1ccccc1\nCC(=O)N\n")
    output = tmp_path / "task.jsonl"
    assert main(["data", "molecules", "--smiles", str(source), "--n", "none", "--output", str(output)]) == 0
    assert len(output.read_text().splitlines()) == 3  # none: every molecule


def test_a_model_that_is_not_here_is_refused_in_one_line(tmp_path, capsys):
    output = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    for model, message in (
            (str(tmp_path / "missing"), f"model: {tmp_path / 'missing'} is neither a folder here nor a model in the "
                                        "Hugging Face cache (caftkit never downloads"),
            ("no-such-org/no-such-model", "model: no-such-org/no-such-model is neither a folder here nor a model"),
            (str(empty), f"model: {empty} has no config.json: not a transformers model folder")):
        assert main(["finetune", "--model", model, "--data", "task.jsonl", "--mode", "ntp",
                     "--output", str(output)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"caft: error: {message}") and error.count("\n") == 1
        assert not output.exists()


def test_heads_of_another_model_are_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    """The heads folder is checked against the model's config alone: the other model's folder here holds no weights
    (loading it would fail otherwise), and nothing is written."""
    from caftkit.core.heads import attach_heads, get_heads, save_heads

    heads = tmp_path / "heads"
    save_heads(get_heads(attach_heads(tiny_model("llama"), 2)), heads)
    other = tmp_path / "other"
    tiny_model("qwen2").config.save_pretrained(other)
    output = tmp_path / "run"
    assert main(["finetune", "--model", str(other), "--heads", str(heads), "--data", "task.jsonl",
                 "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"caft: error: {heads / 'heads_config.json'}: these heads were trained for "
                            "another base model (model_type: heads 'llama' vs model 'qwen2'")
    assert error.count("\n") == 1 and not output.exists()


def test_train_heads_never_writes_into_a_folder_that_holds_something(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    assert main(["train-heads", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"caft: error: {output}: a folder caft train-heads did not make: choose a new "
                                       "or empty output folder (nothing in it was changed)\n")
    assert [path.name for path in output.iterdir()] == ["notes.txt"]
    assert (output / "notes.txt").read_text() == "keep me"


def test_the_command_line_reads_and_refuses_settings_without_importing_torch():
    """Reading every command's flags and refusing a bad setting imports neither torch nor transformers, TRL or
    PEFT: a refusal comes at once, not after seconds of imports (measured in the closing note of issue 19)."""
    import subprocess
    import sys

    program = (
        "import sys\n"
        "from caftkit.cli import main\n"
        "assert main(['--help']) == 0\n"
        "code = main(['finetune', '--data', 'task.jsonl', '--report-to', 'wandb', '--output', 'never-made'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "2 []"
    assert done.stderr == "caft: error: report_to: wandb is not installed (pip install wandb)\n"


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--data", "task.jsonl", "--beta", "nan"], "beta must be a finite number, got nan"),
    (["finetune", "--data", "task.jsonl", "--epochs", "inf"], "epochs must be a finite number, got inf"),
    (["train-heads", "--data", "d.jsonl", "--epochs", "-1"], "epochs must be > 0, got -1"),
    (["finetune", "--data", "task.jsonl", "--alpha", "-1"], "alpha must be > 0 and <= 1, got -1"),
    (["finetune", "--data", "task.jsonl", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["finetune", "--data", "task.jsonl", "--grad-accum", "0"], "grad_accum must be >= 1, got 0"),
    (["distill", "--max-samples", "-5"], "max_samples must be >= 0, got -5"),
    (["eval", "--task", "humaneval", "--timeout-s", "-1"], "timeout_s must be > 0 and <= 86400, got -1"),
    (["eval", "--task", "humaneval", "--memory-mb", "1"], "memory_mb must be >= 256, got 1"),
    (["eval", "--task", "molecules", "--max-examples", "-1"], "max_examples must be >= 0, got -1"),
    (["bench", "generate", "--heads", "h", "--batch-sizes", "1,0"], "batch_sizes must be >= 1, got 0"),
    # upper bounds where numpy or the OS has one
    (["finetune", "--data", "task.jsonl", "--seed", str(10**20)],
     f"seed must be >= 0 and <= 4294967295, got {10**20}"),
    (["eval", "--task", "humaneval", "--timeout-s", "1e10"], "timeout_s must be > 0 and <= 86400, got 1e+10"),
    (["finetune", "--data", "task.jsonl", "--alpha", "2"], "alpha must be > 0 and <= 1, got 2"),
])
def test_a_number_out_of_range_is_refused_in_one_line_before_anything(argv, message, tmp_path, capsys):
    output = tmp_path / "out"
    assert main([*argv, "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"caft: error: {message}\n"
    assert not output.exists()


CAFT_WITHOUT_HEADS = ("caft: error: caft mode needs trained auxiliary heads: pass --heads (a folder from "
                      "`caft train-heads`), or --head-warmup yes to train new ones on this data first, or --mode ntp "
                      "for plain next-token fine-tuning\n")


def test_caft_mode_without_heads_is_refused_before_anything_loads(tmp_path, capsys):
    """caft mode (the default) with untrained heads would fine-tune with noise for auxiliary targets: refused in one
    line naming what to pass, before the model loads, unless the heads are trained on the task first."""
    from caftkit.training.settings import FinetuneSettings

    for argv in (["finetune"], ["finetune", "--head-warmup", "auto"], ["finetune", "--head-warmup", "no"]):
        assert main([*argv, "--data", "task.jsonl", "--output", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == CAFT_WITHOUT_HEADS
    assert not (tmp_path / "run").exists()
    assert FinetuneSettings(model="m", data="d", head_warmup="yes").heads is None  # new heads, warmed up on the task
    assert FinetuneSettings(model="m", data="d", mode="ntp").head_warmup == "auto"  # ntp runs no heads
    assert FinetuneSettings(model="m", data="d", heads="h").head_warmup == "auto"  # the paper's rule by default


def _failing(error: BaseException):
    def run() -> None:
        """Fail."""
        raise error
    return Command(run)


@pytest.mark.parametrize("error, line, status", [
    (IsADirectoryError(21, "Is a directory", "some/folder"), "caft: error: some/folder: Is a directory", 2),
    (ValueError("data.jsonl:3: field 'messages': expected a list"),
     "caft: error: data.jsonl:3: field 'messages': expected a list", 2),
    (KeyError("layers"), "caft: error: KeyError: 'layers' (unexpected; rerun with --debug for the traceback)", 1),
    (RuntimeError("first line\n  second line"),
     "caft: error: RuntimeError: first line second line (unexpected; rerun with --debug for the traceback)", 1),
])
def test_every_failure_is_one_line_and_debug_shows_the_traceback(capsys, error, line, status):
    commands = {"fail": _failing(error)}
    assert run_command("caft", "test", commands, "0", ["fail"]) == status
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""
    with pytest.raises(type(error)):
        run_command("caft", "test", commands, "0", ["fail", "--debug"])
