"""What crosses between a program's process and the judge: plain data as JSON, written whole to a pipe.

These functions run in the program's and the judge's processes (their scripts are assembled from this source,
`scripts.assemble_script`) as well as in the evaluator, so they use nothing but the standard library."""

from __future__ import annotations

import os
import traceback
from typing import Any

# The longest message (one call's arguments or answer, or the judge's verdict) the processes exchange.
MESSAGE_LIMIT_BYTES = 16 * 2**20


def encode_plain(value: Any) -> Any:
    """`value` as JSON data, if it is plain data: None, or an object whose type is exactly bool, int, float, str,
    list, dict, tuple, set, frozenset, bytes or complex, holding plain data. JSON's own types stay as they are
    (floats as JSON numbers, NaN and Infinity included); the others become one-key objects: `{"tuple": [...]}`,
    `{"set": [...]}`, `{"frozenset": [...]}`, `{"dict": [[key, value], ...]}`, `{"bytes": hex}`,
    `{"complex": [real, imag]}`. Anything else, a subclass of these types included, raises TypeError (a cycle,
    RecursionError)."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if kind is list:
        return [encode_plain(item) for item in value]
    if kind is dict:
        return {"dict": [[encode_plain(key), encode_plain(item)] for key, item in value.items()]}
    if kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode_plain(item) for item in value]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a value of type {kind.__name__} is not plain data")


def decode_plain(data: Any) -> Any:
    """The value `encode_plain` turned into `data` (as `json.loads` reads it back). Data of another form raises
    ValueError; a set or dict key that cannot be hashed, TypeError."""
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is list:
        return [decode_plain(item) for item in data]
    if kind is dict and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "dict" and type(inner) is list and all(type(pair) is list and len(pair) == 2 for pair in inner):
            return {decode_plain(key): decode_plain(item) for key, item in inner}
        if tag in ("tuple", "set", "frozenset") and type(inner) is list:
            items = [decode_plain(item) for item in inner]
            return tuple(items) if tag == "tuple" else set(items) if tag == "set" else frozenset(items)
        if tag == "bytes" and type(inner) is str:
            return bytes.fromhex(inner)
        if tag == "complex" and type(inner) is list and len(inner) == 2 and all(
                type(part) is float or type(part) is int for part in inner):
            return complex(inner[0], inner[1])
    raise ValueError(f"not plain data as encode_plain writes it: {str(data)[:80]}")


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a pipe may take it in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def error_text(error: BaseException) -> str:
    """The message of `error`, or "" when it has none or producing it fails (its `__str__` is the program's)."""
    try:
        return str(error)
    except BaseException:
        return ""


def describe_error(error: BaseException, filename: str, what: str) -> str:
    """`Type: message (line N of the <what>)`, N being the last line of `filename` the exception came through."""
    line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                 if frame.filename == filename), None)
    message = error_text(error)
    return (f"{type(error).__name__}{': ' + message if message else ''}"
            f"{f' (line {line} of the {what})' if line else ''}")


# The functions above, as every process's script includes them.
SHARED_FUNCTIONS = (encode_plain, decode_plain, write_all, error_text, describe_error)
