"""The whole CAFT pipeline, small enough for a laptop CPU: distil, train heads, warm them up on a task,
fine-tune with CAFT (every weight but the unembedding) and, for comparison, with the next-token loss alone on the
same data and steps, export both, and score the base model and both fine-tuned ones on the same held-out
molecule-design prompts: what CAFT added is the difference between the last two columns, not the first."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from ..evaluation.settings import EvalSettings
from ..evaluation.task_eval import EXAMPLES_FILE, evaluate
from ..files.atomic import write_json
from ..files.resumable_jsonl import read_complete_records
from ..models import load_model, load_tokenizer
from ..tasks.molecules import write_molecule_records
from ..tasks.registry import get_task
from ..training.distill import DistillSettings, distill
from ..training.export import export_run
from ..training.finetuning import HEAD_LOSSES_FILE, FinetuneSettings, finetune
from ..training.head_training import LOSS_CURVES_FILE, HeadTrainingSettings, format_head_table, train_heads
from .settings import DemoSettings

# Where the runs log besides the console when the `tracking` extra is installed (`make demo` installs it).
TRACKER = "tensorboard"
# The demo's task, whose headline metrics its table shows.
DEMO_TASK = "molecules"
# The demo's stages, and the columns of its table: what each model is and its title.
STAGES = 9
COLUMNS = {"base": "the base model", "ntp": "the next-token fine-tuned model", "caft": "the CAFT fine-tuned model"}
COLUMN_TITLES = {"base": "base model", "ntp": "next-token FT", "caft": "CAFT FT"}
# A molecule-design answer is one SMILES, a few dozen tokens; the base model talks on, so its answers are cut here.
ANSWER_TOKENS = 64


def _stage(name: str, timings: dict[str, float]):
    class Timer:
        def __enter__(self):
            print(f"\n== {name}", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            print(f"== {name}: {timings[name]} s", flush=True)

    return Timer()


def run_demo(sizes: DemoSettings) -> dict[str, Any]:
    """Run every stage into `sizes.output`; returns where each artefact is and the evaluation scores."""
    model_name, device = sizes.model, sizes.device
    root = Path(sizes.output)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tokenizer = load_tokenizer(model_name)
    tracked = importlib.util.find_spec(TRACKER) is not None
    report_to = [TRACKER] if tracked else []

    with _stage(f"1/{STAGES} self-distillation (caft distill)", timings):
        distilled = root / "distilled.jsonl"
        summary = distill(lambda: load_model(model_name).to(device), tokenizer, distilled,
                          DistillSettings(model=model_name, data="sharegpt", max_samples=sizes.distill_prompts,
                                          max_new_tokens=sizes.distill_new_tokens, max_prompt_tokens=256,
                                          batch_size=16))
        print(f"{summary.written_total} answers, {summary.tokens_per_second:.0f} tokens/s")

    heads = root / "heads"
    with _stage(f"2/{STAGES} head training (caft train-heads)", timings):
        if not (heads / "heads_config.json").is_file():
            result = train_heads(str(heads), HeadTrainingSettings(model=model_name, data=str(distilled),
                                                                  epochs=sizes.epochs, eval_fraction=0.1,
                                                                  report_to=report_to, device=device))
            print(format_head_table(result["held_out_before"], result["held_out_after"]))

    molecules = root / "molecules.jsonl"
    with _stage(f"3/{STAGES} molecule-design task data (caft data molecules)", timings):
        stats = write_molecule_records("moses:train", molecules, n=sizes.molecules, seed=0)
        print(f"{stats.written} records")

    # The two fine-tunings differ in their loss alone: same data, split, steps, learning rate and seed.
    runs = {"caft": root / "run", "ntp": root / "run-ntp"}
    for number, (mode, run) in enumerate(runs.items(), start=4):
        title = "head warm-up and CAFT fine-tuning" if mode == "caft" else "next-token fine-tuning, the baseline"
        with _stage(f"{number}/{STAGES} {title} (caft finetune --mode {mode})", timings):
            if not (run / "caft_run.json").is_file():
                finetune(str(run), FinetuneSettings(model=model_name, data=str(molecules),
                                                    heads=str(heads) if mode == "caft" else None,
                                                    head_warmup="yes", mode=mode, epochs=sizes.epochs,
                                                    # A few dozen steps only. Measured with the bundled model on
                                                    # 40 held-out molecules: LoRA at lr 1e-3 after 40 steps
                                                    # answered SMILES-like strings none of which were valid; full
                                                    # fine-tuning (unembedding frozen) at lr 1e-4 after 60 steps,
                                                    # 70% valid.
                                                    method="full", learning_rate=1e-4,
                                                    eval_fraction=sizes.eval_molecules / sizes.molecules,
                                                    report_to=report_to, device=device),
                         resume=any(run.glob("checkpoint-*")))

    exported = {"caft": root / "model", "ntp": root / "model-ntp"}
    with _stage(f"6/{STAGES} export (caft export)", timings):
        written = {mode: export_run(runs[mode], exported[mode]) for mode in runs}

    # Molecules from the MOSES test split: never seen in training (the task data comes from the train split).
    held_out = root / "molecules-test.jsonl"
    write_molecule_records("moses:test", held_out, n=sizes.eval_molecules, seed=1)
    evaluation = {}
    for number, (column, model, output) in enumerate((
            ("base", model_name, "eval-base"), ("ntp", str(exported["ntp"]), "eval-ntp"),
            ("caft", str(exported["caft"]), "eval")), start=7):
        with _stage(f"{number}/{STAGES} {COLUMNS[column]} on the held-out molecules (caft eval)", timings):
            evaluation[column] = score_held_out(model, held_out, root / output, device)

    report = {"artefacts": {"distilled": str(distilled), "heads": str(heads), "task_data": str(molecules),
                            "run": str(runs["caft"]), "model": written["caft"]["model"],
                            "model_heads": written["caft"]["heads"],
                            "model_card": str(Path(written["caft"]["model"]) / "README.md"),
                            "ntp_run": str(runs["ntp"]), "ntp_model": written["ntp"]["model"],
                            "plots": [str(heads / LOSS_CURVES_FILE), str(runs["caft"] / HEAD_LOSSES_FILE)]},
              "tracking": TRACKER if tracked else None, "evaluation": evaluation, "seconds": timings}
    write_json(root / "demo.json", report)
    return report


def score_held_out(model: str, held_out: Path, output: Path, device: str) -> dict[str, Any]:
    """`caft eval --task molecules` of `model` on the held-out records, through the same code: the task's headline
    metrics, how many prompts, and the first answers."""
    result = evaluate(output, EvalSettings(model=model, task=DEMO_TASK, data=str(held_out),
                                           max_new_tokens=ANSWER_TOKENS, device=device))
    metrics = result["metrics"]
    rows = read_complete_records(output / EXAMPLES_FILE, required=("prompt", "output"),
                                 what="a per-example row of caft eval")
    return {"prompts": metrics["n"], **{key: metrics[key] for key in get_task(DEMO_TASK).headline_metrics()},
            "examples": [{"prompt": row["prompt"], "answer": row["output"]} for row in rows[:3]]}


def format_scores(evaluation: dict[str, dict[str, Any]]) -> str:
    """The base model and the two fine-tuned ones side by side, one row per headline metric of the task."""
    titles = [COLUMN_TITLES[column] for column in COLUMNS]
    lines = [f"{evaluation['caft']['prompts']} held-out MOSES test molecules " + "   ".join(titles)]
    for key, label in get_task(DEMO_TASK).headline_metrics().items():
        cells = "   ".join(f"{evaluation[column][key]:>{len(title)}.2f}" for column, title in zip(COLUMNS, titles))
        lines.append(f"  {label:<31} {cells}")
    return "\n".join(lines)
