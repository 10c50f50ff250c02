"""Conversation data (`caftkit.data`): the three record formats, errors naming file/line/field, JSON arrays,
prompts, and tokenisation through the chat template with assistant-only masks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from tiny_tokenizer import tiny_tokenizer

from caftkit.data import (
    ChatTemplateError,
    DataError,
    ReadStats,
    TokenizedData,
    assistant_spans,
    bundled_sharegpt_path,
    first_prompt,
    iter_conversations,
    iter_json_array,
    iter_prompts,
    iter_raw_records,
    record_id,
    render_prompt,
    to_messages,
    tokenize_conversation,
    tokenize_source,
)

W = "f.jsonl:1"  # a `where` for records checked without a file


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write one line per item: dicts/lists are JSON-encoded, strings are written as they are (blank or broken)."""
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines),
                    encoding="utf-8")
    return path


def raises_data_error(call, *args) -> DataError:
    with pytest.raises(DataError) as info:
        call(*args)
    return info.value


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --------------------------------------------------------------------------------------------------------------
# to_messages: the three formats
# --------------------------------------------------------------------------------------------------------------


def test_messages_format_is_kept_and_extra_keys_dropped():
    """`messages` records come back as role/content dicts in order; extra message keys are dropped."""
    record = {"id": 3, "messages": [system("be brief"), {"role": "user", "content": "hi", "name": "bob"},
                                    assistant("hello"), {"role": "tool", "content": "42"}]}
    assert to_messages(record, W) == [system("be brief"), user("hi"), assistant("hello"),
                                      {"role": "tool", "content": "42"}]


def test_prompt_completion_string_form():
    """String prompt/completion become one user and one assistant message; no completion gives the prompt only."""
    assert to_messages({"prompt": "2+2?", "completion": "4"}, W) == [user("2+2?"), assistant("4")]
    assert to_messages({"prompt": "2+2?"}, W) == [user("2+2?")]
    assert to_messages({"prompt": "2+2?", "completion": None}, W) == [user("2+2?")]


def test_prompt_completion_conversational_form():
    """TRL's conversational prompt/completion (lists of messages) are concatenated in order."""
    record = {"prompt": [system("sys"), user("q1"), assistant("a1"), user("q2")],
              "completion": [assistant("a2")]}
    assert to_messages(record, W) == [system("sys"), user("q1"), assistant("a1"), user("q2"), assistant("a2")]


def test_prompt_string_with_conversational_completion():
    """A string prompt may be followed by a list-of-messages completion."""
    assert to_messages({"prompt": "q", "completion": [assistant("a")]}, W) == [user("q"), assistant("a")]


def test_sharegpt_conversations_map_speakers_to_roles():
    """ShareGPT speakers human/gpt/system (any case, and the other exports' names) map to user/assistant/system."""
    record = {"id": "x", "conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "H1"},
        {"from": "gpt", "value": "G1"},
        {"from": "Human", "value": "H2"},
        {"from": "chatgpt", "value": "G2"},
        {"from": "user", "value": "H3"},
        {"from": "bard", "value": "G3"},
        {"from": "model", "value": "G4"},
    ]}
    assert to_messages(record, W) == [system("S"), user("H1"), assistant("G1"), user("H2"), assistant("G2"),
                                      user("H3"), assistant("G3"), assistant("G4")]


def test_messages_field_takes_precedence_over_others():
    """A record with both `messages` and `prompt` is read through `messages`."""
    assert to_messages({"messages": [user("m")], "prompt": "p"}, W) == [user("m")]


# --------------------------------------------------------------------------------------------------------------
# to_messages: malformed records name the record and the field
# --------------------------------------------------------------------------------------------------------------


def test_data_error_message_format():
    """`DataError` reads `where: field 'name': problem`, and keeps its parts as attributes."""
    error = DataError("a.jsonl:7", "missing", "messages[1].content")
    assert str(error) == "a.jsonl:7: field 'messages[1].content': missing"
    assert (error.where, error.problem, error.field_name) == ("a.jsonl:7", "missing", "messages[1].content")
    assert str(DataError("a.jsonl:7", "bad")) == "a.jsonl:7: bad"
    assert isinstance(error, ValueError)


def test_record_with_no_known_field():
    """A record with none of messages/prompt/conversations names the fields it does have."""
    error = raises_data_error(to_messages, {"text": "hi", "label": 1}, W)
    assert str(error) == f"{W}: no 'messages', 'prompt' or 'conversations' field (fields: label, text)"
    assert raises_data_error(to_messages, {}, W).problem.endswith("(fields: none)")


def test_record_that_is_not_an_object():
    """A JSON value other than an object is rejected with its type."""
    assert str(raises_data_error(to_messages, [1, 2], W)) == f"{W}: expected a JSON object, got list"


def test_message_missing_content():
    """A message without `content` names `messages[i].content`."""
    error = raises_data_error(to_messages, {"messages": [user("q"), {"role": "assistant"}]}, W)
    assert error.field_name == "messages[1].content"
    assert str(error) == f"{W}: field 'messages[1].content': missing"


def test_message_missing_role():
    """A message without `role` names `messages[i].role`."""
    error = raises_data_error(to_messages, {"messages": [{"content": "q"}]}, W)
    assert str(error) == f"{W}: field 'messages[0].role': missing"


def test_message_that_is_not_an_object():
    """A message that is a bare string names `messages[i]` and its type."""
    error = raises_data_error(to_messages, {"messages": [user("q"), "hello"]}, W)
    assert error.field_name == "messages[1]"
    assert "got str" in error.problem


def test_non_string_content():
    """Content that is not a string names the field and the type found."""
    error = raises_data_error(to_messages, {"messages": [user("q"), {"role": "assistant", "content": 42}]}, W)
    assert str(error) == f"{W}: field 'messages[1].content': expected a string, got int"
    error = raises_data_error(to_messages, {"messages": [{"role": "user", "content": None}]}, W)
    assert str(error) == f"{W}: field 'messages[0].content': expected a string, got NoneType"


def test_unknown_role():
    """A role outside system/user/assistant/tool is rejected, naming the role and the accepted ones."""
    error = raises_data_error(to_messages, {"messages": [{"role": "bot", "content": "x"}]}, W)
    assert error.field_name == "messages[0].role"
    assert error.problem == "unknown role 'bot'; expected one of system, user, assistant, tool"


def test_messages_not_a_list():
    """`messages` that is not a list names the field and the type found."""
    error = raises_data_error(to_messages, {"messages": "hi"}, W)
    assert str(error) == f"{W}: field 'messages': expected a list of messages, got str"


@pytest.mark.parametrize("record,field_name", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "conversations"),
    ({"prompt": []}, "prompt"),
])
def test_empty_conversation(record, field_name):
    """An empty list of messages/turns is an empty conversation, naming the field."""
    error = raises_data_error(to_messages, record, W)
    assert str(error) == f"{W}: field {field_name!r}: empty conversation"


def test_empty_string_prompt():
    """A blank string prompt is rejected."""
    assert str(raises_data_error(to_messages, {"prompt": "  \n", "completion": "a"}, W)) == \
        f"{W}: field 'prompt': empty prompt"


def test_prompt_completion_errors_name_the_list_field():
    """Malformed messages in a conversational prompt/completion name `prompt[i]` / `completion[i]`."""
    assert raises_data_error(to_messages, {"prompt": [{"role": "user"}]}, W).field_name == "prompt[0].content"
    error = raises_data_error(to_messages, {"prompt": "q", "completion": [{"role": "robot", "content": "a"}]}, W)
    assert error.field_name == "completion[0].role"
    error = raises_data_error(to_messages, {"prompt": 5}, W)
    assert str(error) == f"{W}: field 'prompt': expected a list of messages, got int"


def test_sharegpt_errors():
    """ShareGPT: an unknown speaker, a turn without `value`, and a non-list `conversations` name the field."""
    error = raises_data_error(to_messages, {"conversations": [{"from": "human", "value": "q"},
                                                              {"from": "robot", "value": "a"}]}, W)
    assert error.field_name == "conversations[1].from"
    assert error.problem == "unknown speaker 'robot'; expected human, gpt or system"
    error = raises_data_error(to_messages, {"conversations": [{"from": "human"}]}, W)
    assert str(error) == f"{W}: field 'conversations[0]': expected an object with 'from' and 'value'"
    error = raises_data_error(to_messages, {"conversations": [{"from": "gpt", "value": 1}]}, W)
    assert str(error) == f"{W}: field 'conversations[0].value': expected a string, got int"
    error = raises_data_error(to_messages, {"conversations": {"from": "gpt"}}, W)
    assert str(error) == f"{W}: field 'conversations': expected a list of turns, got dict"


# --------------------------------------------------------------------------------------------------------------
# Reading files: JSONL
# --------------------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    """A bad third line stops reading there, with `file.jsonl:3` and "not valid JSON" in the message."""
    path = write_jsonl(tmp_path / "file.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c",'])
    stats = ReadStats()
    records = iter_raw_records(str(path), stats)
    assert [record for _, record in itertools.islice(records, 2)] == [{"prompt": "a"}, {"prompt": "b"}]
    error = raises_data_error(next, records)
    assert error.where == f"{path}:3"
    assert "file.jsonl:3: not valid JSON (" in str(error)
    assert "at column" in str(error)
    assert stats.read == 2


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path):
    """Blank lines are skipped; `where` and error line numbers count them (the physical line)."""
    path = write_jsonl(tmp_path / "file.jsonl", [{"prompt": "a"}, "", "   ", {"prompt": "b"}, "",
                                                 {"messages": [user("q"), {"role": "assistant"}]}])
    stats = ReadStats()
    records = iter_raw_records(str(path), stats)
    assert [where for where, _ in itertools.islice(records, 2)] == [f"{path}:1", f"{path}:4"]
    assert stats.read == 2
    # The bad record on line 6 is reported as line 6 by the readers that normalise records.
    error = raises_data_error(list, iter_prompts(str(path), ReadStats()))
    assert str(error) == f"{path}:6: field 'messages[1].content': missing"


def test_malformed_json_after_blank_lines_names_physical_line(tmp_path):
    """A broken line after blank lines is named by its physical line number."""
    path = write_jsonl(tmp_path / "file.jsonl", ["", {"prompt": "a"}, "", "not json"])
    error = raises_data_error(list, iter_prompts(str(path), ReadStats()))
    assert error.where == f"{path}:4"
    assert "not valid JSON" in error.problem


def test_empty_file(tmp_path):
    """A zero-byte file is an error saying so."""
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert str(raises_data_error(list, iter_raw_records(str(path)))) == f"{path}: the file is empty"
    assert str(raises_data_error(list, iter_prompts(str(path), ReadStats()))) == f"{path}: the file is empty"


def test_missing_file(tmp_path):
    """A path that is not a file raises FileNotFoundError naming it."""
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        list(iter_raw_records(str(path)))
    with pytest.raises(FileNotFoundError) as info:
        list(iter_conversations(str(path)))
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Reading files: JSON arrays
# --------------------------------------------------------------------------------------------------------------


def test_json_array_file_is_read(tmp_path):
    """A JSON array of records (pretty-printed, any format mix) is read element by element."""
    records = [{"messages": [user("q1"), assistant("a1")]}, {"prompt": "q2", "completion": "a2"},
               {"conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]}]
    path = tmp_path / "data.json"
    path.write_text("\n  " + json.dumps(records, indent=2) + "\n")
    stats = ReadStats()
    assert list(iter_raw_records(str(path), stats)) == [(f"{path}:record {i}", r) for i, r in enumerate(records, 1)]
    assert stats.read == 3 and not stats.truncated_tail
    conversations = list(iter_conversations(str(path)))
    assert [c.messages for c in conversations] == [[user(f"q{i}"), assistant(f"a{i}")] for i in (1, 2, 3)]
    assert [c.source for c in conversations] == [f"{path}:record {i}" for i in (1, 2, 3)]


def test_empty_json_array(tmp_path):
    """`[]` yields nothing and is not a truncated tail."""
    path = tmp_path / "data.json"
    path.write_text("[ ]")
    stats = ReadStats()
    assert list(iter_raw_records(str(path), stats)) == []
    assert stats.read == 0 and not stats.truncated_tail


def truncated_array(tmp_path) -> Path:
    """An array of two complete records, cut off on line 4 inside the third."""
    path = tmp_path / "cut.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": "b"},\n{"messages": [{"role": "us')
    return path


def test_truncated_json_array_in_user_file_is_an_error(tmp_path):
    """A user's JSON array cut off mid-record is an error naming the line, after the complete records."""
    path = truncated_array(tmp_path)
    stats = ReadStats()
    records = iter_raw_records(str(path), stats)
    assert [r for _, r in itertools.islice(records, 2)] == [{"prompt": "a"}, {"prompt": "b"}]
    error = raises_data_error(next, records)
    assert error.where == f"{path}:4"
    assert error.problem.startswith("not valid JSON (")
    assert not stats.truncated_tail


def test_json_array_without_closing_bracket_is_an_error(tmp_path):
    """A user's array whose last record is complete but has no `]` says how many records it read."""
    path = tmp_path / "cut.json"
    path.write_text('[{"prompt": "a"}, {"prompt": "b"},\n')
    error = raises_data_error(list, iter_raw_records(str(path)))
    assert str(error) == f"{path}: the JSON array ends without ']' after 2 records (truncated file?)"


def test_json_array_allow_truncated_keeps_complete_records(tmp_path):
    """With `allow_truncated`, a cut-off array yields its complete records and sets `truncated_tail`."""
    path = truncated_array(tmp_path)
    stats = ReadStats()
    assert list(iter_json_array(path, stats, allow_truncated=True)) == [
        (f"{path}:record 1", {"prompt": "a"}), (f"{path}:record 2", {"prompt": "b"})]
    assert stats.truncated_tail
    # Cut right after a complete element (no `]`): also a truncated tail.
    path.write_text('[{"prompt": "a"},')
    stats = ReadStats()
    assert [r for _, r in iter_json_array(path, stats, allow_truncated=True)] == [{"prompt": "a"}]
    assert stats.truncated_tail


def test_json_array_allow_truncated_on_complete_file(tmp_path):
    """A complete array read with `allow_truncated` is not flagged as truncated."""
    path = tmp_path / "ok.json"
    path.write_text('[{"prompt": "a"}, {"prompt": "b"}]')
    stats = ReadStats()
    assert len(list(iter_json_array(path, stats, allow_truncated=True))) == 2
    assert not stats.truncated_tail


def test_json_array_reader_rejects_non_array(tmp_path):
    """`iter_json_array` on a file that is not an array says it expected one."""
    path = tmp_path / "obj.json"
    path.write_text('{"prompt": "a"}')
    error = raises_data_error(list, iter_json_array(path, ReadStats(), allow_truncated=False))
    assert error.where == str(path)
    assert error.problem.startswith("expected a JSON array of records")


# --------------------------------------------------------------------------------------------------------------
# Prompts and conversations
# --------------------------------------------------------------------------------------------------------------


def test_first_prompt():
    """The first user turn with only the system messages before it; other earlier turns are dropped."""
    messages = [system("s1"), assistant("greeting"), system("s2"), user("q"), assistant("a"), user("q2")]
    assert first_prompt(messages, W) == [system("s1"), system("s2"), user("q")]
    assert str(raises_data_error(first_prompt, [system("s"), assistant("a")], W)) == \
        f"{W}: no user turn to take a prompt from"
    assert str(raises_data_error(first_prompt, [user(" "), assistant("a")], W)) == \
        f"{W}: field 'content': the first user turn is empty"


def test_record_id():
    """`id` (string or integer) when present, else where the record was read."""
    assert record_id({"id": "abc"}, W) == "abc"
    assert record_id({"id": 12}, W) == "12"
    assert record_id({"id": None}, W) == W
    assert record_id({"id": [1]}, W) == W
    assert record_id({"prompt": "x"}, W) == W


def test_iter_prompts_yields_first_user_turn_ids_and_counts(tmp_path):
    """Each format's first prompt, ids from `id` else `file:line`, `source` on the physical line, `read` counted."""
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "messages": [system("sys"), assistant("early"), user("Q1"), assistant("A1"), user("Q1b")]},
        {"prompt": "Q2", "completion": "A2"},
        "",
        {"id": 7, "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "Q3"},
                                    {"from": "gpt", "value": "A3"}]},
        {"prompt": [system("s4"), user("Q4")]},
    ])
    stats = ReadStats()
    records = list(iter_prompts(str(path), stats))
    assert [r.messages for r in records] == [[system("sys"), user("Q1")], [user("Q2")], [user("Q3")],
                                             [system("s4"), user("Q4")]]
    assert [r.id for r in records] == ["a", f"{path}:2", "7", f"{path}:5"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2", f"{path}:4", f"{path}:5"]
    assert all(r.extra == {} for r in records)
    assert stats.read == 4 and stats.skipped == {} and not stats.truncated_tail


def test_iter_prompts_duplicate_id_is_an_error(tmp_path):
    """A repeated `id` in a user file names the field `id` and the line of the repeat."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                              {"id": "a", "prompt": "z"}])
    stats = ReadStats()
    error = raises_data_error(list, iter_prompts(str(path), stats))
    assert error.field_name == "id"
    assert str(error) == f"{path}:3: field 'id': duplicate id 'a'"
    assert stats.read == 3


def test_iter_prompts_bad_record_in_user_file_is_an_error(tmp_path):
    """A user file's record without a user turn stops with a `DataError` rather than being skipped."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"messages": [system("s"), assistant("a")]}])
    error = raises_data_error(list, iter_prompts(str(path), ReadStats()))
    assert str(error) == f"{path}:2: no user turn to take a prompt from"


def test_iter_conversations_keeps_whole_conversations(tmp_path):
    """Training conversations keep all their messages, with ids and sources as for prompts."""
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "x", "messages": [user("q"), assistant("a"), user("q2"), assistant("a2")]},
        {"prompt": "p", "completion": "c"},
    ])
    stats = ReadStats()
    records = list(iter_conversations(str(path), stats))
    assert [(r.id, r.source, r.messages) for r in records] == [
        ("x", f"{path}:1", [user("q"), assistant("a"), user("q2"), assistant("a2")]),
        (f"{path}:2", f"{path}:2", [user("p"), assistant("c")]),
    ]
    assert stats.read == 2


def test_iter_conversations_without_assistant_turn(tmp_path):
    """A conversation with no assistant turn cannot be trained on: `DataError` naming its line."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "only a prompt"}])
    error = raises_data_error(list, iter_conversations(str(path)))
    assert str(error) == f"{path}:2: the conversation has no assistant turn to learn from"


def test_read_stats_skip_counts_by_reason():
    """`ReadStats.skip` counts per reason."""
    stats = ReadStats()
    stats.skip("a")
    stats.skip("b")
    stats.skip("a")
    assert stats.skipped == {"a": 2, "b": 1}


# --------------------------------------------------------------------------------------------------------------
# Tokenisation through the chat template
# --------------------------------------------------------------------------------------------------------------

TWO_TURNS = [user("What is 2+2?"), assistant("It is 4."), user("And 3+3?"), assistant("Six.")]


def masked_text(tokenizer, tokenized) -> str:
    return tokenizer.decode([t for t, m in zip(tokenized.input_ids, tokenized.assistant_masks) if m])


def test_render_prompt_appends_generation_prompt(tokenizer):
    """`render_prompt` is the template text of the messages followed by the assistant header."""
    assert render_prompt(tokenizer, [system("S"), user("hi")]) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_spans_cover_content_and_end_of_turn(tokenizer):
    """Each span is exactly an assistant turn's content and `<|im_end|>` within the rendered text."""
    text, spans = assistant_spans(tokenizer, TWO_TURNS)
    assert text == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert [text[start:end] for start, end in spans] == ["It is 4.<|im_end|>", "Six.<|im_end|>"]


def test_tokenize_conversation_masks_only_assistant_tokens(tokenizer):
    """Masked tokens decode to the two answers and their end-of-turn tokens, nothing else; ids are the full text."""
    tokenized = tokenize_conversation(tokenizer, TWO_TURNS)
    assert tokenizer.decode(tokenized.input_ids) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert masked_text(tokenizer, tokenized) == "It is 4.<|im_end|>" + "Six.<|im_end|>"
    assert len(tokenized.assistant_masks) == len(tokenized.input_ids)
    assert set(tokenized.assistant_masks) == {0, 1}
    assert not tokenized.truncated
    # The masked tokens form two contiguous runs (one per assistant turn).
    runs = [key for key, _ in itertools.groupby(tokenized.assistant_masks)]
    assert runs == [0, 1, 0, 1, 0]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, m in zip(tokenized.input_ids, tokenized.assistant_masks) if m and t == im_end) == 2


def test_tokenize_conversation_max_length_not_exceeded(tokenizer):
    """`max_length` equal to (or above) the length keeps everything and is not a truncation."""
    full = tokenize_conversation(tokenizer, TWO_TURNS)
    for max_length in (len(full.input_ids), len(full.input_ids) + 10):
        same = tokenize_conversation(tokenizer, TWO_TURNS, max_length)
        assert same == full


def test_tokenize_conversation_truncates_to_max_length(tokenizer):
    """A shorter `max_length` keeps exactly the first `max_length` ids and mask entries, flagged truncated."""
    full = tokenize_conversation(tokenizer, TWO_TURNS)
    max_length = len(full.input_ids) - 7
    cut = tokenize_conversation(tokenizer, TWO_TURNS, max_length)
    assert cut.truncated
    assert len(cut.input_ids) == len(cut.assistant_masks) == max_length
    assert cut.input_ids == full.input_ids[:max_length]
    assert cut.assistant_masks == full.assistant_masks[:max_length]


def test_render_prompt_without_chat_template():
    """`render_prompt` refuses a tokenizer without a chat template with `ChatTemplateError`."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_prompt(tokenizer, [user("hi")])


def test_assistant_spans_without_chat_template():
    """`assistant_spans` / `tokenize_conversation` refuse a tokenizer without a chat template.

    (Only `ValueError` is asserted here: `ChatTemplateError` is what the module documents, but `assistant_spans`
    calls `apply_chat_template` before `render_prompt` checks the template, so transformers' own error comes first.)
    """
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError):
        assistant_spans(tokenizer, TWO_TURNS)
    with pytest.raises(ValueError):
        tokenize_conversation(tokenizer, TWO_TURNS)


# Renders the last message differently from the ones before it, so a conversation's rendering does not start
# with the rendering of its first turns.
LAST_DIFFERENT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.last %}{{ '[' + message['role'] + '] ' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("messages", [TWO_TURNS, TWO_TURNS[:2]], ids=["two-turns", "one-turn"])
def test_prefix_inconsistent_template(messages):
    """A template rendering earlier turns differently once later turns follow raises `ChatTemplateError`."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = LAST_DIFFERENT_TEMPLATE
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently"):
        assistant_spans(tokenizer, messages)
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently"):
        tokenize_conversation(tokenizer, messages)


# --------------------------------------------------------------------------------------------------------------
# tokenize_source
# --------------------------------------------------------------------------------------------------------------

# With the char-level tiny tokenizer, `<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n` is 19 + len(q)
# tokens, and the whole single-turn conversation 21 + len(q) + len(a) + 1.


def conversation(q: str, a: str) -> dict:
    return {"messages": [user(q), assistant(a)]}


def test_tokenize_source_counts_truncations(tmp_path, tokenizer):
    """Conversations over `max_length` are cut to it, kept, and counted under "truncated to N tokens (kept)"."""
    path = write_jsonl(tmp_path / "t.jsonl", [conversation("hi", "ok"),            # 25 tokens: fits
                                              conversation("hi", "a" * 20),        # 43 tokens: truncated
                                              conversation("hey", "b" * 30)])      # 54 tokens: truncated
    data = tokenize_source(str(path), tokenizer, max_length=30)
    assert isinstance(data, TokenizedData)
    assert data.stats.read == 3
    assert data.stats.skipped == {"truncated to 30 tokens (kept)": 2}
    assert [len(e["input_ids"]) for e in data.examples] == [25, 30, 30]
    assert data.examples[0] == {"input_ids": tokenize_conversation(tokenizer, conversation("hi", "ok")["messages"]
                                                                   ).input_ids,
                                "assistant_masks": [0] * 21 + [1] * 3 + [0]}
    assert data.examples[1]["assistant_masks"] == [0] * 21 + [1] * 9
    assert data.summary() == "3 examples from 3 records (dropped: 2 truncated to 30 tokens (kept))"


def test_tokenize_source_drops_examples_without_assistant_tokens(tmp_path, tokenizer):
    """A conversation whose assistant tokens all lie beyond `max_length` is dropped and counted."""
    path = write_jsonl(tmp_path / "t.jsonl", [conversation("hi", "ok"),           # assistant from token 21: kept
                                              conversation("q" * 40, "late"),     # assistant from token 59: dropped
                                              conversation("hi", "also ok")])
    data = tokenize_source(str(path), tokenizer, max_length=30)
    assert data.stats.read == 3
    assert data.stats.skipped["no assistant token within max_length"] == 1
    assert len(data.examples) == 2
    assert [tokenizer.decode([t for t, m in zip(e["input_ids"], e["assistant_masks"]) if m])
            for e in data.examples] == ["ok<|im_end|>", "also ok<|im_end|>"]


def test_tokenize_source_keeps_partial_assistant(tmp_path, tokenizer):
    """One assistant token within `max_length` is enough to keep a (truncated) conversation."""
    path = write_jsonl(tmp_path / "t.jsonl", [conversation("hi", "answer")])
    data = tokenize_source(str(path), tokenizer, max_length=22)
    assert data.stats.skipped == {"truncated to 22 tokens (kept)": 1}
    assert data.examples[0]["assistant_masks"] == [0] * 21 + [1]
    with pytest.raises(DataError):
        tokenize_source(str(path), tokenizer, max_length=21)


def test_tokenize_source_nothing_usable(tmp_path, tokenizer):
    """When every conversation is dropped, `DataError` names the source and says nothing is usable."""
    path = write_jsonl(tmp_path / "t.jsonl", [conversation("q" * 40, "a"), conversation("r" * 50, "b")])
    error = raises_data_error(tokenize_source, str(path), tokenizer, 30)
    assert str(error) == f"{path}: no usable training example"


def test_tokenize_source_propagates_record_errors(tmp_path, tokenizer):
    """A conversation without an assistant turn stops `tokenize_source` with the record's `DataError`."""
    path = write_jsonl(tmp_path / "t.jsonl", [conversation("hi", "ok"), {"prompt": "no answer"}])
    error = raises_data_error(tokenize_source, str(path), tokenizer, 64)
    assert error.where == f"{path}:2"
    assert "no assistant turn" in error.problem


# --------------------------------------------------------------------------------------------------------------
# The bundled ShareGPT prompts (one read of the 125 MB file, about 3 s)
# --------------------------------------------------------------------------------------------------------------


def test_bundled_sharegpt_path_exists():
    """The packaged ShareGPT JSON file is found."""
    path = bundled_sharegpt_path()
    assert path.is_file()
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json"


def test_bundled_sharegpt_prompts():
    """The first 50 bundled prompts each end with a non-empty user turn, with unique ids."""
    stats = ReadStats()
    prompts = list(itertools.islice(iter_prompts("sharegpt", stats), 50))
    assert len(prompts) == 50
    for record in prompts:
        assert record.messages[-1]["role"] == "user"
        assert record.messages[-1]["content"].strip()
        assert all(m["role"] == "system" for m in record.messages[:-1])
    assert len({record.id for record in prompts}) == 50
    assert stats.read >= 50
    assert stats.read == 50 + sum(stats.skipped.values())


def test_text_records_are_learnt_from_every_token(tmp_path):
    """A `text` record is plain language-model data: its tokens (the tokenizer's own special tokens, then the
    end-of-sequence token) all carry the loss, with no chat template; conversations beside it keep their
    assistant-only masks."""
    tokenizer = tiny_tokenizer()
    conversation = [user("molecule 1"), assistant("CCO")]
    source = tmp_path / "mixed.jsonl"
    source.write_text(json.dumps({"text": "CCO c1ccccc1"}) + "\n" + json.dumps({"messages": conversation}) + "\n")
    data = tokenize_source(str(source), tokenizer, None)
    text_example, chat_example = data.examples
    expected = tokenizer("CCO c1ccccc1")["input_ids"] + [tokenizer.eos_token_id]
    assert text_example == {"input_ids": expected, "assistant_masks": [1] * len(expected)}
    chat = tokenize_conversation(tokenizer, conversation)
    assert chat_example == {"input_ids": chat.input_ids, "assistant_masks": chat.assistant_masks}
    assert 0 < sum(chat.assistant_masks) < len(chat.assistant_masks)
    # truncated like a conversation, and counted
    short = tokenize_source(str(source), tokenizer, 3)
    assert short.examples[0] == {"input_ids": expected[:3], "assistant_masks": [1, 1, 1]}
    assert short.stats.skipped["truncated to 3 tokens (kept)"] >= 1
    # a model without a chat template trains on text, not on conversations
    tokenizer.chat_template = None
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"text": "CCO c1ccccc1"}) + "\n")
    assert tokenize_source(str(text_only), tokenizer, None).examples == [text_example]
    with pytest.raises(ChatTemplateError):
        tokenize_source(str(source), tokenizer, None)


@pytest.mark.parametrize("record, message", [
    ({"text": "  "}, "t.jsonl:1: field 'text': empty text"),
    ({"text": 3}, "t.jsonl:1: field 'text': expected a string, got int"),
])
def test_a_bad_text_record_is_named_by_file_line_and_field(tmp_path, monkeypatch, record, message):
    monkeypatch.chdir(tmp_path)
    Path("t.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as error:
        list(iter_conversations("t.jsonl"))
    assert str(error.value) == message
