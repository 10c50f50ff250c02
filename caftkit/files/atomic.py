"""Files written whole or not at all: the content goes to a new temporary file beside the target, which is renamed
over it only when the writing succeeded. An interrupted or failed write leaves the target as it was, and the
temporary name is unique, so no other file is ever overwritten on the way. (Folders written whole:
`outputs.replace_folder`.)"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    """The permissions a newly created file gets under this process's umask (mkstemp's are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary file in `path`'s folder to write; renamed to `path` when the block ends without an
    error, removed otherwise."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    staging = Path(name)
    try:
        os.chmod(staging, _default_mode())
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Write `value` as JSON text (indented, with a final newline) to `path`, whole or not at all: every record
    caftkit writes (a run's `caft_run.json`, which `caft compare` reads as "this run finished", among them)."""
    write_text_atomically(path, json.dumps(value, indent=indent) + "\n")
