"""Self-speculative decoding is lossless: its tokens are `model.generate(do_sample=False)`'s, on every architecture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from caftkit.core.heads import attach_heads, get_heads
from caftkit.decoding.speculative import generate

EOS = [2, 5]
PROMPTS = [[1, 17, 23, 9, 40, 41, 12], [1, 33, 8], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 3], [1, 50, 51, 52]]


def reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy `generate()` of one prompt alone, stop token kept, as speculative decoding reports it."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)[0, len(prompt):].tolist()
    stop = next((i for i, token in enumerate(out) if token in EOS), None)
    return out if stop is None else out[: stop + 1]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def repetitive_model(model_type: str):
    """A tiny model with heads (copies of its last layer) whose greedy text often repeats token 9, so that
    drafts are accepted in part: the unembedding of token 9 is pushed toward the mean direction."""
    model = tiny_model(model_type, seed=3)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[9] += 0.3 * weight.mean(0) / weight.mean(0).norm()
    attach_heads(model, 3)
    return model


SLIDING = {"gemma3_text"}  # tiny models with sliding-window layers: chains only
# Fixed drafts (every head at every pass), and adaptive drafting, which tries each way of drafting and then takes
# the fastest (on these tiny models, whose heads cost as much as the model, mostly none): both give the same tokens.
DRAFTS = [{"candidates": 1, "adaptive": False}, {"candidates": 3, "tree_size": 8, "adaptive": False},
          {"candidates": 2, "tree_size": 14, "adaptive": False},
          {"candidates": 1, "draft_dtype": torch.bfloat16, "adaptive": False},
          {"candidates": 3, "tree_size": 8, "draft_dtype": "bfloat16", "adaptive": False},
          {"candidates": 1}, {"candidates": 3, "tree_size": 8}]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("draft", DRAFTS, ids=["chain", "tree-3x8", "tree-2x14", "chain-bf16", "tree-3x8-bf16",
                                               "chain-adaptive", "tree-3x8-adaptive"])
def test_speculative_tokens_equal_greedy_generate(model_type, draft):
    if draft["candidates"] > 1 and model_type in SLIDING:
        return test_trees_are_refused_on_sliding_window_models(model_type, draft)
    model = repetitive_model(model_type)
    expected = [reference(model, prompt, 24) for prompt in PROMPTS]
    ids, mask = left_padded(PROMPTS)
    batched = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=EOS, **draft)
    assert batched.sequences == expected  # batch of 4 prompts of different lengths
    for prompt, tokens in zip(PROMPTS, expected):
        single = generate(model, input_ids=torch.tensor([prompt]), max_new_tokens=24, eos_token_id=EOS, **draft)
        assert single.sequences == [tokens]
        assert single.forward_passes <= 1 + len(tokens)


def test_trees_are_refused_on_sliding_window_models(model_type="gemma3_text", draft=DRAFTS[1]):
    model = repetitive_model(model_type)
    with pytest.raises(ValueError, match="sliding-window layers: use candidates=1"):
        generate(model, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=4, **draft)


def test_drafts_are_accepted_and_save_forward_passes():
    """The test models' heads do guess right often enough for several tokens per pass to be exercised."""
    from caftkit.bench.generation import ForwardCounter

    model = repetitive_model("llama")
    with ForwardCounter(model) as counter:
        out = generate(model, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=40, eos_token_id=[],
                       adaptive=False)
    # forward_passes counts every call of the model: the prefill, then one verification pass per step.
    assert counter.calls == out.forward_passes == 1 + len(out.accepted_per_step)
    assert out.sequences == [reference(model, PROMPTS[0], 40)] and len(out.sequences[0]) == 40
    assert out.mean_accepted > 1.2
    assert out.forward_passes < 40  # plain greedy needs 1 prefill + 39 decoding passes
    tree = generate(model, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=40, eos_token_id=[], candidates=3,
                    tree_size=12, adaptive=False)
    assert tree.sequences == out.sequences and tree.mean_accepted > 1.2


def test_bfloat16_drafts_come_from_copies_and_leave_the_heads_alone():
    from caftkit.decoding.speculative import HeadDrafter

    model = repetitive_model("llama")
    heads_before = {name: tensor.clone() for name, tensor in get_heads(model).state_dict().items()}
    drafter = HeadDrafter(model, get_heads(model), 3, 1, torch.bfloat16)
    assert {p.dtype for layer in drafter.layers for p in layer.parameters()} == {torch.bfloat16}
    assert drafter.lm_head.weight.dtype == torch.bfloat16 and drafter.lm_head is not model.lm_head
    assert HeadDrafter(model, get_heads(model), 3, 1, torch.float32).lm_head is model.lm_head  # no copy needed
    out = generate(model, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=40, eos_token_id=[], adaptive=False,
                   draft_dtype=torch.bfloat16)
    assert out.sequences == [reference(model, PROMPTS[0], 40)] and out.mean_accepted > 1.2
    for name, tensor in get_heads(model).state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, heads_before[name]), name


@pytest.mark.parametrize("num_aux_heads", [0, 1, 3])
def test_fewer_heads_and_streaming(num_aux_heads):
    model = repetitive_model("qwen2")
    streamed: dict[int, list[int]] = {}
    ids, mask = left_padded(PROMPTS[:2])
    out = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=EOS,
                   num_aux_heads=num_aux_heads,
                   on_tokens=lambda row, tokens: streamed.setdefault(row, []).extend(tokens))
    assert out.sequences == [reference(model, p, 16) for p in PROMPTS[:2]]
    assert [streamed.get(i, []) for i in range(2)] == out.sequences
    if num_aux_heads == 0:
        assert out.mean_accepted == 1.0


def test_max_new_tokens_and_too_many_heads():
    model = repetitive_model("llama")
    out = generate(model, input_ids=torch.tensor([PROMPTS[1]]), max_new_tokens=1, eos_token_id=[])
    assert out.sequences == [reference(model, PROMPTS[1], 1)] and len(out.sequences[0]) == 1
    with pytest.raises(ValueError, match="4 heads asked for, but 3 are available"):
        generate(model, input_ids=torch.tensor([PROMPTS[1]]), num_aux_heads=4)
    assert get_heads(model).num_aux_heads == 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import saved_model_dir

    from caftkit.core.heads import save_heads

    root = tmp_path_factory.mktemp("tiny-speculative")
    model = repetitive_model("llama")
    save_heads(get_heads(model), root / "heads")
    from caftkit.core.heads import detach_heads

    detach_heads(model)
    saved_model_dir(root / "model", model)
    return root


def test_generate_command_streams_the_same_text_with_and_without_heads(tiny_dir, capsys):
    from caftkit.cli import main

    texts = []
    speculative = ["--heads", str(tiny_dir / "heads"), "--speculative"]
    for extra in ([], speculative, speculative + ["--candidates", "2", "--tree-size", "5"],
                  speculative + ["--draft-dtype", "bfloat16"]):
        assert main(["generate", "--model", str(tiny_dir / "model"), "--prompt", "molecule 3",
                     "--max-new-tokens", "20", *extra]) == 0
        captured = capsys.readouterr()
        texts.append(captured.out)
        assert "tokens per pass]" in captured.err
    assert texts[0] == texts[1] == texts[2] == texts[3] and texts[0].strip()


def test_generate_command_samples_reproducibly_with_and_without_heads(tiny_dir, capsys):
    """A seed gives the same sampled text on every run; --top-k without a temperature is refused, naming
    --candidates (the former meaning of --top-k)."""
    from caftkit.cli import main

    base = ["generate", "--model", str(tiny_dir / "model"), "--prompt", "molecule 3", "--max-new-tokens", "20",
            "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40", "--seed", "7"]
    speculative = ["--heads", str(tiny_dir / "heads"), "--speculative"]
    texts = {}
    for name, extra in (("plain", []), ("plain again", []), ("speculative", speculative),
                        ("speculative again", speculative)):
        assert main([*base, *extra]) == 0
        texts[name] = capsys.readouterr().out
    assert texts["plain"] == texts["plain again"] and texts["speculative"] == texts["speculative again"]
    assert main([*base[:7], "--seed", "8", "--temperature", "0.8"]) == 0
    assert capsys.readouterr().out != texts["plain"]  # another seed, another sample of this near-uniform model
    assert main(["generate", "--model", str(tiny_dir / "model"), "--prompt", "hi", "--top-k", "3"]) == 2
    assert "give a temperature above 0 (the candidates per head of a draft tree are --candidates)" in (
        capsys.readouterr().err)


def test_bad_draft_shape_is_a_clear_error(tiny_dir, capsys):
    from caftkit.cli import main

    assert main(["bench", "generate", "--model", str(tiny_dir / "model"), "--heads", str(tiny_dir / "heads"),
                 "--drafts", "3,three"]) != 0
    assert "--drafts: draft shape 'three': expected H, HxK or HxK:N" in capsys.readouterr().err
    for shape in ("-1", "0", "3x0", "3x2:0"):
        assert main(["bench", "generate", "--model", str(tiny_dir / "model"), "--heads", str(tiny_dir / "heads"),
                     "--drafts", shape]) == 2
        assert f"--drafts: draft shape '{shape}': expected H, HxK or HxK:N" in capsys.readouterr().err
    for command in (["bench", "generate"], ["generate", "--prompt", "hi", "--speculative"]):
        assert main([*command, "--model", str(tiny_dir / "model"), "--heads", str(tiny_dir / "heads"),
                     "--draft-dtype", "bfloat8"]) != 0
        assert "unknown dtype 'bfloat8'; expected one of float64, float32" in capsys.readouterr().err


def test_bench_generate_reports_identical_answers(tiny_dir, tmp_path, capsys):
    import json

    from caftkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}",
                                           "messages": [{"role": "user", "content": f"say {i} " * (i + 1)}]})
                               + "\n" for i in range(6)))
    output = tmp_path / "bench.json"
    assert main(["bench", "generate", "--model", str(tiny_dir / "model"), "--heads", str(tiny_dir / "heads"),
                 "--data", str(prompts), "--num-prompts", "5", "--skip", "1", "--batch-sizes", "1,4",
                 "--max-new-tokens", "12", "--drafts", "3,2,3x2:6", "--draft-dtype", "bfloat16",
                 "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert (result["dtype"], result["draft_dtype"]) == ("float32", "bfloat16")
    assert [(row["batch_size"], row["draft"], row["drafting"]) for row in result["rows"]] == [
        (size, draft, way) for size in (1, 4) for draft in ("3", "2", "3x2:6") for way in ("fixed", "adaptive")]
    for row in result["rows"]:
        assert row["prompts"] == 5 and row["identical"] == 5
        assert row["plain_tokens"] == row["speculative_tokens"] > 0
        assert row["speedup"] == pytest.approx(row["speculative_tokens_per_second"] / row["plain_tokens_per_second"],
                                               rel=1e-2)
        assert row["mean_accepted"] >= 1.0
        # The split of the speedup: the two factors multiply back to it.
        assert row["speedup"] == pytest.approx(row["pass_reduction"] / row["pass_cost"], rel=1e-2)
        # generate() runs one forward pass per new token of the longest answer of a batch; at batch 1, of the answer.
        if row["batch_size"] == 1:
            assert row["plain_passes"] == row["plain_tokens"]


def test_bench_generate_samples_on_every_side_with_one_seed(tiny_dir, tmp_path, capsys):
    import json

    from caftkit.cli import main

    output = tmp_path / "bench.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"say {i}"}]})
                               + "\n" for i in range(3)))
    assert main(["bench", "generate", "--model", str(tiny_dir / "model"), "--heads", str(tiny_dir / "heads"),
                 "--data", str(prompts), "--num-prompts", "3", "--batch-sizes", "1", "--max-new-tokens", "10",
                 "--temperatures", "0,0.7", "--top-p", "0.9", "--drafting", "adaptive", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert (result["top_p"], result["seed"]) == (0.9, 0)
    rows = {row["temperature"]: row for row in result["rows"]}
    assert set(rows) == {0.0, 0.7} and {row["drafting"] for row in result["rows"]} == {"adaptive"}
    assert rows[0.0]["identical"] == 3 and rows[0.7]["identical"] is None  # samples differ by their random stream
    assert rows[0.7]["speculative_tokens"] > 0 and rows[0.7]["plain_tokens"] > 0
    assert main(["bench", "generate", "--model", str(tiny_dir / "model"), "--heads", str(tiny_dir / "heads"),
                 "--drafting", "fixed,greedy"]) == 2
    assert "--drafting: 'greedy' is not one of fixed, adaptive" in capsys.readouterr().err
