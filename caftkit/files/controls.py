"""Requests to the kernel written to its control files (`/proc`, `/sys`): not records, so not written whole. The
kernel reads each write as it comes, and a control file cannot be replaced by a rename, so the text goes in place."""

from __future__ import annotations

import os


def write_control(path: str | os.PathLike, text: str) -> None:
    """Write `text` to the kernel control file `path`, in place; an OSError says the kernel refused it."""
    with open(path, "w", encoding="ascii") as control:
        control.write(text)
