"""JSON text parsed with errors that name where it came from, in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def parse_json(text: str, where: str) -> Any:
    """`json.loads(text)`; invalid JSON, or nesting deeper than the parser's recursion allows (a hostile or
    broken file), is a `ValueError` naming `where` (a path, or `path:line`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read as JSON") from None


def decode_utf8(data: bytes, path: str | os.PathLike, first_line: int = 1) -> str:
    """`data`, read from `path` starting at line `first_line`, as UTF-8 text; anything else (latin-1, binary) is a
    `ValueError` naming the file, the line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as "
                         "UTF-8") from None


def read_json_file(path: str | os.PathLike, what: str = "") -> Any:
    """The JSON content of the file `path`, with one-line errors naming it (`what` says what it should hold)."""
    path = Path(path)
    try:
        return parse_json(decode_utf8(path.read_bytes(), str(path)), str(path))
    except ValueError as error:
        raise ValueError(f"{error}{f'; expected {what}' if what else ''}") from None
