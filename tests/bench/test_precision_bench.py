"""`caft bench precision`: the measured steps are the first steps of the real run, the loss comparison is exact,
and both sides run in fresh processes with their own precision."""

from __future__ import annotations

import json

import pytest
from tiny_models import saved_model_dir, tiny_model

from caftkit.bench.precision import bench_precision, largest_relative_difference, run_side
from caftkit.cli import main
from caftkit.training.finetuning import FinetuneSettings, finetune
from caftkit.training.runs import LOG_HISTORY_FILE

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A saved tiny llama (with its tokenizer), heads for it (copies of its last layer) and 40 task records."""
    from caftkit.core.heads import attach_heads, get_heads, save_heads

    root = tmp_path_factory.mktemp("tiny-precision")
    model = tiny_model("llama")
    model_dir = saved_model_dir(root / "model", model)
    save_heads(get_heads(attach_heads(model, 2)), root / "heads")
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"molecule {i % 10}"},
        {"role": "assistant", "content": "CCO c1ccccc1 CC(=O)O"[: 4 + i % 12]},
    ]}) + "\n" for i in range(40)))
    return model_dir, data


def settings(tiny_task, **overrides) -> FinetuneSettings:
    model_dir, data = tiny_task
    values = dict(model=str(model_dir), data=str(data), mode="caft", heads=str(model_dir.parent / "heads"),
                  head_warmup="no", num_aux_heads=2, epochs=2, batch_size=4, learning_rate=3e-3, eval_fraction=0.2,
                  lora_r=4, lora_alpha=8, beta=0.5, device="cpu")
    values.update(overrides)
    return FinetuneSettings(**values)


def test_largest_relative_difference():
    reference = {"1": [[1, 2.0], [2, 4.0], [3, 1.0]], "2": [[1, 8.0], [3, 5.0]]}
    other = {"1": [[1, 2.1], [2, 3.0], [4, 9.0]], "2": [[1, 8.0], [3, 5.5]]}
    result = largest_relative_difference(reference, other)
    # head 1: steps 1 and 2 are logged by both (0.05, 0.25); head 2: 0.0 and 0.1
    assert result["per_head"] == pytest.approx({"1": 0.25, "2": 0.1})
    assert result["largest"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="head 2: no step logged by both"):
        largest_relative_difference({"2": [[7, 1.0]]}, other)


def test_measured_steps_are_the_first_steps_of_the_whole_run(tiny_task, tmp_path):
    whole = settings(tiny_task, logging_steps=1, eval_steps=10**9)
    finetune(str(tmp_path / "whole"), whole)
    history = json.loads((tmp_path / "whole" / LOG_HISTORY_FILE).read_text())
    whole_steps = {entry["step"]: entry for entry in history if "loss_head_1" in entry}
    assert len(whole_steps) == 16  # 32 training records, batch 4, 2 epochs

    side = run_side(settings(tiny_task), 3, str(tmp_path / "side"))
    assert side["steps"] == 3 and len(side["step_seconds"]) == 3
    assert side["median_step_seconds"] > 0 and side["peak_memory_bytes"] > 0
    assert sorted(side["train_loss_per_head"]) == ["1", "2", "3"]
    for head, series in side["train_loss_per_head"].items():
        assert [step for step, _ in series] == [1, 2, 3]
        # the schedules are the whole run's, so the losses are the whole run's first three, to the last bit
        assert [loss for _, loss in series] == [whole_steps[step][f"loss_head_{head}"] for step in (1, 2, 3)]


@pytest.mark.long(40)
def test_bench_compares_bf16_with_float32_in_fresh_processes(tiny_task, tmp_path):
    result = bench_precision(settings(tiny_task, mode="ntp"), steps=2, tolerance=0.5, workdir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the run folders were temporary
    assert result["float32"]["mixed_precision"] == "no" and result["bf16"]["mixed_precision"] == "bf16"
    assert result["float32"]["steps"] == result["bf16"]["steps"] == 2
    assert result["time_ratio"] == result["bf16"]["median_step_seconds"] / result["float32"]["median_step_seconds"]
    assert result["peak_memory_ratio"] == result["bf16"]["peak_memory_bytes"] / result["float32"]["peak_memory_bytes"]
    # the figures say what they measure: on the CPU, the process's peak resident memory
    assert result["memory_kind"] == result["float32"]["memory_kind"] == result["bf16"]["memory_kind"]
    assert result["memory_kind"].startswith("peak RSS")
    expected = largest_relative_difference(result["float32"]["train_loss_per_head"],
                                           result["bf16"]["train_loss_per_head"])["largest"]
    assert result["largest_relative_loss_difference"] == expected
    # autocast did run on the bf16 side: its losses differ from float32's, though by little
    assert 0 < expected < 0.05
    assert result["within_tolerance"] is True


def test_bench_precision_command_refuses_settings_it_sets_itself(tiny_task, tmp_path, capsys):
    model_dir, data = tiny_task
    assert main(["bench", "precision", "--data", str(data), "--model", str(model_dir),
                 "--finetune", "{mixed_precision: bf16, batch_size: 4}"]) == 2
    assert "--finetune: ['mixed_precision'] are not further finetune settings" in capsys.readouterr().err
    assert main(["bench", "precision", "--data", str(data), "--finetune", "{batch_sise: 4}"]) == 2
    assert "['batch_sise']" in capsys.readouterr().err
