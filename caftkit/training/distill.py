"""Self-distillation: the base model answers the prompts itself, so the heads learn its own distribution.

The output is `messages` JSONL, one record per line, written a batch at a time and flushed to disk. A rerun
with the same settings skips every id already written and regenerates only what is missing; a last line cut
off by an interruption is dropped and redone. Prompts are grouped by length into batches (left-padded) in a
fixed plan, so a resumed run writes exactly the file an uninterrupted run writes.

A rerun with a larger `max_samples` extends the file: the prompts added form a plan stage of their own (the
stages are kept in the meta file), so the batches already written stay as they were and only the new prompts
are generated.

With `server` set (`caft distill --server URL`), an OpenAI-compatible server generates the answers
(`distill_server`): the same records, written as they arrive, whatever order they finish in; each prompt's sampling
seed is `seed` plus its index, so a rerun asks for exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import DataError, ReadStats, Record, iter_prompts, render_prompt, skipped_text
from ..decoding.completion_server import CompletionServer, ServerError
from ..decoding.greedy import STOP_END_OF_TURN, generate_batch, stop_token_ids
from ..files.atomic import write_json
from ..files.json_text import read_json_file
from ..files.outputs import OutputError
from ..files.resumable_jsonl import read_complete_records
from ..models import load_generation_config
from .distill_server import answers_by_server, check_server
from .settings import DistillSettings

# Settings that change what is generated: a resumed run must use the same ones (a server's batches are its own).
_GENERATION_SETTINGS = ("model", "data", "max_new_tokens", "max_prompt_tokens", "temperature", "top_p", "seed")
_IN_PROCESS_SETTINGS = ("batch_size", "dtype")


@dataclass
class DistillSummary:
    """Counts and speed of a distillation run (this invocation only, except `written_total`)."""

    records_read: int = 0
    prompts_selected: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    source_truncated_tail: bool = False
    already_done: int = 0
    generated: int = 0
    written_total: int = 0
    stop_reasons: dict[str, int] = field(default_factory=dict)
    new_tokens: int = 0
    seconds: float = 0.0
    server: dict[str, Any] | None = None
    retried_requests: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def meta_path(output: Path) -> Path:
    """The settings-and-summary file kept beside a distillation output."""
    return output.with_name(output.stem + ".meta.json")


def _is_distill_meta(meta: Path) -> bool:
    try:
        recorded = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(recorded, dict) and {"settings", "plan_stages"} <= recorded.keys()


def check_distill_output(output: str | os.PathLike) -> None:
    """Refuse `output` unless it is new or an earlier `caft distill` output: one with its meta file beside it
    (`meta_path`, written before the first answer). A user's file is never read for ids, repaired or appended
    to, and a user's file at the meta file's path is never replaced."""
    output = Path(output)
    meta = meta_path(output)
    exists = output.exists() or output.is_symlink()
    if exists and not output.is_file():
        raise OutputError(f"{output}: exists and is not a file; caft distill writes a JSONL file there")
    if (meta.exists() or meta.is_symlink()) and not _is_distill_meta(meta):
        raise OutputError(f"{meta}: exists and was not written by caft distill, which keeps its settings there: "
                          "choose another --output (nothing was changed)")
    if exists and not meta.exists():
        raise OutputError(f"{output}: exists and was not written by caft distill (no {meta.name} beside it): "
                          "choose a new --output (nothing was changed)")


def recover_output(output: Path) -> set[str]:
    """Ids already in `output`; a last line cut off mid-write is removed so that it is generated again."""
    return {record["id"] for record in read_complete_records(output, ("id",), "a distilled record")}


def _check_resumable(output: Path, settings: DistillSettings, done: set[str]) -> None:
    meta = meta_path(output)
    if not done or not meta.exists():
        return
    previous = read_json_file(meta).get("settings", {})
    if bool(previous.get("server")) != bool(settings.server):
        written_by = "a server (--server)" if previous.get("server") else "this process (no --server)"
        raise ValueError(f"{output}: its answers were generated by {written_by}: resume it the same way or write "
                         "to a new file")
    compared = _GENERATION_SETTINGS + (() if settings.server else _IN_PROCESS_SETTINGS)
    changed = [f"{name}={previous.get(name)!r} (now {getattr(settings, name)!r})"
               for name in compared if previous.get(name) != getattr(settings, name)]
    if changed:
        raise ValueError(f"{output}: was generated with other settings: {', '.join(changed)}; "
                         "resume with the same settings or write to a new file")


def select_prompts(tokenizer, settings: DistillSettings, summary: DistillSummary) -> list[tuple[Record, list[int]]]:
    """The first `max_samples` prompts of the source that fit `max_prompt_tokens`, with their prompt token ids."""
    stats = ReadStats()
    selected = []
    for record in iter_prompts(settings.data, stats):
        ids = tokenizer(render_prompt(tokenizer, record.messages), add_special_tokens=False)["input_ids"]
        if len(ids) > settings.max_prompt_tokens:
            stats.skip(f"longer than {settings.max_prompt_tokens} prompt tokens")
            continue
        selected.append((record, ids))
        if settings.max_samples is not None and len(selected) >= settings.max_samples:
            break
    summary.records_read = stats.read
    summary.skipped = stats.skipped
    summary.source_truncated_tail = stats.truncated_tail
    summary.prompts_selected = len(selected)
    return selected


def batch_plan(prompts: list[tuple[Record, list[int]]], batch_size: int, stages: list[int] | None = None
               ) -> list[list[tuple[Record, list[int]]]]:
    """Prompts grouped by length into batches, longest first (so that running out of memory shows at once).

    `stages` are increasing prompt counts (the last one `len(prompts)`): each slice between two of them is
    planned on its own, so that extending a file never regroups the prompts of an earlier stage.
    """
    plan = []
    start = 0
    for end in stages or [len(prompts)]:
        order = sorted(range(start, end), key=lambda i: (-len(prompts[i][1]), i))
        ordered = [prompts[i] for i in order]
        plan += [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]
        start = end
    return plan


def plan_stages(output: Path, num_prompts: int, already_written: int) -> list[int]:
    """The plan stages of `output` once it holds `num_prompts` prompts: those recorded in its meta file (a file
    written before stages were recorded is one stage of its recorded `max_samples`), cut or extended to
    `num_prompts`."""
    meta = meta_path(output)
    previous: list[int] = []
    if already_written and meta.exists():
        recorded = read_json_file(meta)
        previous = recorded.get("plan_stages") or [recorded.get("last_run", {}).get("prompts_selected") or 0]
    stages = [stage for stage in previous if 0 < stage < num_prompts]
    return stages + [num_prompts]


def distilled_record(record: Record, answer_text: str, stop_reason: str, new_tokens: int) -> dict[str, Any]:
    """The JSONL record of one distilled answer."""
    return {
        "id": record.id,
        "messages": [*record.messages, {"role": "assistant", "content": answer_text}],
        "stop_reason": stop_reason,
        "new_tokens": new_tokens,
    }


def distill(model, tokenizer, output: str | os.PathLike, settings: DistillSettings, progress: bool = True,
            server: CompletionServer | None = None) -> DistillSummary:
    """Generate the model's answers to the prompts of `settings.data` into `output`, resuming where it stopped.

    `model` is a causal LM, or a function returning one: it is then called only once the prompts have been
    read and checked, so that bad input fails fast. With `settings.server` the answers come from that server
    (`server`, else a client built from the settings) and `model` gives only the generation config's stop tokens
    (None: read from `settings.model`); the server is checked before any prompt is sent to it.
    """
    output = Path(output)
    check_distill_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = DistillSummary()
    done = recover_output(output)
    _check_resumable(output, settings, done)
    prompts = select_prompts(tokenizer, settings, summary)
    if not prompts:  # before anything is written: an empty output would pass for a finished distillation
        raise DataError(settings.data, f"no prompt to answer ({summary.records_read} records read; skipped: "
                                       f"{skipped_text(summary.skipped)})")
    selected_ids = {record.id for record, _ in prompts}
    summary.already_done = len(done & selected_ids)
    stages = plan_stages(output, len(prompts), len(done))
    if settings.server:
        server = server or CompletionServer(settings.server, timeout_s=settings.request_timeout,
                                            retries=settings.retries)
        texts = [render_prompt(tokenizer, record.messages) for record, _ in prompts]
        summary.server = check_server(server, tokenizer, settings.model, settings.server_model, texts[0])
        stop_ids = stop_token_ids(model.generation_config if isinstance(model, torch.nn.Module)
                                  else load_generation_config(settings.model), tokenizer)
        todo = [i for i, (record, _) in enumerate(prompts) if record.id not in done]
        answers = ([(prompts[i][0], *answer) for i, *answer in chunk] for chunk in answers_by_server(
            server, tokenizer, [(text, ids) for text, (_, ids) in zip(texts, prompts)], todo, settings, stop_ids))
    else:
        answers = _answers_in_process(model, tokenizer, batch_plan(prompts, settings.batch_size, stages), done,
                                      settings)
    _write_meta(output, settings, summary, len(done), stages)
    started = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=summary.already_done, unit="prompt", desc="distill", disable=not progress)
    try:
        with output.open("a", encoding="utf-8") as handle:
            for chunk in answers:
                lines = []
                for record, text, stop, new_tokens in chunk:
                    lines.append(json.dumps(distilled_record(record, text, stop, new_tokens), ensure_ascii=False)
                                 + "\n")
                    summary.stop_reasons[stop] = summary.stop_reasons.get(stop, 0) + 1
                    summary.new_tokens += new_tokens
                    done.add(record.id)
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                summary.generated += len(chunk)
                summary.seconds = time.perf_counter() - started
                bar.update(len(chunk))
                bar.set_postfix(tokens_per_s=f"{summary.tokens_per_second:.0f}")
    except ServerError as error:
        raise ServerError(f"{error}; {len(done)} of {len(prompts)} answers are in {output}: run the same command "
                          "again to complete it") from error
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
        summary.written_total = len(done)
        summary.retried_requests = server.retried if server is not None else 0
        _write_meta(output, settings, summary, len(done), stages)
    return summary


def _answers_in_process(model, tokenizer, plan: list[list[tuple[Record, list[int]]]], done: set[str],
                        settings: DistillSettings) -> Iterator[list[tuple[Record, str, str, int]]]:
    """(record, text, stop reason, new tokens) of the prompts not in `done`, a planned batch at a time."""
    if not isinstance(model, torch.nn.Module):
        model = model()
    model.eval()
    for index, batch in enumerate(plan):
        missing = [i for i, (record, _) in enumerate(batch) if record.id not in done]
        if not missing:
            continue
        # The whole planned batch is generated even when part of it was written before an interruption: the
        # same batch gives the same numbers, so the resumed file equals an uninterrupted one.
        answers = generate_batch(model, tokenizer, [ids for _, ids in batch], settings.max_new_tokens,
                                 settings.temperature, settings.top_p, seed=settings.seed + index)
        chunk = []
        for i in missing:
            ids, stop = answers[i]
            chunk.append((batch[i][0], tokenizer.decode(ids, skip_special_tokens=True), stop,
                          len(ids) + (stop == STOP_END_OF_TURN)))
        yield chunk


def _write_meta(output: Path, settings: DistillSettings, summary: DistillSummary, written: int,
                stages: list[int]) -> None:
    meta = {"settings": asdict(settings), "last_run": {**asdict(summary), "tokens_per_second":
                                                       round(summary.tokens_per_second, 2)},
            "records_written": written, "plan_stages": stages}
    write_json(meta_path(output), meta)


