"""`caft bench distill`: self-distillation in this process against the same prompts answered by a server.

Both sides run `distill` with the same settings on the same prompts, one after the other, each into a file of its
own in a temporary folder: the in-process side with the model already loaded (its load is not timed), the server
side after the server's check. Tokens per second of each side, their ratio, and how many answers are the same
text; for the others, the answer token where they first part.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from ..environment import environment
from ..models import load_model, load_tokenizer
from ..training.distill import DistillSettings, distill
from ..training.distill_server import first_difference


def compare_answers(tokenizer, in_process: Path, served: Path) -> dict[str, Any]:
    """How many answers of the two files (matched by id) are the same text, and where the others part."""
    def answers(path: Path) -> dict[str, dict]:
        return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}

    ours, theirs = answers(in_process), answers(served)
    differing = []
    for key in sorted(ours.keys() & theirs.keys()):
        a, b = ours[key]["messages"][-1]["content"], theirs[key]["messages"][-1]["content"]
        if a != b:
            ids_a, ids_b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (a, b))
            differing.append({"id": key, "first_difference_at_token": first_difference(ids_a, ids_b),
                              "in_process_new_tokens": ours[key]["new_tokens"],
                              "server_new_tokens": theirs[key]["new_tokens"]})
    return {"answers": len(ours.keys() & theirs.keys()), "identical": len(ours.keys() & theirs.keys()) - len(differing),
            "differing": differing}


def _side(summary) -> dict[str, Any]:
    return {"seconds": round(summary.seconds, 2), "new_tokens": summary.new_tokens,
            "tokens_per_second": round(summary.tokens_per_second, 1), "stop_reasons": summary.stop_reasons}


def run_distill_bench(settings: DistillSettings) -> dict[str, Any]:
    """Distil the first `settings.max_samples` prompts in this process and through `settings.server`; return the
    speeds side by side and the agreement of the answers."""
    if not settings.server:
        raise ValueError("caft bench distill measures a server against this process: give --server")
    tokenizer = load_tokenizer(settings.model, settings.chat_template)
    model = load_model(settings.model, settings.dtype).to(settings.device)
    in_process_settings = dataclasses.replace(settings, server=None, server_model=None)
    with tempfile.TemporaryDirectory(prefix="caft-bench-distill-") as folder:
        files = Path(folder) / "in-process.jsonl", Path(folder) / "server.jsonl"
        local = distill(model, tokenizer, files[0], in_process_settings, progress=False)
        del model
        served = distill(None, tokenizer, files[1], settings, progress=False)
        agreement = compare_answers(tokenizer, *files)
    return {
        "model": settings.model, "data": settings.data, "prompts": local.prompts_selected,
        "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
        "machine": {key: value for key, value in environment().items() if key in ("platform", "cpu", "cuda")},
        "in_process": {**_side(local), "device": settings.device, "dtype": settings.dtype,
                       "batch_size": settings.batch_size},
        "server": {**_side(served), **(served.server or {}), "concurrency": settings.concurrency,
                   "retried_requests": served.retried_requests},
        "server_over_in_process": round(served.tokens_per_second / local.tokens_per_second, 3)
        if local.tokens_per_second else None,
        **agreement,
    }
