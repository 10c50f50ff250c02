"""JSONL files written a batch at a time and read back on a rerun, so that interrupted work resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_complete_records(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """The records of `path` (none when it does not exist). A last line cut off by an interruption is removed
    from the file, so that its record is produced again; a line that is not a JSON object with the `required`
    fields stops with an error naming file and line (`what` says what the file should hold)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    records = []
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and the like, which JSON written
    # with ensure_ascii=False leaves unescaped inside strings.
    for number, line in enumerate(complete.decode("utf-8").split("\n")[:-1], start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(name not in record for name in required):
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}:{number}: not {what}; write to a new file or remove it") from None
        records.append(record)
    return records
