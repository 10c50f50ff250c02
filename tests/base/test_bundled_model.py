"""End to end on the bundled SmolLM2-135M-Instruct (converted once from its GGUF file, then cached)."""

from __future__ import annotations

import os

import pytest
import torch
from reference import naive_head_losses

from caftkit.core.heads import attach_heads, get_heads
from caftkit.core.multitoken import head_statistics, weighted_loss
from caftkit.core.weights import head_loss_weights
from caftkit.models import BUNDLED_MODEL, load_model_and_tokenizer


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_model_and_tokenizer(BUNDLED_MODEL)
    return model.eval(), tokenizer


def test_bundled_model_is_smollm2_and_answers(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])


def test_multi_token_loss_on_smollm_matches_naive_reference(smollm):
    model, tokenizer = smollm
    text = ["Concept-aware fine-tuning teaches a model to see several tokens ahead.",
            "CC(=O)Nc1ccc(O)cc1 is paracetamol."]
    tokenizer.padding_side = "right"
    batch = dict(tokenizer(text, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    prompt = tokenizer("Write a molecule:", return_tensors="pt")
    before = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    attach_heads(model, 4)
    try:
        with torch.no_grad():
            for p in get_heads(model).parameters():  # heads that differ from layer L
                p.add_(torch.randn_like(p) * 1e-3)
            stats = head_statistics(model, batch, num_aux_heads=4)
            reference = naive_head_losses(model, batch, 5)
            for loss_sum, count, expected in zip(stats.loss_sums, stats.counts, reference):
                torch.testing.assert_close(loss_sum / count, expected, rtol=1e-5, atol=0)
            weights = head_loss_weights("caft", 4)
            torch.testing.assert_close(
                weighted_loss(stats, weights, stats.counts), sum(w * loss for w, loss in zip(weights, reference)),
                rtol=1e-5, atol=0,
            )
        assert torch.equal(model.generate(**prompt, max_new_tokens=10, do_sample=False), before)
    finally:
        from caftkit.core.heads import detach_heads

        detach_heads(model)


def test_loading_stays_offline_without_changing_the_environment(tmp_path, monkeypatch):
    """A hub id is read from the Hugging Face cache only (`local_files_only`), and one that is not cached is
    refused in one line before transformers is asked; no process-wide setting is written."""
    import huggingface_hub.constants

    from caftkit.models import load_tokenizer, pretrained_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # A hub cache holding the config of one model, as `huggingface_hub` lays it out.
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--cached-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--some-org--cached-model" / "refs").mkdir()
    (cache / "models--some-org--cached-model" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert pretrained_source("some-org/cached-model") == ("some-org/cached-model", {"local_files_only": True})
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert pretrained_source(str(folder)) == (str(folder), {})
    with pytest.raises(FileNotFoundError, match="model: no-such-org/no-such-model is neither a folder here nor a "
                                                 "model in the Hugging Face cache"):
        load_tokenizer("no-such-org/no-such-model")
    assert "HF_HUB_OFFLINE" not in os.environ
