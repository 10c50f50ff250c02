"""Files written whole or not at all: the content goes to a new temporary file beside the target, which is renamed
over it only when the writing succeeded. An interrupted or failed write leaves the target as it was, and the
temporary name is unique, so no other file is ever overwritten on the way."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def check_replaceable(path: str | os.PathLike, marker: str) -> None:
    """Refuse `path` as an output folder unless it is absent, or a folder an earlier run of the same command wrote
    (it holds the file `marker`): anything else, a user's folder or file, is never touched."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and (path / marker).is_file()):
        raise ValueError(f"{path}: exists and was not written by this command: choose another output (nothing was "
                         "changed)")


@contextmanager
def atomic_folder(path: str | os.PathLike, marker: str) -> Iterator[Path]:
    """A new temporary folder beside `path` to fill; when the block ends without an error it takes `path`'s place,
    else it is removed. `path` must be absent or an earlier output of the same command (`check_replaceable`); that
    earlier output is swapped out and only then removed, so a failure at any point leaves one whole folder."""
    path = Path(path)
    check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield staging
        check_replaceable(path, marker)  # nothing else appeared there meanwhile
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
