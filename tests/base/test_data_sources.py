"""Data beyond chat records: a chat template given for a model without one, every token learnt
(`completion_only` off), string prompts and completions as plain text, and Hub dataset ids read from the local
cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_tokenizer import CHAT_TEMPLATE, tiny_tokenizer

from caftkit.data import ChatTemplateError, iter_conversations, iter_raw_records, render_prompt, tokenize_source
from caftkit.hub_data import parse_hub_dataset
from caftkit.models import ModelSettings, load_tokenizer, read_chat_template

CONVERSATION = [{"role": "user", "content": "molecule 1"}, {"role": "assistant", "content": "CCO"}]


def model_folder(path: Path, tokenizer) -> Path:
    """A folder `load_tokenizer` takes: the tokenizer and a model config."""
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def untemplated(tmp_path) -> Path:
    """The tiny tokenizer saved without a chat template (a base model's)."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    return model_folder(tmp_path / "base", tokenizer)


def test_a_chat_template_file_or_another_models_template_is_used(tmp_path):
    base = untemplated(tmp_path)
    assert load_tokenizer(str(base)).chat_template is None
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    from_file = load_tokenizer(str(base), str(template))
    assert render_prompt(from_file, CONVERSATION[:1]) == \
        "<|im_start|>user\nmolecule 1<|im_end|>\n<|im_start|>assistant\n"
    templated = model_folder(tmp_path / "chat-model", tiny_tokenizer())
    assert load_tokenizer(str(base), str(templated)).chat_template == CHAT_TEMPLATE
    # checked with the other settings, before anything loads
    assert ModelSettings(model=str(base), chat_template=str(template), device="cpu").chat_template == str(template)


@pytest.mark.parametrize("content, message", [
    ("{% for m in messages %}{{ m['content'] }}", "chatml.jinja:1: not a valid Jinja chat template"),
    ("  \n", "chatml.jinja: the chat template file is empty"),
])
def test_a_broken_chat_template_is_refused_in_one_line(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    Path("chatml.jinja").write_text(content)
    with pytest.raises(ValueError) as error:
        ModelSettings(model="m", chat_template="chatml.jinja", device="cpu")
    assert str(error.value).startswith(message)


def test_a_model_without_a_template_cannot_lend_one(tmp_path):
    base = untemplated(tmp_path)
    with pytest.raises(ValueError, match=f"chat_template: '{base}' has no chat template to take"):
        read_chat_template(str(base))


def test_without_a_template_the_error_says_what_to_pass(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template: give one with --chat-template"):
        render_prompt(tokenizer, CONVERSATION[:1])


def test_completion_only_off_learns_every_token(tmp_path):
    """Off, the masks are all ones over the same ids: prompts and the template's own text carry the loss too."""
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    tokenizer = tiny_tokenizer()
    only = tokenize_source(str(source), tokenizer, None).examples[0]
    every = tokenize_source(str(source), tokenizer, None, completion_only=False).examples[0]
    assert every["input_ids"] == only["input_ids"]
    assert every["assistant_masks"] == [1] * len(only["input_ids"])
    assert tokenizer.decode([t for t, m in zip(only["input_ids"], only["assistant_masks"]) if m]) == "CCO<|im_end|>"


def test_string_prompts_are_plain_text_for_a_model_without_a_template(tmp_path):
    """TRL's standard prompt-completion form: the prompt's tokens, the completion's, then end of sequence; the
    completion alone carries the loss unless completion_only is off. With a template, the same record is a chat."""
    source = tmp_path / "pc.jsonl"
    source.write_text(json.dumps({"prompt": "Q: 2+2 =", "completion": " 4"}) + "\n")
    tokenizer = tiny_tokenizer()
    chat = tokenize_source(str(source), tokenizer, None).examples[0]
    assert tokenizer.decode(chat["input_ids"]).startswith("<|im_start|>user\nQ: 2+2 =<|im_end|>")
    tokenizer.chat_template = None
    plain = tokenize_source(str(source), tokenizer, None).examples[0]
    prompt_ids = tokenizer("Q: 2+2 =")["input_ids"]
    completion_ids = tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert plain == {"input_ids": prompt_ids + completion_ids,
                     "assistant_masks": [0] * len(prompt_ids) + [1] * len(completion_ids)}
    every = tokenize_source(str(source), tokenizer, None, completion_only=False).examples[0]
    assert every == {"input_ids": plain["input_ids"], "assistant_masks": [1] * len(plain["input_ids"])}
    cut = tokenize_source(str(source), tokenizer, len(prompt_ids) + 1)
    assert cut.examples[0]["input_ids"] == plain["input_ids"][:len(prompt_ids) + 1]
    assert cut.stats.skipped == {f"truncated to {len(prompt_ids) + 1} tokens (kept)": 1}


def hub_cache(root: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A Hub cache holding one snapshot of dataset `repo_id` with `files`, laid out as `hf download` leaves it."""
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


@pytest.fixture
def cached_dataset(tmp_path, monkeypatch):
    """`someone/tiny-chat` in a Hub cache of its own, with a train and a test split, and no network."""
    train = [{"messages": CONVERSATION}, {"text": "CCO c1ccccc1"}, {"prompt": "Q", "completion": "A"}]
    root = hub_cache(tmp_path / "hub", "someone/tiny-chat", {"data/train.jsonl": jsonl(train),
                                                             "data/test.jsonl": jsonl([{"text": "C"}])})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(tmp_path)
    return train


def test_a_cached_hub_dataset_is_read_by_its_id(cached_dataset):
    """Rows come back as the records they were (columns other rows have are not added), named by id, split and
    row; `:test` picks the split."""
    rows = list(iter_raw_records("someone/tiny-chat"))
    assert rows == [(f"someone/tiny-chat:train row {i}", record) for i, record in enumerate(cached_dataset, 1)]
    records = list(iter_conversations("someone/tiny-chat"))
    assert [r.text for r in records] == [None, "CCO c1ccccc1", None]
    assert records[2].plain == ("Q", "A")
    assert list(iter_raw_records("someone/tiny-chat:test")) == [("someone/tiny-chat:test row 1", {"text": "C"})]


def test_a_hub_id_not_in_the_cache_or_a_missing_split_is_one_line(cached_dataset):
    with pytest.raises(FileNotFoundError) as error:
        list(iter_raw_records("someone/elsewhere"))
    assert str(error.value) == (
        "someone/elsewhere: not a data file, and no dataset of that id is in the local Hugging Face cache; caftkit "
        "never downloads: fetch it once with `hf download --repo-type dataset someone/elsewhere` (or give a file)")
    with pytest.raises(ValueError, match=r"^someone/tiny-chat: no split 'valid' in the cached dataset; it has "
                                         r"train, test \(name one as someone/tiny-chat:SPLIT\)$"):
        list(iter_raw_records("someone/tiny-chat:valid"))


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_dataset("someone/tiny-chat") == ("someone/tiny-chat", "train")
    assert parse_hub_dataset("someone/tiny-chat:test") == ("someone/tiny-chat", "test")
    # a path that exists, a missing data file, a deeper path, the bundled set: never a Hub id
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "set").write_text("{}\n")
    for source in ("data/set", "data/train.jsonl", "a/b/c", "sharegpt", "/abs/x"):
        assert parse_hub_dataset(source) is None
    with pytest.raises(FileNotFoundError, match=r"^data/train.jsonl: data file not found$"):
        list(iter_raw_records("data/train.jsonl"))
