"""The `caft compare` and `caft demo` commands.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from .settings import CompareOutput, CompareSettings, DemoSettings


def compare_command(settings: CompareSettings, where: CompareOutput) -> dict:
    """Fine-tune with next-token loss and with CAFT on the same data, seeds and steps; evaluate every arm; report.

    Each arm is fine-tuned with `caft finetune` (its mode, method, seeds, heads and warm-up, and the shared
    settings with its own overrides), exported and scored on the same test examples with `caft eval`. Without
    --arms there are two, ntp and caft, alike in everything but the loss. `report.md` gives, for each caft arm
    against its baseline (the ntp arm of the same method unless it names one), each metric, the difference and
    its 95% confidence interval (paired bootstrap over the test examples, and over the seeds both arms ran), the
    per-seed values, and the heads' held-out top-1 accuracy before and after warm-up. Rerunning the command
    resumes: finished runs, exports and evaluations are kept when made with the same settings, an interrupted run
    continues from its last checkpoint.
    """
    from ..files.outputs import output_folder
    from .compare import compare
    from .compare_report import REPORT_FILE

    with output_folder(where.output, "compare"):
        result = compare(where.output, settings)
    for comparison in result["comparisons"]:
        arm, baseline = comparison["arm"], comparison["baseline"]
        print(f"{arm} against {baseline}, seeds {', '.join(map(str, comparison['seeds']))}:")
        for row in comparison["rows"]:
            print(f"  {row['metric']:<14} {baseline} {row['ntp']:.4f}  {arm} {row['caft']:.4f}  "
                  f"difference {row['difference']:+.4f}  95% CI [{row['low']:+.4f}, {row['high']:+.4f}]")
    print(f"report written to {Path(where.output) / REPORT_FILE}")
    return result


def runnable(script: str) -> str:
    """How to call `script` of this environment from the current shell: its name where PATH finds this very script
    (the environment is active), else its path (`.venv/bin/caft` after `make demo`, which does not activate it)."""
    here = Path(sys.executable).parent / script
    found = shutil.which(script)
    if found is not None and Path(found).resolve() == here.resolve():
        return script
    return os.path.relpath(here) if not os.path.relpath(here).startswith("..") else str(here)


def demo_command(settings: DemoSettings) -> dict:
    """Run the whole CAFT pipeline on a small scale: distil, train heads, warm up, fine-tune, export, evaluate.

    Self-distils a few ShareGPT prompts, trains general heads on the answers, builds molecule-design records
    from MOSES, warms the heads up on them and fine-tunes with CAFT (every weight but the unembedding), fine-tunes
    the same way with the next-token loss alone (the baseline), exports both as plain transformers models, and
    scores the base model and both fine-tuned ones on the same held-out MOSES test prompts (valid SMILES, formula
    match, groups present, distinct answers): what CAFT added is the difference between the last two columns.
    With the `tracking` extra installed the runs log to tensorboard. A rerun reuses the stages already done.
    Prints the scores, where each artefact is and what to run next.
    """
    from ..files.outputs import output_folder
    from .demo import format_scores, run_demo

    started = time.perf_counter()
    with output_folder(settings.output, "demo"):
        report = run_demo(settings)
    artefacts = report["artefacts"]
    print(f"\ndone in {time.perf_counter() - started:.0f} s.\n")
    print(format_scores(report["evaluation"]))
    print("\nArtefacts:")
    for name, path in artefacts.items():
        print(f"  {name:<12} {', '.join(path) if isinstance(path, list) else path}")
    caft, tensorboard = runnable("caft"), runnable("tensorboard")
    if report["tracking"]:
        print(f"Training curves: {tensorboard} --logdir {settings.output}")
    else:
        print("Training curves: install the tracking extra (pip install -e '.[tracking]') and rerun with a new "
              "--output to log them to tensorboard")
    print("Next:")
    # The exported heads were frozen while the model moved: re-fitted to it, their drafts are accepted more often
    # (docs/benchmarks.md: 1.21x plain decoding re-fitted, slower than plain with the frozen general heads).
    refitted = f"{artefacts['model']}-heads-tuned"
    print(f"  {caft} train-heads --model {artefacts['model']} --data {artefacts['task_data']} --init "
          f"{artefacts['model_heads']} --epochs 1 --output {refitted}      # heads re-fitted to the fine-tuned model")
    print(f"  {caft} generate --model {artefacts['model']} --heads {refitted} --speculative "
          "--prompt \"Design a molecule with the molecular formula C9H11NO2 that contains these functional groups: "
          "benzene ring, amide. Answer with its SMILES string only.\"")
    print(f"  {caft} train-heads --data {artefacts['distilled']} --output heads      # heads on more data")
    print(f"  {caft} finetune --data {artefacts['task_data']} --heads {artefacts['heads']} --head-warmup auto "
          "--output run")
    return report
