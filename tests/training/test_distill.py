"""`caft distill`: batched self-distillation equals `model.generate`, resumes after a kill, rejects bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import saved_model_dir, tiny_model
from tiny_tokenizer import tiny_tokenizer

from caftkit.cli import main
from caftkit.data import render_prompt
from caftkit.decoding.greedy import STOP_END_OF_TURN, STOP_MAX_NEW_TOKENS
from caftkit.training.distill import DistillSettings, distill, meta_path

QUESTIONS = [
    "What is CCO?", "Name a ring.", "Why?", "Write a SMILES string for benzene, please.", "Hi", "2+2=?",
    "Explain aromaticity in one short sentence.", "ok", "List three gases.", "What is a nitrile group?",
]
EOS_IDS = [2, 5]  # the tiny model's configured end-of-sequence id and the tokenizer's end of turn


def eos_prone_model(seed: int = 0) -> torch.nn.Module:
    """A tiny llama whose end-of-turn logit is raised, so that some answers stop early."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight[5] += 0.35 * model.lm_head.weight.mean(0) / model.lm_head.weight.mean(0).norm()
    return model


def write_prompts(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": q}]}) + "\n"
                            for i, q in enumerate(questions)))
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distilled_answers_equal_unbatched_greedy_generate(tmp_path):
    """Batched, left-padded, length-grouped greedy distillation gives, for each prompt, exactly the tokens
    `model.generate` gives for that prompt alone."""
    model, tokenizer = eos_prone_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS)
    settings = DistillSettings(model="tiny", data=str(prompts), max_new_tokens=24, batch_size=4)
    summary = distill(model, tokenizer, tmp_path / "out.jsonl", settings, progress=False)
    records = read_records(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in records) == [f"q{i}" for i in range(len(QUESTIONS))]
    # Longest prompts first, as the batch plan orders them.
    lengths = [len(r["messages"][0]["content"]) for r in records]
    assert lengths == sorted(lengths, reverse=True)
    for record in records:
        question = QUESTIONS[int(record["id"][1:])]
        assert record["messages"][0] == {"role": "user", "content": question}
        ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": question}]),
                        add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=EOS_IDS,
                                       pad_token_id=0)[0, ids.shape[1]:].tolist()
        stop = next((i for i, token in enumerate(generated) if token in EOS_IDS), None)
        answer = generated if stop is None else generated[:stop]
        assert record["messages"][1] == {"role": "assistant", "content": tokenizer.decode(answer,
                                                                                          skip_special_tokens=True)}
        assert record["stop_reason"] == (STOP_MAX_NEW_TOKENS if stop is None else STOP_END_OF_TURN)
        assert record["new_tokens"] == (24 if stop is None else stop + 1)
    reasons = {r["stop_reason"] for r in records}
    assert reasons == {STOP_END_OF_TURN, STOP_MAX_NEW_TOKENS}  # both ways of stopping are exercised
    assert summary.generated == len(QUESTIONS) and summary.new_tokens == sum(r["new_tokens"] for r in records)
    assert summary.stop_reasons == {reason: sum(r["stop_reason"] == reason for r in records) for reason in reasons}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("tiny-distill-model"), eos_prone_model())


def distill_command(model_dir: Path, prompts: Path, output: Path, **flags) -> list[str]:
    command = [sys.executable, "-m", "caftkit.cli", "distill", "--model", str(model_dir), "--data", str(prompts),
               "--output", str(output)]
    for name, value in flags.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return command


def run_env() -> dict:
    # One thread in every run: the interrupted and the uninterrupted runs must do the same arithmetic.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}


def test_killed_run_resumes_to_the_same_file(tiny_model_dir, tmp_path):
    """A run killed (SIGKILL) after its first batches resumes to a file byte-identical to an uninterrupted run."""
    questions = [f"{q} ({i})" * (1 + i % 3) for i, q in enumerate(QUESTIONS * 6)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", questions)
    flags = dict(batch_size=2, max_new_tokens=120)
    complete, interrupted = tmp_path / "complete.jsonl", tmp_path / "interrupted.jsonl"
    subprocess.run(distill_command(tiny_model_dir, prompts, complete, **flags), env=run_env(), check=True,
                   capture_output=True)

    process = subprocess.Popen(distill_command(tiny_model_dir, prompts, interrupted, **flags), env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if interrupted.exists() and interrupted.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    lines_at_kill = interrupted.read_bytes().count(b"\n")
    assert 4 <= lines_at_kill < len(questions), "the run must be killed mid-way"

    resumed = subprocess.run(distill_command(tiny_model_dir, prompts, interrupted, **flags), env=run_env(),
                             check=True, capture_output=True, text=True)
    assert f"{len(questions)} prompts selected" in resumed.stdout
    assert interrupted.read_bytes() == complete.read_bytes()
    meta = json.loads(meta_path(interrupted).read_text())
    assert meta["records_written"] == len(questions)
    assert meta["last_run"]["already_done"] >= lines_at_kill - 1


def test_half_written_last_line_is_redone_with_sampling(tmp_path):
    """A last line cut off mid-write is dropped and regenerated; sampling is seeded per batch, so the resumed
    file equals the uninterrupted one even when sampling."""
    model, tokenizer = eos_prone_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS)
    settings = DistillSettings(model="tiny", data=str(prompts), max_new_tokens=16, batch_size=3, temperature=0.9,
                               top_p=0.95, seed=7)
    output = tmp_path / "out.jsonl"
    distill(model, tokenizer, output, settings, progress=False)
    complete = output.read_bytes()
    lines = complete.splitlines(keepends=True)
    # Keep five whole lines (the second batch partly written) and half of the sixth.
    output.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    summary = distill(model, tokenizer, output, settings, progress=False)
    assert summary.already_done == 5 and summary.generated == len(QUESTIONS) - 5
    assert output.read_bytes() == complete
    # A rerun of a finished file generates nothing.
    assert distill(model, tokenizer, output, settings, progress=False).generated == 0
    assert output.read_bytes() == complete


def test_resuming_with_other_settings_is_refused(tmp_path):
    model, tokenizer = eos_prone_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS[:3])
    output = tmp_path / "out.jsonl"
    distill(model, tokenizer, output, DistillSettings(model="tiny", data=str(prompts), max_new_tokens=8),
            progress=False)
    with pytest.raises(ValueError, match=r"max_new_tokens=8 \(now 9\)"):
        distill(model, tokenizer, output, DistillSettings(model="tiny", data=str(prompts), max_new_tokens=9),
                progress=False)


def test_long_prompts_are_skipped_and_counted(tmp_path):
    model, tokenizer = eos_prone_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["short", "x" * 80, "tiny", "y" * 90])
    settings = DistillSettings(model="tiny", data=str(prompts), max_new_tokens=4, max_prompt_tokens=40,
                               max_samples=10)
    summary = distill(model, tokenizer, tmp_path / "out.jsonl", settings, progress=False)
    assert summary.records_read == 4 and summary.prompts_selected == 2
    assert summary.skipped == {"longer than 40 prompt tokens": 2}
    assert sorted(r["id"] for r in read_records(tmp_path / "out.jsonl")) == ["q0", "q2"]


def test_max_samples_takes_the_first_prompts(tmp_path):
    model, tokenizer = eos_prone_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS)
    settings = DistillSettings(model="tiny", data=str(prompts), max_new_tokens=4, max_samples=3)
    distill(model, tokenizer, tmp_path / "out.jsonl", settings, progress=False)
    assert sorted(r["id"] for r in read_records(tmp_path / "out.jsonl")) == ["q0", "q1", "q2"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', r"prompts.jsonl:2: not valid JSON"),
        ('{"messages": []}\n', r"prompts.jsonl:1: field 'messages': empty conversation"),
        ('{"messages": [{"role": "assistant", "content": "hello"}]}\n', r"prompts.jsonl:1: no user turn"),
        ('{"text": "hello"}\n', r"prompts.jsonl:1: no 'messages', 'prompt' or 'conversations' field"),
        ("", r"prompts.jsonl: the file is empty"),
    ],
)
def test_bad_prompt_files_give_one_line_errors(tiny_model_dir, tmp_path, capsys, content, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    output = tmp_path / "out.jsonl"
    assert main(["distill", "--model", str(tiny_model_dir), "--data", str(prompts), "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("caft: error: ") and len(error.splitlines()) == 1
    assert re.search(expected, error), error
    assert not output.exists() or output.read_text() == ""


def test_missing_prompt_file(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert main(["distill", "--model", str(tiny_model_dir), "--data", str(missing),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{missing}: data file not found" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    b"a user's notes, no final newline",  # was cut to nothing before the refusal
    b'{"id": "q0", "messages": [{"role": "user", "content": "mine"}]}\n',  # records with ids: were appended to
])
def test_a_file_distill_did_not_write_is_refused_and_left_as_it_was(tiny_model_dir, tmp_path, capsys, content):
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS[:2])
    output = tmp_path / "out.jsonl"
    output.write_bytes(content)
    assert main(["distill", "--model", str(tiny_model_dir), "--data", str(prompts), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"caft: error: {output}: exists and was not written by caft distill (no "
                                       "out.meta.json beside it): choose a new --output (nothing was changed)\n")
    assert output.read_bytes() == content
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]


def test_a_users_file_where_the_meta_file_goes_is_never_replaced(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS[:2])
    (tmp_path / "out.meta.json").write_text("my settings")
    assert main(["distill", "--model", str(tiny_model_dir), "--data", str(prompts),
                 "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"caft: error: {tmp_path / 'out.meta.json'}: exists and was not "
                                              "written by caft distill")
    assert (tmp_path / "out.meta.json").read_text() == "my settings" and not (tmp_path / "out.jsonl").exists()


def test_a_broken_line_in_distills_own_file_is_named_and_left(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS[:2])
    output = tmp_path / "out.jsonl"
    argv = ["distill", "--model", str(tiny_model_dir), "--data", str(prompts), "--output", str(output),
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    output.write_text("this is not a distilled record\n" + output.read_text())
    before = output.read_bytes()
    assert main(argv) == 2
    assert capsys.readouterr().err.endswith(f"caft: error: {output}:1: not a distilled record; write to a new file "
                                            "or remove it\n")
    assert output.read_bytes() == before


def test_a_second_distill_on_the_same_output_is_refused_while_the_first_runs(tiny_model_dir, tmp_path, capsys):
    from caftkit.files.outputs import output_lock

    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS[:2])
    output = tmp_path / "out.jsonl"
    with output_lock(output):  # what a first, running `caft distill` holds
        assert main(["distill", "--model", str(tiny_model_dir), "--data", str(prompts), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"caft: error: {output}: another caft run is writing this output (it holds "
                                       f"{tmp_path / '.out.jsonl.caft-lock'}); wait for it to end or choose another "
                                       "output\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_larger_max_samples_extends_the_file_generating_only_the_new_prompts(tmp_path):
    """Raising `max_samples` on an existing file keeps its lines byte for byte and generates only the prompts
    added; they form a plan stage of their own, recorded in the meta file, and their greedy answers are those of
    a one-shot run over every prompt."""
    model, tokenizer = eos_prone_model(), tiny_tokenizer()
    prompts = write_prompts(tmp_path / "prompts.jsonl", QUESTIONS)
    output = tmp_path / "out.jsonl"
    first = DistillSettings(model="tiny", data=str(prompts), max_new_tokens=12, batch_size=3, max_samples=4)
    distill(model, tokenizer, output, first, progress=False)
    written = output.read_bytes()
    extended = DistillSettings(model="tiny", data=str(prompts), max_new_tokens=12, batch_size=3, max_samples=10)
    summary = distill(model, tokenizer, output, extended, progress=False)
    assert summary.already_done == 4 and summary.generated == 6
    assert output.read_bytes().startswith(written)
    assert json.loads(meta_path(output).read_text())["plan_stages"] == [4, 10]
    # Within the new stage, longest prompts first.
    new_lengths = [len(r["messages"][0]["content"]) for r in read_records(output)[4:]]
    assert new_lengths == sorted(new_lengths, reverse=True)
    # An interrupted extension resumes on the same two-stage plan.
    lines = output.read_bytes().splitlines(keepends=True)
    output.write_bytes(b"".join(lines[:7]))
    assert distill(model, tokenizer, output, extended, progress=False).generated == 3
    assert json.loads(meta_path(output).read_text())["plan_stages"] == [4, 10]
    one_shot = tmp_path / "one_shot.jsonl"
    distill(model, tokenizer, one_shot, extended, progress=False)
    by_id = {r["id"]: r for r in read_records(one_shot)}
    records = read_records(output)
    assert sorted(r["id"] for r in records) == sorted(by_id)
    for record in records:
        assert record["messages"] == by_id[record["id"]]["messages"]
