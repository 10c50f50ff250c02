"""The trunk cache of head training: a cached batch scores and trains the heads exactly as a fresh forward does."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import random_batch, tiny_model
from tiny_tokenizer import tiny_tokenizer

from caftkit.core.heads import attach_heads, get_heads
from caftkit.core.multitoken import head_statistics, weighted_loss
from caftkit.core.samplers import FixedBatchesSampler
from caftkit.core.trunk_cache import TrunkCache, trunk_is_deterministic
from caftkit.core.weights import head_loss_weights
from caftkit.training.head_training import HeadTrainingSettings, train_heads


def stats_and_grads(model, batch, cache):
    get_heads(model).zero_grad()
    stats = head_statistics(model, batch, num_aux_heads=3, train_trunk=False, main_needs_grad=False,
                            trunk_cache=cache)
    weighted_loss(stats, head_loss_weights("heads", 3), stats.counts).backward()
    grads = [p.grad.clone() for p in get_heads(model).parameters()]
    return stats, grads


def test_cached_batch_gives_the_same_statistics_and_head_gradients():
    model = tiny_model("llama")
    attach_heads(model, 3, trainable=True)
    model.requires_grad_(False)
    get_heads(model).requires_grad_(True)
    batch = random_batch(batch_size=3, seq_len=14)
    plain, plain_grads = stats_and_grads(model, batch, None)
    cache = TrunkCache(max_bytes=2**30)
    miss, miss_grads = stats_and_grads(model, batch, cache)
    hit, hit_grads = stats_and_grads(model, batch, cache)
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1) and cache.bytes > 0
    for stats, grads in ((miss, miss_grads), (hit, hit_grads)):
        assert all(torch.equal(a, b) for a, b in zip(stats.loss_sums, plain.loss_sums))
        assert torch.equal(stats.counts, plain.counts) and torch.equal(stats.correct, plain.correct)
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    # Another batch (other labels) is another entry.
    other = dict(batch, labels=batch["labels"].roll(1, dims=1))
    assert TrunkCache.key(other) != TrunkCache.key(batch)


def test_budget_bounds_what_is_kept():
    model = tiny_model("llama")
    attach_heads(model, 2)
    cache = TrunkCache(max_bytes=1)
    with torch.no_grad():
        head_statistics(model, random_batch(), num_aux_heads=2, train_trunk=False, main_needs_grad=False,
                        heads_need_grad=False, trunk_cache=cache)
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="only for head training"):
        head_statistics(model, random_batch(), num_aux_heads=2, trunk_cache=cache)


def test_fixed_batches_recur_in_a_new_order_each_epoch():
    lengths = [random.Random(i).randint(5, 50) for i in range(23)]
    sampler = FixedBatchesSampler(lengths, batch_size=4, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(23)) and len(sampler) == 23
        epochs.append([order[i: i + 4] for i in range(0, 23, 4)])
    assert all(sorted(map(tuple, e)) == sorted(map(tuple, epochs[0])) for e in epochs)  # the same batches
    assert epochs[0] != epochs[1] != epochs[2]  # visited in another order
    assert all(len(e[-1]) == 3 for e in epochs)  # the smaller batch last
    sampler.set_epoch(1)
    assert [list(sampler)[i: i + 4] for i in range(0, 23, 4)] == epochs[1]  # seeded: a resumed epoch replays


def test_dropout_disables_the_cache():
    assert trunk_is_deterministic(tiny_model("llama"))
    gpt2 = tiny_model("gpt2")  # GPT-2 configs have dropout (resid_pdrop 0.1)
    assert not trunk_is_deterministic(gpt2)


def write_conversations(path, n=40):
    rng = random.Random(0)
    words = ["carbon", "oxygen", "ring", "bond", "acid"]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"say {i % 5}"},
        {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(5))}]}) + "\n" for i in range(n)))
    return path


def test_head_training_with_the_cache_trains_the_same_heads(tmp_path):
    """Two epochs with every batch's trunk cached give the heads of the same run with nothing cached."""
    data = write_conversations(tmp_path / "data.jsonl")
    heads = {}
    for name, budget in (("cached", 1.0), ("uncached", 1e-12)):
        model = tiny_model("llama")
        settings = HeadTrainingSettings(model="tiny", data=str(data), num_aux_heads=2, epochs=2, learning_rate=3e-3,
                                        batch_size=4, eval_fraction=0.2, warmup=0.0, mixed_precision="no",
                                        trunk_cache_gb=budget)
        summary = train_heads(str(tmp_path / name), settings, model=model, tokenizer=tiny_tokenizer(),
                              progress=False)
        heads[name] = (get_heads(model).state_dict(), summary)
    cached, uncached = heads["cached"][1]["trunk_cache"], heads["uncached"][1]["trunk_cache"]
    # 8 training batches (and 2 held-out) per epoch: the second epoch and later evaluations hit the cache.
    assert cached["batches"] == 10 and cached["hits"] >= 8
    assert uncached["batches"] == 0 and uncached["hits"] == 0
    for key, value in heads["cached"][0].items():
        assert torch.allclose(value, heads["uncached"][0][key], atol=1e-6, rtol=0), key
    for name, metrics in heads["uncached"][1]["held_out_after"].items():
        assert heads["cached"][1]["held_out_after"][name] == pytest.approx(metrics), name
