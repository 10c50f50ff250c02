"""The `caft eval` command and its output setting.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..command_line import setting
from .task_eval import EvalSettings


@dataclass(kw_only=True)
class EvalOutput:
    output: str | None = setting(None, help="folder for metrics.json, examples.jsonl and generations.jsonl "
                                            "(default: eval-<task>).")


def eval_command(settings: EvalSettings, where: EvalOutput) -> dict:
    """Score a model on a task and write `metrics.json` and the per-example results; print a table.

    Tasks:
    - molecules: greedy answers to molecule-design prompts, checked with RDKit: validity, formula match,
      functional-group recall and match, exact match of the canonical SMILES, mean Tanimoto similarity to the
      reference (Morgan fingerprints, radius 2, 2048 bits), uniqueness of the valid answers.
    - humaneval: greedy answers to the HumanEval problems; pass@1. Each program runs in a sandbox (its own user,
      PID, mount and network namespaces, a read-only file system but a 64 MB work directory, time and memory
      limits) and its tests in a separate judge process it cannot reach. Where the machine cannot isolate it,
      the evaluation refuses to start unless --allow-unsandboxed.
    - loss: each head's loss and top-1 accuracy over the assistant tokens of --data (with --heads, the
      auxiliary heads too).
    Answers are appended to `generations.jsonl` as they come: rerunning the command resumes.
    """
    from ..outputs import output_folder
    from .task_eval import GENERATIONS_FILE, SETTINGS_FILE, evaluate, format_metrics

    output = where.output or f"eval-{settings.task}"
    with output_folder(output, "eval", (SETTINGS_FILE, GENERATIONS_FILE)):
        result = evaluate(output, settings)
    print(format_metrics(result["metrics"]))
    print(f"results written to {output}")
    return result
