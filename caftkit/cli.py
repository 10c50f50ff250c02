"""The `caft` command line: each command is one plain function whose docstring is its `--help`.

Every command takes `--config FILE.yaml` whose keys are the command's flags (dashes or underscores); flags
given on the command line override the file, and the file overrides the defaults.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def bench_train(
    model: str = "smollm2-135m-instruct",
    batch_size: int = 4,
    seq_len: int = 512,
    num_heads: int = 4,
    steps: int = 5,
    warmup: int = 1,
    dtype: str = "float32",
    device: str = "auto",
    seed: int = 0,
    output: str | None = None,
) -> dict:
    """Time and peak memory of a CAFT training step against plain next-token fine-tuning.

    Both sides train every weight but the unembedding (frozen in both) on the same random tokens, every
    position labelled; each runs in a fresh process. Prints JSON with `time_ratio` (median step time, CAFT /
    plain), `peak_memory_ratio` and `flop_floor_time_ratio` (the ratio the extra matrix multiplies alone imply).

    Args:
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        num_heads: auxiliary heads of the CAFT side (frozen, as in CAFT fine-tuning).
        steps: timed steps per side (the median is reported).
        warmup: untimed steps before them.
        dtype: float32, bfloat16 or float16.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
        seed: seed of the random tokens.
        output: also write the JSON to this file.
    """
    from .bench.train_step import bench_train as run

    result = run(model=model, batch_size=batch_size, seq_len=seq_len, num_heads=num_heads, steps=steps,
                 warmup=warmup, dtype=dtype, device=device, seed=seed)
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return result


def bench_precision(
    data: str,
    model: str = "smollm2-135m-instruct",
    mode: str = "caft",
    method: str = "lora",
    heads: str | None = None,
    steps: int = 20,
    tolerance: float = 0.02,
    seed: int = 0,
    device: str = "auto",
    finetune: str | None = None,
    output: str | None = None,
) -> dict:
    """bf16 autocast against float32 over the first steps of a real `caft finetune` run.

    The same run (data, seed, mode, heads, learning-rate and gamma schedules of the whole run) is started twice,
    with `--mixed-precision no` and `bf16`, each in a fresh process and stopped after `--steps` optimisation
    steps, without head warm-up. Prints JSON with `time_ratio` (median step time, bf16 / float32),
    `peak_memory_ratio` (peak memory during training), `largest_relative_loss_difference` (over the steps and
    the heads, of each head's training loss) and `within_tolerance`.

    Args:
        data: the task's training records, as for `caft finetune`.
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        mode: caft or ntp.
        method: lora or full.
        heads: a heads folder from `caft train-heads` (caft mode).
        steps: optimisation steps per side.
        tolerance: the largest relative loss difference accepted (0.02: 2%).
        seed: seed of the run (split, shuffling, LoRA initialisation, dropout), the same on both sides.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
        finetune: further `caft finetune` settings, as a YAML mapping (e.g. `{batch_size: 8, epochs: 1}`).
        output: also write the JSON to this file.
    """
    from .bench.precision import bench_precision as run
    from .training.finetuning import FinetuneSettings

    extra = _settings_mapping("--finetune", finetune)
    given = {"model", "data", "mode", "method", "heads", "seed", "device", "mixed_precision"}
    unknown = sorted(set(extra) - set(FinetuneSettings.__dataclass_fields__) | set(extra) & given)
    if unknown:
        raise CLIError(f"--finetune: {unknown} are not further finetune settings (the flags of this command, and "
                       f"mixed_precision, are set by it); see `caft finetune --help`")
    settings = FinetuneSettings(model=model, data=data, mode=mode, method=method, heads=heads, seed=seed,
                                device=device, **extra)
    result = run(settings, steps=steps, tolerance=tolerance)
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return result


def bench_generate(
    model: str = "smollm2-135m-instruct",
    heads: str | None = None,
    data: str = "sharegpt",
    exclude: str | None = None,
    skip: int = 0,
    num_prompts: int = 16,
    batch_sizes: str = "1,8",
    max_new_tokens: int = 128,
    drafts: str | None = None,
    dtype: str = "float32",
    draft_dtype: str | None = None,
    device: str = "auto",
    output: str | None = None,
) -> dict:
    """Plain greedy `generate()` against self-speculative decoding with the heads, on the same prompts.

    Both sides run in this process on the same batches (chat template applied, prompts grouped by length,
    left-padded), after an untimed warm-up; each batch is decoded plainly and then with every draft shape. Prints,
    per batch size and draft shape, new tokens per second of each side, the speedup, the mean tokens accepted per
    verification pass, and how many answers are token for token the same (all should be). The speedup is split
    into `pass_reduction` (plain forward passes over speculative ones: what the heads save) and `pass_cost` (a
    speculative pass's time in plain one-token steps: what the device charges): speedup = pass_reduction /
    pass_cost.

    Args:
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        heads: heads folder (from `caft train-heads` or `caft export`) (required).
        data: prompts: `sharegpt` (the bundled set) or a JSONL/JSON file of conversations.
        exclude: a JSONL file whose record ids are left out (e.g. the distilled data the heads learned from).
        skip: skip this many usable prompts first.
        num_prompts: prompts to generate for.
        batch_sizes: comma-separated batch sizes to measure.
        max_new_tokens: most new tokens per answer.
        drafts: comma-separated draft shapes to measure: H (a chain through the first H heads), HxK (a tree
            through the top K candidates of H heads) or HxK:N (that tree cut to its N likeliest drafts per pass);
            default: a chain through all heads.
        dtype: float32, bfloat16 or float16.
        draft_dtype: draft with the heads in this dtype (e.g. bfloat16 for a float32 model: cheaper drafts, the
            model still verifies in --dtype); default: --dtype.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
        output: also write the JSON to this file.
    """
    from .bench.generation import DraftShape, bench_prompts, rows_as_dict
    from .bench.generation import bench_generate as run
    from .core.heads import attach_heads, get_heads
    from .models import load_model, load_tokenizer, parse_dtype, resolve_device

    if heads is None:
        raise CLIError("missing --heads (a heads folder to draft with)")
    device = resolve_device(device)
    if draft_dtype is not None:
        parse_dtype(draft_dtype)  # a typo fails before anything loads
    try:  # before any loading: a typo should not cost the wait
        shapes = [DraftShape.parse(text) for text in str(drafts).split(",") if text.strip()] if drafts else None
    except ValueError as error:
        raise CLIError(f"--drafts: {error}") from None
    tokenizer = load_tokenizer(model)
    prompts = bench_prompts(tokenizer, data, num_prompts, skip=skip, exclude=exclude)
    loaded = load_model(model, dtype).to(device)
    attach_heads(loaded, heads)
    shapes = shapes or [DraftShape(get_heads(loaded).num_heads)]
    sizes = [int(size) for size in str(batch_sizes).split(",") if size.strip()]
    rows = rows_as_dict(run(loaded, tokenizer, prompts, sizes, max_new_tokens, shapes, draft_dtype))
    result = {"model": model, "heads": heads, "device": device, "dtype": dtype, "draft_dtype": draft_dtype or dtype,
              "max_new_tokens": max_new_tokens, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return result


def generate(
    prompt: str,
    model: str = "smollm2-135m-instruct",
    heads: str | None = None,
    speculative: bool = False,
    num_heads: int | None = None,
    top_k: int = 1,
    tree_size: int | None = None,
    max_new_tokens: int = 256,
    system: str | None = None,
    dtype: str = "float32",
    draft_dtype: str | None = None,
    device: str = "auto",
) -> dict:
    """Answer a prompt with greedy decoding through the model's chat template, streaming to the terminal.

    With --speculative the auxiliary heads draft several tokens per forward pass and the model verifies them:
    the text is the same as without, only faster when the heads guess well.

    Args:
        prompt: the user message.
        model: transformers model id, local folder (e.g. from `caft export`), or the bundled
            `smollm2-135m-instruct`.
        heads: heads folder for --speculative (from `caft train-heads`, or `<model>-heads` from `caft export`).
        speculative: draft with the heads (self-speculative decoding).
        num_heads: heads used for drafting (default: all).
        top_k: candidates per head; above 1, each pass verifies a tree of drafts instead of a chain.
        tree_size: drafts verified per pass with --top-k above 1 (default: num_heads * top_k).
        max_new_tokens: most new tokens.
        system: an optional system message.
        dtype: float32, bfloat16 or float16.
        draft_dtype: with --speculative, draft with the heads in this dtype (e.g. bfloat16 for a float32 model:
            cheaper drafts, same text); default: --dtype.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
    """
    import torch

    from .core.heads import attach_heads
    from .data import render_prompt
    from .decoding.greedy import stop_token_ids
    from .decoding.speculative import generate as speculative_generate
    from .models import load_model, load_tokenizer, parse_dtype, resolve_device

    if speculative and heads is None:
        raise CLIError("--speculative needs --heads (a heads folder)")
    device = resolve_device(device)
    if draft_dtype is not None:
        parse_dtype(draft_dtype)  # a typo fails before anything loads
    tokenizer = load_tokenizer(model)
    loaded = load_model(model, dtype).to(device).eval()
    if speculative:
        attach_heads(loaded, heads)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    stop_ids = stop_token_ids(loaded, tokenizer)
    answer: list[int] = []
    shown = ""

    def show(_row: int, tokens: list[int]) -> None:
        nonlocal shown
        answer.extend(tokens)
        # Decode the whole answer each time: a character may span tokens that arrive in different steps.
        text = tokenizer.decode(answer, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text

    started = time.perf_counter()
    if speculative:
        result = speculative_generate(loaded, input_ids=ids, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                      num_heads=num_heads, top_k=top_k, tree_size=tree_size, on_tokens=show,
                                      draft_dtype=draft_dtype)
        passes, accepted = result.forward_passes, result.mean_accepted
    else:
        from transformers.generation.streamers import BaseStreamer

        class TokenStream(BaseStreamer):
            """Hands each generated token to `show`; the first `put` is the prompt."""

            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                show(0, value.reshape(-1).tolist())

            def end(self):
                pass

        with torch.no_grad():
            loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=stop_ids, streamer=TokenStream(), top_k=None, top_p=None,
                            temperature=None, pad_token_id=tokenizer.pad_token_id or stop_ids[0])
        passes, accepted = len(answer), 1.0  # one token per forward pass
    seconds = time.perf_counter() - started
    print()
    new_tokens = len(answer)
    print(f"[{new_tokens} tokens in {seconds:.2f} s, {new_tokens / max(seconds, 1e-9):.1f} tokens/s, "
          f"{passes} forward passes, {accepted:.2f} tokens per pass]", file=sys.stderr)
    return {"tokens": answer, "seconds": seconds, "forward_passes": passes, "mean_accepted": accepted}


def distill(
    output: str = "distilled.jsonl",
    model: str = "smollm2-135m-instruct",
    data: str = "sharegpt",
    max_samples: int | None = 1000,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 512,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
) -> dict:
    """Generate the base model's own answers to a set of prompts (self-distillation) as `messages` JSONL.

    Each prompt is the first user turn of a conversation, rendered with the model's chat template; each output
    line holds the source id, the prompt and answer as `messages`, why generation stopped (`end_of_turn` or
    `max_new_tokens`) and the number of new tokens. Rerunning the same command resumes: ids already written are
    skipped and a half-written last line is redone. Settings and counts are kept in `<output stem>.meta.json`.

    Args:
        output: JSONL file to write (appended to when it exists).
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        data: `sharegpt` (the bundled ShareGPT prompts) or a JSONL/JSON file of `messages`, `prompt`/`completion`
            or ShareGPT `conversations` records.
        max_samples: number of prompts to answer (the first ones that fit); 0 or none for all.
        max_new_tokens: most tokens generated per answer.
        max_prompt_tokens: prompts longer than this (chat template included) are skipped and counted.
        batch_size: prompts generated together (grouped by length, left-padded).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling threshold when sampling.
        seed: sampling seed (each batch is seeded from it, so resumed runs sample the same).
        dtype: float32, bfloat16 or float16.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
    """
    from .models import load_model, load_tokenizer, resolve_device
    from .training.distill import DistillSettings
    from .training.distill import distill as run

    device = resolve_device(device)

    settings = DistillSettings(model=model, data=data, max_new_tokens=max_new_tokens,
                               max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, temperature=temperature,
                               top_p=top_p, seed=seed, dtype=dtype, max_samples=max_samples or None)
    if batch_size < 1 or max_new_tokens < 1:
        raise CLIError("batch-size and max-new-tokens must be at least 1")
    tokenizer = load_tokenizer(model)
    summary = run(lambda: load_model(model, dtype).to(device), tokenizer, output, settings)
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items()) or "none"
    tail = " (the file ends mid-record: its complete records were read)" if summary.source_truncated_tail else ""
    print(f"read {summary.records_read} records{tail}; skipped: {skipped}")
    print(f"{summary.prompts_selected} prompts selected, {summary.already_done} already in {output}, "
          f"{summary.generated} generated; stop reasons: {summary.stop_reasons or 'none'}")
    print(f"{summary.new_tokens} new tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s); "
          f"{summary.written_total} records in {output}")
    return summary.__dict__


def train_heads(
    data: str,
    output: str = "heads",
    model: str = "smollm2-135m-instruct",
    init: str | None = None,
    num_heads: int = 4,
    alpha: float = 0.8,
    epochs: float = 2.0,
    learning_rate: float = 1e-3,
    lr_scheduler: str = "cosine",
    warmup: float = 0.05,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 1024,
    eval_fraction: float = 0.05,
    eval_steps: int | None = None,
    save_steps: int = 50,
    logging_steps: int = 5,
    resume: bool = False,
    keep_checkpoints: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    mixed_precision: str = "auto",
    trunk_cache_gb: float = 4.0,
    device: str = "auto",
    report_to: str = "none",
) -> dict:
    """Train the auxiliary heads (paper eq. 3) with the base model frozen, and write a `heads/` folder.

    Each head is a copy of the last decoder layer that learns to predict token t+k (k = 2..num_heads+1) through
    the model's own final norm and unembedding; the loss is sum_k alpha^(k-2) CE_k over the assistant tokens.
    Train once per base model on self-distilled data (`caft distill`); for a task whose tokens the heads
    predict badly (auxiliary loss L2 > 4), warm them up with one epoch on the task's training set:
    `caft train-heads --data task.jsonl --init heads/ --output task-heads/`.

    The folder gets `heads.safetensors`, `heads_config.json` (training settings, and each head's held-out loss
    and top-1 accuracy before and after), `log_history.json` and `loss_curves.png`.

    Args:
        data: JSONL/JSON file of `messages`, `prompt`/`completion` or ShareGPT `conversations` records
            (e.g. the output of `caft distill`).
        output: the heads folder to write.
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        init: a heads folder to start from (the task warm-up); new heads are copies of the last layer otherwise.
        num_heads: auxiliary heads to train (with --init, at most as many as the folder has).
        alpha: decay of the per-head weights alpha^(k-2).
        epochs: passes over the training split.
        learning_rate: peak AdamW learning rate.
        lr_scheduler: a transformers scheduler name (cosine, linear, constant, ...).
        warmup: warm-up steps, or a fraction of all steps when below 1.
        batch_size: sequences per device and step.
        grad_accum: micro-batches accumulated per optimisation step.
        max_length: longer conversations are truncated to this many tokens (and counted).
        eval_fraction: fraction of the records held out to measure each head's loss and accuracy.
        eval_steps: evaluate on the held-out split every this many steps (default: twice per epoch).
        save_steps: write a checkpoint every this many steps.
        logging_steps: log the per-head training losses every this many steps.
        resume: continue from the last checkpoint in `<output>/checkpoints/`.
        keep_checkpoints: keep `<output>/checkpoints/` after training ends.
        seed: seed of the split, the shuffling and the optimizer.
        dtype: float32, bfloat16 or float16 (the dtype the weights are loaded and kept in).
        mixed_precision: auto (bf16 autocast where the device multiplies bf16 natively: recent GPUs, CPUs with
            AVX512-BF16 or AMX), bf16, or no.
        trunk_cache_gb: keep up to this many GB of the frozen base's outputs per batch, so that later epochs and
            held-out evaluations run only the heads (batches are then fixed, their order reshuffled each epoch);
            0 turns it off.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
        report_to: where to log besides the console: none, or comma-separated integrations (tensorboard, trackio).
    """
    from .core.distributed import is_main_process
    from .training.head_training import HeadTrainingSettings, format_head_table
    from .training.head_training import train_heads as run

    settings = HeadTrainingSettings(
        model=model, data=data, init=init, num_heads=num_heads, alpha=alpha, epochs=epochs,
        learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup=warmup, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, eval_fraction=eval_fraction, eval_steps=eval_steps,
        save_steps=save_steps, logging_steps=logging_steps, seed=seed, dtype=dtype, mixed_precision=mixed_precision,
        trunk_cache_gb=trunk_cache_gb, device=device, report_to=_report_to(report_to))
    summary = run(output, settings, resume=resume, keep_checkpoints=keep_checkpoints)
    if not is_main_process():  # under a launcher, one process reports
        return summary
    print(f"{summary['train_examples']} training and {summary['held_out_examples']} held-out examples, "
          f"{summary['optimizer_steps']} steps; data: {summary['data']}")
    print("held-out loss and top-1 accuracy per head:")
    print(format_head_table(summary["held_out_before"], summary["held_out_after"]))
    print(f"heads written to {output}")
    return summary


def finetune(
    data: str,
    output: str = "run",
    model: str = "smollm2-135m-instruct",
    heads: str | None = None,
    mode: str = "caft",
    method: str = "lora",
    head_warmup: str = "no",
    num_heads: int = 4,
    alpha: float = 0.8,
    beta: float = 0.01,
    schedule: str = "rsine",
    train_heads: bool = False,
    freeze_unembedding: bool = True,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    epochs: float = 1.0,
    learning_rate: float | None = None,
    lr_scheduler: str = "cosine",
    warmup: float = 0.03,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 1024,
    eval_fraction: float = 0.1,
    eval_steps: int | None = None,
    save_steps: int = 100,
    logging_steps: int = 5,
    resume: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    mixed_precision: str = "no",
    device: str = "auto",
    report_to: str = "none",
) -> dict:
    """Fine-tune a model on a task with CAFT (paper eq. 4), or the plain next-token baseline (`--mode ntp`).

    The loss is L = CE_1 + beta * gamma(step) * sum_{k=2..n} alpha^(k-1) * CE_k over the assistant tokens, with
    the auxiliary heads of `--heads` (from `caft train-heads`) frozen; `--mode ntp` trains with CE_1 alone and
    everything else identical, for comparison. The run folder gets checkpoints, `final/` (LoRA adapter or full
    weights, without heads), `heads/`, `caft_run.json`, `log_history.json` and `head_losses.png`; turn it into
    a plain transformers model with `caft export`.

    Args:
        data: JSONL/JSON file of `messages`, `prompt`/`completion` or ShareGPT `conversations` records.
        output: the run folder.
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        heads: a heads folder from `caft train-heads` (caft mode).
        mode: caft, or ntp for the plain next-token baseline.
        method: lora (rank 8, alpha 16, dropout 0.1 on every linear projection of the decoder layers, heads
            excluded) or full (every weight but the unembedding).
        head_warmup: no; yes (one epoch of head training on the task's training split first); or auto (the
            warm-up runs when the first auxiliary loss L2 on the held-out split exceeds 4.0 at the start).
        num_heads: auxiliary heads (with --heads, at most as many as the folder has).
        alpha: decay of the auxiliary weights alpha^(k-1).
        beta: overall weight of the auxiliary losses.
        schedule: gamma(step): rsine (high early, low late), sine, linear or constant.
        train_heads: also train the auxiliary heads during fine-tuning.
        freeze_unembedding: keep lm_head frozen in full fine-tuning (with tied embeddings, the input embeddings too).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling alpha.
        lora_dropout: LoRA dropout.
        epochs: passes over the training split.
        learning_rate: peak learning rate (default 2e-4 for lora, 2e-5 for full).
        lr_scheduler: a transformers scheduler name (cosine, linear, constant, ...).
        warmup: warm-up steps, or a fraction of all steps when below 1.
        batch_size: sequences per device and step.
        grad_accum: micro-batches accumulated per optimisation step.
        max_length: longer conversations are truncated to this many tokens (and counted).
        eval_fraction: fraction of the records held out for evaluation.
        eval_steps: evaluate every this many steps (default: twice per epoch).
        save_steps: write a checkpoint every this many steps.
        logging_steps: log the losses every this many steps.
        resume: continue from the last checkpoint in the run folder.
        seed: seed of the split, the shuffling, LoRA initialisation and dropout.
        dtype: float32, bfloat16 or float16 (the dtype the weights are loaded and kept in).
        mixed_precision: no, bf16 (autocast), or auto (bf16 where the device multiplies bf16 natively).
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
        report_to: where to log besides the console: none, or comma-separated integrations (tensorboard, trackio).
    """
    from .core.distributed import is_main_process
    from .training.finetuning import FinetuneSettings
    from .training.finetuning import finetune as run

    settings = FinetuneSettings(
        model=model, data=data, heads=heads, mode=mode, method=method, head_warmup=head_warmup, num_heads=num_heads,
        alpha=alpha, beta=beta, schedule=schedule, train_heads=train_heads, freeze_unembedding=freeze_unembedding,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, epochs=epochs,
        learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup=warmup, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, eval_fraction=eval_fraction, eval_steps=eval_steps,
        save_steps=save_steps, logging_steps=logging_steps, seed=seed, dtype=dtype, mixed_precision=mixed_precision,
        device=device, report_to=_report_to(report_to))
    summary = run(output, settings, resume=resume)
    if not is_main_process():  # under a launcher, one process reports
        return summary
    print(f"{summary['train_examples']} training and {summary['held_out_examples']} held-out examples, "
          f"{summary['optimizer_steps']} steps; data: {summary['data']}")
    for name, metrics in summary["held_out_per_head"].items():
        print(f"held-out {name}: loss {metrics['loss']:.4f}, top-1 accuracy {metrics['accuracy']:.4f}")
    print(f"run written to {output}; next: caft export {output} --out model")
    return summary


def export(run: str, /, out: str = "model", heads_out: str | None = None, dtype: str | None = None) -> dict:
    """Export a `caft finetune` run as a plain transformers model: LoRA merged, heads stripped.

    The model folder gets the weights, config, tokenizer and a model card (base, data, CAFT settings, final
    held-out metrics), and loads with `AutoModelForCausalLM.from_pretrained` without caftkit. The heads the run
    used are copied beside it, for reuse and for speculative decoding, recorded as heads of the exported model
    (`caft generate --model OUT --heads OUT-heads --speculative` accepts the pair).

    Args:
        run: the run folder written by `caft finetune`.
        out: the model folder to write.
        heads_out: where to copy the heads (default: `<out>-heads`).
        dtype: dtype of the saved weights (default: the one the run trained in).
    """
    from .training.export import export_run

    written = export_run(run, out, heads_out, dtype)
    print(f"model written to {written['model']}" + (f"; heads to {written['heads']}" if written["heads"] else ""))
    return written


def eval_task(
    model: str,
    task: str,
    data: str | None = None,
    output: str | None = None,
    heads: str | None = None,
    max_examples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    max_length: int = 1024,
    seed: int = 0,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    dtype: str = "float32",
    device: str = "auto",
) -> dict:
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

    Args:
        model: transformers model id, local folder (e.g. from `caft export`), or the bundled
            `smollm2-135m-instruct`.
        task: molecules, humaneval or loss.
        data: molecules: `moses:test` (default), `moses:train` or a JSONL of molecule records (`caft data
            molecules`); humaneval: a problems JSONL (default: the bundled HumanEval set); loss: a JSONL/JSON
            file of conversations (required).
        output: folder for metrics.json, examples.jsonl and generations.jsonl (default: eval-<task>).
        heads: a heads folder to score (loss task).
        max_examples: score only the first this many examples.
        max_new_tokens: most tokens per answer (default: 96 for molecules, 512 for humaneval).
        batch_size: prompts generated (or conversations scored) together.
        max_length: loss task: conversations are truncated to this many tokens.
        seed: order of the molecules drawn from a MOSES split.
        timeout_s: humaneval: wall-clock limit of one program.
        memory_mb: humaneval: address-space limit of one program.
        workers: humaneval: programs run in parallel.
        dtype: float32, bfloat16 or float16.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
    """
    from .evaluation.task_eval import EvalSettings, evaluate, format_metrics

    settings = EvalSettings(model=model, task=task, data=data, heads=heads, max_examples=max_examples or None,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length, seed=seed,
                            timeout_s=timeout_s, memory_mb=memory_mb, workers=workers, dtype=dtype, device=device)
    output = output or f"eval-{task}"
    result = evaluate(output, settings)
    print(format_metrics(result["metrics"]))
    print(f"results written to {output}")
    return result


def compare(
    train_data: str,
    output: str = "compare",
    model: str = "smollm2-135m-instruct",
    task: str = "molecules",
    test_data: str | None = None,
    test_examples: int | None = 500,
    heads: str | None = None,
    head_warmup: str = "yes",
    method: str = "lora",
    seeds: str = "0",
    finetune: str | None = None,
    arms: str | None = None,
    max_new_tokens: int | None = None,
    eval_batch_size: int = 16,
    n_resamples: int = 10000,
    dtype: str = "float32",
    device: str = "auto",
) -> dict:
    """Fine-tune with next-token loss and with CAFT on the same data, seeds and steps; evaluate every arm; report.

    Each arm is fine-tuned with `caft finetune` (its mode, method, seeds, heads and warm-up, and the shared
    settings with its own overrides), exported and scored on the same test examples with `caft eval`. Without
    --arms there are two, ntp and caft, alike in everything but the loss. `report.md` gives, for each caft arm
    against its baseline (the ntp arm of the same method unless it names one), each metric, the difference and
    its 95% confidence interval (paired bootstrap over the test examples, and over the seeds both arms ran), the
    per-seed values, and the heads' held-out top-1 accuracy before and after warm-up. Rerunning the command
    resumes: finished runs, exports and evaluations are kept when made with the same settings, an interrupted run
    continues from its last checkpoint.

    Args:
        train_data: the task's training records (e.g. from `caft data molecules`).
        output: the comparison folder.
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        task: molecules or humaneval (how the exported models are scored; see `caft eval`).
        test_data: the test examples (default: `moses:test` for molecules, the bundled HumanEval set).
        test_examples: score the first this many test examples; 0 or none for all.
        heads: heads folder of the caft arms (from `caft train-heads`); the default of every arm.
        head_warmup: no, yes or auto: the caft arms' head warm-up on the task (see `caft finetune`).
        method: lora or full; the default of every arm.
        seeds: training seeds, comma-separated on the command line or a YAML list; the default of every arm.
        finetune: further `caft finetune` settings shared by every arm, as a YAML mapping (e.g. `{epochs: 1,
            batch_size: 16}`).
        arms: the arms, as a YAML mapping from a name to its settings: mode (ntp or caft, required), method,
            seeds, heads, head_warmup, baseline (caft arms: the ntp arm to measure against) and finetune (its
            overrides of the shared settings), e.g. `{ntp: {mode: ntp}, caft-beta0.5: {mode: caft, finetune:
            {beta: 0.5}}}`. Default: ntp and caft.
        max_new_tokens: most tokens per answer in the evaluation (default: the task's).
        eval_batch_size: prompts generated together in the evaluation.
        n_resamples: bootstrap resamples of the confidence intervals.
        dtype: float32, bfloat16 or float16.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
    """
    from .workflows.compare import REPORT_FILE, CompareSettings
    from .workflows.compare import compare as run

    seed_list = seeds if isinstance(seeds, list) else [int(s) for s in str(seeds).split(",") if s.strip()]
    settings = CompareSettings(train_data=train_data, model=model, task=task, test_data=test_data,
                               test_examples=test_examples or None, heads=heads, head_warmup=head_warmup,
                               method=method, seeds=seed_list, finetune=_settings_mapping("--finetune", finetune),
                               arms=_settings_mapping("--arms", arms) or None, max_new_tokens=max_new_tokens,
                               eval_batch_size=eval_batch_size, n_resamples=n_resamples, dtype=dtype, device=device)
    result = run(output, settings)
    for comparison in result["comparisons"]:
        arm, baseline = comparison["arm"], comparison["baseline"]
        print(f"{arm} against {baseline}, seeds {', '.join(map(str, comparison['seeds']))}:")
        for row in comparison["rows"]:
            print(f"  {row['metric']:<14} {baseline} {row['ntp']:.4f}  {arm} {row['caft']:.4f}  "
                  f"difference {row['difference']:+.4f}  95% CI [{row['low']:+.4f}, {row['high']:+.4f}]")
    print(f"report written to {Path(output) / REPORT_FILE}")
    return result


def env() -> dict:
    """Print the versions caftkit runs with and what the machine offers it, as JSON.

    Python, platform, the versions of caftkit, torch, transformers, TRL, PEFT, accelerate, datasets and
    safetensors, the CPU cores and torch threads, and each CUDA GPU, each with whether it multiplies bf16
    natively (where `--mixed-precision auto` turns bf16 autocast on). Paste it into a bug report.
    """
    from .environment import environment

    result = environment()
    print(json.dumps(result, indent=2))
    return result


def _settings_mapping(flag: str, value: str | dict | None) -> dict:
    """A YAML mapping of further settings given on the command line (text) or in a config file (a mapping)."""
    mapping = yaml.safe_load(value) if isinstance(value, str) else value
    if mapping is not None and not isinstance(mapping, dict):
        raise CLIError(f"{flag} must be a mapping of settings, got {value!r}")
    return mapping or {}


def _report_to(value: str) -> list[str]:
    return [] if value in ("", "none") else [name.strip() for name in value.split(",")]


def demo(
    output: str = "demo-output",
    model: str = "smollm2-135m-instruct",
    distill_prompts: int = 48,
    distill_new_tokens: int = 96,
    molecules: int = 320,
    eval_molecules: int = 40,
    device: str = "auto",
) -> dict:
    """Run the whole CAFT pipeline on a small scale: distil, train heads, warm up, fine-tune, export, evaluate.

    Self-distils a few ShareGPT prompts, trains general heads on the answers, builds molecule-design records
    from MOSES, warms the heads up on them and fine-tunes with CAFT and LoRA, exports a plain transformers
    model, and scores its greedy answers to held-out MOSES test prompts (valid SMILES, formula match, groups
    present). A rerun reuses the stages already done. Prints where each artefact is and what to run next.

    Args:
        output: folder for every artefact.
        model: transformers model id, local folder, or the bundled `smollm2-135m-instruct`.
        distill_prompts: ShareGPT prompts to self-distil.
        distill_new_tokens: most tokens per distilled answer.
        molecules: molecule-design records from the MOSES train split to fine-tune on (some held out).
        eval_molecules: MOSES test molecules to score the exported model on.
        device: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or another torch device.
    """
    from .workflows.demo import DemoSizes, run_demo

    started = time.perf_counter()
    report = run_demo(output, model, DemoSizes(distill_prompts=distill_prompts, distill_new_tokens=distill_new_tokens,
                                              molecules=molecules, eval_molecules=eval_molecules), device)
    artefacts = report["artefacts"]
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Artefacts:")
    for name, path in artefacts.items():
        print(f"  {name:<12} {path}")
    print("next:")
    print(f"  caft train-heads --data {artefacts['distilled']} --output heads      # heads on more data")
    print(f"  caft finetune --data {artefacts['task_data']} --heads {artefacts['heads']} --output run")
    print("  caft export run --out model")
    return report


def data_molecules(
    out: str,
    smiles: str = "moses:train",
    n: int | None = 1000,
    seed: int = 0,
) -> dict:
    """Build molecule-design records (`messages` JSONL) from SMILES with RDKit.

    The user asks for a molecule with a given molecular formula that contains given functional groups; the
    assistant answers with the canonical SMILES. A `meta` field keeps the formula, the groups and the SMILES.
    The groups (name: SMARTS) are fixed: benzene ring c1ccccc1, amide [CX3](=O)[NX3], carboxylic acid
    [CX3](=O)[OX2H1], ester [#6][CX3](=O)[OX2H0][#6], ketone [#6][CX3](=O)[#6], hydroxyl [OX2H][CX4,c],
    primary amine [NX3;H2][#6], nitrile C#N, sulfonamide S(=O)(=O)N, fluoro [F], chloro [Cl], bromo [Br],
    ether [OD2]([#6])[#6]. Invalid SMILES, molecules with none of the groups and duplicates are skipped and
    counted.

    Args:
        out: JSONL file to write.
        smiles: `moses:train` or `moses:test` (the MOSES sets of the `molsets` package), a text file with one
            SMILES per line, or a CSV file with a SMILES column (optionally .gz).
        n: number of records (molecules drawn in a seeded random order); 0 or none for all.
        seed: seed of the order.
    """
    from .tasks.molecules import write_molecule_records

    stats = write_molecule_records(smiles, out, n=n or None, seed=seed)
    skipped = ", ".join(f"{count} {reason}" for reason, count in stats.skipped.items()) or "none"
    print(f"{stats.written} records written to {out} from {stats.read} molecules read; skipped: {skipped}")
    return stats.__dict__


# Command name -> function; a name with a space is a sub-command ("bench train").
COMMANDS: dict[str, Callable[..., Any]] = {
    "distill": distill,
    "train-heads": train_heads,
    "finetune": finetune,
    "export": export,
    "eval": eval_task,
    "compare": compare,
    "data molecules": data_molecules,
    "demo": demo,
    "generate": generate,
    "bench train": bench_train,
    "bench generate": bench_generate,
    "bench precision": bench_precision,
    "env": env,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _param_help(doc: str) -> dict[str, str]:
    helps, current = {}, None
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        # `inspect.getdoc` removes the common indent: parameters sit 4 spaces in, their continuations deeper.
        if match and line.startswith(" " * 4) and not line.startswith(" " * 5):
            current = match.group(1)
            helps[current] = match.group(2)
        elif stripped and current:
            helps[current] += " " + stripped
    return helps


def _converter(annotation) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if base is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    return base if base in (int, float) else str


def _add_command(subparsers, name: str, function: Callable) -> argparse.ArgumentParser:
    doc = inspect.getdoc(function) or ""
    summary, _, body = doc.partition("\n\n")
    description = body.split("Args:")[0].strip()
    parser = subparsers.add_parser(name, help=summary, description=f"{summary}\n\n{description}".strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   argument_default=argparse.SUPPRESS)
    helps = _param_help(doc)
    hints = typing.get_type_hints(function)
    parser.add_argument("--config", help="YAML file whose keys are this command's flags")
    for param in inspect.signature(function).parameters.values():
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            # `caft export RUN`: a positional-only parameter is a positional argument (or a config key).
            parser.add_argument(param.name, nargs="?", default=argparse.SUPPRESS, metavar=param.name.upper(),
                                help=helps.get(param.name, ""))
            continue
        flag = "--" + param.name.replace("_", "-")
        default = "" if param.default is inspect.Parameter.empty else f" (default: {param.default})"
        hint = hints.get(param.name, str)
        # A bare boolean flag (`--resume`) means true; `--resume false` still works, as does a YAML value.
        extra = {"nargs": "?", "const": True} if bool in (hint, *typing.get_args(hint)) else {}
        required = " (required)" if param.default is inspect.Parameter.empty else ""
        parser.add_argument(flag, dest=param.name, type=_converter(hint),
                            help=helps.get(param.name, "") + default + required, **extra)
    parser.set_defaults(_function=function)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The `caft` argument parser with every command."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="caft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"caft {__version__}")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    for name, function in COMMANDS.items():
        if " " in name:
            group, sub = name.split(" ", 1)
            if group not in groups:
                group_parser = top.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(dest="subcommand", required=True)
            _add_command(groups[group], sub, function)
        else:
            _add_command(top, name, function)
    return parser


def load_config(path: str, function: Callable) -> dict[str, Any]:
    """Read a YAML config for `function`; unknown keys and malformed files are errors naming file and line."""
    config_path = Path(path)
    if not config_path.is_file():
        raise CLIError(f"{config_path}: config file not found")
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise CLIError(f"{config_path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise CLIError(f"{config_path}: expected a mapping of flag names to values")
    names = set(inspect.signature(function).parameters)
    config = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise CLIError(f"{config_path}: unknown key {key!r}; expected one of {', '.join(sorted(names))}")
        config[name] = value
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `caft` console script."""
    args = vars(build_parser().parse_args(argv))
    function = args.pop("_function")
    args.pop("command", None)
    args.pop("subcommand", None)
    config_path = args.pop("config", None)
    try:
        options = load_config(config_path, function) if config_path else {}
        options.update(args)
        parameters = inspect.signature(function).parameters
        missing = [name for name, param in parameters.items()
                   if param.default is inspect.Parameter.empty and name not in options]
        if missing:
            shown = [name.upper() if parameters[name].kind is inspect.Parameter.POSITIONAL_ONLY
                     else "--" + name.replace("_", "-") for name in missing]
            raise CLIError(f"missing {', '.join(shown)} (give it on the command line or in --config)")
        if "device" in parameters:
            from .models import resolve_device  # torch: imported only for commands that use a device

            # Checked before the command starts, so a typo or a missing GPU costs no loading.
            options["device"] = resolve_device(options.get("device", parameters["device"].default))
        positional = [options.pop(name) for name, param in parameters.items()
                      if param.kind is inspect.Parameter.POSITIONAL_ONLY]
        function(*positional, **options)
    except (CLIError, FileNotFoundError, ValueError) as error:
        print(f"caft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
