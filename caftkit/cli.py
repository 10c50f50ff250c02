"""The `caft` command line: a table of commands, each a settings class (its flags) and a function that runs it.

Every setting is declared once, on its settings dataclass, with its help; `command_line` builds the flags and reads
`--config FILE.yaml` from those declarations (flags override the file, the file overrides the defaults). The
functions here only run the library and print what it returns.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .bench.generation import GenerationBenchSettings
from .bench.precision import PrecisionBenchSettings
from .bench.train_step import TrainBenchSettings
from .command_line import Command, run_command, setting
from .decoding.streaming import GenerateSettings
from .evaluation.task_eval import EvalSettings
from .tasks.molecules import MoleculeDataSettings
from .training.distill import DistillSettings
from .training.export import ExportSettings
from .training.finetuning import FinetuneSettings
from .training.head_training import HeadTrainingSettings
from .workflows.compare import CompareSettings
from .workflows.demo import DemoSettings


@dataclass(kw_only=True)
class DistillOutput:
    output: str = setting("distilled.jsonl", help="JSONL file to write (extended when it exists).")


@dataclass(kw_only=True)
class HeadsOutput:
    output: str = setting("heads", help="the heads folder to write.")
    resume: bool = setting(False, help="continue from the last checkpoint in <output>/checkpoints/.")
    keep_checkpoints: bool = setting(False, help="keep <output>/checkpoints/ after training ends.")


@dataclass(kw_only=True)
class RunOutput:
    output: str = setting("run", help="the run folder.")
    resume: bool = setting(False, help="continue from the last checkpoint in the run folder.")


@dataclass(kw_only=True)
class EvalOutput:
    output: str | None = setting(None, help="folder for metrics.json, examples.jsonl and generations.jsonl "
                                            "(default: eval-<task>).")


@dataclass(kw_only=True)
class CompareOutput:
    output: str = setting("compare", help="the comparison folder.")


def _print_json(result: dict, output: str | None = None) -> dict:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return result


def distill(settings: DistillSettings, where: DistillOutput) -> dict:
    """Generate the base model's own answers to a set of prompts (self-distillation) as `messages` JSONL.

    Each prompt is the first user turn of a conversation, rendered with the model's chat template; each output
    line holds the source id, the prompt and answer as `messages`, why generation stopped (`end_of_turn` or
    `max_new_tokens`) and the number of new tokens. Rerunning the same command resumes: ids already written are
    skipped and a half-written last line is redone. Settings and counts are kept in `<output stem>.meta.json`.
    """
    from .models import load_model, load_tokenizer
    from .training.distill import distill as run

    tokenizer = load_tokenizer(settings.model)
    summary = run(lambda: load_model(settings.model, settings.dtype).to(settings.device), tokenizer, where.output,
                  settings)
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items()) or "none"
    tail = " (the file ends mid-record: its complete records were read)" if summary.source_truncated_tail else ""
    print(f"read {summary.records_read} records{tail}; skipped: {skipped}")
    print(f"{summary.prompts_selected} prompts selected, {summary.already_done} already in {where.output}, "
          f"{summary.generated} generated; stop reasons: {summary.stop_reasons or 'none'}")
    print(f"{summary.new_tokens} new tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s); "
          f"{summary.written_total} records in {where.output}")
    return summary.__dict__


def train_heads(settings: HeadTrainingSettings, where: HeadsOutput) -> dict:
    """Train the auxiliary heads (paper eq. 3) with the base model frozen, and write a `heads/` folder.

    Each head is a copy of the last decoder layer that learns to predict token t+k (k = 2..num_heads+1) through
    the model's own final norm and unembedding; the loss is sum_k alpha^(k-2) CE_k over the assistant tokens.
    Train once per base model on self-distilled data (`caft distill`); for a task whose tokens the heads
    predict badly (auxiliary loss L2 > 4), warm them up with one epoch on the task's training set:
    `caft train-heads --data task.jsonl --init heads/ --output task-heads/`. The folder gets `heads.safetensors`,
    `heads_config.json` (settings, and each head's held-out loss and top-1 accuracy before and after),
    `log_history.json` and `loss_curves.png`.
    """
    from .core.distributed import is_main_process
    from .training.head_training import format_head_table
    from .training.head_training import train_heads as run

    summary = run(where.output, settings, resume=where.resume, keep_checkpoints=where.keep_checkpoints)
    if is_main_process():  # under a launcher, one process reports
        print(f"{summary['train_examples']} training and {summary['held_out_examples']} held-out examples, "
              f"{summary['optimizer_steps']} steps; data: {summary['data']}")
        print("held-out loss and top-1 accuracy per head:")
        print(format_head_table(summary["held_out_before"], summary["held_out_after"]))
        print(f"heads written to {where.output}")
    return summary


def finetune(settings: FinetuneSettings, where: RunOutput) -> dict:
    """Fine-tune a model on a task with CAFT (paper eq. 4), or the plain next-token baseline (`--mode ntp`).

    The loss is L = CE_1 + beta * gamma(step) * sum_{k=2..n} alpha^(k-1) * CE_k over the assistant tokens, with
    the auxiliary heads of `--heads` (from `caft train-heads`) frozen; `--mode ntp` trains with CE_1 alone and
    everything else identical, for comparison. The run folder gets checkpoints, `final/` (LoRA adapter or full
    weights, without heads), `heads/`, `caft_run.json`, `log_history.json` and `head_losses.png`; turn it into
    a plain transformers model with `caft export`.
    """
    from .core.distributed import is_main_process
    from .training.finetuning import finetune as run

    summary = run(where.output, settings, resume=where.resume)
    if is_main_process():  # under a launcher, one process reports
        print(f"{summary['train_examples']} training and {summary['held_out_examples']} held-out examples, "
              f"{summary['optimizer_steps']} steps; data: {summary['data']}")
        for name, metrics in summary["held_out_per_head"].items():
            print(f"held-out {name}: loss {metrics['loss']:.4f}, top-1 accuracy {metrics['accuracy']:.4f}")
        print(f"run written to {where.output}; next: caft export {where.output} --output model")
    return summary


def export(settings: ExportSettings) -> dict:
    """Export a `caft finetune` run as a plain transformers model: LoRA merged, heads stripped.

    The model folder gets the weights, config, tokenizer and a model card (base, data, CAFT settings, final
    held-out metrics), and loads with `AutoModelForCausalLM.from_pretrained` without caftkit. The heads the run
    used are copied beside it, for reuse and for speculative decoding, recorded as heads of the exported model
    (`caft generate --model OUT --heads OUT-heads --speculative` accepts the pair).
    """
    from .training.export import export_run

    written = export_run(settings.run, settings.output, settings.heads_output, settings.dtype)
    print(f"model written to {written['model']}" + (f"; heads to {written['heads']}" if written["heads"] else ""))
    return written


def eval_task(settings: EvalSettings, where: EvalOutput) -> dict:
    """Score a model on a task and write `metrics.json` and the per-example results; print a table.

    Tasks:
    - molecules: greedy answers to molecule-design prompts, checked with RDKit: validity, formula match,
      functional-group recall and match, exact match of the canonical SMILES, mean Tanimoto similarity to the
      reference (Morgan fingerprints, radius 2, 2048 bits), uniqueness of the valid answers.
    - humaneval: greedy answers to the HumanEval problems, each run with its tests in a separate process (time
      and memory limits, no network, a temporary directory); pass@1.
    - loss: each head's loss and top-1 accuracy over the assistant tokens of --data (with --heads, the
      auxiliary heads too).
    Answers are appended to `generations.jsonl` as they come: rerunning the command resumes.
    """
    from .evaluation.task_eval import evaluate, format_metrics

    output = where.output or f"eval-{settings.task}"
    result = evaluate(output, settings)
    print(format_metrics(result["metrics"]))
    print(f"results written to {output}")
    return result


def compare(settings: CompareSettings, where: CompareOutput) -> dict:
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
    from .workflows.compare import compare as run
    from .workflows.compare_report import REPORT_FILE

    result = run(where.output, settings)
    for comparison in result["comparisons"]:
        arm, baseline = comparison["arm"], comparison["baseline"]
        print(f"{arm} against {baseline}, seeds {', '.join(map(str, comparison['seeds']))}:")
        for row in comparison["rows"]:
            print(f"  {row['metric']:<14} {baseline} {row['ntp']:.4f}  {arm} {row['caft']:.4f}  "
                  f"difference {row['difference']:+.4f}  95% CI [{row['low']:+.4f}, {row['high']:+.4f}]")
    print(f"report written to {Path(where.output) / REPORT_FILE}")
    return result


def data_molecules(settings: MoleculeDataSettings) -> dict:
    """Build molecule-design records (`messages` JSONL) from SMILES with RDKit.

    The user asks for a molecule with a given molecular formula that contains given functional groups; the
    assistant answers with the canonical SMILES. A `meta` field keeps the formula, the groups and the SMILES.
    The groups (name: SMARTS) are fixed: benzene ring c1ccccc1, amide [CX3](=O)[NX3], carboxylic acid
    [CX3](=O)[OX2H1], ester [#6][CX3](=O)[OX2H0][#6], ketone [#6][CX3](=O)[#6], hydroxyl [OX2H][CX4,c],
    primary amine [NX3;H2][#6], nitrile C#N, sulfonamide S(=O)(=O)N, fluoro [F], chloro [Cl], bromo [Br],
    ether [OD2]([#6])[#6]. Invalid SMILES, molecules with none of the groups and duplicates are skipped and
    counted.
    """
    from .tasks.molecules import write_molecule_records

    stats = write_molecule_records(settings.smiles, settings.output, n=settings.n, seed=settings.seed)
    skipped = ", ".join(f"{count} {reason}" for reason, count in stats.skipped.items()) or "none"
    print(f"{stats.written} records written to {settings.output} from {stats.read} molecules read; "
          f"skipped: {skipped}")
    return stats.__dict__


def demo(settings: DemoSettings) -> dict:
    """Run the whole CAFT pipeline on a small scale: distil, train heads, warm up, fine-tune, export, evaluate.

    Self-distils a few ShareGPT prompts, trains general heads on the answers, builds molecule-design records
    from MOSES, warms the heads up on them and fine-tunes with CAFT and LoRA, exports a plain transformers
    model, and scores its greedy answers to held-out MOSES test prompts (valid SMILES, formula match, groups
    present). A rerun reuses the stages already done. Prints where each artefact is and what to run next.
    """
    from .workflows.demo import run_demo

    started = time.perf_counter()
    report = run_demo(settings)
    artefacts = report["artefacts"]
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Artefacts:")
    for name, path in artefacts.items():
        print(f"  {name:<12} {path}")
    print("next:")
    print(f"  caft train-heads --data {artefacts['distilled']} --output heads      # heads on more data")
    print(f"  caft finetune --data {artefacts['task_data']} --heads {artefacts['heads']} --output run")
    print("  caft export run --output model")
    return report


def generate(settings: GenerateSettings) -> dict:
    """Answer a prompt with greedy decoding through the model's chat template, streaming to the terminal.

    With --speculative the auxiliary heads draft several tokens per forward pass and the model verifies them:
    the text is the same as without, only faster when the heads guess well.
    """
    from .decoding.streaming import answer_prompt

    return answer_prompt(settings)


def bench_train(settings: TrainBenchSettings) -> dict:
    """Time and peak memory of a CAFT training step against plain next-token fine-tuning.

    Both sides train every weight but the unembedding (frozen in both) on the same random tokens, every
    position labelled; each runs in a fresh process. Prints JSON with `time_ratio` (median step time, CAFT /
    plain), `peak_memory_ratio` and `flop_floor_time_ratio` (the ratio the extra matrix multiplies alone imply).
    """
    from .bench.train_step import bench_train as run

    return _print_json(run(model=settings.model, batch_size=settings.batch_size, seq_len=settings.seq_len,
                           num_heads=settings.num_heads, steps=settings.steps, warmup=settings.warmup,
                           dtype=settings.dtype, device=settings.device, seed=settings.seed), settings.output)


def bench_generate(settings: GenerationBenchSettings) -> dict:
    """Plain greedy `generate()` against self-speculative decoding with the heads, on the same prompts.

    Both sides run in this process on the same batches (chat template applied, prompts grouped by length,
    left-padded), after an untimed warm-up; each batch is decoded plainly and then with every draft shape. Prints,
    per batch size and draft shape, new tokens per second of each side, the speedup, the mean tokens accepted per
    verification pass, and how many answers are token for token the same (all should be). The speedup is split
    into `pass_reduction` (plain forward passes over speculative ones: what the heads save) and `pass_cost` (a
    speculative pass's time in plain one-token steps: what the device charges): speedup = pass_reduction /
    pass_cost.
    """
    from .bench.generation import run_generation_bench

    return _print_json(run_generation_bench(settings), settings.output)


def bench_precision(settings: PrecisionBenchSettings) -> dict:
    """bf16 autocast against float32 over the first steps of a real `caft finetune` run.

    The same run (data, seed, mode, heads, learning-rate and gamma schedules of the whole run) is started twice,
    with `--mixed-precision no` and `bf16`, each in a fresh process and stopped after `--steps` optimisation
    steps, without head warm-up. Prints JSON with `time_ratio` (median step time, bf16 / float32),
    `peak_memory_ratio` (peak memory during training), `largest_relative_loss_difference` (over the steps and
    the heads, of each head's training loss) and `within_tolerance`.
    """
    from .bench.precision import bench_precision as run

    result = run(settings.finetune_settings(), steps=settings.steps, tolerance=settings.tolerance)
    return _print_json(result, settings.output)


def env() -> dict:
    """Print the versions caftkit runs with and what the machine offers it, as JSON.

    Python, platform, the versions of caftkit, torch, transformers, TRL, PEFT, accelerate, datasets and
    safetensors, the CPU cores and torch threads, and each CUDA GPU, each with whether it multiplies bf16
    natively (where `--mixed-precision auto` turns bf16 autocast on). Paste it into a bug report.
    """
    from .environment import environment

    return _print_json(environment())


# Command name -> command; a name with a space is a sub-command ("bench train").
COMMANDS: dict[str, Command] = {
    "distill": Command(distill, (DistillSettings, DistillOutput)),
    "train-heads": Command(train_heads, (HeadTrainingSettings, HeadsOutput)),
    "finetune": Command(finetune, (FinetuneSettings, RunOutput)),
    "export": Command(export, (ExportSettings,), positional=("run",)),
    "eval": Command(eval_task, (EvalSettings, EvalOutput)),
    "compare": Command(compare, (CompareSettings, CompareOutput)),
    "data molecules": Command(data_molecules, (MoleculeDataSettings,)),
    "demo": Command(demo, (DemoSettings,)),
    "generate": Command(generate, (GenerateSettings,)),
    "bench train": Command(bench_train, (TrainBenchSettings,)),
    "bench generate": Command(bench_generate, (GenerationBenchSettings,)),
    "bench precision": Command(bench_precision, (PrecisionBenchSettings,)),
    "env": Command(env),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `caft` console script."""
    return run_command("caft", __doc__.split("\n\n")[0], COMMANDS, __version__, argv)


if __name__ == "__main__":
    sys.exit(main())
