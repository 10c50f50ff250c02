"""Flags and YAML configs built from settings dataclasses: one declaration, the same conversion for both."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from caftkit.command_line import SettingsError, add_settings, build_settings, read_config
from caftkit.settings import check_settings, setting


@dataclass
class Example:
    data: str = setting(help="the records")
    learning_rate: float | None = setting(None, help="peak learning rate")
    epochs: float = setting(1.0, help="passes over the data")
    mode: str = setting("caft", help="the loss", choices=("caft", "ntp"))
    resume: bool = setting(False, help="continue the run")
    freeze_unembedding: bool = setting(True, help="keep lm_head frozen")
    seeds: list[int] = setting(default_factory=lambda: [0], help="training seeds")
    finetune: dict = setting(default_factory=dict, help="further settings")
    max_samples: int | None = setting(1000, help="how many")
    activation_checkpointing: bool = setting(False, help="recompute", formerly=("gradient_checkpointing",))
    output: str = setting("run", help="where", formerly=("out",))


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="caft example", exit_on_error=False)
    add_settings(built, Example)
    return built


def from_flags(*flags: str) -> Example:
    return build_settings(Example, vars(parser().parse_args(list(flags))))


def test_flags_and_yaml_give_equal_settings(tmp_path):
    config = tmp_path / "example.yaml"
    config.write_text("data: d.jsonl\nlearning-rate: 2e-4\nepochs: 2\nmode: ntp\nresume: yes\n"
                      "freeze_unembedding: false\nseeds: [1, 2]\nfinetune: {beta: 0.5}\nmax-samples: none\n")
    from_yaml = build_settings(Example, {}, config)
    flags = from_flags("--data", "d.jsonl", "--learning-rate", "2e-4", "--epochs", "2", "--mode", "ntp", "--resume",
                       "--no-freeze-unembedding", "--seeds", "1,2", "--finetune", "{beta: 0.5}",
                       "--max-samples", "none")
    assert from_yaml == flags
    # YAML reads 2e-4 as a string; the setting's type makes it a float, as on the command line
    assert from_yaml.learning_rate == 2e-4 and isinstance(from_yaml.learning_rate, float)
    assert from_yaml.seeds == [1, 2] and from_yaml.finetune == {"beta": 0.5} and from_yaml.max_samples is None
    assert from_yaml.resume is True and from_yaml.freeze_unembedding is False


def test_flags_override_the_config_and_the_config_overrides_defaults(tmp_path):
    config = tmp_path / "example.yaml"
    config.write_text("data: d.jsonl\nepochs: 3\n")
    built = build_settings(Example, vars(parser().parse_args(["--epochs", "4"])), config)
    assert (built.data, built.epochs, built.mode, built.seeds) == ("d.jsonl", 4.0, "caft", [0])
    assert build_settings(Example, {}, config).epochs == 3.0


def test_former_names_are_refused_with_the_current_one(tmp_path, capsys):
    """A command line or config kept from before a rename stops at once, saying what to write instead."""
    for flags, message in ((["--gradient-checkpointing"], "--gradient-checkpointing was renamed "
                                                          "--activation-checkpointing"),
                           (["--no-gradient-checkpointing"], "--no-gradient-checkpointing was renamed "
                                                             "--no-activation-checkpointing"),
                           (["--out", "o"], "--out was renamed --output")):
        with pytest.raises(SystemExit) as exit_status:
            from_flags("--data", "x", *flags)
        assert exit_status.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"caft example: error: {message}"
    config = tmp_path / "old.yaml"
    config.write_text("data: x\ngradient_checkpointing: true\nout: o\n")
    with pytest.raises(SettingsError, match=rf"^{config}:2: 'gradient_checkpointing' was renamed "
                                            r"'activation-checkpointing'$"):
        build_settings(Example, {}, config)


def test_underscores_and_dashes_are_both_flags():
    assert from_flags("--data", "x", "--learning_rate", "0.1") == from_flags("--data", "x", "--learning-rate", "0.1")
    assert from_flags("--data", "x", "--no_freeze_unembedding").freeze_unembedding is False


def test_a_boolean_takes_no_word_so_a_typo_cannot_pass_for_one(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--resume", "flase"])
    assert "unrecognized arguments: flase" in capsys.readouterr().err
    with pytest.raises(SettingsError, match=r"--resume: expected true or false, got 'flase'"):
        read_config_text("resume: flase\ndata: x\n")


def read_config_text(text: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text)
        return read_config(path, Example)


@pytest.mark.parametrize("text, message", [
    ("data: x\nmode: sft\n", r"c.yaml:2: --mode: 'sft' is not one of caft, ntp"),
    ("data: x\nlearning_rat: 0.1\n", r"c.yaml:2: unknown setting 'learning_rat' \(did you mean learning-rate\?\)"),
    ("data: x\n\nepochs: many\n", r"c.yaml:3: --epochs: expected a number, got 'many'"),
    ("data: x\nseeds: [1, a]\n", r"c.yaml:2: --seeds: expected a comma-separated list of int, got \[1, 'a'\]"),
    ("data: x\nfinetune: [1]\n", r"c.yaml:2: --finetune: expected a mapping such as \{key: value\}"),
    ("data: x\nmax_samples: 2.5\n", r"c.yaml:2: --max-samples: expected an integer or none, got 2.5"),
    ("data: [x\n", r"c.yaml:2: not valid YAML"),
    ("- data\n", r"c.yaml: expected a mapping of setting names to values"),
    ("data: x\nepochs: 1\nepochs: 2\n", r"c.yaml:3: key 'epochs' given twice \(first on line 2\); give it once"),
    ("data: x\nfinetune: {beta: 1, beta: 2}\n", r"c.yaml:2: key 'beta' given twice \(first on line 2\)"),
    ("data: x\nlearning-rate: 1\nlearning_rate: 2\n", r"c.yaml:3: 'learning_rate' sets 'learning-rate' a second time"),
])
def test_a_bad_config_value_is_one_line_naming_file_line_and_setting(text, message):
    with pytest.raises(SettingsError, match=message):
        read_config_text(text)


def test_a_home_path_in_a_config_is_expanded_as_the_shell_does_on_the_command_line():
    values = read_config_text("data: ~/records.jsonl\noutput: ~/runs/a\nmode: ntp\n")
    assert values["data"] == str(Path.home() / "records.jsonl") and values["output"] == str(Path.home() / "runs/a")
    assert read_config_text("data: x~/y\n")["data"] == "x~/y"  # only a leading ~ is the home folder


def test_bad_flags_name_the_flag_and_the_choices():
    with pytest.raises(argparse.ArgumentError, match=r"argument --mode: 'sft' is not one of caft, ntp"):
        parser().parse_args(["--mode", "sft"])
    with pytest.raises(argparse.ArgumentError, match=r"argument --epochs: expected a number, got 'x'"):
        parser().parse_args(["--epochs", "x"])
    with pytest.raises(SettingsError, match=r"missing --data \(give it on the command line or in --config\)"):
        build_settings(Example, {})


def test_help_lists_each_setting_with_its_choices_and_default():
    text = parser().format_help()
    assert "--mode MODE" in text and "the loss One of: caft, ntp. (default: caft)" in " ".join(text.split())
    assert "--resume, --no-resume" in text
    assert "training seeds (default: 0)" in " ".join(text.split())
    assert "the records (required)" in " ".join(text.split())


@dataclass
class Bounded:
    rate: float = setting(0.1, help="a rate", above=0, below=1)
    count: int | None = setting(4, help="a count", minimum=1)
    sizes: list[int] = setting(default_factory=lambda: [1, 8], help="sizes", minimum=1)
    weight: float = setting(0.0, help="a weight", minimum=0)

    def __post_init__(self):
        check_settings(self)


@pytest.mark.parametrize("values, message", [
    ({"rate": 0.0}, "rate must be > 0 and < 1, got 0"),
    ({"rate": 1.5}, "rate must be > 0 and < 1, got 1.5"),
    ({"count": 0}, "count must be >= 1, got 0"),
    ({"sizes": [4, 0]}, "sizes must be >= 1, got 0"),
    ({"weight": float("nan")}, "weight must be a finite number, got nan"),
    ({"weight": float("inf")}, "weight must be a finite number, got inf"),
])
def test_numbers_outside_their_declared_range_are_refused(values, message):
    with pytest.raises(ValueError) as refused:
        Bounded(**values)
    assert str(refused.value) == message


def test_the_declared_range_is_in_the_help_and_edges_pass():
    assert Bounded(rate=0.5, count=None, sizes=[1], weight=0.0).count is None  # none is not a number to bound
    built = argparse.ArgumentParser(prog="caft bounded")
    add_settings(built, Bounded)
    text = " ".join(built.format_help().split())
    assert "a rate (> 0 and < 1) (default: 0.1)" in text and "a count (>= 1) (default: 4)" in text
