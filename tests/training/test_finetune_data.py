"""`caft finetune` on what a base model without a chat template is given: `--chat-template`, string prompts and
completions learnt as plain text, `--no-completion-only`, and a Hub dataset id from the local cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_model
from tiny_tokenizer import CHAT_TEMPLATE, tiny_tokenizer
from transformers import AutoTokenizer, TrainerCallback

from caftkit.cli import main
from caftkit.training.finetuning import FINAL_DIR, RUN_FILE
from caftkit.training.finetuning import finetune as run_finetune
from caftkit.training.settings import FinetuneSettings


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer has no chat template, as a base (not instruction-tuned) model's."""
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_model("llama").save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return path


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def finetune(base_dir: Path, data: str, output: Path, *flags: str) -> int:
    return main(["finetune", "--model", str(base_dir), "--data", data, "--mode", "ntp", "--output", str(output),
                 "--batch-size", "4", "--max-steps", "2", "--eval-fraction", "0.25", *flags])


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"molecule {i}"}, {"role": "assistant", "content": "CCO"}]}
            for i in range(n)]


def test_a_chat_template_is_given_learnt_with_and_saved(base_dir, tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", chats(8))
    assert finetune(base_dir, str(data), tmp_path / "refused") == 2
    assert "has no chat template: give one with --chat-template" in capsys.readouterr().err
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    run = tmp_path / "run"
    assert finetune(base_dir, str(data), run, "--chat-template", str(template)) == 0
    assert AutoTokenizer.from_pretrained(run / FINAL_DIR).chat_template == CHAT_TEMPLATE
    assert json.loads((run / RUN_FILE).read_text())["settings"]["chat_template"] == str(template)


class LabelCounter(TrainerCallback):
    """Counts the tokens that carry the loss in every training batch."""

    def __init__(self):
        self.labelled = 0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.labelled = sum(int((batch["labels"] != -100).sum()) for batch in train_dataloader)


def test_plain_prompts_and_completions_train_a_base_model(base_dir, tmp_path):
    """String prompt/completion records need no template: the completion and its end token carry the loss, and
    with --no-completion-only-loss (TRL's name) the prompt's tokens too."""
    records = [{"prompt": f"molecule {i}:", "completion": " CCO"} for i in range(8)]
    data = write(tmp_path / "pc.jsonl", records)
    labelled = {}
    for name, flags in (("completions", ()), ("everything", ("--no-completion-only-loss",))):
        assert finetune(base_dir, str(data), tmp_path / name, *flags) == 0
        record = json.loads((tmp_path / name / RUN_FILE).read_text())
        assert record["settings"]["completion_only"] is (name == "completions")
        counter = LabelCounter()
        run_finetune(str(tmp_path / name / "again"), FinetuneSettings(**record["settings"]), callbacks=[counter])
        labelled[name] = counter.labelled
    train = json.loads((tmp_path / "completions" / RUN_FILE).read_text())["train_examples"]
    # one token per character: " CCO" and the end token; "molecule i:" before them
    assert labelled == {"completions": train * (len(" CCO") + 1),
                        "everything": train * (len("molecule 0:") + len(" CCO") + 1)}


def test_a_cached_hub_dataset_is_fine_tuned_on_by_its_id(base_dir, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "datasets--someone--molecules"
    snapshot = repo / "snapshots" / ("0" * 40)
    write((snapshot / "data").mkdir(parents=True) or snapshot / "data" / "train.jsonl",
          [{"text": f"molecule {i}: CCO"} for i in range(8)])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(tmp_path)
    assert finetune(base_dir, "someone/molecules", tmp_path / "run") == 0
    record = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert record["data"]["records"] == 8 and record["train_examples"] + record["held_out_examples"] == 8
