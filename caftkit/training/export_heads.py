"""`caft export-heads`: the heads in a format a serving engine loads. `eagle3`: head 2 as an EAGLE-3 draft
(`core/eagle3.py`), `config.json` and `model.safetensors`, which vLLM and SGLang load beside the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..core.eagle3 import check_eagle3_draft, eagle3_draft
from ..core.heads import attach_heads, check_heads_fit, get_heads
from ..files.atomic import write_json
from ..files.outputs import replace_folder
from ..models import load_model

# Written into the draft folder: what it was made from.
DRAFT_RECORD = "caft_draft.json"
# The command whose marker a draft folder holds (`caft export --eagle3` writes the same folder): a draft folder made by
# it may be replaced by a new draft.
DRAFT_COMMAND = "export-heads"
DRAFT_WEIGHTS_FILE = "model.safetensors"
DRAFT_CONFIG_FILE = "config.json"


def write_eagle3_draft(model, output: str | Path, record: dict[str, Any]) -> Path:
    """Write head 2 of the heads attached to `model` as an EAGLE-3 draft folder (refused for a base it cannot be
    expressed for exactly; every key and shape checked against the engines' layout), with `record` kept in it.
    The folder is written beside its place and renamed into it."""
    config, state = eagle3_draft(model, get_heads(model))
    output = Path(output)
    with replace_folder(output, DRAFT_COMMAND) as staging:
        save_file(state, str(staging / DRAFT_WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(staging / DRAFT_CONFIG_FILE, config)
        write_json(staging / DRAFT_RECORD, record)
    return output


def read_eagle3_draft(directory: str | Path) -> tuple[dict[str, Any], dict]:
    """The config and weights of an EAGLE-3 draft folder, refused unless every weight an engine loads is there, with
    its shape, and nothing else: a draft with missing weights must never reach an engine that loads it anyway."""
    directory = Path(directory)
    for name in (DRAFT_CONFIG_FILE, DRAFT_WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; an EAGLE-3 draft folder holds {DRAFT_CONFIG_FILE} "
                                    f"and {DRAFT_WEIGHTS_FILE}")
    config = json.loads((directory / DRAFT_CONFIG_FILE).read_text())
    state = load_file(str(directory / DRAFT_WEIGHTS_FILE))
    check_eagle3_draft(config, state, str(directory))
    return config, state


def export_heads(model_name: str, heads: str, output: str | Path, dtype: str = "float32") -> dict[str, Any]:
    """Load `model_name` with `heads` (checked against it) and write head 2 as an EAGLE-3 draft to `output`."""
    check_heads_fit(heads, model_name)
    model = load_model(model_name, dtype)
    attach_heads(model, heads)
    path = write_eagle3_draft(model, output, {"model": model_name, "heads": heads, "format": "eagle3"})
    return {"draft": str(path), "model": model_name, "heads": heads}
