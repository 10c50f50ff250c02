"""The `caft` command line: each command is one plain function whose docstring is its `--help`.

Every command takes `--config FILE.yaml` whose keys are the command's flags (dashes or underscores); flags
given on the command line override the file, and the file overrides the defaults.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import yaml


def bench_train(
    model: str = "smollm2-135m-instruct",
    batch_size: int = 4,
    seq_len: int = 512,
    num_heads: int = 4,
    steps: int = 5,
    warmup: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    output: str | None = None,
) -> dict:
    """Time and peak memory of a CAFT training step against plain next-token fine-tuning.

    Both sides train every weight but the unembedding (frozen in both) on the same random tokens, every
    position labelled; each runs in a fresh process. Prints JSON with `time_ratio` (median step time, CAFT /
    plain), `peak_memory_ratio` and `flop_floor_time_ratio` (the ratio the extra matrix multiplies alone imply).

    Args:
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        num_heads: auxiliary heads of the CAFT side (frozen, as in CAFT fine-tuning).
        steps: timed steps per side (the median is reported).
        warmup: untimed steps before them.
        dtype: float32, bfloat16 or float16.
        device: cpu or cuda.
        seed: seed of the random tokens.
        output: also write the JSON to this file.
    """
    from .bench import bench_train as run

    result = run(model=model, batch_size=batch_size, seq_len=seq_len, num_heads=num_heads, steps=steps,
                 warmup=warmup, dtype=dtype, device=device, seed=seed)
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return result


# Command name -> function; a name with a space is a sub-command ("bench train").
COMMANDS: dict[str, Callable[..., Any]] = {
    "bench train": bench_train,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _param_help(doc: str) -> dict[str, str]:
    helps, current = {}, None
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        # `inspect.getdoc` removes the common indent: parameters sit 4 spaces in, their continuations deeper.
        if match and line.startswith(" " * 4) and not line.startswith(" " * 5):
            current = match.group(1)
            helps[current] = match.group(2)
        elif stripped and current:
            helps[current] += " " + stripped
    return helps


def _converter(annotation) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if base is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    return base if base in (int, float) else str


def _add_command(subparsers, name: str, function: Callable) -> argparse.ArgumentParser:
    doc = inspect.getdoc(function) or ""
    summary, _, body = doc.partition("\n\n")
    description = body.split("Args:")[0].strip()
    parser = subparsers.add_parser(name, help=summary, description=f"{summary}\n\n{description}".strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   argument_default=argparse.SUPPRESS)
    helps = _param_help(doc)
    hints = typing.get_type_hints(function)
    parser.add_argument("--config", help="YAML file whose keys are this command's flags")
    for param in inspect.signature(function).parameters.values():
        flag = "--" + param.name.replace("_", "-")
        default = "" if param.default is inspect.Parameter.empty else f" (default: {param.default})"
        parser.add_argument(flag, dest=param.name, type=_converter(hints.get(param.name, str)),
                            help=helps.get(param.name, "") + default)
    parser.set_defaults(_function=function)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The `caft` argument parser with every command."""
    parser = argparse.ArgumentParser(prog="caft", description=__doc__.split("\n\n")[0])
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    for name, function in COMMANDS.items():
        if " " in name:
            group, sub = name.split(" ", 1)
            if group not in groups:
                group_parser = top.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(dest="subcommand", required=True)
            _add_command(groups[group], sub, function)
        else:
            _add_command(top, name, function)
    return parser


def load_config(path: str, function: Callable) -> dict[str, Any]:
    """Read a YAML config for `function`; unknown keys and malformed files are errors naming file and line."""
    config_path = Path(path)
    if not config_path.is_file():
        raise CLIError(f"{config_path}: config file not found")
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise CLIError(f"{config_path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise CLIError(f"{config_path}: expected a mapping of flag names to values")
    names = set(inspect.signature(function).parameters)
    config = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise CLIError(f"{config_path}: unknown key {key!r}; expected one of {', '.join(sorted(names))}")
        config[name] = value
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `caft` console script."""
    args = vars(build_parser().parse_args(argv))
    function = args.pop("_function")
    args.pop("command", None)
    args.pop("subcommand", None)
    config_path = args.pop("config", None)
    try:
        options = load_config(config_path, function) if config_path else {}
        options.update(args)
        function(**options)
    except (CLIError, FileNotFoundError, ValueError) as error:
        print(f"caft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
