"""The chunked multi-token loss equals a naive full-logits reference, in value and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import naive_head_losses
from tiny_models import ARCHITECTURES, random_batch, tiny_model
from torch import nn

from caftkit.core.heads import attach_heads, get_heads
from caftkit.core.loss import (
    DEFAULT_CHUNK_ELEMENTS,
    MIN_DEFAULT_CHUNK_ROWS,
    chunk_rows,
    linear_cross_entropy,
    sequence_ids_from_positions,
    shifted_targets,
)
from caftkit.core.multitoken import count_targets, head_statistics, weighted_loss
from caftkit.core.weights import gamma_schedule, head_loss_weights

IMPLS = ["fused", "checkpoint"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item() + 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale,softcap,bias", [(1.0, None, False), (0.5, None, True), (1.0, 3.0, False)])
def test_linear_cross_entropy_matches_full_logits(impl, scale, softcap, bias):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(16, 50, bias=bias).double()
    targets = torch.randint(0, 50, (37,))
    # 100 logits per chunk: 2 rows at a time, so the 37 rows take 19 chunks, the last one short.
    loss, correct = linear_cross_entropy(hidden, head, targets, logit_scale=scale, logit_softcap=softcap,
                                         impl=impl, chunk_elements=100)
    loss.backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()

    logits = head(hidden) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected.backward()
    expected_grads = [hidden.grad] + [p.grad for p in head.parameters()]

    assert_close(loss.double(), expected)
    assert correct.item() == (logits.argmax(-1) == targets).sum().item()
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


def test_default_chunks_hold_enough_rows_to_amortise_the_unembedding():
    # Large vocabularies: never fewer than the minimum rows, whatever the element budget says.
    assert chunk_rows(128_256) == MIN_DEFAULT_CHUNK_ROWS == 1024
    assert chunk_rows(49_152) == 1024
    # Small vocabularies: the element budget gives more rows than the minimum.
    assert chunk_rows(4_096) == DEFAULT_CHUNK_ELEMENTS // 4_096 == 2048
    # An explicit budget is taken as given (tests and users who need small chunks).
    assert chunk_rows(49_152, chunk_elements=100 * 49_152) == 100
    assert chunk_rows(50, chunk_elements=10) == 1


def test_default_chunking_over_several_chunks_matches_full_logits():
    torch.manual_seed(0)
    vocab = 9_000  # above DEFAULT_CHUNK_ELEMENTS / MIN_DEFAULT_CHUNK_ROWS: chunks of the minimum 1,024 rows
    rows = 2 * MIN_DEFAULT_CHUNK_ROWS + 37  # three chunks, the last one short
    assert chunk_rows(vocab) == MIN_DEFAULT_CHUNK_ROWS
    hidden = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(8, vocab, bias=False).double()
    targets = torch.randint(0, vocab, (rows,))
    loss, correct = linear_cross_entropy(hidden, head, targets)
    loss.backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected.backward()
    assert_close(loss.double(), expected)
    assert correct.item() == (logits.argmax(-1) == targets).sum().item()
    for got, want in zip(grads, [hidden.grad, head.weight.grad]):
        assert_close(got, want)


def test_linear_cross_entropy_scales_stored_gradient_by_upstream_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, requires_grad=True)
    head = nn.Linear(8, 20, bias=False)
    targets = torch.randint(0, 20, (9,))
    loss, _ = linear_cross_entropy(hidden, head, targets)
    (loss * 0.25).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    (F.cross_entropy(head(hidden), targets, reduction="sum") * 0.25).backward()
    assert_close(got, hidden.grad)


def test_no_valid_target_gives_zero_loss_and_zero_gradient():
    model = tiny_model("llama")
    attach_heads(model, num_aux_heads=2, trainable=True)
    assert get_heads(model).num_aux_heads == 2
    batch = random_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    stats = head_statistics(model, batch, num_aux_heads=2)
    loss = weighted_loss(stats, head_loss_weights("caft", 2), stats.counts)
    loss.backward()
    assert loss.item() == 0.0
    assert stats.counts.tolist() == [0, 0, 0]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "backward must still reach the parameters"
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def _parameter_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_token_loss_and_gradients_match_naive_reference(arch, impl):
    model = tiny_model(arch).double()
    attach_heads(model, 3, trainable=True)
    with torch.no_grad():  # heads that differ from layer L and from each other
        for p in get_heads(model).parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = random_batch(batch_size=3, seq_len=14)
    weights = head_loss_weights("caft", 3, beta=0.5, gamma=0.7)  # large aux weights: head gradients visible

    stats = head_statistics(model, batch, num_aux_heads=3, impl=impl, chunk_elements=64 * 7)
    loss = weighted_loss(stats, weights, stats.counts)
    loss.backward()
    ours = _parameter_grads(model)
    model.zero_grad(set_to_none=True)

    reference_losses = naive_head_losses(model, batch, 4)
    reference = sum(w * loss for w, loss in zip(weights, reference_losses))
    reference.backward()
    expected = _parameter_grads(model)

    for got, want in zip([s / c for s, c in zip(stats.loss_sums, stats.counts)], reference_losses):
        assert_close(got.double(), want)
    assert_close(loss.double(), reference)
    assert set(ours) == set(expected)
    trunk = [n for n in ours if "caft_heads" not in n]
    heads = [n for n in ours if "caft_heads" in n]
    assert trunk and heads
    for name in ours:
        assert_close(ours[name], expected[name])


def test_head_training_leaves_trunk_without_gradient():
    model = tiny_model("qwen2")
    attach_heads(model, 2, trainable=True)
    stats = head_statistics(model, random_batch(), num_aux_heads=2, train_trunk=False, main_needs_grad=False)
    weighted_loss(stats, head_loss_weights("heads", 2), stats.counts).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    # The trunk runs without gradient even though its weights require it; the shared final norm and lm_head
    # are reached through the heads (the trainer freezes them in head training).
    assert with_grad == {n for n, _ in model.named_parameters() if n.startswith("caft_heads.")} | {
        "model.norm.weight", "lm_head.weight"}


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulation_equals_one_big_batch(impl):
    model = tiny_model("llama")
    attach_heads(model, 3, trainable=True)
    big = random_batch(batch_size=4, seq_len=10, pad_last=6)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    weights = head_loss_weights("caft", 3, beta=0.3)

    stats = head_statistics(model, big, num_aux_heads=3, impl=impl)
    big_loss = weighted_loss(stats, weights, stats.counts)
    big_loss.backward()
    expected = _parameter_grads(model)
    model.zero_grad(set_to_none=True)

    step_counts = sum(count_targets(half, 3) for half in halves)
    assert step_counts.tolist() == stats.counts.tolist()
    # The halves hold different numbers of valid targets: a per-micro-batch mean would be wrong.
    assert count_targets(halves[0], 3)[0] != count_targets(halves[1], 3)[0]
    total = 0.0
    for half in halves:
        half_stats = head_statistics(model, half, num_aux_heads=3, impl=impl)
        half_loss = weighted_loss(half_stats, weights, step_counts)
        half_loss.backward()
        total += half_loss.item()
    got = _parameter_grads(model)
    assert total == pytest.approx(big_loss.item(), rel=1e-5)
    for name in expected:
        assert_close(got[name], expected[name])


def test_no_full_vocabulary_logits_are_saved_for_backward():
    model = tiny_model("llama")
    attach_heads(model, 4)
    batch = random_batch(batch_size=2, seq_len=40, pad_last=0)
    vocab = model.config.vocab_size
    saved = []

    weight_storage = model.lm_head.weight.untyped_storage().data_ptr()

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != weight_storage:  # the unembedding itself is no logits
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = head_statistics(model.train(), batch, num_aux_heads=4, chunk_elements=vocab * 8)
    weighted_loss(stats, head_loss_weights("caft", 4), stats.counts).backward()
    # Logits (last dimension = vocab) of more rows than one chunk would be full logits of a head.
    logits_like = [shape for shape in saved if shape and shape[-1] == vocab]
    assert saved and all(math.prod(shape) <= 8 * vocab for shape in logits_like), logits_like
    # The same check on plain transformers training does see the full logits.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    assert any(math.prod(shape) >= batch["input_ids"].numel() * vocab for shape in saved if shape[-1:] == (vocab,))


def test_shifted_targets_never_cross_a_packed_boundary():
    labels = torch.tensor([[10, 11, 12, 20, 21, 22, 23]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    sequence_ids = sequence_ids_from_positions(position_ids)
    assert sequence_ids.tolist() == [[1, 1, 1, 2, 2, 2, 2]]
    assert shifted_targets(labels, 1, sequence_ids).tolist() == [[11, 12, -100, 21, 22, 23, -100]]
    assert shifted_targets(labels, 2, sequence_ids).tolist() == [[12, -100, -100, 22, 23, -100, -100]]
    assert shifted_targets(labels, 3).tolist() == [[20, 21, 22, 23, -100, -100, -100]]
    assert shifted_targets(labels, 9).tolist() == [[-100] * 7]


def test_packed_batch_matches_separate_sequences():
    model = tiny_model("llama")
    attach_heads(model, 2)
    first, second = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([20, 21, 22, 23])
    packed = {
        "input_ids": torch.cat([first, second])[None],
        "position_ids": torch.cat([torch.arange(5), torch.arange(4)])[None],
        "labels": torch.cat([first, second])[None],
    }
    stats = head_statistics(model, packed, num_aux_heads=2)
    assert stats.counts.tolist() == [4 + 3, 3 + 2, 2 + 1]
    # Eager attention with position ids alone is not block-diagonal, so compare the targets, not the losses.
    separate = [count_targets({"labels": s[None]}, 2) for s in (first, second)]
    assert (separate[0] + separate[1]).tolist() == stats.counts.tolist()


def test_schedules():
    assert gamma_schedule("rsine", 0, 100) == pytest.approx(1.0)
    assert gamma_schedule("rsine", 50, 100) == pytest.approx(math.sin(math.pi / 4))
    assert gamma_schedule("rsine", 100, 100) == pytest.approx(0.0)
    assert gamma_schedule("sine", 0, 100) == pytest.approx(0.0)
    assert gamma_schedule("sine", 100, 100) == pytest.approx(1.0)
    assert gamma_schedule("linear", 25, 100) == pytest.approx(0.75)
    assert gamma_schedule("constant", 99, 100) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        gamma_schedule("cosine", 0, 1)


def test_a_schedule_that_ends_early_is_zero_after_its_end():
    # rsine over the first quarter of 100 steps: the whole curve in steps 0..25, then nothing
    assert gamma_schedule("rsine", 0, 100, end=0.25) == pytest.approx(1.0)
    assert gamma_schedule("rsine", 10, 100, end=0.25) == pytest.approx(math.sin(math.pi / 2 * (1 - 10 / 25)))
    assert [gamma_schedule(name, step, 100, end=0.25) for name in ("rsine", "constant", "sine")
            for step in (25, 26, 99)] == [0.0] * 9
    assert gamma_schedule("linear", 5, 100, end=0.1) == pytest.approx(0.5)
    assert gamma_schedule("constant", 99, 100, end=1.0) == 1.0  # the default: the whole run
    with pytest.raises(ValueError, match=r"end must be in \(0, 1\], got 0"):
        gamma_schedule("rsine", 0, 100, end=0)


def test_head_loss_weights_follow_the_paper():
    assert head_loss_weights("ntp", 4) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert head_loss_weights("heads", 4, alpha=0.8) == pytest.approx([0.0, 1.0, 0.8, 0.64, 0.512])
    assert head_loss_weights("caft", 4, alpha=0.8, beta=0.01, gamma=0.5) == pytest.approx(
        [1.0, 0.01 * 0.5 * 0.8, 0.01 * 0.5 * 0.64, 0.01 * 0.5 * 0.512, 0.01 * 0.5 * 0.4096]
    )


def test_eight_heads_one_at_a_time_give_the_losses_and_gradients_of_the_full_logits_reference():
    """With 8 heads, each recomputed alone in the backward pass, the losses and the gradients of every trunk and
    head weight equal those of the naive full-logits reference."""
    model = tiny_model("llama").double()
    attach_heads(model, 8, trainable=True)
    with torch.no_grad():
        for p in get_heads(model).parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = random_batch(batch_size=2, seq_len=20, pad_last=4)
    weights = head_loss_weights("caft", 8, beta=0.5, gamma=0.9)

    stats = head_statistics(model, batch, num_aux_heads=8)
    loss = weighted_loss(stats, weights, stats.counts)
    loss.backward()
    ours = _parameter_grads(model)
    model.zero_grad(set_to_none=True)
    reference_losses = naive_head_losses(model, batch, 9)
    sum(w * loss for w, loss in zip(weights, reference_losses)).backward()
    expected = _parameter_grads(model)

    for got, want in zip([s / c for s, c in zip(stats.loss_sums, stats.counts)], reference_losses, strict=True):
        assert_close(got.double(), want)
    assert set(ours) == set(expected) and any("caft_heads.layers.7." in name for name in ours)
    for name in ours:
        assert_close(ours[name], expected[name])


def _bytes_saved_for_backward(run) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `run()` builds its graph (the weights, which
    are there anyway, not counted)."""
    saved = []

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved)


def test_each_further_head_keeps_only_its_output_not_its_activations():
    """What the forward pass keeps for backward grows, per further head, by about its output (the rows scored by
    the loss), not by the decoder layer's activations: those are recomputed one head at a time."""
    model = tiny_model("llama").train()
    attach_heads(model, 8)
    # Frozen, as in every CAFT run: a trainable unembedding would add its own gradient per head, kept by the fused
    # loss (which computes the gradients in its forward pass), whatever the heads do.
    model.lm_head.weight.requires_grad_(False)
    batch = random_batch(batch_size=2, seq_len=40, pad_last=0)
    kept = {n: _bytes_saved_for_backward(lambda n=n: head_statistics(model, batch, num_aux_heads=n))
            for n in (1, 8)}
    per_head = (kept[8] - kept[1]) / 7
    rows, hidden = batch["input_ids"].numel(), model.config.hidden_size
    output_bytes = rows * hidden * 4
    assert per_head <= 3 * output_bytes, (per_head, output_bytes)
    # A head run plainly keeps far more: its attention and MLP activations.
    parts_call = {}

    def one_plain_head():
        from caftkit.core.architecture import find_model_parts
        from caftkit.core.layer_call import capture_layer_inputs

        with capture_layer_inputs(find_model_parts(model)) as capture:
            model(**batch)
        parts_call["call"] = capture.layer_call

    one_plain_head()
    call = parts_call["call"]
    plain = _bytes_saved_for_backward(lambda: get_heads(model).head_output(0, call.hidden_states, call))
    assert plain > 3 * output_bytes, (plain, output_bytes)
