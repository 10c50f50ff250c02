"""Export a fine-tuning run as a plain transformers checkpoint: LoRA merged, heads stripped, a model card.

The heads the run used (or trained) are written beside the model, in their own folder, for reuse and for
self-speculative decoding; the model folder itself loads with `AutoModelForCausalLM.from_pretrained` alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import GenerationConfig

from ..core.eagle3 import eagle3_refusal
from ..core.heads import HEADS_WEIGHTS_FILE, attach_heads, detach_heads, read_heads_config, rebase_heads
from ..evaluation.evaluation_record import TaskEvaluation, read_task_evaluation
from ..files.atomic import write_json
from ..files.export_record import EXPORT_RECORD, file_fingerprint
from ..files.json_text import read_json_file
from ..files.outputs import OUTPUT_MARKER, check_replaceable, replace_folder
from ..models import check_model_source, load_model, load_tokenizer
from .export_heads import DRAFT_COMMAND, write_eagle3_draft
from .finetuning import FINAL_DIR, RUN_FILE, RUN_HEADS_DIR
from .model_card import CARD_FILE, exported_model_card
from .trainer import CHECKPOINT_HEADS_DIR

# The command whose marker an exported model or heads folder holds: a folder made by it may be replaced by it.
EXPORT_COMMAND = "export"
GENERATION_CONFIG_FILE = "generation_config.json"


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The `caft_run.json` of a finished run, with a clear error when the folder is not one."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a finished `caft finetune` run folder?")
    return read_json_file(path)


def load_finetuned(run_dir: str | Path, dtype: str | None = None):
    """The fine-tuned model of a run as a plain transformers model (LoRA merged, no heads), with the generation
    config training left (end-of-sequence tokens aligned with the tokenizer's), and its tokenizer."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    settings = run["settings"]
    final = run_dir / FINAL_DIR
    dtype = dtype or settings["dtype"]
    if settings["method"] == "lora":
        check_model_source(str(final))  # a broken adapter_config.json is named before the base loads
        # In full precision, a QLoRA run's (`load_in_4bit`) too: the export is a plain checkpoint, never a 4-bit one.
        base = load_model(settings["model"], dtype)
        model = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    else:
        model = load_model(str(final), dtype)
    if (final / GENERATION_CONFIG_FILE).is_file():  # earlier runs kept none beside a LoRA adapter
        model.generation_config = GenerationConfig.from_pretrained(final)
    detach_heads(model)
    return model, load_tokenizer(str(final))


def _heads_source(run_dir: Path) -> Path | None:
    trained = run_dir / FINAL_DIR / CHECKPOINT_HEADS_DIR  # heads trained during fine-tuning (`train_heads`)
    if (trained / HEADS_WEIGHTS_FILE).is_file():
        return trained
    used = run_dir / RUN_HEADS_DIR
    return used if (used / HEADS_WEIGHTS_FILE).is_file() else None


def default_heads_output(out: str | Path) -> Path:
    """Where `caft export` writes the heads when no folder is named: `<out>-heads` beside the model."""
    out = Path(out)
    return out.with_name(out.name + "-heads")


def default_draft_output(out: str | Path) -> Path:
    """Where `caft export --eagle3` writes the EAGLE-3 draft: `<out>-eagle3` beside the model."""
    out = Path(out)
    return out.with_name(out.name + "-eagle3")


def export_outputs(out: str | Path, heads_out: str | Path | None, eagle3: bool) -> list[Path]:
    """The folders an export writes (model, heads, and the draft with `eagle3`), refused when two are one folder
    (the same path, or spellings of it): each export folder is replaced whole."""
    outputs = {"--output": Path(out), "--heads-output": Path(heads_out) if heads_out else default_heads_output(out)}
    if eagle3:
        outputs["the EAGLE-3 draft"] = default_draft_output(out)
    seen: dict[str, str] = {}
    for name, path in outputs.items():
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{path}: {name} is the folder of {seen[real]}; give each its own folder")
        seen[real] = name
    return list(outputs.values())


def check_evaluated_export(evaluation: TaskEvaluation, run_dir: Path, fingerprint: str, dtype: str,
                           out: Path) -> None:
    """Refuse, in one line naming both, an evaluation whose model is not an export of the run `run_dir` as it is
    now (`fingerprint` of its `caft_run.json`) in `dtype`, the weights `caft export` writes to `out`."""
    exported = evaluation.model_export
    if exported is None:
        why = "it is no caft export"
    elif "run_fingerprint" not in exported:
        why = "its caft_export.json, from an older caftkit, has no fingerprint of its run; export it again"
    elif exported["run_fingerprint"] != fingerprint:
        same_run = os.path.realpath(str(exported.get("run"))) == os.path.realpath(run_dir)
        why = (f"it was exported from {exported.get('run')}" + (" before that run was trained again" if same_run
                                                                 else ""))
    elif exported.get("dtype") != dtype:
        why = f"it was exported in {exported.get('dtype')}"
    else:
        return
    raise ValueError(f"{evaluation.folder}: an evaluation of {evaluation.model}, not of {out}, the export of "
                     f"{run_dir} in {dtype} ({why}): evaluate an export of this run with `caft eval` and give that "
                     "folder to --eval")


def export_run(run_dir: str | Path, out: str | Path, heads_out: str | Path | None = None,
               dtype: str | None = None, eagle3: bool = False, evaluations: Sequence[str | os.PathLike] = ()
               ) -> dict[str, Any]:
    """Write the run's model to `out` (plain transformers, with tokenizer and model card) and its heads to
    `heads_out` (default: `<out>-heads`), recorded as heads of the exported model (`rebase_heads`); with `eagle3`,
    head 2 as an EAGLE-3 draft of the exported model to `<out>-eagle3`. The card reports the `caft eval --task`
    folders `evaluations`, each of an export of this run in this dtype (the same weights; for instance an earlier
    export to `out`). Returns the paths written."""
    run_dir, out = Path(run_dir), Path(out)
    run = read_run(run_dir)
    dtype = dtype or run["settings"]["dtype"]
    fingerprint = file_fingerprint(run_dir / RUN_FILE)
    # The evaluations are only read; each must have scored these very weights (an export of this run as it is now,
    # in this dtype), checked before anything loads or is written.
    folders = [os.path.realpath(folder) for folder in evaluations]
    for folder in evaluations:
        if folders.count(os.path.realpath(folder)) > 1:
            raise ValueError(f"{folder}: given to --eval more than once (as {', '.join(map(str, evaluations))})")
    scored = [read_task_evaluation(folder) for folder in evaluations]
    for evaluation in scored:
        check_evaluated_export(evaluation, run_dir, fingerprint, dtype, out)
    source = _heads_source(run_dir)
    target = (Path(heads_out) if heads_out else default_heads_output(out)) if source is not None else None
    if eagle3 and source is None:
        raise ValueError(f"{run_dir}: a next-token run has no heads to write as an EAGLE-3 draft")
    # Every output is checked before anything loads: each must be new, or an earlier export holding only what the
    # export wrote (its marker says so); a user's folder, the run's own heads or the working directory are never
    # replaced.
    check_replaceable(out, EXPORT_COMMAND)
    if eagle3:
        check_replaceable(default_draft_output(out), DRAFT_COMMAND)
    if target is not None:
        check_replaceable(target, EXPORT_COMMAND)
        read_heads_config(source)  # a broken heads folder fails here, not at generation time
    model, tokenizer = load_finetuned(run_dir, dtype)
    if eagle3:
        refusal = eagle3_refusal(model)
        if refusal is not None:  # before anything is written
            raise ValueError(f"cannot write the heads as an EAGLE-3 draft: {refusal}")
    # `run_fingerprint` and `dtype` say which weights the folder holds: what `caft export --eval` checks.
    record = {"run": str(run_dir), "model": str(out), "heads": str(target) if target else None, "dtype": dtype,
              "run_fingerprint": fingerprint}
    with replace_folder(out, EXPORT_COMMAND) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        exported_model_card(run, out, target, scored).save(staging / CARD_FILE)
        write_json(staging / EXPORT_RECORD, record)
    written = {"model": str(out), "heads": None}
    if target is not None:
        with replace_folder(target, EXPORT_COMMAND) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(OUTPUT_MARKER))
            # Fine-tuning changed layer L under the heads; they go with the exported model, so that
            # `caft generate --model out --heads out-heads --speculative` accepts the pair.
            rebase_heads(staging, model)
            write_json(staging / EXPORT_RECORD, record)
        written["heads"] = str(target)
    if eagle3:
        attach_heads(model, str(target))  # the heads just recorded as this model's
        written["draft"] = str(write_eagle3_draft(model, default_draft_output(out), record))
        detach_heads(model)
    return written


