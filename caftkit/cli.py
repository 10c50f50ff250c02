"""caft: Concept-Aware Fine-Tuning of causal language models (distil, train heads, fine-tune, export, evaluate).

The command line is a table of commands, each a settings class (its flags) and a function that runs it. Every
setting is declared once, on its settings dataclass, with its help; `command_line` builds the flags and reads
`--config FILE.yaml` from those declarations (flags override the file, the file overrides the defaults). Each wing
keeps its commands in `commands.py` (a command's docstring is its help) and their settings in modules that do not
import torch: reading and checking the settings, and refusing a bad one, takes a fraction of a second.
"""

from __future__ import annotations

import logging
import sys

from . import __version__
from .bench.commands import (
    bench_distill_command,
    bench_generate_command,
    bench_precision_command,
    bench_train_command,
)
from .bench.settings import DistillBenchOutput, GenerationBenchSettings, PrecisionBenchSettings, TrainBenchSettings
from .command_line import Command, run_command
from .decoding.commands import generate_command
from .decoding.settings import GenerateSettings, Sampling
from .environment import env_command
from .evaluation.commands import compare_evals_command, eval_command, eval_tasks_help
from .evaluation.settings import CompareEvalsSettings, EvalOutput, EvalSettings
from .tasks.registry import get_task, task_names
from .training.commands import (
    distill_command,
    export_command,
    export_heads_command,
    finetune_command,
    train_heads_command,
)
from .training.settings import (
    DistillOutput,
    DistillSettings,
    ExportHeadsSettings,
    ExportSettings,
    FinetuneSettings,
    HeadsOutput,
    HeadTrainingSettings,
    RunOutput,
)
from .workflows.commands import compare_command, demo_command
from .workflows.settings import CompareOutput, CompareSettings, DemoSettings

# Command name -> command; a name with a space is a sub-command ("bench train").
COMMANDS: dict[str, Command] = {
    "distill": Command(distill_command, (DistillSettings, DistillOutput)),
    "train-heads": Command(train_heads_command, (HeadTrainingSettings, HeadsOutput)),
    "finetune": Command(finetune_command, (FinetuneSettings, RunOutput)),
    "export": Command(export_command, (ExportSettings,), positional=("run",)),
    "export-heads": Command(export_heads_command, (ExportHeadsSettings,)),
    "eval": Command(eval_command, (EvalSettings, EvalOutput), more_help=eval_tasks_help),
    "compare-evals": Command(compare_evals_command, (CompareEvalsSettings,), positional=("baseline", "other")),
    "compare": Command(compare_command, (CompareSettings, CompareOutput)),
    "demo": Command(demo_command, (DemoSettings,)),
    "generate": Command(generate_command, (GenerateSettings, Sampling)),
    "bench train": Command(bench_train_command, (TrainBenchSettings,)),
    "bench generate": Command(bench_generate_command, (GenerationBenchSettings,)),
    "bench precision": Command(bench_precision_command, (PrecisionBenchSettings,)),
    "bench distill": Command(bench_distill_command, (DistillSettings, DistillBenchOutput)),
    "env": Command(env_command),
}




def data_commands() -> dict[str, Command]:
    """`data <task>` for every registered task that builds records, read from the registry when the parser is built."""
    tasks = [get_task(name) for name in task_names()]
    return {f"data {task.name}": Command(task.data_command, (task.data_settings,))
            for task in tasks if task.data_command is not None}


def commands() -> dict[str, Command]:
    """Every command: the table above and the registered tasks' `data` commands."""
    return {**COMMANDS, **data_commands()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `caft` console script."""
    # bitsandbytes (the qlora extra), which PEFT imports, fetches an optional CPU inference kernel from the Hub when
    # imported on a CPU with AVX512-BF16 and warns on every command where it cannot (always, offline); QLoRA training
    # does not use that kernel (training/qlora.py), so the warning is kept out of every command's output.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return run_command("caft", __doc__.split("\n\n")[0], commands(), __version__, argv)


if __name__ == "__main__":
    sys.exit(main())
