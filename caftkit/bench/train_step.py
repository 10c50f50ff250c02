"""`caft bench train`: the cost of a CAFT training step against plain next-token fine-tuning, side by side.

Each side runs in a fresh process so that its peak memory is its own. Both train every weight but the
unembedding (frozen in both: the paper's recommended full fine-tuning setting), on the same random tokens,
every position labelled. Two next-token baselines: `plain`, what a transformers user writes (`model(input_ids,
labels=...)`, full logits), `trl`, the loss of TRL's `SFTTrainer` as it computes it by default (`compute_loss`:
the model's fused LM head, which also scores entropy and token accuracy), and `ntp`, caftkit's own next-token
path (`caft finetune --mode ntp`: the main head through the fused chunked cross-entropy, no full logits). CAFT is
measured against each.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..models import BUNDLED_MODEL, resolve_device

# The next-token baselines CAFT is measured against, then CAFT; each side runs in a fresh process, in this order.
BASELINES = ("plain", "trl", "ntp")
SIDES = (*BASELINES, "caft")


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


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory measurement of this process on `device` (see `peak_memory_bytes`)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux resets the process's peak resident set size ("high water mark") on writing 5 to clear_refs.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_memory_bytes(device: torch.device | str) -> int:
    """This process's peak memory since `reset_peak_memory`: CUDA's `max_memory_allocated` on a GPU, the peak
    resident set size (VmHWM) on the CPU."""
    return _memory(torch.device(device), peak=True)


def _memory(device: torch.device, peak: bool) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the process's memory from /proc/self/status")


def run_side(side: str, model_name: str, batch_size: int, seq_len: int, num_aux_heads: int, steps: int, warmup: int,
             dtype: str, device: str, seed: int) -> TrainBenchResult:
    """Measure one side in this process: `warmup` untimed steps, then `steps` timed forward+backward steps."""
    from ..core.architecture import find_model_parts
    from ..core.heads import attach_heads
    from ..core.multitoken import head_statistics, weighted_loss
    from ..core.weights import head_loss_weights
    from ..models import load_model_and_tokenizer

    torch.manual_seed(seed)
    device = torch.device(device)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype)
    model.to(device).train()
    find_model_parts(model).lm_head.requires_grad_(False)
    if side == "caft":
        attach_heads(model, num_aux_heads)  # frozen: CAFT fine-tuning does not train the heads
    vocab = find_model_parts(model).lm_head.weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    aux_heads = num_aux_heads if side == "caft" else 0
    weights = head_loss_weights("caft", aux_heads)

    trl_loss = _trl_loss(model, tokenizer, batch_size, seq_len, device) if side == "trl" else None

    def step() -> float:
        if side == "plain":
            loss = model(input_ids=input_ids, labels=input_ids).loss
        elif side == "trl":
            loss = trl_loss(dict(batch))
        else:
            stats = head_statistics(model, batch, num_aux_heads=aux_heads)
            loss = weighted_loss(stats, weights, stats.counts)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = _memory(device, peak=False)
    reset_peak_memory(device)
    times, loss = [], float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return TrainBenchResult(side, times, statistics.median(times), _memory(device, peak=True), before,
                            "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)", loss)


def _trl_loss(model, tokenizer, batch_size: int, seq_len: int, device: torch.device):
    """The loss function of a TRL `SFTTrainer` built around `model` with SFTConfig's defaults (what `trl sft`
    trains with), but for the batch shape, the device and no logging; called on a batch it returns the loss of
    `SFTTrainer.compute_loss`."""
    import atexit
    import shutil
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    output_dir = tempfile.mkdtemp(prefix="caft-bench-trl-")  # the trainer needs one; nothing is saved there
    atexit.register(shutil.rmtree, output_dir, True)
    args = SFTConfig(output_dir=output_dir, report_to=[], max_length=seq_len,
                     per_device_train_batch_size=batch_size, use_cpu=device.type == "cpu", save_strategy="no")
    dataset = Dataset.from_dict({"input_ids": [[0] * seq_len]})  # the trainer needs one; batches are given below
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return lambda batch: trainer.compute_loss(trainer.model, batch)


def train_step_flops(config, batch_size: int, seq_len: int, num_aux_heads: int) -> dict[str, float]:
    """Matrix-multiply FLOPs of one forward+backward step of each side, counted from the model config.

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
    vocab = config.vocab_size
    tokens = batch_size * seq_len
    trunk = tokens * layers * (6 * layer_weights + 3 * attention)
    unembedding = tokens * 4 * hidden * vocab  # frozen in both sides
    plain = trunk + unembedding
    per_head = tokens * (4 * layer_weights + 3 * attention) + unembedding
    caft = plain + num_aux_heads * per_head
    return {"plain": float(plain), "caft": float(caft), "ratio": caft / plain}


def bench_train(model: str = BUNDLED_MODEL, batch_size: int = 4, seq_len: int = 512, num_aux_heads: int = 4,
                steps: int = 5, warmup: int = 1, dtype: str = "float32", device: str = "auto", seed: int = 0) -> dict:
    """Run every side, each in a fresh process, and return CAFT's ratios against each next-token baseline (the
top-level `time_ratio` and `peak_memory_ratio` are against `plain`) with the raw figures."""
    from transformers import AutoConfig

    from ..models import pretrained_source, resolve_model_path

    device = resolve_device(device)
    resolve_model_path(model)  # convert the bundled model once, before the two timed processes
    results = {}
    for side in SIDES:
        print(f"caft bench train: {side} side, {warmup} warm-up + {steps} timed steps in a fresh process...",
              file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "caftkit.bench.train_step", side, model, str(batch_size), str(seq_len),
                   str(num_aux_heads),
                   str(steps), str(warmup), dtype, device, str(seed)]
        completed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if completed.returncode != 0:
            raise RuntimeError(f"the {side} side failed:\n{completed.stderr[-4000:]}")
        results[side] = json.loads(completed.stdout.strip().splitlines()[-1])
    path, offline = pretrained_source(model)
    flops = train_step_flops(AutoConfig.from_pretrained(path, **offline), batch_size, seq_len, num_aux_heads)
    caft = results["caft"]
    ratios = {baseline: {"time_ratio": caft["median_step_seconds"] / results[baseline]["median_step_seconds"],
                         "peak_memory_ratio": caft["peak_memory_bytes"] / results[baseline]["peak_memory_bytes"]}
              for baseline in BASELINES}
    # Both baselines multiply the same matrices, so the floor is one figure; how far CAFT's time is above it,
    # against caftkit's own next-token path (the same loss code without the heads).
    ratios["ntp"]["time_over_flop_floor"] = ratios["ntp"]["time_ratio"] / flops["ratio"]
    return {
        "model": model,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_aux_heads": num_aux_heads,
        "time_ratio": ratios["plain"]["time_ratio"],
        "peak_memory_ratio": ratios["plain"]["peak_memory_ratio"],
        "flop_floor_time_ratio": flops["ratio"],
        "against": ratios,
        **results,
    }


if __name__ == "__main__":
    side, model_name, batch_size, seq_len, num_aux_heads, steps, warmup, dtype, device, seed = sys.argv[1:]
    result = run_side(side, model_name, int(batch_size), int(seq_len), int(num_aux_heads), int(steps), int(warmup),
                      dtype, device, int(seed))
    print(json.dumps(asdict(result)))


