"""`caft bench train`: CAFT's training step against plain next-token fine-tuning, end to end on a tiny model, and the
FLOP floor it reports."""

from __future__ import annotations

import json

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.bench.train_step import train_step_flops
from caftkit.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_model("llama"))


def test_bench_train_end_to_end(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(f"model: {tiny_model_dir}\nbatch-size: 2\nseq_len: 16\nsteps: 2\nwarmup: 1\nnum_heads: 3\n")
    output = tmp_path / "bench.json"
    assert main(["bench", "train", "--config", str(config), "--seq-len", "24", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(output.read_text())
    assert printed == written
    assert written["seq_len"] == 24  # the flag overrides the config file
    assert written["batch_size"] == 2 and written["num_aux_heads"] == 3
    for side in ("plain", "trl", "ntp", "caft"):
        assert len(written[side]["step_seconds"]) == 2
        assert written[side]["peak_memory_bytes"] >= written[side]["memory_before_steps_bytes"] > 0
    plain, ntp, caft = written["plain"], written["ntp"], written["caft"]
    assert written["time_ratio"] == pytest.approx(caft["median_step_seconds"] / plain["median_step_seconds"])
    assert written["peak_memory_ratio"] == pytest.approx(caft["peak_memory_bytes"] / plain["peak_memory_bytes"])
    against_ntp = written["against"]["ntp"]
    assert against_ntp["time_ratio"] == pytest.approx(caft["median_step_seconds"] / ntp["median_step_seconds"])
    assert against_ntp["peak_memory_ratio"] == pytest.approx(caft["peak_memory_bytes"] / ntp["peak_memory_bytes"])
    floor = train_step_flops(tiny_model("llama").config, 2, 24, 3)["ratio"]
    assert written["flop_floor_time_ratio"] == pytest.approx(floor)
    assert against_ntp["time_over_flop_floor"] == pytest.approx(against_ntp["time_ratio"] / floor)
    for baseline in ("plain", "trl", "ntp"):
        assert set(written["against"][baseline]) >= {"time_ratio", "peak_memory_ratio"}
    # Every side scores the same random tokens with the same weights: TRL's and caftkit's next-token losses are the
    # plain one, and the CAFT loss adds small positive terms.
    assert ntp["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert written["trl"]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert caft["loss"] > plain["loss"]


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
