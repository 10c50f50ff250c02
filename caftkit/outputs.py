"""Which paths a command may write, and one run at a time on each.

A command writes only into outputs it made. An output folder carries the marker file `.caft-output` (which command
made it) from the moment the command creates it; a folder without it is taken as the command's own only when it
holds the files that command always writes (outputs made before the marker existed), or when it is empty. Anything
else, a user's folder or a file where a folder belongs, is refused before a byte of it is touched.

Each output is also locked for the length of the run (`flock` on a hidden sibling file), so that a second run on
the same output stops at once with one line instead of interleaving its writes with the first one's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic_files import write_text_atomically

OUTPUT_MARKER = ".caft-output"


class OutputError(ValueError):
    """An output path this command may not write, or one another run is writing."""


def _lock_path(path: Path) -> Path:
    # A sibling, not a file inside: the output may be a file, or a folder that is swapped out whole.
    return path.parent / f".{path.name}.caft-lock"


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the output `path` for the block; a second holder is refused with one line.

    The lock file is removed on release. A run waiting on a lock file that is being removed would lock a file no
    longer in place, so a lock counts only once the file locked is still the one at the lock's path."""
    path = Path(path)
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.is_symlink() or (lock.exists() and (not lock.is_file() or lock.stat().st_size > 0)):
        # caftkit's lock files are always empty: anything else there is not one, and is neither used nor removed.
        raise OutputError(f"{lock}: exists and is not a caft lock file; move it away to write {path}")
    while True:
        handle = open(lock, "a+")  # held until the block ends
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{path}: another caft run is writing this output (it holds {lock}); wait for it "
                                  "to end or choose another output") from None
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the file was removed by the run that held it: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def output_maker(path: str | os.PathLike) -> str | None:
    """The command named by the marker of the output folder `path`, or None when it has none."""
    marker = Path(path) / OUTPUT_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_folder(path: str | os.PathLike, command: str, signatures: tuple[str, ...] = ()) -> None:
    """Refuse `path` as the output folder of `caft <command>` unless it is absent, empty, marked as made by this
    command, or holds one of `signatures` (glob patterns of files that only this command writes there)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder; caft {command} writes a folder there (choose another "
                          "output; nothing was changed)")
    maker = output_maker(path)
    if maker == command:
        return
    if maker is not None:
        raise OutputError(f"{path}: made by caft {maker}, not caft {command}: choose another output (nothing was "
                          "changed)")
    # The staging file of a marker being written (`mark_output_folder`): under a launcher the main process may be
    # marking the folder while the others check it, and it holds nothing of anyone else's.
    entries = [entry for entry in path.iterdir() if not entry.match(f".{OUTPUT_MARKER}.*.partial")]
    if not entries or any(next(path.glob(pattern), None) for pattern in signatures):
        return
    raise OutputError(f"{path}: a folder caft {command} did not make: choose a new or empty output folder (nothing "
                      "in it was changed)")


def mark_output_folder(path: str | os.PathLike, command: str) -> None:
    """Create the output folder `path` if needed and mark it as made by `caft <command>`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if output_maker(path) != command:
        write_text_atomically(path / OUTPUT_MARKER, json.dumps({"command": command}) + "\n")


@contextmanager
def output_folder(path: str | os.PathLike, command: str, signatures: tuple[str, ...] = (), *,
                  main_process: bool = True) -> Iterator[Path]:
    """The output folder of one run of `caft <command>`: locked, checked as this command's own
    (`check_output_folder`), then created and marked; yields its path. Under a launcher every process of the run
    checks the folder and only the main one (`main_process`) locks and marks it: they are one run."""
    path = Path(path)
    if not main_process:
        check_output_folder(path, command, signatures)
        yield path
        return
    with output_lock(path):
        check_output_folder(path, command, signatures)
        created = not path.exists()
        # A new or empty folder gets the marker; one this command filled before is left as it is.
        marked = created or not any(path.iterdir())
        if marked:
            mark_output_folder(path, command)
        try:
            yield path
        finally:
            # A run that stopped before writing anything (a refused model, bad data) leaves the folder as it found it.
            if marked and [entry.name for entry in path.iterdir()] == [OUTPUT_MARKER]:
                (path / OUTPUT_MARKER).unlink()
                if created:
                    path.rmdir()


def check_new_file(path: str | os.PathLike, what: str) -> None:
    """Refuse `path` as an output file when anything is already there: caft never replaces a file it did not make
    (`what` names the setting, e.g. `--output`)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputError(f"{path}: already exists; {what} must be a new file (nothing was changed)")
