"""The paper's Ln diagnostic for a comparison: does CAFT change what the model knows about the next few tokens?

The paper (Sec. 3.3, advice to practitioners) asks to monitor `Ln = sum_{k=2..n} alpha^(k-2) * CE_k` (eq. 3, without
beta or gamma) and expects a CAFT model's final Ln to be lower than a next-token fine-tune's. Here, for every CAFT arm
and seed, both final models, the arm's and its baseline's, are scored under the same frozen heads (the heads that
arm fine-tuned with, after its warm-up: `run/heads`) on the same held-out task data (the test examples with their
reference answers), each head's cross-entropy over the answer tokens (`caft eval --task loss
--no-heads-base-check`).

    <output>/ln-conversations.jsonl           the test examples with their reference answers
    <output>/seed-<s>/<arm>/ln/<arm>/         metrics.json of the arm's model under its heads
    <output>/seed-<s>/<arm>/ln/<baseline>/    metrics.json of the baseline's model under the same heads

Arms that share a warm-up (`caft compare` copies it) fine-tune with the very same heads: the baseline's model is
scored under them once, in the folder of the first such arm, and every other arm of that seed reads it there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.heads import HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE
from ..evaluation.settings import EvalSettings
from ..evaluation.task_eval import METRICS_FILE, evaluate
from ..files.atomic import write_text_atomically
from ..files.export_record import file_fingerprint
from ..files.json_text import read_json_file
from ..tasks.registry import get_task
from ..training.finetuning import RUN_HEADS_DIR
from .compare_report import arm_dir
from .settings import CompareSettings

LN_DIR = "ln"
LN_DATA_FILE = "ln-conversations.jsonl"


def write_ln_conversations(output: Path, settings: CompareSettings) -> Path | None:
    """The test examples with their reference answers as conversations (written once); None when the task's
    examples have no reference answer."""
    path = output / LN_DATA_FILE
    examples = get_task(settings.task).examples(settings.test_data, settings.test_examples, 0)
    if any(example.answer is None for example in examples):
        return None
    text = "".join(json.dumps({"messages": example.conversation()}, ensure_ascii=False) + "\n"
                   for example in examples)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_text_atomically(path, text)
    return path


def ln_eval_settings(settings: CompareSettings, model_dir: Path, heads_dir: Path, data: Path) -> EvalSettings:
    """How a final model is scored under another run's heads: the loss task, the heads' base not required to be
    the model's (a fine-tuned descendant of it)."""
    return EvalSettings(model=str(model_dir), task="loss", heads=str(heads_dir), heads_base_check=False,
                        data=str(data), batch_size=settings.eval_batch_size, dtype=settings.dtype,
                        device=settings.device)


def _heads_identity(heads_dir: Path) -> tuple[str, ...] | None:
    """Fingerprints of a heads folder's weights and config (None while it has none): equal ones score alike."""
    files = [heads_dir / HEADS_WEIGHTS_FILE, heads_dir / HEADS_CONFIG_FILE]
    return tuple(file_fingerprint(path) for path in files) if all(path.is_file() for path in files) else None


def _run_heads(output: Path, arm: str, seed: int) -> Path:
    return arm_dir(output, seed, arm) / "run" / RUN_HEADS_DIR


def ln_folders(output: Path, settings: CompareSettings, arm: str, seed: int) -> dict[str, Path]:
    """Where the Ln of the arm's model and of its baseline's model (under the arm's heads) are written. The
    baseline's is that of an earlier arm of this seed, against the same baseline, whose heads are these very heads
    (a shared warm-up): scoring the same model under the same heads again would give the same numbers."""
    baseline, root = settings.baselines[arm], arm_dir(output, seed, arm) / LN_DIR
    identity = _heads_identity(_run_heads(output, arm, seed))
    earlier_arms = list(settings.baselines)[:list(settings.baselines).index(arm)] if identity is not None else []
    for earlier in earlier_arms:
        if (settings.baselines[earlier] == baseline and seed in settings.arm_settings[earlier].seeds
                and _heads_identity(_run_heads(output, earlier, seed)) == identity):
            return {arm: root / arm, baseline: arm_dir(output, seed, earlier) / LN_DIR / baseline}
    return {arm: root / arm, baseline: root / baseline}


def run_ln(output: Path, settings: CompareSettings, arm: str, seed: int, data: Path, timings) -> None:
    """Score the arm's final model and its baseline's under the heads the arm fine-tuned with; a scored one is
    kept."""
    heads = _run_heads(output, arm, seed)
    for name, folder in ln_folders(output, settings, arm, seed).items():
        if (folder / METRICS_FILE).exists():
            continue
        with timings.stage(f"seed-{seed}/{arm}/ln-{name}"):
            evaluate(folder, ln_eval_settings(settings, arm_dir(output, seed, name) / "model", heads, data),
                     progress=False)


def weighted_ln(metrics: dict[str, Any], alpha: float) -> float:
    """`sum_{k>=2} alpha^(k-2) * loss_head_k` (eq. 3) of a `loss` evaluation's metrics."""
    losses = {int(key.rsplit("_", 1)[1]): value for key, value in metrics.items() if key.startswith("loss_head_")}
    return sum(alpha ** (k - 2) * loss for k, loss in losses.items() if k >= 2)


def ln_results(output: Path, settings: CompareSettings) -> list[dict[str, Any]]:
    """Per CAFT arm and seed: the heads, alpha, and for the arm's model and its baseline's, Ln and each head's loss
    and top-1 accuracy; only where both were scored."""
    results = []
    for arm, baseline in settings.baselines.items():
        for seed in settings.arm_settings[arm].seeds:
            folders = ln_folders(output, settings, arm, seed)
            if seed not in settings.arm_settings[baseline].seeds or not all(
                    (folder / METRICS_FILE).exists() for folder in folders.values()):
                continue
            alpha = settings.finetune_settings(arm, seed).alpha
            scored = {name: read_json_file(folder / METRICS_FILE)["metrics"] for name, folder in folders.items()}
            results.append({"arm": arm, "baseline": baseline, "seed": seed, "alpha": alpha,
                            "heads": str(_run_heads(output, arm, seed)),
                            "baseline_scored_in": str(folders[baseline]),
                            "examples": scored[arm]["n"],
                            **{role: {"ln": weighted_ln(scored[name], alpha),
                                      **{key: value for key, value in scored[name].items() if "_head_" in key}}
                               for role, name in (("arm_model", arm), ("baseline_model", baseline))}})
    return results


def ln_section(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per CAFT arm and seed, Ln of the baseline's and of the arm's model under the same heads, the
    difference, and each auxiliary head's loss; then a sentence per arm on the direction against the paper."""
    if not results:
        return []
    heads = sorted({int(key.rsplit("_", 1)[1]) for result in results for key in result["arm_model"]
                    if key.startswith("loss_head_") and int(key.rsplit("_", 1)[1]) >= 2})
    lines = ["## The paper's Ln: the auxiliary loss under the same frozen heads", "",
             "Each final model scored under the heads the caft arm fine-tuned with (after its warm-up), on the test "
             "examples with their reference answers: `Ln = sum_k alpha^(k-2) * CE_k` over the answer tokens (eq. 3, "
             "no beta or gamma), and each head's cross-entropy (nats). The paper expects the caft model's Ln to end "
             "lower than next-token fine-tuning's.", "",
             "| arm | baseline | seed | Ln baseline | Ln arm | arm - baseline | "
             + " | ".join(f"CE t+{k} baseline / arm" for k in heads) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(heads)]
    for result in results:
        base, arm = result["baseline_model"], result["arm_model"]
        cells = [f"{base[f'loss_head_{k}']:.4f} / {arm[f'loss_head_{k}']:.4f}" for k in heads]
        lines.append(f"| {result['arm']} | {result['baseline']} | {result['seed']} | {base['ln']:.4f} | "
                     f"{arm['ln']:.4f} | {arm['ln'] - base['ln']:+.4f} | " + " | ".join(cells) + " |")
    lines.append("")
    for arm in dict.fromkeys(result["arm"] for result in results):
        mine = [result for result in results if result["arm"] == arm]
        lower = sum(result["arm_model"]["ln"] < result["baseline_model"]["ln"] for result in mine)
        mean = sum(result["arm_model"]["ln"] - result["baseline_model"]["ln"] for result in mine) / len(mine)
        verdict = "as the paper expects" if lower == len(mine) else (
            "against the paper's expectation" if lower == 0 else "in no consistent direction")
        lines.append(f"- {arm}: Ln is lower than {mine[0]['baseline']}'s on {lower} of {len(mine)} seeds (mean "
                     f"difference {mean:+.4f}): {verdict}.")
    return lines + [""]
