"""The declaration of settings: each setting is one dataclass field, declared once with `setting(...)` (its default,
help, choices, bounds and former names), and checked by `check_settings` wherever it is built: from flags and
YAML (`command_line`), in Python, or from a mapping (`caft compare`'s arms). `check_declared` checks the same
settings on an object built elsewhere (`CAFTConfig`). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

# The largest seed: numpy's generator (which transformers' `set_seed` seeds) takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
            default_factory: Any = dataclasses.MISSING, formerly: tuple[str, ...] = (), trl: str | None = None,
            minimum: float | None = None, above: float | None = None, maximum: float | None = None,
            below: float | None = None) -> Any:
    """A settings field with its help text (and the values it may take): the one declaration of that setting.

    `choices` lists the values it may hold. For a number (or each number of a list), `minimum`/`maximum` are
    inclusive bounds and `above`/`below` exclusive ones; a number must also be finite. `formerly` lists earlier
    names, refused as flags, in YAML and in mappings with a message naming the current one; `trl` is TRL's name
    of the same setting (`per_device_train_batch_size` for `batch_size`), accepted alike without a note.
    `check_settings` enforces it all."""
    bounds = {name: value for name, value in (("minimum", minimum), ("above", above), ("maximum", maximum),
                                               ("below", below)) if value is not None}
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {}),
                **({"bounds": bounds} if bounds else {}), **({"formerly": tuple(formerly)} if formerly else {}),
                **({"trl": trl} if trl else {})}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUND_SIGNS = {"minimum": ">=", "above": ">", "maximum": "<=", "below": "<"}


def describe_bounds(bounds: dict[str, float]) -> str:
    """`> 0`, `>= 1 and <= 64`: the range a setting's numbers must be in."""
    return " and ".join(f"{_BOUND_SIGNS[name]} {number_text(value)}" for name, value in bounds.items())


def number_text(value: float) -> str:
    """An integer as it is (4294967295), any other number short (0.0002, 1e+20)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _within(value: float, bounds: dict[str, float]) -> bool:
    return all({"minimum": value >= limit, "above": value > limit, "maximum": value <= limit,
                "below": value < limit}[name] for name, limit in bounds.items())


def check_settings(settings: Any) -> None:
    """Refuse a settings object any of whose fields holds a value outside its declared choices, a number that is
    not finite (nan, inf), or one outside its declared bounds. Settings from flags and YAML, and settings built in
    Python, are all checked here (from each settings class's `__post_init__`), their types too: a setting built in
    Python or from a mapping (`caft compare`'s arms) is refused when it is not of its declared type, as a flag
    that cannot be converted is."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        _check_value(field, hints.get(field.name) if field.init else None, getattr(settings, field.name))


def check_declared(values: Any, declared_in: tuple[type, ...], names: tuple[str, ...]) -> None:
    """Check the attributes `names` of `values`, an object built elsewhere (`CAFTConfig`), against the settings of
    the same names declared in the settings classes `declared_in`: the same types, choices and bounds, refused with
    the same messages as on the command line."""
    for name in names:
        cls = next(cls for cls in declared_in if name in {field.name for field in dataclasses.fields(cls)})
        field = next(field for field in dataclasses.fields(cls) if field.name == name)
        _check_value(field, typing.get_type_hints(cls)[name], getattr(values, name))


def _check_value(field: dataclasses.Field, hint: Any, value: Any) -> None:
    """Refuse `value` for the declared setting `field` (of type `hint`, unchecked when None)."""
    if hint is not None and not of_type(value, *type_kind(hint)):
        raise ValueError(f"{field.name} must be {describe_type(*type_kind(hint))}, got {value!r}")
    choices = field.metadata.get("choices")
    chosen = value if isinstance(value, list) else [value]  # a list setting: each item is one of the choices
    if choices and any(item not in choices for item in chosen):
        raise ValueError(f"{field.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if not math.isfinite(number):
            raise ValueError(f"{field.name} must be a finite number, got {number}")
        bounds = field.metadata.get("bounds")
        if bounds and not _within(number, bounds):
            raise ValueError(f"{field.name} must be {describe_bounds(bounds)}, got {number_text(number)}")


def of_type(value: Any, base: Any, optional: bool) -> bool:
    """Whether `value` is of the settings type `base` (None too when `optional`): an integer is a number, a bool is
    neither; a list's items are checked each; types a setting does not declare with a converter pass."""
    if value is None:
        return optional
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        return isinstance(value, (list, tuple)) and all(of_type(part, item, False) for part in value)
    if origin is dict or base is dict:
        return isinstance(value, dict)
    return True


def flag_name(name: str) -> str:
    """`--learning-rate` for the setting `learning_rate`."""
    return "--" + name.replace("_", "-")


def type_kind(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported settings type {annotation}")
        return args[0], True
    return annotation, False


def describe_type(base: Any, optional: bool) -> str:
    if base is bool:
        text = "true or false"
    elif typing.get_origin(base) is list:
        text = f"a comma-separated list of {typing.get_args(base)[0].__name__}"
    elif typing.get_origin(base) is dict or base is dict:
        text = "a mapping such as {key: value}"
    else:
        text = {int: "an integer", float: "a number", str: "text"}.get(base, str(base))
    return text + (" or none" if optional else "")


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The init fields of a settings dataclass with their resolved type annotations."""
    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls) if field.init]


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (`MISSING` when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def trl_names(*classes: type) -> dict[str, str]:
    """TRL's name -> caftkit's name of every setting of `classes` that TRL names otherwise (`setting(trl=...)`)."""
    return {field.metadata["trl"]: field.name for cls in classes for field, _ in fields_of(cls)
            if "trl" in field.metadata}


def former_names(*classes: type) -> dict[str, str]:
    """Earlier name -> current name of every setting of `classes` that was renamed (`setting(formerly=...)`)."""
    return {old: field.name for cls in classes for field, _ in fields_of(cls)
            for old in field.metadata.get("formerly", ())}


def refuse_former_names(values: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """A mapping of `cls` settings (e.g. the `finetune:` overrides of `caft compare`), refused when it uses an earlier
    setting name, with the current one."""
    former = former_names(cls)
    for key in values:
        if key in former:
            raise ValueError(f"{where}: {key!r} was renamed {former[key]!r}")
    return dict(values)
