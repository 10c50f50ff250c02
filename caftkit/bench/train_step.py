"""`caft bench train`: the cost of a CAFT training step against plain next-token fine-tuning, side by side.

Each side runs in a fresh process so that its peak memory is its own. Both train every weight but the
unembedding (frozen in both: the paper's recommended full fine-tuning setting), on the same random tokens,
every position labelled. Three next-token baselines: `plain`, what a transformers user writes (`model(input_ids,
labels=...)`, full logits), `trl`, the loss of TRL's `SFTTrainer` as it computes it by default (`compute_loss`:
the model's fused LM head, which also scores entropy and token accuracy), and `ntp`, caftkit's own next-token
path (`caft finetune --mode ntp`: the main head through the fused chunked cross-entropy, no full logits). CAFT is
measured against each, and on a CUDA device with liger-kernel installed, against `liger` too (Liger's fused
linear cross-entropy). A last process takes `ntp` and CAFT steps in turn, for the time ratio against the FLOP floor.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..core.architecture import find_model_parts
from ..core.heads import attach_heads
from ..core.layer_call import capture_layer_inputs
from ..core.multitoken import head_statistics, weighted_loss
from ..core.weights import head_loss_weights
from ..models import (
    BUNDLED_MODEL,
    load_model,
    load_tokenizer,
    parse_dtype,
    pretrained_source,
    resolve_device,
    resolve_model_path,
)
from .memory import memory_bytes, memory_kind, peak_memory_bytes, reset_peak_memory

# The next-token baselines CAFT is measured against, then CAFT; each side runs in a fresh process, in this order.
BASELINES = ("plain", "trl", "ntp")
SIDES = (*BASELINES, "caft")
# One more process, after the sides: caftkit's next-token step and the CAFT step in turn (`run_paired`). Minutes
# apart, fresh processes of the same side differ by more than CAFT's margin over its FLOP floor on a shared machine;
# steps taken side by side do not, so CAFT's time against its floor is read from this process.
PAIRED = "ntp+caft"
# One more baseline where it can run: the next-token loss through Liger's fused linear cross-entropy (Triton kernels,
# CUDA only; the liger-kernel package is not a caftkit dependency). It goes before CAFT when measured.
LIGER = "liger"


@dataclass
class TrainBenchResult:
    """Measurements of one side (`plain`, `ntp` or `caft`) of `caft bench train`."""

    side: str
    step_seconds: list[float]
    median_step_seconds: float
    peak_memory_bytes: int
    memory_before_steps_bytes: int
    memory_kind: str
    loss: float


@dataclass
class PairedStepTimes:
    """Step times of caftkit's next-token step and of the CAFT step, taken in turn in one process (`run_paired`)."""

    side: str
    ntp_step_seconds: list[float]
    caft_step_seconds: list[float]
    ntp_loss: float
    caft_loss: float


def random_model(model_name: str, vocab_size: int, dtype: str):
    """`model_name`'s architecture with a vocabulary of `vocab_size` tokens and random weights (seeded by the caller's
    `torch.manual_seed`): what the cost of a step against the vocabulary is measured on."""
    path, offline = pretrained_source(model_name)
    config = AutoConfig.from_pretrained(path, **offline)
    config.get_text_config().vocab_size = vocab_size
    return AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))


def run_side(side: str, model_name: str, batch_size: int, seq_len: int, num_aux_heads: int, steps: int, warmup: int,
             dtype: str, device: str, seed: int, vocab_size: int | None = None) -> TrainBenchResult:
    """Measure one side in this process: `warmup` untimed steps, then `steps` timed forward+backward steps.

    With `vocab_size`, the model is `model_name`'s architecture with that vocabulary and random weights."""
    model, batch, device = _bench_model_and_batch(side, model_name, batch_size, seq_len, num_aux_heads, dtype, device,
                                                  seed, vocab_size)
    step = _step_function(side, model, batch, num_aux_heads, device, model_name)
    for _ in range(warmup):
        step()
    model.zero_grad(set_to_none=True)
    _synchronize(device)
    before = memory_bytes(device)
    reset_peak_memory(device)
    times, loss = [], float("nan")
    for _ in range(steps):
        seconds, loss = _timed(step, device)
        times.append(seconds)
    return TrainBenchResult(side, times, statistics.median(times), peak_memory_bytes(device), before,
                            memory_kind(device), loss)


def run_paired(model_name: str, batch_size: int, seq_len: int, num_aux_heads: int, steps: int, warmup: int,
               dtype: str, device: str, seed: int, vocab_size: int | None = None) -> PairedStepTimes:
    """Time caftkit's next-token step and the CAFT step in turn in this process, `steps` of each after `warmup` of
    each, on one model (the heads attached; the next-token step does not run them) and the same tokens.

    Each CAFT step is set beside the next-token step next to it in time, so a slow spell of the machine falls on
    both halves of a pair; which of the two goes first alternates from pair to pair."""
    model, batch, device = _bench_model_and_batch("caft", model_name, batch_size, seq_len, num_aux_heads, dtype,
                                                  device, seed, vocab_size)
    ntp_step = _step_function("ntp", model, batch, num_aux_heads, device, model_name)
    caft_step = _step_function("caft", model, batch, num_aux_heads, device, model_name)
    for _ in range(warmup):
        ntp_step()
        caft_step()
    times: dict[str, list[float]] = {"ntp": [], "caft": []}
    losses = {"ntp": float("nan"), "caft": float("nan")}
    for index in range(steps):
        pair = [("ntp", ntp_step), ("caft", caft_step)]
        for side, step in pair if index % 2 == 0 else reversed(pair):
            seconds, losses[side] = _timed(step, device)
            times[side].append(seconds)
    return PairedStepTimes(PAIRED, times["ntp"], times["caft"], losses["ntp"], losses["caft"])


def _bench_model_and_batch(side: str, model_name: str, batch_size: int, seq_len: int, num_aux_heads: int, dtype: str,
                           device: str, seed: int, vocab_size: int | None):
    """The model a side trains (the unembedding frozen; with `num_aux_heads` frozen heads on the CAFT side), the
    random batch of `seed`, every position labelled, and the device."""
    torch.manual_seed(seed)
    device = torch.device(device)
    if vocab_size is None:
        model = load_model(model_name, dtype=dtype)
    elif side == "trl":
        raise ValueError("the trl side runs the model's own tokenizer: it cannot take another vocabulary size")
    else:
        model = random_model(model_name, vocab_size, dtype)
    model.to(device).train()
    find_model_parts(model).lm_head.requires_grad_(False)
    if side == "caft":
        attach_heads(model, num_aux_heads)  # frozen: CAFT fine-tuning does not train the heads
    vocab = find_model_parts(model).lm_head.weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    return model, batch, device


def liger_unavailable(device: str | torch.device) -> str | None:
    """Why the `liger` side cannot be measured on `device`, or None when it can."""
    if torch.device(device).type != "cuda":
        return "Liger's fused linear cross-entropy runs Triton kernels, for CUDA devices only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def fused_linear_next_token_loss(model, input_ids: torch.Tensor, linear_cross_entropy) -> torch.Tensor:
    """`model`'s next-token loss on `input_ids`, every position labelled, with the unembedding and the
    cross-entropy done in one call, `linear_cross_entropy(unembedding weight, hidden states, targets)` (the
    convention of Liger's `LigerFusedLinearCrossEntropyLoss`), on the final norm's output: no full logits."""
    parts = find_model_parts(model)
    with capture_layer_inputs(parts) as capture:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    hidden = capture.final_hidden[:, :-1]
    loss = linear_cross_entropy(parts.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]),
                                input_ids[:, 1:].reshape(-1))
    return loss[0] if isinstance(loss, tuple) else loss  # releases that can add a z-loss return a pair


def _step_function(side: str, model, batch: dict, num_aux_heads: int, device: torch.device, model_name: str
                   ) -> Callable[[], float]:
    """One forward+backward step of `side` on `batch`, returning its loss; the gradients are dropped after it."""
    input_ids = batch["input_ids"]
    aux_heads = num_aux_heads if side == "caft" else 0
    weights = head_loss_weights("caft", aux_heads)
    if side == "trl":
        trl_loss = _trl_loss(model, load_tokenizer(model_name), *input_ids.shape, device)
    elif side == LIGER:
        # deferred: optional, liger-kernel is no caftkit dependency
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss()

    def step() -> float:
        if side == "plain":
            loss = model(input_ids=input_ids, labels=input_ids).loss
        elif side == "trl":
            loss = trl_loss(dict(batch))
        elif side == LIGER:
            loss = fused_linear_next_token_loss(model, input_ids, liger_loss)
        else:
            stats = head_statistics(model, batch, num_aux_heads=aux_heads)
            loss = weighted_loss(stats, weights, stats.counts)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _timed(step: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """`step`'s wall time (the device synchronised) and its loss."""
    start = time.perf_counter()
    loss = step()
    _synchronize(device)
    return time.perf_counter() - start, loss


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator, so that a step's time is the step's."""
    if device.type == "mps":
        torch.mps.synchronize()
    elif device.type in ("cuda", "xpu"):
        getattr(torch, device.type).synchronize(device)


def _trl_loss(model, tokenizer, batch_size: int, seq_len: int, device: torch.device):
    """The loss function of a TRL `SFTTrainer` built around `model` with SFTConfig's defaults (what `trl sft`
    trains with), but for the batch shape, the device and no logging; called on a batch it returns the loss of
    `SFTTrainer.compute_loss`."""
    # deferred: only the trl side's process imports TRL: each side's memory is its own
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    output_dir = tempfile.mkdtemp(prefix="caft-bench-trl-")  # the trainer needs one; nothing is saved there
    atexit.register(shutil.rmtree, output_dir, True)
    args = SFTConfig(output_dir=output_dir, report_to=[], max_length=seq_len,
                     per_device_train_batch_size=batch_size, use_cpu=device.type == "cpu", save_strategy="no")
    dataset = Dataset.from_dict({"input_ids": [[0] * seq_len]})  # the trainer needs one; batches are given below
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return lambda batch: trainer.compute_loss(trainer.model, batch)


def train_step_flops(config, batch_size: int, seq_len: int, num_aux_heads: int, vocab_size: int | None = None
                     ) -> dict[str, float]:
    """Matrix-multiply FLOPs of one forward+backward step of each side, counted from the model config (with
    `vocab_size` in place of its vocabulary when given).

    A trained matrix costs 6 FLOPs per weight per token (forward, input gradient, weight gradient); a frozen
    one 4 (no weight gradient); attention scores and values 4*T*H per token per layer forward, twice that
    backward. The CAFT side adds, per auxiliary head, one frozen copy of the last layer and one pass through the
    frozen unembedding. Elementwise work is ignored, so this is a floor, not a prediction.
    """
    config = config.get_text_config()
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    mlp_mats = 3 if getattr(config, "hidden_act", "gelu") in ("silu", "swiglu") or "llama" in config.model_type else 2
    layer_weights = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + mlp_mats * hidden * inter
    attention = 4 * seq_len * heads * head_dim  # per token, forward, QK^T and AV
    vocab = vocab_size or config.vocab_size
    tokens = batch_size * seq_len
    trunk = tokens * layers * (6 * layer_weights + 3 * attention)
    unembedding = tokens * 4 * hidden * vocab  # frozen in both sides
    plain = trunk + unembedding
    per_head = tokens * (4 * layer_weights + 3 * attention) + unembedding
    caft = plain + num_aux_heads * per_head
    return {"plain": float(plain), "caft": float(caft), "ratio": caft / plain}


def measure_sides(sides: tuple[str, ...], model: str, batch_size: int, seq_len: int, num_aux_heads: int, steps: int,
                  warmup: int, dtype: str, device: str, seed: int, repeats: int = 1, vocab_size: int | None = None
                  ) -> dict[str, dict]:
    """Measure each of `sides` (`PAIRED` among them, possibly), each time in a fresh process, `repeats` times in
    turn (a, b, c, a, b, c, ...), and pool each side's timed steps: a slow spell of a shared machine then falls on
    every side alike instead of on the one that happened to run in it. A side's peak memory is the largest of its
    processes'."""
    measured: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in sides:
            print(f"caft bench train: {side} side{f' ({repeat + 1}/{repeats})' if repeats > 1 else ''}, {warmup} "
                  f"warm-up + {steps} timed steps in a fresh process...", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "caftkit.bench.train_step", side, model, str(batch_size), str(seq_len),
                       str(num_aux_heads), str(steps), str(warmup), dtype, device, str(seed), str(vocab_size or 0)]
            completed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if completed.returncode != 0:
                raise RuntimeError(f"the {side} side failed:\n{completed.stderr[-4000:]}")
            measured[side].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return {side: _pooled_pairs(runs) if side == PAIRED else _pooled(runs) for side, runs in measured.items()}


def _pooled(runs: list[dict]) -> dict:
    steps = [seconds for run in runs for seconds in run["step_seconds"]]
    return {**asdict(TrainBenchResult(runs[0]["side"], steps, statistics.median(steps),
                                      max(run["peak_memory_bytes"] for run in runs),
                                      max(run["memory_before_steps_bytes"] for run in runs), runs[0]["memory_kind"],
                                      runs[0]["loss"])),
            "processes": len(runs)}


def _pooled_pairs(runs: list[dict]) -> dict:
    ntp = [seconds for run in runs for seconds in run["ntp_step_seconds"]]
    caft = [seconds for run in runs for seconds in run["caft_step_seconds"]]
    step_ratios = [caft_seconds / ntp_seconds for caft_seconds, ntp_seconds in zip(caft, ntp)]
    return {"side": PAIRED, "ntp_step_seconds": ntp, "caft_step_seconds": caft, "step_ratios": step_ratios,
            "median_step_ratio": statistics.median(step_ratios), "ntp_loss": runs[0]["ntp_loss"],
            "caft_loss": runs[0]["caft_loss"], "processes": len(runs)}


def caft_ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """CAFT's median step time and peak memory over each other side's in `results`; against `ntp`, when `results`
    holds the `PAIRED` process, also the median of the CAFT steps' times over the next-token steps' beside them
    (`paired_time_ratio`)."""
    caft = results["caft"]
    ratios = {side: {"time_ratio": caft["median_step_seconds"] / result["median_step_seconds"],
                     "peak_memory_ratio": caft["peak_memory_bytes"] / result["peak_memory_bytes"]}
              for side, result in results.items() if side not in ("caft", PAIRED)}
    if PAIRED in results and "ntp" in ratios:
        ratios["ntp"]["paired_time_ratio"] = results[PAIRED]["median_step_ratio"]
    return ratios


def step_flops(model: str, batch_size: int, seq_len: int, num_aux_heads: int, vocab_size: int | None = None
               ) -> dict[str, float]:
    """`train_step_flops` of `model`'s config (read offline)."""
    path, offline = pretrained_source(model)
    return train_step_flops(AutoConfig.from_pretrained(path, **offline), batch_size, seq_len, num_aux_heads,
                            vocab_size)


def bench_train(model: str = BUNDLED_MODEL, batch_size: int = 4, seq_len: int = 512, num_aux_heads: int = 4,
                steps: int = 5, warmup: int = 1, dtype: str = "float32", device: str = "auto", seed: int = 0,
                repeats: int = 1) -> dict:
    """Run every side, each in a fresh process (`repeats` times in turn, steps pooled), and return CAFT's ratios
    against each next-token baseline (the top-level `time_ratio` and `peak_memory_ratio` are against `plain`) with
    the raw figures. `not_measured` says why a side was left out (Liger, away from a CUDA device)."""
    device = resolve_device(device)
    resolve_model_path(model)  # convert the bundled model once, before the timed processes
    liger_reason = liger_unavailable(device)
    sides = SIDES if liger_reason else (*BASELINES, LIGER, "caft")
    results = measure_sides((*sides, PAIRED), model, batch_size, seq_len, num_aux_heads, steps, warmup, dtype,
                            device, seed, repeats)
    flops = step_flops(model, batch_size, seq_len, num_aux_heads)
    ratios = caft_ratios(results)
    # Both baselines multiply the same matrices, so the floor is one figure; how far CAFT's time is above it,
    # against caftkit's own next-token path (the same loss code without the heads), its steps taken side by side.
    ratios["ntp"]["time_over_flop_floor"] = ratios["ntp"]["paired_time_ratio"] / flops["ratio"]
    return {
        "model": model,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_aux_heads": num_aux_heads,
        "repeats": repeats,
        "time_ratio": ratios["plain"]["time_ratio"],
        "peak_memory_ratio": ratios["plain"]["peak_memory_ratio"],
        "flop_floor_time_ratio": flops["ratio"],
        "against": ratios,
        "not_measured": {LIGER: liger_reason} if liger_reason else {},
        **results,
    }


if __name__ == "__main__":
    side, model_name, batch_size, seq_len, num_aux_heads, steps, warmup, dtype, device, seed, vocab_size = sys.argv[1:]
    shape = (model_name, int(batch_size), int(seq_len), int(num_aux_heads), int(steps), int(warmup), dtype, device,
             int(seed), int(vocab_size) or None)
    result = run_paired(*shape) if side == PAIRED else run_side(side, *shape)
    print(json.dumps(asdict(result)))


