"""A real vLLM (its CPU build, started from `.venv-vllm` as a subprocess) serves caftkit's head 2 as an EAGLE-3 draft
of the bundled model: greedy outputs identical to vLLM without the draft, vLLM's acceptance equal (within 2 points)
to caftkit's own count of head 2's one-token drafts along the same outputs, a draft with one weight perturbed
accepting less, and a draft missing a weight refused by caftkit before vLLM is started.

Run with `make test-vllm`, which builds `.venv-vllm` and names its Python in CAFTKIT_VLLM_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from caftkit.bench.generation import bench_prompts
from caftkit.core.heads import attach_heads
from caftkit.data import BUNDLED_SHAREGPT, DataError, iter_raw_records, to_messages
from caftkit.evaluation.draft_agreement import one_token_draft_agreement
from caftkit.models import BUNDLED_MODEL, load_model, load_tokenizer, resolve_model_path
from caftkit.training.export_heads import export_heads, read_eagle3_draft
from caftkit.training.head_training import HeadTrainingSettings, train_heads

ENGINE_SCRIPT = Path(__file__).parent / "vllm_generate.py"
PROMPTS = 32
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_python):
    """Heads of the bundled model trained briefly on ShareGPT (so that some drafts hold), their EAGLE-3 draft, the
    prompts, and vLLM's answers without and with the draft."""
    root = tmp_path_factory.mktemp("vllm")
    (root / "train.jsonl").write_text("".join(json.dumps({"messages": turns}) + "\n"
                                              for turns in first_exchanges(340)))
    # Brief (40 steps of 128 tokens: CI's time), yet enough for some drafts to hold.
    train_heads(str(root / "heads"), HeadTrainingSettings(
        model=BUNDLED_MODEL, data=str(root / "train.jsonl"), num_aux_heads=1, max_steps=40, batch_size=8,
        max_length=128, eval_fraction=0.05, learning_rate=3e-3, mixed_precision="no"), progress=False)
    export_heads(BUNDLED_MODEL, str(root / "heads"), root / "draft")
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    prompts = bench_prompts(tokenizer, "sharegpt", PROMPTS, skip=2000)  # prompts the heads were not trained on
    (root / "prompts.json").write_text(json.dumps(prompts))
    return {"root": root, "prompts": prompts, "plain": run_vllm(vllm_python, root, None),
            "drafted": run_vllm(vllm_python, root, root / "draft")}


def first_exchanges(count: int) -> list[list[dict[str, str]]]:
    """The first user turn and its answer of the first `count` usable conversations of the bundled ShareGPT set
    (the set has empty and one-sided records, left out here)."""
    exchanges = []
    for where, raw in iter_raw_records(BUNDLED_SHAREGPT):
        try:
            messages = to_messages(raw, where)
        except DataError:
            continue
        if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
            exchanges.append(messages[:2])
        if len(exchanges) == count:
            return exchanges
    raise AssertionError(f"only {len(exchanges)} usable conversations in the bundled ShareGPT set")


def run_vllm(python: str, root: Path, draft: Path | None) -> dict:
    """vLLM's greedy answers to the prompts (with `draft` as an EAGLE-3 draft), checked by caftkit first."""
    if draft is not None:
        read_eagle3_draft(draft)  # a draft that is not complete never reaches the engine
    output = root / f"vllm-{draft.name if draft else 'plain'}.json"
    result = subprocess.run([python, str(ENGINE_SCRIPT), resolve_model_path(BUNDLED_MODEL), str(root / "prompts.json"),
                             str(NEW_TOKENS), str(draft) if draft else "-", str(output)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text())


def acceptance(run: dict) -> float:
    counters = run["counters"]
    return counters["vllm:spec_decode_num_accepted_tokens"] / counters["vllm:spec_decode_num_draft_tokens"]


def test_the_draft_keeps_the_answers_and_accepts_what_caftkit_counts(served):
    assert len(served["plain"]["answers"]) == PROMPTS
    assert served["drafted"]["answers"] == served["plain"]["answers"]  # token for token
    model = load_model(BUNDLED_MODEL).eval()
    attach_heads(model, str(served["root"] / "heads"))
    ours = one_token_draft_agreement(model, served["prompts"], served["drafted"]["answers"])
    engine = served["drafted"]["counters"]
    print(f"vLLM: {engine}; caftkit: {ours.accepted} of {ours.drafted} ({ours.rate:.3f})", file=sys.stderr)
    assert ours.accepted > 0  # some drafts hold: the comparison says something
    assert abs(acceptance(served["drafted"]) - ours.rate) <= 0.02
    assert abs(engine["vllm:spec_decode_num_draft_tokens"] - ours.drafted) <= 0.02 * ours.drafted


def altered_draft(root: Path, name: str, alter) -> Path:
    """A copy of the served draft under `name`, its weights changed in place by `alter(state)`."""
    altered = root / name
    altered.mkdir()
    (altered / "config.json").write_text((root / "draft" / "config.json").read_text())
    state = load_file(str(root / "draft" / "model.safetensors"))
    alter(state)
    save_file(state, str(altered / "model.safetensors"))
    return altered


def test_a_perturbed_draft_accepts_less(served, vllm_python):
    root = served["root"]

    def perturb(state):
        weight = state["midlayer.mlp.down_proj.weight"]
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        state["midlayer.mlp.down_proj.weight"] = weight + weight.std() * noise

    run = run_vllm(vllm_python, root, altered_draft(root, "perturbed", perturb))
    assert run["answers"] == served["plain"]["answers"]  # drafts never change greedy answers
    assert acceptance(run) < acceptance(served["drafted"])


def test_a_draft_missing_a_weight_never_reaches_the_engine(served, vllm_python):
    root = served["root"]
    broken = altered_draft(root, "broken", lambda state: state.pop("midlayer.hidden_norm.weight"))
    with pytest.raises(ValueError, match="not a complete EAGLE-3 draft: missing midlayer.hidden_norm.weight"):
        run_vllm(vllm_python, root, broken)
    assert not (root / "vllm-broken.json").exists()
