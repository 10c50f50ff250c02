"""caft: Concept-Aware Fine-Tuning of causal language models (distil, train heads, fine-tune, export, evaluate).

The command line is a table of commands, each a settings class (its flags) and a function that runs it. Every
setting is declared once, on its settings dataclass, with its help; `command_line` builds the flags and reads
`--config FILE.yaml` from those declarations (flags override the file, the file overrides the defaults). Each
command's function lives beside the library function it runs, and its docstring is the command's help.
"""

from __future__ import annotations

import sys

from . import __version__
from .bench.generation import GenerationBenchSettings, bench_generate_command
from .bench.precision import PrecisionBenchSettings, bench_precision_command
from .bench.train_step import TrainBenchSettings, bench_train_command
from .command_line import Command, run_command
from .decoding.streaming import GenerateSettings, generate_command
from .environment import env_command
from .evaluation.task_eval import EvalOutput, EvalSettings, eval_command
from .tasks.molecules import MoleculeDataSettings, molecules_data_command
from .training.distill import DistillOutput, DistillSettings, distill_command
from .training.export import ExportSettings, export_command
from .training.finetuning import FinetuneSettings, RunOutput, finetune_command
from .training.head_training import HeadsOutput, HeadTrainingSettings, train_heads_command
from .workflows.compare import CompareOutput, CompareSettings, compare_command
from .workflows.demo import DemoSettings, demo_command

# Command name -> command; a name with a space is a sub-command ("bench train").
COMMANDS: dict[str, Command] = {
    "distill": Command(distill_command, (DistillSettings, DistillOutput)),
    "train-heads": Command(train_heads_command, (HeadTrainingSettings, HeadsOutput)),
    "finetune": Command(finetune_command, (FinetuneSettings, RunOutput)),
    "export": Command(export_command, (ExportSettings,), positional=("run",)),
    "eval": Command(eval_command, (EvalSettings, EvalOutput)),
    "compare": Command(compare_command, (CompareSettings, CompareOutput)),
    "data molecules": Command(molecules_data_command, (MoleculeDataSettings,)),
    "demo": Command(demo_command, (DemoSettings,)),
    "generate": Command(generate_command, (GenerateSettings,)),
    "bench train": Command(bench_train_command, (TrainBenchSettings,)),
    "bench generate": Command(bench_generate_command, (GenerationBenchSettings,)),
    "bench precision": Command(bench_precision_command, (PrecisionBenchSettings,)),
    "env": Command(env_command),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `caft` console script."""
    return run_command("caft", __doc__.split("\n\n")[0], COMMANDS, __version__, argv)


if __name__ == "__main__":
    sys.exit(main())
