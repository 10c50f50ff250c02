"""Which paths a command may write, and one run at a time on each.

A command writes only into outputs it made. An output folder carries the marker file `.caft-output` from the
moment the command creates it (or takes an empty folder): which command made it, the folder it was written for
(its inode, so that a marker copied into another folder makes nothing there caft's), and the entries inside that
the command made and may therefore remove or replace (`claim`, `remove_claimed`). A folder without a marker of its
own, or with another command's, is refused before a byte of it is touched, whatever names it holds.

Each output is also locked for the length of the run (`flock` on a hidden sibling of its real path, so that a
symlink and its target are one output), so that a second run on the same output stops at once with one line
instead of interleaving its writes with the first one's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import write_text_atomically

OUTPUT_MARKER = ".caft-output"


class OutputError(ValueError):
    """An output path this command may not write, or one another run is writing."""


def _lock_path(path: Path) -> Path:
    # A sibling, not a file inside: the output may be a file, or a folder that is swapped out whole. The real path:
    # two spellings of one folder (a symlink, `..`) are one output.
    path = Path(os.path.realpath(path))
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


def _folder_id(path: Path) -> int:
    return os.stat(path).st_ino


def _marker(path: Path) -> dict | None:
    """The marker of the folder `path` when it was written for this very folder, else None."""
    try:
        record = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) and record.get("folder") == _folder_id(path) else None
    except (OSError, ValueError):
        return None


def output_maker(path: str | os.PathLike) -> str | None:
    """The command that made the output folder `path`, or None when it holds no marker of its own (none, a broken
    one, or one copied from another folder)."""
    record = _marker(Path(path))
    command = record.get("command") if record else None
    return command if isinstance(command, str) else None


def claimed(path: str | os.PathLike) -> set[str]:
    """The entries of the output folder `path` (relative paths) that the command which made it wrote."""
    record = _marker(Path(path)) or {}
    made = record.get("made")
    return {name for name in made if isinstance(name, str)} if isinstance(made, list) else set()


def check_output_folder(path: str | os.PathLike, command: str) -> None:
    """Refuse `path` as the output folder of `caft <command>` unless it is absent, empty, or holds the marker this
    command wrote for it."""
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
    if not entries:
        return
    raise OutputError(f"{path}: a folder caft {command} did not make{_why_not_own(path)}: choose a new or empty "
                      "output folder (nothing in it was changed)")


def _why_not_own(path: Path) -> str:
    """Why the marker in `path`, if there is one, does not make it caft's."""
    try:
        record = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if isinstance(record, dict) and "folder" not in record:
        return f" (its {OUTPUT_MARKER} is from a caftkit that did not record its folder)"
    return f" (its {OUTPUT_MARKER} was written for another folder)"


def _write_marker(path: Path, command: str, made: set[str]) -> None:
    record = {"command": command, "folder": _folder_id(path), "made": sorted(made)}
    write_text_atomically(path / OUTPUT_MARKER, json.dumps(record) + "\n")


def mark_output_folder(path: str | os.PathLike, command: str) -> None:
    """Create the output folder `path` if needed and mark it as made by `caft <command>`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if output_maker(path) != command:
        _write_marker(path, command, set())


def claim(path: str | os.PathLike, *names: str) -> None:
    """Record `names` (paths relative to the output folder `path`) as written by the command that made `path`, before
    writing them: only what is claimed is ever removed or replaced."""
    path = Path(path)
    command = output_maker(path)
    if command is None:
        raise OutputError(f"{path}: holds no caft marker of its own; nothing in it is caft's to write")
    made = claimed(path)
    if not set(names) <= made:
        _write_marker(path, command, made | set(names))


def remove_claimed(path: str | os.PathLike, name: str) -> None:
    """Remove the entry `name` of the output folder `path` (a file or a folder), which must be one the command that
    made `path` claimed; its claim goes with it."""
    path = Path(path)
    made = claimed(path)
    if name not in made or Path(name).is_absolute() or ".." in Path(name).parts:  # never outside the folder
        raise OutputError(f"{path / name}: not written by caft; left as it is")
    target = path / name
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    _write_marker(path, output_maker(path), {entry for entry in made if entry != name and
                                              not entry.startswith(f"{name}/")})


@contextmanager
def output_folder(path: str | os.PathLike, command: str, *, main_process: bool = True) -> Iterator[Path]:
    """The output folder of one run of `caft <command>`: locked, checked as this command's own
    (`check_output_folder`), then created and marked; yields its path. Under a launcher every process of the run
    checks the folder and only the main one (`main_process`) locks and marks it: they are one run."""
    path = Path(path)
    if not main_process:
        check_output_folder(path, command)
        yield path
        return
    with output_lock(path):
        check_output_folder(path, command)
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
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: no such folder for {what}")


def _clean_interrupted(path: Path, command: str) -> None:
    """Remove what an interrupted `replace_folder` of `path` left beside it (a staging or a retired folder), naming
    it: only folders holding this command's own marker are taken."""
    for entry in sorted(path.parent.glob(f".{glob_escape(path.name)}.*.partial")) + sorted(
            path.parent.glob(f".{glob_escape(path.name)}.*.old")):
        made = entry / path.name if entry.suffix == ".old" else entry
        if entry.is_dir() and not entry.is_symlink() and output_maker(made) == command and (
                entry.suffix == ".partial" or [child.name for child in entry.iterdir()] == [path.name]):
            shutil.rmtree(entry)
            warnings.warn(f"{entry}: removed, left by an interrupted caft {command}", UserWarning, stacklevel=3)


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)


def check_replaceable(path: str | os.PathLike, command: str) -> None:
    """Refuse `path` as an output folder that `caft <command>` writes whole, unless it is absent, or a folder an
    earlier run of the same command wrote and that holds nothing else (what was added since would be lost)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink() or output_maker(path) != command:
        raise OutputError(f"{path}: exists and was not written by caft {command}: choose another output (nothing was "
                          "changed)")
    added = sorted(entry.name for entry in path.iterdir() if entry.name not in claimed(path) | {OUTPUT_MARKER})
    if added:
        raise OutputError(f"{path}: holds {', '.join(added)}, which caft {command} did not write: move it away or "
                          "choose another output (nothing was changed)")


@contextmanager
def replace_folder(path: str | os.PathLike, command: str) -> Iterator[Path]:
    """A new folder beside `path` to fill, marked as `caft <command>`'s; when the block ends without an error its
    contents are claimed and it takes `path`'s place, else it is removed. `path` must be absent or an earlier output
    of the same command holding nothing else (`check_replaceable`); that earlier output is swapped out and only then
    removed, so a failure at any point leaves one whole folder, and what an interrupted run left beside it is removed
    by the next."""
    path = Path(path)
    check_replaceable(path, command)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_interrupted(path, command)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        mark_output_folder(staging, command)  # first: an interrupted run's staging folder is known as caft's
        yield staging
        claim(staging, *(entry.name for entry in staging.iterdir() if entry.name != OUTPUT_MARKER))
        check_replaceable(path, command)  # nothing else appeared there meanwhile
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
