"""`caft eval`: score a model on a task and write `metrics.json`, the per-example results and a printed table.

Tasks are the registered ones (`tasks/registry.py`: molecules, humaneval, math): each says which examples it is
scored on and how an answer is scored; this module generates the answers. `loss` is this module's own measurement:
each head's held-out loss and top-1 accuracy on any dataset (the main head, and the auxiliary heads when `heads` are
given).

Generation is resumable: answers are appended to `generations.jsonl` a batch at a time, and a rerun generates
only the examples not yet there. Scoring is cheap and always redone from that file, so `examples.jsonl` and
`metrics.json` always describe every answer. `metrics.json` also keeps the `caft_export.json` of the model scored
(`model_export`; None for a model that is no `caft export` folder): which run's weights, in which dtype, were scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.heads import attach_heads, check_heads_fit
from ..data import DataError, render_prompt, tokenize_source
from ..decoding.greedy import generate_batch
from ..files.atomic import write_json, write_text_atomically
from ..files.export_record import EXPORT_RECORD, read_export_record
from ..files.json_text import read_json_file
from ..files.resumable_jsonl import read_complete_records
from ..models import load_model, load_tokenizer
from ..tasks.task import TaskExample
from .head_metrics import head_metrics
from .paired import EXAMPLES_FILE, METRICS_FILE, metric_intervals
from .settings import LOSS, EvalSettings

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "eval_settings.json"


# Settings that change the answers: a folder's generations are resumed only under the same ones.
_GENERATION_SETTINGS = ("model", "task", "data", "max_new_tokens", "seed", "dtype")


def _check_resumable(output_dir: Path, settings: EvalSettings, model_export: dict[str, Any] | None) -> None:
    """Refuse to add answers to a folder whose earlier answers were generated with other settings, or by another
    export in the same model folder (`model_export`: its export record)."""
    path = output_dir / SETTINGS_FILE
    if (output_dir / GENERATIONS_FILE).exists() and path.exists():
        previous = read_json_file(path)
        changed = [f"{name}={previous.get(name)!r} (now {getattr(settings, name)!r})"
                   for name in _GENERATION_SETTINGS if previous.get(name) != getattr(settings, name)]
        if changed:
            raise ValueError(f"{output_dir}: holds answers generated with other settings: {', '.join(changed)}; "
                             "use the same settings or another --output")
        # Folders written before the record was kept say nothing of it, and are resumed as before.
        if "model_export" in previous and previous["model_export"] != model_export:
            raise ValueError(f"{output_dir}: holds answers of another export in {settings.model} (its "
                             f"{EXPORT_RECORD} changed since); use another --output")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {**asdict(settings), "model_export": model_export})


def _read_generations(path: Path) -> dict[str, str]:
    """Answers already generated; a last line cut off by an interruption is dropped (and regenerated)."""
    return {record["id"]: record["output"]
            for record in read_complete_records(path, ("id", "output"), "a generation record")}


def _batches(model, tokenizer, examples: list[TaskExample], batch_size: int) -> Iterator[list[tuple[TaskExample,
                                                                                                   list[int]]]]:
    # Longest prompts first, so that running out of memory shows at once; similar lengths share a batch.
    ids = [tokenizer(render_prompt(tokenizer, example.messages), add_special_tokens=False)["input_ids"]
           for example in examples]
    order = sorted(range(len(examples)), key=lambda i: (-len(ids[i]), i))
    for start in range(0, len(order), batch_size):
        yield [(examples[i], ids[i]) for i in order[start: start + batch_size]]


def generate_answers(model, tokenizer, examples: list[TaskExample], output_dir: Path, max_new_tokens: int,
                     batch_size: int, progress: bool = True) -> dict[str, str]:
    """Greedy answers to every example, appended to `output_dir/generations.jsonl`; those already there are kept."""
    path = output_dir / GENERATIONS_FILE
    answers = _read_generations(path)
    todo = [example for example in examples if example.id not in answers]
    if not todo:
        return answers
    model.eval()
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), unit="answer", desc="generate",
               disable=not progress)
    with path.open("a", encoding="utf-8") as handle:
        for batch in _batches(model, tokenizer, todo, batch_size):
            generated = generate_batch(model, tokenizer, [ids for _, ids in batch], max_new_tokens)
            lines = []
            for (example, _), (tokens, stop) in zip(batch, generated):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                answers[example.id] = text
                lines.append(json.dumps({"id": example.id, "output": text, "stop_reason": stop},
                                        ensure_ascii=False) + "\n")
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
    bar.close()
    return answers


def score_loss(model, tokenizer, settings: EvalSettings) -> tuple[dict[str, float], list[dict]]:
    """Each head's loss and top-1 accuracy over every assistant token of `settings.data`."""
    data = tokenize_source(settings.data, tokenizer, settings.max_length)
    examples = data.examples[: settings.max_examples]
    if not examples:
        raise DataError(settings.data, "no conversations to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_head = head_metrics(model, examples, pad_token_id=pad, batch_size=settings.batch_size)
    # What reading dropped (no assistant token left within --max-length, ...) or cut is counted, never silent.
    truncated = sum(count for reason, count in data.stats.skipped.items() if reason.startswith("truncated"))
    metrics: dict[str, float] = {"n": len(examples), "records_read": data.stats.read,
                                 "records_dropped": data.stats.read - len(data.examples),
                                 "records_truncated": truncated}
    for name, values in per_head.items():
        metrics[f"loss_{name}"] = values["loss"]
        metrics[f"accuracy_{name}"] = values["accuracy"]
    return metrics, []


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def evaluate(output: str | os.PathLike, settings: EvalSettings, *, model=None, tokenizer=None,
             progress: bool = True) -> dict[str, Any]:
    """Score `settings.model` on `settings.task` into the folder `output`; returns the metrics.

    `model` and `tokenizer` may be given already loaded (`settings.model` is then only recorded).
    """
    output_dir = Path(output)
    if settings.task == LOSS and settings.heads and model is None:
        check_heads_fit(settings.heads, settings.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(settings.model, settings.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The data is read and checked before the model is loaded: bad input fails fast.
    task = settings.scored_task()
    examples = []
    if task is not None:
        examples = task.examples(settings.data, settings.max_examples, settings.seed)
        task.before_generation(settings)
    # What the model folder says it is (a `caft export` of which run, in which dtype): `caft export --eval` reads it
    # back to check that the evaluation scored the model whose card it goes into.
    model_export = read_export_record(settings.model)
    _check_resumable(output_dir, settings, model_export)
    if model is None:
        model = load_model(settings.model, settings.dtype).to(settings.device)

    if task is None:
        if settings.heads:
            attach_heads(model, settings.heads, check_base=settings.heads_base_check)
        metrics, rows = score_loss(model, tokenizer, settings)
    else:
        answers = generate_answers(model, tokenizer, examples, output_dir, settings.max_new_tokens,
                                   settings.batch_size, progress)
        metrics, rows = task.score(examples, answers, settings, progress)
    if rows:
        _write_jsonl(output_dir / EXAMPLES_FILE, rows)
    result = {"task": settings.task, "settings": asdict(settings), "model_export": model_export, "metrics": metrics}
    if task is not None and rows:
        result["intervals"] = [asdict(interval) for interval in metric_intervals(
            rows, task.report_metrics(rows), settings.n_resamples)]
    write_json(output_dir / METRICS_FILE, result)
    return result


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column text table of metric names and values."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for name, value in metrics.items():
        shown = f"{value}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


