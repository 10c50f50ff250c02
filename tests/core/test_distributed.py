"""Two processes on CPU (gloo) give what one process gives with the same global batch: DDP through `torchrun` and
`caft finetune` / `caft train-heads`, and the CAFT loss under FSDP2 (`fully_shard`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_workers as workers
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import saved_model_dir, tiny_model

from caftkit.core.heads import HEADS_WEIGHTS_FILE, attach_heads, get_heads, save_heads
from caftkit.training.export import export_run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("impl", ["fused", "checkpoint"])
def test_fsdp2_caft_loss_and_head_gradients_equal_one_process(tmp_path, impl):
    torch.multiprocessing.spawn(workers.fsdp_worker, args=(2, free_port(), str(tmp_path), impl), nprocs=2)
    sharded = torch.load(tmp_path / "fsdp.pt")
    single = workers.single_process(impl)
    torch.testing.assert_close(sharded["loss"], single["loss"], rtol=1e-6, atol=1e-6)
    head_names = [name for name in single["grads"] if ".layers." in name and "caft_heads" in name]
    assert head_names and set(sharded["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # The heads saved from the sharded model are whole and are the heads the processes started with.
    saved = load_file(str(tmp_path / "heads" / HEADS_WEIGHTS_FILE))
    expected = get_heads(workers.model_with_heads()).state_dict()
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


# --- DDP through torchrun and the command line -------------------------------------------------------------------

MOLECULES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C#N", "CC(C)O", "OCC(O)CO", "CC(=O)N", "CC#N", "OC(=O)c1ccccc1"]


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = tiny_model("llama", seed=1)
    saved_model_dir(root / "model", model)
    # Copies of the last layer, as heads: what caft mode starts from without trained ones.
    save_heads(get_heads(attach_heads(model, 2)), root / "heads")
    (root / "task.jsonl").write_text("".join(json.dumps({"id": f"m{i}", "messages": [
        {"role": "user", "content": f"molecule {i % 10} " * (1 + i % 3)},
        {"role": "assistant", "content": MOLECULES[i % 10] * (1 + i % 2)},
    ]}) + "\n" for i in range(40)))
    return root


def run_caft(command: list[str], processes: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        launcher = [sys.executable, "-m", "caftkit.cli"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "caftkit.cli"]
    result = subprocess.run(launcher + command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def train_losses(history: list[dict]) -> list[tuple[int, dict]]:
    return [(entry["step"], {key: value for key, value in entry.items()
                             if key == "loss" or key.startswith("loss_head")})
            for entry in history if "loss" in entry]


@pytest.mark.parametrize("head_warmup", ["no", "yes"])
@pytest.mark.long(35)
def test_ddp_finetune_equals_one_process_with_the_same_global_batch(tiny_run_inputs, tmp_path, head_warmup):
    """Also with the task head warm-up run inside `finetune` first (one epoch of head training, then CAFT)."""
    flags = ["finetune", "--model", str(tiny_run_inputs / "model"), "--data", str(tiny_run_inputs / "task.jsonl"),
             "--heads", str(tiny_run_inputs / "heads"), "--method", "full", "--num-aux-heads", "2", "--beta", "0.5",
             "--epochs", "1", "--learning-rate", "0.001",
             "--logging-steps", "1", "--warmup", "0", "--eval-fraction", "0.2", "--save-steps", "100",
             "--head-warmup", head_warmup,
             "--mixed-precision", "no"]  # equal in float32; under bf16, batches of other shapes round differently
    run_caft(flags + ["--batch-size", "4", "--output", str(tmp_path / "one")], 1, tmp_path)
    run_caft(flags + ["--batch-size", "2", "--output", str(tmp_path / "two")], 2, tmp_path)
    one = json.loads((tmp_path / "one" / "log_history.json").read_text())
    two = json.loads((tmp_path / "two" / "log_history.json").read_text())
    assert len(train_losses(one)) == 8  # 32 training examples, 4 per step (a partial last batch would differ)
    assert [step for step, _ in train_losses(one)] == [step for step, _ in train_losses(two)]
    for (step, a), (_, b) in zip(train_losses(one), train_losses(two)):
        assert set(a) == set(b) == {"loss", "loss_head_1", "loss_head_2", "loss_head_3"}, step
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    if head_warmup == "yes":  # the warmed-up heads, trained by both processes and written by one, are the same
        warm_one = load_file(str(tmp_path / "one" / "warmup-heads" / HEADS_WEIGHTS_FILE))
        warm_two = load_file(str(tmp_path / "two" / "warmup-heads" / HEADS_WEIGHTS_FILE))
        untrained = get_heads(attach_heads(tiny_model("llama", seed=1), 2)).state_dict()
        assert set(warm_one) == set(warm_two) == set(untrained)
        assert any(not torch.equal(warm_one[name], untrained[name]) for name in warm_one)  # they did train
        for name in warm_one:
            torch.testing.assert_close(warm_two[name], warm_one[name], rtol=1e-5, atol=1e-5, msg=name)
        run = json.loads((tmp_path / "two" / "caft_run.json").read_text())
        assert run["head_warmup"]["warmed_up"] is True
    # The run records how it was spread, and the exported model's card says so.
    assert json.loads((tmp_path / "one" / "caft_run.json").read_text())["launch"] == {"processes": 1,
                                                                                       "distribution": "NO"}
    assert json.loads((tmp_path / "two" / "caft_run.json").read_text())["launch"] == {"processes": 2,
                                                                                       "distribution": "MULTI_CPU"}
    if head_warmup == "no":
        export_run(tmp_path / "two", tmp_path / "exported")
        assert "on `cpu`, 2 processes (MULTI_CPU)" in (tmp_path / "exported" / "README.md").read_text()
    single = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    double = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert set(single) == set(double) and not any("caft_heads" in name for name in single)
    start = load_file(str(tiny_run_inputs / "model" / "model.safetensors"))
    assert any(not torch.equal(single[name], start[name]) for name in single)  # it did train
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.long(35)
def test_ddp_train_heads_equals_one_process_with_the_same_global_batch(tiny_run_inputs, tmp_path):
    flags = ["train-heads", "--model", str(tiny_run_inputs / "model"), "--data", str(tiny_run_inputs / "task.jsonl"),
             "--num-aux-heads", "2", "--epochs", "2", "--learning-rate", "0.003", "--mixed-precision", "no",
             "--eval-fraction", "0.2", "--logging-steps", "1"]
    run_caft(flags + ["--batch-size", "4", "--output", str(tmp_path / "one")], 1, tmp_path)
    run_caft(flags + ["--batch-size", "2", "--output", str(tmp_path / "two")], 2, tmp_path)
    single = load_file(str(tmp_path / "one" / HEADS_WEIGHTS_FILE))
    double = load_file(str(tmp_path / "two" / HEADS_WEIGHTS_FILE))
    assert set(single) == set(double)
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-5, msg=name)
    one = json.loads((tmp_path / "one" / "heads_config.json").read_text())["training"]
    two = json.loads((tmp_path / "two" / "heads_config.json").read_text())["training"]
    assert one["optimizer_steps"] == two["optimizer_steps"] == 16
    for head, metrics in one["held_out_after"].items():
        assert two["held_out_after"][head]["loss"] == pytest.approx(metrics["loss"], rel=1e-5), head


# --- the accelerate configs ----------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def test_accelerate_configs_load_and_keep_what_caftkit_relies_on():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    loaded = {path.stem: load_config_from_file(str(path)) for path in sorted(CONFIGS.glob("*.yaml"))}
    assert set(loaded) == {"ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"}
    assert loaded["ddp"].distributed_type == DistributedType.MULTI_GPU
    fsdp = loaded["fsdp2"].fsdp_config
    assert loaded["fsdp2"].distributed_type == DistributedType.FSDP and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # decoder layers and heads are units
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # whole files in checkpoints and final/
    zero2, zero3 = loaded["deepspeed-zero2"].deepspeed_config, loaded["deepspeed-zero3"].deepspeed_config
    assert zero2["zero_stage"] == 2 and zero3["zero_stage"] == 3
    assert zero3["zero3_init_flag"] is False  # heads are copied from a whole last layer
    assert zero3["zero3_save_16bit_model"] is True  # whole files on save
    for name, config in loaded.items():
        assert config.mixed_precision == "no" and config.use_cpu is False, name  # caft's flags decide
    guide = (CONFIGS.parent.parent / "docs" / "distributed.md").read_text()
    assert all(f"configs/accelerate/{name}.yaml" in guide for name in loaded)


def test_a_zero3_partitioned_unembedding_is_called_through_its_module():
    """DeepSpeed ZeRO-3 leaves a partitioned weight empty outside its module's forward and marks it with `ds_id`
    and `ds_shape`: the loss then switches to the implementation that calls the module, and chunks by the real
    vocabulary size."""
    from torch import nn

    from caftkit.core.distributed import loss_impl_for
    from caftkit.core.loss import linear_cross_entropy

    head = nn.Linear(8, 50, bias=False)
    assert loss_impl_for(head, "fused") == "fused"
    torch.manual_seed(0)
    hidden, targets = torch.randn(6, 8), torch.randint(0, 50, (6,))
    expected, _ = linear_cross_entropy(hidden, head, targets, impl="fused", chunk_elements=8 * 10)
    head.weight.ds_id, head.weight.ds_shape = 3, torch.Size([50, 8])
    assert loss_impl_for(head, "fused") == "checkpoint"
    assert loss_impl_for(head, "checkpoint") == "checkpoint"
    loss, _ = linear_cross_entropy(hidden, head, targets, impl=loss_impl_for(head, "fused"), chunk_elements=8 * 10)
    torch.testing.assert_close(loss, expected)
