"""The record `caft export` leaves in each folder it writes (`caft_export.json`), and what it identifies.

It names the run the folder came from, the dtype its weights were saved in and a fingerprint of the run's record
(`caft_run.json`, written once when the training ends): an export is a function of those two, so two exports with
the same fingerprint and dtype hold the same weights. `caft eval` copies the record of the model it scores into its
`metrics.json`, and `caft export --eval` reads it back to check that an evaluation scored the model it describes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .json_text import read_json_file

EXPORT_RECORD = "caft_export.json"


def file_fingerprint(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of the bytes of the file `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def read_export_record(model: str | os.PathLike) -> dict[str, Any] | None:
    """The export record of the model folder `model`; None for a model that is not a `caft export` folder (a Hub
    id, the bundled model, a folder without a record, or one whose record is not a JSON object)."""
    path = Path(model) / EXPORT_RECORD
    if not path.is_file():
        return None
    try:
        record = read_json_file(path)
    except (OSError, ValueError):  # a broken record: the model still loads and is scored, as one of unknown origin
        return None
    return record if isinstance(record, dict) else None
