"""The `caft eval` command and its output setting.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from ..settings import setting
from ..tasks.registry import get_task, task_names
from .task_eval import LOSS, EvalSettings


@dataclass(kw_only=True)
class EvalOutput:
    output: str | None = setting(None, help="folder for metrics.json, examples.jsonl and generations.jsonl "
                                            "(default: eval-<task>).")


def eval_command(settings: EvalSettings, where: EvalOutput) -> dict:
    """Score a model on a task and write `metrics.json` and the per-example results; print a table.

    The tasks are listed below (each registered task, then loss). Answers are greedy and are appended to
    `generations.jsonl` as they come: rerunning the command resumes.
    """
    from ..outputs import output_folder
    from .task_eval import evaluate, format_metrics

    output = where.output or f"eval-{settings.task}"
    with output_folder(output, "eval"):
        result = evaluate(output, settings)
    print(format_metrics(result["metrics"]))
    print(f"results written to {output}")
    return result


def eval_tasks_help() -> str:
    """The tasks of `caft eval --task`, one paragraph each: what each registered task scores, then `loss`."""
    summaries = {name: get_task(name).summary for name in task_names()}
    summaries[LOSS] = ("each head's loss and top-1 accuracy over the assistant tokens of --data (with --heads, the "
                       "auxiliary heads too)")
    return "tasks:\n" + "\n".join(textwrap.fill(f"{name}: {summary}.", width=100, initial_indent="  ",
                                                subsequent_indent="    ") for name, summary in summaries.items())
