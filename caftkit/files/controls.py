"""Requests to the kernel written to its control files (`/proc`, `/sys`): not records, so not written whole. The
kernel reads each write as it comes, and a control file cannot be replaced by a rename, so the text goes in place.
Nothing else is written here: a path outside those two trees is refused, and the file is opened without creating
or truncating it, so no file of a user's can be made or cut short through this module."""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_TREES = (Path("/proc"), Path("/sys"))


def write_control(path: str | os.PathLike, text: str) -> None:
    """Write `text` to the kernel control file `path` (under /proc or /sys), in place; an OSError says the kernel
    refused it or the file is not there."""
    path = Path(os.path.abspath(path))
    if not any(path.is_relative_to(tree) for tree in KERNEL_TREES):
        raise ValueError(f"{path} is not a kernel control file (under /proc or /sys): not written")
    handle = os.open(path, os.O_WRONLY)  # neither O_CREAT nor O_TRUNC
    try:
        os.write(handle, text.encode("ascii"))
    finally:
        os.close(handle)
