"""`caft compare`: CAFT arms against next-token fine-tuning on the same data, seeds, steps and evaluation.

An arm is one way of fine-tuning: a mode (`ntp` or `caft`), a method (LoRA or full), its seeds, its heads and
warm-up, and its own overrides of the shared fine-tuning settings (`beta: 0.5`, ...). Each CAFT arm is measured
against a baseline arm, the ntp arm of the same method unless it names another. For each arm and seed the model is
fine-tuned (`caft finetune`), exported and scored on the same test examples (`caft eval`). The report gives, per
CAFT arm, each metric for it and its baseline, the difference and its paired bootstrap confidence interval over the
seeds both ran (`comparison_report`), and the held-out top-1 accuracy of the heads before and after warm-up.

Without `arms`, the comparison has two: `ntp` and `caft`, with the top-level method, seeds, heads and warm-up.
With `arms`, those top-level values are the defaults of every arm.

The folder is resumable: a finished fine-tuning run, export or evaluation is not redone, an interrupted
fine-tuning run resumes from its last checkpoint, and an interrupted evaluation keeps its answers. A finished
step is reused only when it was made with the settings asked for now; otherwise the comparison stops and names
the settings that differ. CAFT arms of one seed whose head warm-up is the same (it does not depend on beta, the
schedule or the method) share it: the warmed-up heads of the first are copied into the next.

    <output>/seed-<s>/<arm>/run/     the fine-tuning run (`caft finetune`)
    <output>/seed-<s>/<arm>/model/   the exported model (`caft export`)
    <output>/seed-<s>/<arm>/eval/    metrics.json, examples.jsonl (`caft eval`)
    <output>/timings.json            wall time of every stage, every start of it counted
    <output>/report.md, report-<arm>.png, comparison.json
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from ..core.heads import HEADS_CONFIG_FILE, check_heads_fit
from ..evaluation.paired import paired_rows, read_examples, task_records
from ..evaluation.settings import EvalSettings
from ..evaluation.task_eval import METRICS_FILE, evaluate
from ..files.atomic import write_json
from ..files.json_text import read_json_file
from ..files.outputs import OUTPUT_MARKER, mark_output_folder
from ..tasks.registry import get_task
from ..tasks.task import ReportMetric
from ..training.checkpoints import last_checkpoint
from ..training.export import export_run
from ..training.finetuning import (
    FINETUNE_COMMAND,
    RUN_FILE,
    WARMUP_HEADS_DIR,
    FinetuneSettings,
    finetune,
    settings_as_recorded,
    warmup_settings,
)
from .compare_ln import ln_results, ln_section, run_ln, write_ln_conversations
from .compare_report import ArmComparison, arm_dir, write_comparison_report
from .settings import CompareSettings

TIMINGS_FILE = "timings.json"
COMPARISON_FILE = "comparison.json"
ARM_SETTINGS_FILE = "arm_settings.json"

# Settings that do not change what a finished step produced, so a step made with other values is reused.
_NOT_COMPARED = {"device", "report_to", "save_steps", "logging_steps"}
_EVAL_NOT_COMPARED = {"model", "device", "batch_size", "workers", "allow_unsandboxed"}


class StageTimings:
    """Wall time of each stage, kept on disk so that a resumed comparison reports the stages it did not redo.

    A running stage writes its time so far every `flush_interval_s` seconds, so a stage that is stopped and then
    resumed counts the time of every start, not only of the last one (at most one interval is lost per stop)."""

    def __init__(self, path: Path, flush_interval_s: float = 30.0, clock: Callable[[], float] = time.perf_counter):
        self.path = path
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.seconds: dict[str, float] = read_json_file(path) if path.exists() else {}
        self._lock = threading.Lock()

    def _write(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = round(seconds, 1)
            write_json(self.path, self.seconds)

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time the block as `stage`, added to what earlier starts of it recorded, written while it runs."""
        before, started = self.seconds.get(stage, 0.0), self.clock()
        stopped = threading.Event()

        def flush_until_stopped() -> None:
            while not stopped.wait(self.flush_interval_s):
                self._write(stage, before + self.clock() - started)

        flusher = threading.Thread(target=flush_until_stopped, name=f"timings {stage}", daemon=True)
        flusher.start()
        try:
            yield
        finally:
            stopped.set()
            flusher.join()
            self._write(stage, before + self.clock() - started)

    def arm_total(self, arm: str) -> float:
        return round(sum(value for key, value in self.seconds.items() if key.split("/")[1:2] == [arm]), 1)


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _differences(done: dict[str, Any], wanted: Any, ignored: set[str]) -> list[str]:
    """`key=done (asked: wanted)` for every setting of the dataclass `wanted` that differs from the recorded `done`.
    A setting the earlier step did not record counts as its default: what that step ran with."""
    defaults = {f.name: f.default for f in fields(wanted) if f.default is not MISSING}
    defaults.update({f.name: f.default_factory() for f in fields(wanted) if f.default_factory is not MISSING})
    done = {**_as_json(defaults), **done}
    return [f"{key}={done.get(key)!r} (asked: {value!r})" for key, value in _as_json(asdict(wanted)).items()
            if key not in ignored and done.get(key) != value]


def _check_reusable(root: Path, settings: FinetuneSettings, eval_settings: EvalSettings) -> None:
    """Stop when a finished or started step of this arm and seed was made with other settings than asked now."""
    recorded = []  # (file, the settings it holds, ours as that file would hold them)
    if (root / ARM_SETTINGS_FILE).exists():
        recorded.append((root / ARM_SETTINGS_FILE, read_json_file(root / ARM_SETTINGS_FILE)["finetune"], settings))
    if (root / "run" / RUN_FILE).exists():
        # the run file holds the settings the run used, its head count resolved
        recorded.append((root / "run" / RUN_FILE, read_json_file(root / "run" / RUN_FILE)["settings"],
                         settings_as_recorded(settings)))
    differing = []
    for path, done, asked in recorded:
        differing += [f"{path}: {item}" for item in _differences(done, asked, _NOT_COMPARED)]
    metrics = root / "eval" / METRICS_FILE
    if metrics.exists():
        done = read_json_file(metrics).get("settings", {})
        differing += [f"{metrics}: {item}" for item in _differences(done, eval_settings, _EVAL_NOT_COMPARED)]
    if differing:
        raise ValueError(f"{root}: was made with other settings than asked now: {'; '.join(differing)}. Remove "
                         f"that folder to redo it, or choose another --output")


def _share_warmup(output: Path, settings: CompareSettings, arm_name: str, seed: int, run_dir: Path) -> str | None:
    """Copy the warmed-up heads of another arm of this seed whose warm-up is this arm's; returns that arm."""
    arm = settings.arm_settings[arm_name]
    if arm.mode != "caft" or arm.head_warmup == "no" or (run_dir / WARMUP_HEADS_DIR).exists():
        return None

    def four_bit(name: str) -> bool:
        return settings.finetune_settings(name, seed).load_in_4bit

    # A QLoRA arm warms its heads up on its 4-bit base, which the heads' record does not tell from the full-precision
    # one: its warm-up is shared with no other arm.
    if four_bit(arm_name):
        return None
    # settings that do not change the warmed-up heads (where and how often it saved, logged, ran) are not compared
    ignored = _NOT_COMPARED | {"save_total_limit"}
    wanted = {key: value for key, value in _as_json(asdict(warmup_settings(settings.finetune_settings(arm_name, seed),
                                                                           arm.heads))).items()
              if key not in ignored}
    for other in settings.arm_settings:
        source = arm_dir(output, seed, other) / "run" / WARMUP_HEADS_DIR
        config = source / HEADS_CONFIG_FILE
        if other == arm_name or not config.exists() or four_bit(other):
            continue
        done = read_json_file(config).get("training", {}).get("settings", {})
        if {key: value for key, value in done.items() if key not in ignored} == wanted:
            mark_output_folder(run_dir, FINETUNE_COMMAND)  # the arm's run folder, which its finetune then takes
            shutil.copytree(source, run_dir / WARMUP_HEADS_DIR, ignore=shutil.ignore_patterns(OUTPUT_MARKER))
            return other
    return None


def run_arm(output: Path, settings: CompareSettings, seed: int, arm: str, timings: StageTimings,
            progress: bool = True) -> dict[str, Any]:
    """Fine-tune, export and evaluate one arm and seed, skipping what an earlier invocation finished."""
    root = arm_dir(output, seed, arm)
    run_dir, model_dir, eval_dir = root / "run", root / "model", root / "eval"
    finetune_settings = settings.finetune_settings(arm, seed)
    eval_settings = settings.eval_settings(model_dir)
    _check_reusable(root, finetune_settings, eval_settings)
    if not (run_dir / RUN_FILE).exists():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / ARM_SETTINGS_FILE).exists():
            write_json(root / ARM_SETTINGS_FILE, {"finetune": asdict(finetune_settings)})
        resume = last_checkpoint(run_dir) is not None
        shared_from = None if resume else _share_warmup(output, settings, arm, seed, run_dir)
        if shared_from is not None:
            write_json(root / ARM_SETTINGS_FILE,
                       {"finetune": asdict(finetune_settings), "warmup_shared_from": shared_from})
        with timings.stage(f"seed-{seed}/{arm}/finetune"):
            finetune(str(run_dir), finetune_settings, resume=resume)
    if not (model_dir / "config.json").exists():
        with timings.stage(f"seed-{seed}/{arm}/export"):
            export_run(run_dir, model_dir)
    if not (eval_dir / METRICS_FILE).exists():
        with timings.stage(f"seed-{seed}/{arm}/eval"):
            evaluate(eval_dir, eval_settings, progress=progress)
    return read_json_file(eval_dir / METRICS_FILE)


def report_metrics(output: Path, settings: CompareSettings, arm: str) -> list[ReportMetric]:
    """What the comparison reports, as the task says for the test examples of `arm`'s first seed."""
    return get_task(settings.task).report_metrics(read_examples(arm_dir(output, settings.arm_settings[arm].seeds[0],
                                                                        arm) / "eval"))


def arm_records(output: Path, settings: CompareSettings, arm: str, metrics: list[ReportMetric],
                seeds: list[int] | None = None) -> tuple[list[dict[str, list]], list[str]]:
    """Per-seed record sets of one arm (each per-example metric by name, and the raw columns the others read), and
    the example ids."""
    records, ids = [], None
    seeds = settings.arm_settings[arm].seeds if seeds is None else seeds
    for seed in seeds:
        rows = read_examples(arm_dir(output, seed, arm) / "eval")
        seed_ids = [row["id"] for row in rows]
        if ids is not None and seed_ids != ids:
            raise ValueError(f"seed {seed} of {arm} was scored on other test examples than seed {seeds[0]}")
        ids = seed_ids
        records.append(task_records(rows, metrics))
    return records, ids or []


def compare_arms(output: Path, settings: CompareSettings) -> list[ArmComparison]:
    """Every CAFT arm against its baseline, paired by seed on the seeds both ran."""
    comparisons = []
    for arm, baseline in settings.baselines.items():
        seeds = [seed for seed in settings.arm_settings[arm].seeds if seed in settings.arm_settings[baseline].seeds]
        metrics = report_metrics(output, settings, baseline)
        base_records, base_ids = arm_records(output, settings, baseline, metrics, seeds)
        arm_records_, ids = arm_records(output, settings, arm, metrics, seeds)
        if ids != base_ids:
            raise ValueError(f"{arm} and {baseline} were scored on different test examples; remove their eval/ "
                             f"folders")
        rows = paired_rows(base_records, arm_records_, metrics, settings.n_resamples)
        comparisons.append(ArmComparison(arm, baseline, seeds, rows))
    return comparisons


def compare(output: str, settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every arm and seed, then write the report; returns the comparisons and where they are."""
    output_dir = Path(output)
    for arm in settings.arm_settings.values():  # every arm's heads, before the first arm trains
        if arm.mode == "caft" and arm.heads:
            check_heads_fit(arm.heads, settings.model)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings = StageTimings(output_dir / TIMINGS_FILE)
    seeds = sorted({seed for arm in settings.arm_settings.values() for seed in arm.seeds})
    ln_data = write_ln_conversations(output_dir, settings) if settings.ln_diagnostic else None
    for seed in seeds:  # seed by seed: a comparison stopped early already has every arm of its first seeds
        for name, arm in settings.arm_settings.items():
            if seed in arm.seeds:
                run_arm(output_dir, settings, seed, name, timings, progress)
        for name, baseline in settings.baselines.items():
            if ln_data is not None and seed in settings.arm_settings[name].seeds and seed in (
                    settings.arm_settings[baseline].seeds):
                run_ln(output_dir, settings, name, seed, ln_data, timings)
    comparisons = compare_arms(output_dir, settings)
    ln = ln_results(output_dir, settings)
    write_comparison_report(output_dir, settings, comparisons, timings, ln_section(ln))
    result = _as_json({"settings": asdict(settings),
              "comparisons": [{"arm": c.arm, "baseline": c.baseline, "seeds": c.seeds,
                               "rows": [asdict(row) for row in c.rows]} for c in comparisons],
              "ln": ln, "timings_s": timings.seconds})
    write_json(output_dir / COMPARISON_FILE, result)
    return result


