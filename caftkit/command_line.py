"""Command-line flags and YAML configs built from settings dataclasses: each setting is declared once.

A setting is a dataclass field declared with `setting(default, help=..., choices=...)`; its type annotation says how
a value is read. A flag and a YAML key go through the same converter, so `--learning-rate 2e-4` and
`learning-rate: 2e-4` (which YAML reads as a string) give the same float:

- `int`, `float`, `str`: converted, with the field named in the error;
- `bool`: `--x` / `--no-x` on the command line; in YAML true/false (or yes/no, on/off, 1/0); any other word is
  refused;
- `X | None`: also `none` (or `null`, or an empty value);
- `list[int]`, `list[str]`: comma-separated on the command line, a YAML list or a comma-separated string in YAML;
- `dict[str, Any]`: a YAML mapping, or on the command line YAML text such as `{beta: 0.5}`;
- `choices`: listed in the help and in the error (for a list, each item is one of them).

Flags are `--with-dashes`, and `--with_underscores` is accepted too; YAML keys may use either.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .files.atomic import write_text_atomically
from .files.json_text import decode_utf8
from .files.outputs import check_new_file
from .settings import (
    default_of,
    describe_bounds,
    describe_type,
    fields_of,
    flag_name,
    former_names,
    trl_names,
    type_kind,
)

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "")


class SettingsError(ValueError):
    """A value that cannot be a setting: printed as one line naming where it came from and the setting."""


def convert(field: dataclasses.Field, annotation: Any, value: Any) -> Any:
    """`value` (a flag's text, or what YAML read) as the setting `field` of type `annotation`; a `SettingsError`
    says why it cannot be."""
    base, optional = type_kind(annotation)
    name = flag_name(field.name)
    if optional and (value is None or isinstance(value, str) and value.strip().lower() in _NONE):
        return None
    if value is None:
        raise SettingsError(f"{name}: a value is required")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            converted = _boolean(value)
        elif base in (int, float):
            converted = _number_or_text(base, value)
        elif base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            converted = str(value)
        elif origin is list:
            (item,) = typing.get_args(base)
            items = value if isinstance(value, list) else [part for part in str(value).split(",") if part.strip()]
            converted = [_number_or_text(item, part) for part in items]
        elif origin is dict or base is dict:
            converted = yaml.safe_load(value) if isinstance(value, str) else value
            if converted is None:
                converted = {}
            if not isinstance(converted, dict):
                raise ValueError
        else:
            raise TypeError(f"unsupported settings type {annotation}")
    except (ValueError, TypeError, yaml.YAMLError) as error:
        if isinstance(error, TypeError) and "unsupported settings type" in str(error):
            raise
        raise SettingsError(f"{name}: expected {describe_type(base, optional)}, got {value!r}") from None
    choices = field.metadata.get("choices")
    for item in converted if isinstance(converted, list) else [converted]:
        if choices and item not in choices:
            raise SettingsError(f"{name}: {item!r} is not one of {', '.join(map(str, choices))}")
    return converted


def _number_or_text(base: type, value: Any) -> Any:
    """`value` (text, or a number YAML read) as an int, a float or a str; a ValueError where it is not one: a bool,
    or a fraction for an int."""
    if isinstance(value, bool) or base is not str and isinstance(value, (dict, list)):
        raise ValueError
    if base is int and isinstance(value, float) and value != int(value):
        raise ValueError
    return base(value.strip()) if isinstance(value, str) else base(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def add_settings(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """One argument per setting of `cls`: a flag (`--x-y`, also `--x_y`), or a positional argument for the names
    in `positional`. Arguments left out are absent from the parsed namespace (their default applies later), so a
    YAML config can fill them."""
    for field, annotation in fields_of(cls):
        base, _ = type_kind(annotation)
        default = default_of(field)
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices:
            help_text += f" One of: {', '.join(map(str, choices))}."
        if field.metadata.get("bounds"):
            help_text += f" ({describe_bounds(field.metadata['bounds'])})"
        if default is dataclasses.MISSING:
            help_text += " (required)"
        elif default not in (None, "", [], {}):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a "95%" is text
        converter = _flag_converter(field, annotation)
        if field.name in positional:
            parser.add_argument(field.name, nargs="?", type=converter, default=argparse.SUPPRESS, help=help_text,
                                metavar=field.name.upper())
            continue
        names = [flag_name(field.name)]
        if "_" in field.name:
            names.append("--" + field.name)
        if "trl" in field.metadata:  # TRL's name: a TRL user's flag works as it is
            names += [flag_name(field.metadata["trl"]), "--" + field.metadata["trl"]]
        former = [flag_name(old) for old in field.metadata.get("formerly", ())]
        if former and base is bool:
            former += ["--no-" + name[2:] for name in former]
            parser.add_argument(*former, dest=field.name, default=argparse.SUPPRESS, action=_FormerName,
                                new_name=names[0], boolean=True, help=argparse.SUPPRESS)
        elif former:
            parser.add_argument(*former, dest=field.name, type=converter, default=argparse.SUPPRESS,
                                action=_FormerName, new_name=names[0], help=argparse.SUPPRESS)
        if base is bool:
            names += [("--no_" if "_" in name else "--no-") + name[2:] for name in names]  # TRL's name too
            parser.add_argument(*names, dest=field.name, action=_BooleanFlag, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(*names, dest=field.name, type=converter, default=argparse.SUPPRESS, help=help_text,
                                metavar=field.name.upper().replace("_", "-"))


class _FormerName(argparse.Action):
    """An earlier name of a flag, refused with the current one: a command line kept from before the rename says
    what to write instead of "unrecognized arguments"."""

    def __init__(self, option_strings, dest, new_name: str, boolean: bool = False, **kwargs):
        super().__init__(option_strings, dest, **({"nargs": 0} if boolean else {}), **kwargs)
        self.new_name, self.boolean = new_name, boolean

    def __call__(self, parser, namespace, values, option_string=None):
        negated = self.boolean and option_string.startswith("--no")
        current = "--no-" + self.new_name[2:] if negated else self.new_name
        parser.error(f"{option_string} was renamed {current}")


class _BooleanFlag(argparse.Action):
    """`--x` sets true and `--no-x` false; no value is taken, so `--resume flase` cannot pass for anything."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no"))


def _flag_converter(field: dataclasses.Field, annotation: Any):
    def converted(text: str) -> Any:
        try:
            return convert(field, annotation, text)
        except SettingsError as error:
            # argparse prints "argument --x: <message>"
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[1]) from None

    converted.__name__ = field.name  # argparse names the converter in some messages
    return converted


def read_config(path: str | Path, *classes: type) -> dict[str, Any]:
    """The settings of `classes` in a YAML file, converted like flags; an unknown key or a bad value stops with one
    line naming the file, the line and the setting."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: config file not found")
    try:
        text = decode_utf8(path.read_bytes(), path)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except RecursionError:
        raise SettingsError(f"{path}: nested too deeply to read as YAML") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise SettingsError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of setting names to values")
    _refuse_duplicate_keys(node, path)
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    known = {field.name: (field, annotation) for cls in classes for field, annotation in fields_of(cls)}
    former = former_names(*classes)
    trl = trl_names(*classes)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"{path}:{lines.get(key, '?')}"
        if name in former:
            raise SettingsError(f"{where}: {key!r} was renamed {former[name].replace('_', '-')!r}")
        name = trl.get(name, name)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise SettingsError(f"{where}: unknown setting {key!r}{hint}")
        if name in values:
            raise SettingsError(f"{where}: {key!r} sets {name.replace('_', '-')!r} a second time")
        try:
            values[name] = convert(*known[name], _home_expanded(value))
        except SettingsError as error:
            raise SettingsError(f"{where}: {error}") from None
    return values


def _refuse_duplicate_keys(node: yaml.Node, path: Path) -> None:
    """A mapping (at any depth) that names one key twice is refused: YAML loaders keep the last silently."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise SettingsError(f"{path}:{line}: key {key.value!r} given twice (first on line "
                                        f"{seen[key.value]}); give it once")
                seen[key.value] = line
            _refuse_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)


def _home_expanded(value: Any) -> Any:
    """`~/x` (in a value or a list of values) as the shell would expand it on the command line: a YAML config
    reads it as text, and `~` would otherwise become a folder of that name."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [_home_expanded(item) for item in value]
    return value


def build_settings(cls: type, given: dict[str, Any], config: str | Path | None = None) -> Any:
    """`cls` from its defaults, then the YAML `config`, then the flags in `given` (already converted)."""
    return build_settings_group((cls,), given, config)[0]


def build_settings_group(classes: tuple[type, ...], given: dict[str, Any], config: str | Path | None = None
                         ) -> tuple[Any, ...]:
    """One instance of each of `classes` (whose field names do not overlap) from their defaults, then the YAML
    `config`, then the flags in `given`; each takes the values of its own fields."""
    values = read_config(config, *classes) if config else {}
    values.update(given)
    built = []
    for cls in classes:
        own = {field.name for field, _ in fields_of(cls)}
        missing = [flag_name(field.name) for field, _ in fields_of(cls)
                   if default_of(field) is dataclasses.MISSING and field.name not in values]
        if missing:
            raise SettingsError(f"missing {', '.join(missing)} (give it on the command line or in --config)")
        built.append(cls(**{name: value for name, value in values.items() if name in own}))
    return tuple(built)


def print_json(result: dict, output: str | None = None) -> dict:
    """Print a command's result as indented JSON (and write it to the new file `output` when given); returns it."""
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        check_new_file(output, "--output")
        write_text_atomically(output, text + "\n")
    return result


@dataclass(frozen=True)
class Command:
    """A command: the settings classes whose fields are its flags (and config keys), the function run with one
    instance of each, and the settings taken as positional arguments. Its help is `run`'s docstring, followed by
    what `more_help` returns when the parser is built (a list that can grow at run time, such as the tasks)."""

    run: Callable[..., Any]
    settings: tuple[type, ...] = ()
    positional: tuple[str, ...] = ()
    more_help: Callable[[], str] | None = None


# TRL and transformers flags that are no caftkit setting by the same meaning, with what to use instead (the settings
# that only differ by name take TRL's name too: `setting(trl=...)`).
TRL_FLAGS = {
    "--bf16": "--mixed-precision bf16", "--fp16": "--mixed-precision (bf16 or no; fp16 is not offered)",
    "--warmup-ratio": "--warmup, a fraction of all steps when below 1",
    "--warmup-steps": "--warmup, a number of steps when 1 or more",
    "--eval-strategy": "--eval-steps (caftkit evaluates every this many steps)",
    "--save-strategy": "--save-steps",
    "--use-peft": "--method lora (the default)", "--attn-implementation": "not offered yet (the model's default)",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`caft: error: ...`), without the usage before it."""

    def error(self, message):
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str, description: str, commands: dict[str, Command], version: str) -> argparse.ArgumentParser:
    """The parser of every command; a name with a space is a sub-command (`bench train`)."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, Any] = {}
    for name, command in commands.items():
        where = top
        if " " in name:
            group, name = name.split(" ", 1)
            if group not in groups:
                groups[group] = top.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest="subcommand", required=True, metavar="COMMAND", parser_class=_Parser)
            where = groups[group]
        doc = inspect.getdoc(command.run) or ""
        summary, _, body = doc.partition("\n\n")
        # argparse formats a command's help with %: a "95%" in its summary is text (descriptions are not formatted)
        sub = where.add_parser(name, help=summary.replace("%", "%%"), description=f"{summary}\n\n{body}".strip(),
                               epilog=command.more_help() if command.more_help else None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", default=argparse.SUPPRESS,
                         help="YAML file whose keys are this command's flags (flags given override it)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on a failure, show the full traceback instead of one line")
        for cls in command.settings:
            add_settings(sub, cls, command.positional)
        sub.set_defaults(_command=command)
    return parser


def one_line(error: BaseException) -> str:
    """What went wrong, in one line: `<path>: <what>` where the error names a file."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, (SettingsError, ValueError, OSError)):
        text = str(error) or type(error).__name__
    else:  # not a failure caftkit names: a defect, or a library's error it does not expect
        text = (f"{type(error).__name__}: {str(error).strip() or 'no message'} (unexpected; rerun with --debug for the "
                "traceback)")
    return " ".join(text.split())


def run_command(prog: str, description: str, commands: dict[str, Command], version: str,
                argv: list[str] | None = None) -> int:
    """Parse `argv`, build the command's settings (defaults, then `--config`, then flags) and run it. A failure is
    printed as one line, `<prog>: error: <path>: <what>`, and returns 2 (1 for an unexpected one); `--debug`
    shows the traceback instead."""
    try:
        namespace, unknown = build_parser(prog, description, commands, version).parse_known_args(argv)
    except SystemExit as exited:  # --help, --version, or a flag refused (the message is printed)
        return int(exited.code or 0)
    given = vars(namespace)
    command = given.pop("_command")
    name = " ".join(str(given.pop(key)) for key in ("command", "subcommand") if key in given)
    if unknown:
        hints = [f"{flag} is {TRL_FLAGS[flag]} here" for flag in unknown if flag in TRL_FLAGS]
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}"
              + (f" ({'; '.join(hints)})" if hints else f" (see {prog} {name} --help)"), file=sys.stderr)
        return 2
    config = given.pop("config", None)
    debug = given.pop("debug", False)
    try:
        settings = build_settings_group(command.settings, given, config)
        command.run(*settings)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (SettingsError, ValueError, OSError)) else 1
    return 0
