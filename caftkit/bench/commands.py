"""The `caft bench` commands: train, generate, precision, distill.

Each runs its library function and prints what it returns; its docstring is the command's help. The library is
imported when the command runs: the command line reads and checks the settings first, without torch.
"""

from __future__ import annotations

from ..command_line import print_json
from ..files.atomic import write_json
from ..files.outputs import check_new_file
from ..training.settings import DistillSettings
from .settings import DistillBenchOutput, GenerationBenchSettings, PrecisionBenchSettings, TrainBenchSettings


def _check_output(output: str | None, flag: str = "--output") -> None:
    # Before the benchmark runs, not after: a path that will be refused costs no measuring time.
    if output:
        check_new_file(output, flag)


def bench_generate_command(settings: GenerationBenchSettings) -> dict:
    """Plain `generate()` against self-speculative decoding with the heads, on the same prompts.

    Both sides run in this process on the same batches (chat template applied, prompts grouped by length,
    left-padded), after an untimed warm-up; each batch is decoded plainly and then with every draft shape, each
    with fixed drafts (every head at every pass) and adaptive ones (each pass through every head, the confident
    ones or none, by the speed each gave); greedily, and sampled at each of --temperatures. Prints, per
    temperature, batch size, draft shape and drafting, new tokens per second of each side, the speedup, the mean
    tokens accepted per verification pass, and, greedy, how many answers are token for token the same (all should
    be). The speedup is split into `pass_reduction` (plain forward passes over speculative ones: what the heads
    save) and `pass_cost` (a speculative pass's time in plain one-token steps: what the device charges): speedup =
    pass_reduction / pass_cost. With --repeats, each round's speedup too, and on adaptive rows their speed over
    fixed drafts' (`over_fixed`), pooled and per round.
    """
    from .generation import run_generation_bench

    _check_output(settings.output)
    return print_json(run_generation_bench(settings), settings.output)


def bench_train_command(settings: TrainBenchSettings) -> dict:
    """Time and peak memory of a CAFT training step against next-token fine-tuning, three ways.

    The baselines: `plain`, `model(input_ids, labels=...)` as transformers users write it (full logits), `trl`,
    the loss of TRL's SFTTrainer as it computes it by default, and `ntp`, caftkit's own next-token path (`caft
    finetune --mode ntp`: fused chunked cross-entropy). Every side trains every weight but the unembedding
    (frozen) on the same random tokens, every position labelled, each in a fresh process. On a CUDA device with
    liger-kernel installed, `liger` (Liger's fused linear cross-entropy) is a fourth baseline. A last process
    takes `ntp` and CAFT steps in turn: the median of each CAFT step over the next-token step beside it is
    `against.ntp.paired_time_ratio`, which a busy machine's drift between processes does not blur. Prints JSON
    with `time_ratio` and `peak_memory_ratio` (CAFT / plain), the same against each baseline under `against`,
    `flop_floor_time_ratio` (the ratio the extra matrix multiplies alone imply) and
    `against.ntp.time_over_flop_floor` (the paired ratio over it).

    With --sweep, CAFT is measured against `ntp` along three axes (sequence length, number of heads, vocabulary
    size), one at a time; a table is printed, and the JSON goes to --output, the plot to --plot.
    """
    from ..models import check_positions

    _check_output(settings.output)
    _check_output(settings.plot, "--plot")
    flag, longest = max([("--seq-len", settings.seq_len)] + [("--sweep-seq-lens", length) for length in (
        settings.sweep_seq_lens if settings.sweep else [])], key=lambda pair: pair[1])
    check_positions(settings.model, longest, flag, flag)  # in this process, not as a child's traceback
    if settings.sweep:
        return _bench_train_sweep(settings)
    from .train_step import bench_train

    return print_json(bench_train(model=settings.model, batch_size=settings.batch_size, seq_len=settings.seq_len,
                                  num_aux_heads=settings.num_aux_heads, steps=settings.steps,
                                  warmup=settings.warmup, dtype=settings.dtype, device=settings.device,
                                  seed=settings.seed, repeats=settings.repeats), settings.output)


def _bench_train_sweep(settings: TrainBenchSettings) -> dict:
    from .train_sweep import plot_sweep, run_sweep, sweep_table

    sweep = run_sweep(settings.model, settings.batch_size, settings.seq_len, settings.num_aux_heads,
                      settings.sweep_seq_lens, settings.sweep_aux_heads, settings.sweep_vocab_sizes, settings.steps,
                      settings.warmup, settings.dtype, settings.device, settings.seed, settings.repeats)
    print(sweep_table(sweep))
    if settings.output:
        check_new_file(settings.output, "--output")
        write_json(settings.output, sweep)
    if settings.plot:
        check_new_file(settings.plot, "--plot")
        plot_sweep(sweep, settings.plot)
    return sweep


def bench_precision_command(settings: PrecisionBenchSettings) -> dict:
    """bf16 autocast against float32 over the first steps of a real `caft finetune` run.

    The same run (data, seed, mode, heads, learning-rate and gamma schedules of the whole run) is started twice,
    with `--mixed-precision no` and `bf16`, each in a fresh process and stopped after `--steps` optimisation
    steps, without head warm-up. Prints JSON with `time_ratio` (median step time, bf16 / float32),
    `peak_memory_ratio` (peak memory during training, of the kind `memory_kind` names),
    `largest_relative_loss_difference` (over the steps and the heads, of each head's training loss) and
    `within_tolerance`.
    """
    from .precision import bench_precision

    _check_output(settings.output)
    result = bench_precision(settings.finetune_settings(), steps=settings.steps, tolerance=settings.tolerance)
    return print_json(result, settings.output)


def bench_distill_command(settings: DistillSettings, where: DistillBenchOutput) -> dict:
    """Self-distillation in this process against an OpenAI-compatible server (--server), on the same prompts.

    Both sides answer the first --max-samples prompts (give a few, e.g. 32) with the same settings, one after the
    other, into temporary files: this process with the model already loaded, batches of --batch-size; the server
    after caftkit's check, --concurrency requests in flight. Prints new tokens per second of each side and
    `server_over_in_process`, how many answers are the same text, and for the others the answer token where they
    first part. Serve the model in the dtype given here (--dtype) for answers that can agree.
    """
    from .distillation import run_distill_bench

    _check_output(where.output)
    return print_json(run_distill_bench(settings), where.output)
