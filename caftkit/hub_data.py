"""Datasets named by their Hugging Face Hub id (`owner/name`, or `owner/name:split`), read from the local cache only.

A dataset downloaded before (`hf download --repo-type dataset owner/name`, or `datasets.load_dataset` online,
which keeps its data files in the same cache) is a snapshot folder under the Hub cache; caftkit reads its rows
with `datasets` from that folder and never connects to the Hub.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `owner/name` with the Hub's characters, and an optional `:split` (train by default).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<split>[\w.-]+))?$")
DEFAULT_SPLIT = "train"
# A missing `data/train.jsonl` is a file not found, not a Hub id.
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".gz", ".arrow")


def parse_hub_dataset(source: str) -> tuple[str, str] | None:
    """`(repo_id, split)` when `source` is spelled as a Hub dataset id and is not a path that exists, else None."""
    match = _HUB_ID.match(source)
    if match is None or Path(source).exists() or source.lower().endswith(_FILE_SUFFIXES):
        return None
    return match["repo"], match["split"] or DEFAULT_SPLIT


def cached_snapshot(repo_id: str) -> Path:
    """The folder of the newest cached snapshot of dataset `repo_id`; one line saying how to get it when there is
    none (caftkit never downloads)."""
    # deferred: caft starts without huggingface_hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise FileNotFoundError(
            f"{repo_id}: not a data file, and no dataset of that id is in the local Hugging Face cache; caftkit "
            f"never downloads: fetch it once with `hf download --repo-type dataset {repo_id}` (or give a file)"
        ) from None


def iter_hub_rows(repo_id: str, split: str) -> Iterator[tuple[str, Any]]:
    """`(where, row)` pairs of one split of a cached Hub dataset; `where` names the dataset, split and row."""
    import datasets  # deferred: caft starts without datasets

    folder = cached_snapshot(repo_id)
    try:
        splits = datasets.load_dataset(str(folder))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as error:
        raise ValueError(f"{repo_id}: its cached files ({folder}) cannot be read as a dataset: {error}") from None
    if split not in splits:
        raise ValueError(f"{repo_id}: no split {split!r} in the cached dataset; it has {', '.join(splits)} "
                         f"(name one as {repo_id}:SPLIT)")
    for number, row in enumerate(splits[split], start=1):
        # A column some rows lack reads as None in the others: drop it, so that each row is the record it was.
        yield f"{repo_id}:{split} row {number}", {key: value for key, value in row.items() if value is not None}
