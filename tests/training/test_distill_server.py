"""`caft distill --server`: a server's answers are the in-process answers, a server that dies midway leaves a file
the rerun completes (each prompt answered once), a server with another tokenizer is refused before any prompt is
sent, passing failures are tried again, and a bad server setting gets one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_compatible_server import Behaviour, ModelServer
from test_distill import QUESTIONS, eos_prone_model, read_records, write_prompts
from tiny_models import saved_model_dir
from tiny_tokenizer import tiny_tokenizer
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from caftkit.cli import main
from caftkit.decoding.completion_server import CompletionServer, ServerError
from caftkit.training.distill import DistillSettings, distill, meta_path

MAX_NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("served-model"), eos_prone_model())


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", QUESTIONS)


def settings_for(model_dir, prompts, server=None, **overrides) -> DistillSettings:
    return DistillSettings(model=str(model_dir), data=str(prompts), max_new_tokens=MAX_NEW_TOKENS, batch_size=1,
                           server=server, **overrides)


def client(url: str, retries: int = 3) -> CompletionServer:
    return CompletionServer(url, timeout_s=30, retries=retries, backoff_s=0.01)


def by_id(path: Path) -> dict[str, dict]:
    records = read_records(path)
    assert len(records) == len({r["id"] for r in records})  # each prompt answered once
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def in_process(model_dir, prompts, tmp_path_factory):
    """The records of the in-process path: one prompt per batch, as the test server answers."""
    output = tmp_path_factory.mktemp("in-process") / "out.jsonl"
    distill(eos_prone_model(), tiny_tokenizer(), output, settings_for(model_dir, prompts), progress=False)
    return by_id(output)


@pytest.mark.parametrize("behaviour", [
    Behaviour(),
    Behaviour(tokenize=False, takes_ids=False, returns_ids=False),  # a server that speaks text only
], ids=["token-ids", "text-only"])
def test_server_answers_equal_the_in_process_answers(model_dir, prompts, in_process, tmp_path, behaviour):
    """Every record (answer text, stop reason, new-token count) equals the in-process one; both ways of stopping
    occur; the meta file says how the server was used."""
    with ModelServer(eos_prone_model(), tiny_tokenizer(), behaviour) as served:
        summary = distill(None, tiny_tokenizer(), tmp_path / "out.jsonl",
                          settings_for(model_dir, prompts, served.url, concurrency=3), progress=False,
                          server=client(served.url))
    assert by_id(tmp_path / "out.jsonl") == in_process
    assert {r["stop_reason"] for r in in_process.values()} == {"end_of_turn", "max_new_tokens"}
    assert summary.generated == len(QUESTIONS)
    assert summary.new_tokens == sum(r["new_tokens"] for r in in_process.values())
    assert behaviour.answered_max_tokens.count(MAX_NEW_TOKENS) == len(QUESTIONS)
    recorded = json.loads(meta_path(tmp_path / "out.jsonl").read_text())["last_run"]["server"]
    text_only = not behaviour.takes_ids
    assert recorded == {"url": served.url, "model": "tiny", "prompt_as": "text" if text_only else "token ids",
                        "tokenizer_check": "prompt token counts" if text_only else "/tokenize"}


def test_a_server_that_dies_midway_leaves_a_file_that_the_rerun_completes(model_dir, prompts, in_process,
                                                                         tmp_path):
    """The server stops answering after 5 completions (1 of them the check's): the run stops with one line saying
    what is written, the file holds whole records only; the rerun against a live server asks only for the rest, and
    the file then holds every prompt once, each answer equal to the in-process one."""
    output = tmp_path / "out.jsonl"
    settings = settings_for(model_dir, prompts, "http://127.0.0.1:1", concurrency=2)
    dying = Behaviour(dies_after=5)
    with ModelServer(eos_prone_model(), tiny_tokenizer(), dying) as served:
        with pytest.raises(ServerError, match=r"no answer after 3 tries .*; 4 of 10 answers are in .*: run the "
                                              r"same command again"):
            distill(None, tiny_tokenizer(), output, settings, progress=False, server=client(served.url))
    assert output.read_text().endswith("\n")
    first = by_id(output)
    assert len(first) == 4 and all(first[i] == in_process[i] for i in first)
    live = Behaviour()
    with ModelServer(eos_prone_model(), tiny_tokenizer(), live) as served:
        summary = distill(None, tiny_tokenizer(), output, settings, progress=False, server=client(served.url))
    assert by_id(output) == in_process
    assert summary.already_done == 4 and summary.generated == 6
    assert live.answered_max_tokens.count(MAX_NEW_TOKENS) == 6


def other_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """Another model's tokenizer, alike in all else: the tiny one with the ids of 'a' and 'e' exchanged ("swapped",
    the same token counts), or with 'll' one token ("merged", other counts)."""
    tokenizer = tiny_tokenizer()
    if kind == "merged":
        tokenizer.add_tokens(["ll"])
        return tokenizer
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                    bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    other.chat_template = tokenizer.chat_template
    return other


@pytest.mark.parametrize("kind, behaviour, probes", [
    ("swapped", Behaviour(), []),
    ("merged", Behaviour(tokenize=False), [1]),  # the probe text's token count, asked as a one-token answer
], ids=["tokenize", "token-counts"])
def test_a_server_with_another_tokenizer_is_refused_before_any_prompt_is_sent(model_dir, prompts, tmp_path,
                                                                               capsys, kind, behaviour, probes):
    """Through `caft distill`: exit 2, one line naming the server and the model, no prompt sent, nothing
    written. Without /tokenize, the token count of a probe text tells the tokenizers apart."""
    with ModelServer(eos_prone_model(), other_tokenizer(kind), behaviour) as served:
        code = main(["distill", "--model", str(model_dir), "--data", str(prompts), "--output",
                     str(tmp_path / "out.jsonl"), "--server", served.url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"{served.url} serves 'tiny', whose tokenizer is not that of '{model_dir}'" in err[0]
    assert "not self-distillation" in err[0]
    assert behaviour.answered_max_tokens == probes
    assert list(tmp_path.iterdir()) == []


def test_passing_failures_are_tried_again(model_dir, prompts, in_process, tmp_path):
    """HTTP 503 to the first five completion requests (the check's among them): each is tried again after a
    wait, and the run completes with the in-process answers."""
    busy = Behaviour(busy_first=5)
    with ModelServer(eos_prone_model(), tiny_tokenizer(), busy) as served:
        summary = distill(None, tiny_tokenizer(), tmp_path / "out.jsonl",
                          settings_for(model_dir, prompts, served.url, concurrency=1), progress=False,
                          server=client(served.url, retries=8))
    assert busy.refused_busy == 5 and summary.retried_requests == 5
    assert by_id(tmp_path / "out.jsonl") == in_process


def test_no_server_at_the_url_gets_one_line_and_writes_nothing(model_dir, prompts, tmp_path, capsys):
    code = main(["distill", "--model", str(model_dir), "--data", str(prompts), "--output",
                 str(tmp_path / "out.jsonl"), "--server", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("caft: error: http://127.0.0.1:9/v1/models: no answer after 1 tries (")
    assert list(tmp_path.iterdir()) == []


def test_a_file_is_resumed_by_the_engine_that_began_it(model_dir, prompts, tmp_path):
    """A file begun in-process is not completed by a server, nor the other way round."""
    output = tmp_path / "out.jsonl"
    settings = settings_for(model_dir, prompts, max_samples=2)
    distill(eos_prone_model(), tiny_tokenizer(), output, settings, progress=False)
    with ModelServer(eos_prone_model(), tiny_tokenizer()) as served:
        with pytest.raises(ValueError, match=r"generated by this process \(no --server\): resume it the same way"):
            distill(None, tiny_tokenizer(), output, settings_for(model_dir, prompts, served.url), progress=False,
                    server=client(served.url))


@pytest.mark.parametrize("flags, expected", [
    (["--server", "127.0.0.1:8000"], "server: '127.0.0.1:8000' is not an http:// or https:// URL"),
    (["--server-model", "m"], "server_model is for --server: give the server's URL"),
    (["--server", "http://x", "--concurrency", "0"], "concurrency"),
])
def test_bad_server_settings_get_one_line(model_dir, prompts, tmp_path, capsys, flags, expected):
    code = main(["distill", "--model", str(model_dir), "--data", str(prompts), "--output",
                 str(tmp_path / "out.jsonl"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0]
    assert list(tmp_path.iterdir()) == []
