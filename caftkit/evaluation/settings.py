"""The settings of `caft eval` and `caft compare-evals`, declared once with their help and checks (nothing here
imports torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import ModelSettings
from ..settings import MAX_SEED, setting
from ..tasks.registry import get_task, task_names
from ..tasks.task import Task

# `loss` is not a task: it scores the heads' losses on conversations, with nothing generated.
LOSS = "loss"


@dataclass(kw_only=True)
class EvalSettings(ModelSettings):
    """What `evaluate` scores and how; written into `metrics.json`."""

    task: str = setting(help=f"{', '.join(task_names())} (the registered tasks) or {LOSS} (see the command's "
                             "description).")
    data: str | None = setting(None, help="the task's test examples. molecules: moses:test (default), moses:train or a "
                                          "JSONL of molecule records (`caft data molecules`); humaneval: a problems "
                                          "JSONL (default: the bundled HumanEval set); math: a JSONL of math records "
                                          "(`caft data math`, required); loss: a JSONL/JSON file of conversations "
                                          "(required).")
    heads: str | None = setting(None, help="a heads folder to score (loss task).")
    heads_base_check: bool = setting(True, help="loss task: refuse heads trained for another base than --model (a "
                                                "fingerprint of its last layer); --no-heads-base-check scores them on "
                                                "a fine-tuned descendant of their base (same architecture and shapes, "
                                                "still checked), as `caft compare` does for the paper's Ln diagnostic.")
    max_examples: int | None = setting(None, help="score only the first this many examples; 0 or none for all.",
                                       minimum=0)
    max_new_tokens: int | None = setting(None, help="most tokens per answer (default: the task's own: 96 for "
                                                    "molecules, 512 for humaneval, 256 for math).", minimum=1)
    batch_size: int = setting(16, help="prompts generated (or conversations scored) together.", minimum=1)
    max_length: int = setting(1024, help="loss task: conversations are truncated to this many tokens.", minimum=1)
    seed: int = setting(0, help="order of the molecules drawn from a MOSES split.", minimum=0, maximum=MAX_SEED)
    # At most a day: the sandbox's backstop `signal.alarm` takes seconds as a C int (3e9 overflowed it), and no test
    # of a program needs more.
    timeout_s: float = setting(10.0, help="humaneval: wall-clock limit of one program, in seconds (at most a day).",
                               above=0, maximum=86_400)
    memory_mb: int = setting(1024, help="humaneval: memory limit of one program, in MB: of all its processes "
                                        "together where a memory cgroup can be made (as root on most machines), else "
                                        "of each process.", minimum=256)
    workers: int = setting(2, help="humaneval: programs run in parallel.", minimum=1)
    n_resamples: int = setting(2000, help="bootstrap resamples of each metric's 95% interval over the test "
                                          "examples.", minimum=100)
    allow_unsandboxed: bool = setting(False, help="humaneval: run the programs even on a machine where they cannot "
                                                  "be isolated (no user namespaces): they then run as plain "
                                                  "processes of your user, with resource limits only, and code "
                                                  "written to escape can read and write your files.")

    def __post_init__(self):
        super().__post_init__()
        if self.max_examples == 0:
            self.max_examples = None
        if self.task != LOSS and self.task not in task_names():
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join((*task_names(), LOSS))}")
        if self.task == LOSS:
            if not self.data:
                raise ValueError("--task loss needs --data (a JSONL/JSON file of conversations)")
        elif self.max_new_tokens is None:
            self.max_new_tokens = get_task(self.task).max_new_tokens

    def scored_task(self) -> Task | None:
        """The task the answers are scored by; None for `loss`."""
        return None if self.task == LOSS else get_task(self.task)


@dataclass(kw_only=True)
class EvalOutput:
    output: str | None = setting(None, help="folder for metrics.json, examples.jsonl and generations.jsonl "
                                            "(default: eval-<task>).")


@dataclass(kw_only=True)
class CompareEvalsSettings:
    """Two `caft eval` folders of one task, scored on the same test examples."""

    baseline: str = setting(help="the evaluation compared against (e.g. the next-token fine-tuned model's).")
    other: str = setting(help="the evaluation whose difference from the baseline is measured (e.g. CAFT's).")
    n_resamples: int = setting(10000, help="paired bootstrap resamples of each difference's 95% interval.",
                               minimum=100)
