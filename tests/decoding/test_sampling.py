"""Sampling stays lossless under speculation: the continuations sampled with drafts (chain and tree) have the
distribution of `model.generate(do_sample=True)`'s, a test that a biased acceptance rule fails; with a seed they are
the very tokens sampled without drafts; temperature 0 is greedy, token for token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from caftkit.core.heads import attach_heads
from caftkit.decoding import speculative
from caftkit.decoding.draft_tree import accept
from caftkit.decoding.sampling import TokenChooser
from caftkit.decoding.settings import Sampling
from caftkit.decoding.speculative import generate

PROMPT = [1, 17, 9, 9, 9]
SAMPLES = 10_000
NEW_TOKENS = 3


def peaked_model():
    """A tiny model that, after a run of token 9, continues it with probability about 0.6 at each step, and 3 heads
    (copies of its last layer) that guess 9: about 40% of the continuations are (9, 9, 9), the rest spread over
    hundreds of triples, and drafts are accepted often (the unembedding of token 9 is pushed toward the mean
    direction of the final hidden states)."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[9] += 4.0 * weight.mean(0) / weight.mean(0).norm()
    attach_heads(model, 3)
    return model


def plain_samples(model, sampling: Sampling) -> np.ndarray:
    """`SAMPLES` continuations of `NEW_TOKENS` tokens from transformers' own sampling, one row each."""
    torch.manual_seed(sampling.seed)
    ids = torch.tensor([PROMPT] * SAMPLES)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         pad_token_id=0, eos_token_id=None, **sampling.generate_kwargs())
    return out[:, len(PROMPT):].numpy()


def speculative_samples(model, sampling: Sampling, **draft) -> tuple[np.ndarray, float]:
    ids = torch.tensor([PROMPT] * SAMPLES)
    out = generate(model, input_ids=ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], sampling=sampling,
                   adaptive=False, **draft)
    return np.array(out.sequences), out.mean_accepted


def homogeneity_p_value(first: np.ndarray, second: np.ndarray) -> float:
    """p-value of a chi-square test that two samples of token triples come from one distribution: cells whose
    expected count is under 5 in either sample are pooled into one; the chi-square tail by Wilson and Hilferty's
    cube-root normal approximation (accurate for the hundreds of degrees of freedom here)."""
    keys = {tuple(row) for row in first} | {tuple(row) for row in second}
    index = {key: i for i, key in enumerate(sorted(keys))}
    counts = np.zeros((2, len(index)))
    for side, sample in enumerate((first, second)):
        for row in sample:
            counts[side, index[tuple(row)]] += 1
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    rare = (expected < 5).any(0)
    table = np.concatenate([counts[:, ~rare], counts[:, rare].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, seed=11), Sampling(temperature=1.0, top_p=0.9,
                                                                                   seed=12)],
                         ids=["t1", "top-p-0.9"])
def test_speculative_sampling_has_plain_samplings_distribution(model, sampling):
    reference = plain_samples(model, sampling)
    assert len({tuple(row) for row in reference}) > 50  # a real distribution, not one continuation
    for draft in ({"candidates": 1}, {"candidates": 3, "tree_size": 8}):
        drawn, accepted = speculative_samples(model, sampling, **draft)
        assert accepted > 1.3, draft  # drafts are accepted often: the test exercises the accepting path
        assert homogeneity_p_value(reference, drawn) > 1e-3, draft


def test_the_test_fails_on_a_biased_acceptance_rule(model, monkeypatch):
    """A rule that always accepts the first draft (instead of comparing it with the model's sample) shifts the
    distribution of the second token toward the heads' guess: the same test rejects it."""
    sampling = Sampling(temperature=1.0, seed=11)

    def first_draft_always_holds(block, chosen):
        chosen = chosen.clone()
        first = (block.depth == 1).float().argmax(-1)  # each row's first depth-1 node
        chosen[:, 0] = block.tokens.gather(1, first[:, None]).squeeze(1)
        return accept(block, chosen)

    monkeypatch.setattr(speculative, "accept", first_draft_always_holds)
    drawn, _ = speculative_samples(model, sampling, candidates=1)
    assert homogeneity_p_value(plain_samples(model, sampling), drawn) < 1e-6


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, seed=21), Sampling(temperature=1.5, top_p=0.95,
                                                                                   top_k=20, seed=22)],
                         ids=["t1", "t1.5-top-p-top-k"])
def test_a_seeded_sample_is_the_same_whatever_the_drafts(model, sampling):
    """Each new token is drawn with a uniform number fixed by the seed, its row and its index: chains, trees, fixed
    or adaptive drafting give the tokens sampled without heads, row for row."""
    ids = torch.tensor([PROMPT, [1, 30, 31, 9, 9], [1, 2, 9, 9, 9]])
    plain = generate(model, input_ids=ids, max_new_tokens=24, eos_token_id=[], sampling=sampling, num_aux_heads=0)
    assert len({tuple(row) for row in plain.sequences}) == 3
    for draft in ({"candidates": 1, "adaptive": False}, {"candidates": 3, "tree_size": 8, "adaptive": False},
                  {"candidates": 1}, {"candidates": 3, "tree_size": 8}):
        out = generate(model, input_ids=ids, max_new_tokens=24, eos_token_id=[], sampling=sampling, **draft)
        assert out.sequences == plain.sequences, draft
        if not draft.get("adaptive", True):
            assert out.mean_accepted > 1.3, draft  # drafts held: the tokens came from verified blocks
    other = generate(model, input_ids=ids, max_new_tokens=24, eos_token_id=[], num_aux_heads=0,
                     sampling=Sampling(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       seed=sampling.seed + 1))
    assert other.sequences != plain.sequences  # the seed does choose the tokens


def test_temperature_zero_is_greedy_token_for_token(model):
    ids = torch.tensor([PROMPT])
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    for draft in ({"candidates": 1}, {"candidates": 3, "tree_size": 8}):
        out = generate(model, input_ids=ids, max_new_tokens=20, eos_token_id=[], sampling=Sampling(seed=5), **draft)
        assert out.sequences == [greedy]


def test_the_chooser_processes_logits_as_generate_does():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probabilities = TokenChooser(Sampling(temperature=0.5, top_k=3, top_p=0.9), "cpu").probabilities(logits)
    # temperature 0.5, the best 3, then the smallest set of mass >= 0.9 of those
    scaled = torch.softmax(logits[0, :3] / 0.5, -1)
    assert scaled[0] + scaled[1] >= 0.9 > scaled[0]
    expected = torch.tensor([scaled[0], scaled[1], 0, 0, 0]) / (scaled[0] + scaled[1])
    assert torch.allclose(probabilities[0], expected, atol=1e-6)
    assert TokenChooser(Sampling(), "cpu")(logits).tolist() == [0]
    with pytest.raises(ValueError, match="top_p must be > 0 and <= 1, got 0"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number, got nan"):
        Sampling(temperature=float("nan"))
    with pytest.raises(ValueError, match="give a temperature above 0 .the candidates per head of a draft tree are "
                                         "--candidates."):
        Sampling(top_k=3)
