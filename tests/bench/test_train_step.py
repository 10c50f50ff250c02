"""`caft bench train`: CAFT's training step against plain next-token fine-tuning, end to end on a tiny model, and the
FLOP floor it reports."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from tiny_models import saved_model_dir, tiny_model

from caftkit.bench.train_step import (
    LIGER,
    PAIRED,
    fused_linear_next_token_loss,
    liger_unavailable,
    run_paired,
    run_side,
    train_step_flops,
)
from caftkit.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_model("llama"))


def test_bench_train_end_to_end(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(f"model: {tiny_model_dir}\nbatch-size: 2\nseq_len: 16\nsteps: 2\nwarmup: 1\nnum_aux_heads: 3\n")
    output = tmp_path / "bench.json"
    assert main(["bench", "train", "--config", str(config), "--seq-len", "24", "--repeats", "2", "--output",
                 str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(output.read_text())
    assert printed == written
    assert written["seq_len"] == 24  # the flag overrides the config file
    assert written["batch_size"] == 2 and written["num_aux_heads"] == 3
    for side in ("plain", "trl", "ntp", "caft"):
        # Two processes per side, their timed steps pooled.
        assert len(written[side]["step_seconds"]) == 4 and written[side]["processes"] == 2
        assert written[side]["median_step_seconds"] == pytest.approx(statistics.median(written[side]["step_seconds"]))
        assert written[side]["peak_memory_bytes"] >= written[side]["memory_before_steps_bytes"] > 0
    plain, ntp, caft = written["plain"], written["ntp"], written["caft"]
    assert written["time_ratio"] == pytest.approx(caft["median_step_seconds"] / plain["median_step_seconds"])
    assert written["peak_memory_ratio"] == pytest.approx(caft["peak_memory_bytes"] / plain["peak_memory_bytes"])
    against_ntp = written["against"]["ntp"]
    assert against_ntp["time_ratio"] == pytest.approx(caft["median_step_seconds"] / ntp["median_step_seconds"])
    assert against_ntp["peak_memory_ratio"] == pytest.approx(caft["peak_memory_bytes"] / ntp["peak_memory_bytes"])
    # The last process takes both steps in turn: each CAFT step is divided by the next-token step beside it.
    paired = written[PAIRED]
    assert paired["processes"] == 2 and len(paired["ntp_step_seconds"]) == len(paired["caft_step_seconds"]) == 4
    assert paired["step_ratios"] == pytest.approx([caft_seconds / ntp_seconds for caft_seconds, ntp_seconds
                                                   in zip(paired["caft_step_seconds"], paired["ntp_step_seconds"])])
    assert against_ntp["paired_time_ratio"] == pytest.approx(statistics.median(paired["step_ratios"]))
    floor = train_step_flops(tiny_model("llama").config, 2, 24, 3)["ratio"]
    assert written["flop_floor_time_ratio"] == pytest.approx(floor)
    assert against_ntp["time_over_flop_floor"] == pytest.approx(against_ntp["paired_time_ratio"] / floor)
    for baseline in ("plain", "trl", "ntp"):
        assert set(written["against"][baseline]) >= {"time_ratio", "peak_memory_ratio"}
    # On the CPU, Liger's side is left out, and the JSON says why.
    assert LIGER not in written and LIGER not in written["against"]
    assert written["not_measured"] == {LIGER: "Liger's fused linear cross-entropy runs Triton kernels, for CUDA "
                                              "devices only"}
    # Every side scores the same random tokens with the same weights: TRL's and caftkit's next-token losses are the
    # plain one, and the CAFT loss adds small positive terms.
    assert ntp["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert written["trl"]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert caft["loss"] > plain["loss"]
    # The paired process runs the same two steps (the next-token one with the heads attached but unused).
    assert paired["ntp_loss"] == pytest.approx(ntp["loss"], rel=1e-6)
    assert paired["caft_loss"] == pytest.approx(caft["loss"], rel=1e-6)


def test_flop_floor_counts_heads():
    config = tiny_model("llama").config
    flops = train_step_flops(config, batch_size=1, seq_len=8, num_aux_heads=0)
    assert flops["ratio"] == 1.0
    # hidden 32, 4 heads x 8 dims, 2 kv heads, intermediate 64 (3 MLP matrices), 2 layers, vocab 128
    layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64
    attention = 4 * 8 * 32
    plain = 8 * 2 * (6 * layer + 3 * attention) + 8 * 4 * 32 * 128
    assert flops["plain"] == plain
    one_head = train_step_flops(config, batch_size=1, seq_len=8, num_aux_heads=1)
    assert one_head["caft"] == plain + 8 * (4 * layer + 3 * attention) + 8 * 4 * 32 * 128


def test_flop_floor_with_another_vocabulary():
    config = tiny_model("llama").config
    own, larger = (train_step_flops(config, 1, 8, 2, vocab) for vocab in (None, 1000))
    assert larger["plain"] - own["plain"] == 8 * 4 * 32 * (1000 - 128)
    assert larger["caft"] - own["caft"] == 3 * 8 * 4 * 32 * (1000 - 128)


def test_a_side_with_another_vocabulary_runs_random_weights_of_that_size(tiny_model_dir):
    """Random weights give near-uniform predictions: the next-token loss is close to log(vocabulary)."""
    for vocab in (96, 3000):
        result = run_side("ntp", str(tiny_model_dir), 2, 16, 2, 1, 0, "float32", "cpu", 0, vocab)
        assert result.loss == pytest.approx(math.log(vocab), rel=0.02)
    with pytest.raises(ValueError, match="the trl side runs the model's own tokenizer"):
        run_side("trl", str(tiny_model_dir), 2, 16, 2, 1, 0, "float32", "cpu", 0, 96)


def test_paired_steps_are_the_two_sides_steps_in_turn(tiny_model_dir):
    shape = (str(tiny_model_dir), 2, 16, 2, 3, 1, "float32", "cpu", 0, 96)
    paired = run_paired(*shape)
    assert paired.side == PAIRED and len(paired.ntp_step_seconds) == len(paired.caft_step_seconds) == 3
    assert min(paired.ntp_step_seconds + paired.caft_step_seconds) > 0
    assert paired.ntp_loss == pytest.approx(run_side("ntp", *shape).loss, rel=1e-6)
    assert paired.caft_loss == pytest.approx(run_side("caft", *shape).loss, rel=1e-6)
    assert paired.caft_loss > paired.ntp_loss


@pytest.mark.long(130)
def test_sweep_moves_one_axis_at_a_time_and_draws_it(tiny_model_dir, tmp_path, capsys):
    output, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["bench", "train", "--sweep", "--model", str(tiny_model_dir), "--batch-size", "2", "--seq-len",
                 "16", "--num-aux-heads", "2", "--sweep-seq-lens", "8,16", "--sweep-aux-heads", "1,2",
                 "--sweep-vocab-sizes", "64", "--steps", "1", "--warmup", "0", "--output", str(output),
                 "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    sweep = json.loads(output.read_text())
    rows = sweep["points"]
    assert [(row["axis"], row["value"]) for row in rows] == [
        ("seq_len", 8), ("seq_len", 16), ("num_aux_heads", 1), ("num_aux_heads", 2), ("vocab_size", 64)]
    assert [(row["seq_len"], row["num_aux_heads"], row["vocab_size"], row["weights"]) for row in rows] == [
        (8, 2, None, "model"), (16, 2, None, "model"), (16, 1, None, "model"), (16, 2, None, "model"),
        (16, 2, 64, "random")]
    # The base shape lies on two axes and is measured once.
    assert rows[1] == {**rows[3], "axis": "seq_len", "value": 16}
    config = tiny_model("llama").config
    for row in rows:
        assert row["time_ratio"] == pytest.approx(row["caft_step_seconds"] / row["ntp_step_seconds"])
        assert row["peak_memory_ratio"] == pytest.approx(row["caft_peak_memory_bytes"] / row["ntp_peak_memory_bytes"])
        floor = train_step_flops(config, 2, row["seq_len"], row["num_aux_heads"], row["vocab_size"])["ratio"]
        assert row["flop_floor_time_ratio"] == pytest.approx(floor)
        assert row["time_over_flop_floor"] == pytest.approx(row["paired_time_ratio"] / floor)
    assert len(table) == 2 + len(rows) and table[0].startswith("| axis | value |")
    assert table[2].startswith(f"| seq_len | 8 | {rows[0]['ntp_step_seconds']:.2f} s |")
    assert f" | {rows[0]['time_ratio']:.3f} | {rows[0]['paired_time_ratio']:.3f} | " in table[2]
    assert plot.read_bytes().startswith(b"\x89PNG")
    # Two panels, 4.5 inches each at 120 dpi: the vocabulary, held at one value, has none of its own.
    from PIL import Image

    assert Image.open(plot).size[0] == 2 * 4.5 * 120
    # The plot draws a sweep only, and an existing file is never replaced.
    assert main(["bench", "train", "--plot", str(tmp_path / "other.png")]) == 2
    assert "--plot draws a sweep: add --sweep" in capsys.readouterr().err
    assert main(["bench", "train", "--sweep", "--plot", str(plot)]) == 2
    assert f"{plot}: " in capsys.readouterr().err


def test_liger_side_loss_and_gradients_are_the_plain_next_token_ones():
    """The liger side's plumbing (final norm's output, shifted targets, the unembedding's weight), with a naive
    linear cross-entropy in Liger's calling convention in place of its kernel, which needs a CUDA device."""
    assert liger_unavailable("cpu") is not None
    model = tiny_model("llama")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def naive(weight, hidden, targets):
        return F.cross_entropy(hidden @ weight.T, targets)

    fused = fused_linear_next_token_loss(model, input_ids, naive)
    fused.backward()
    fused_grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    plain = model(input_ids=input_ids, labels=input_ids).loss
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)
