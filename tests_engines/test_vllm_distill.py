"""`caft distill --server` against a real `vllm serve` (its CPU build, from `.venv-vllm`) of the bundled model:
the answers agree with the in-process ones, a server killed midway leaves a file the rerun completes with every
prompt answered once, and a server whose tokenizer is not the local model's is refused before any prompt is sent.

Run with `make test-vllm`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import stop, vllm_server

from caftkit.models import BUNDLED_MODEL, resolve_model_path

PROMPTS = 32
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def server(vllm_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-server")
    with vllm_server(vllm_python, resolve_model_path(BUNDLED_MODEL), root / "server.log") as (url, _):
        yield url


def caft(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caftkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def ids_of(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_server_answers_agree_with_the_in_process_answers(server, tmp_path):
    """`caft bench distill` on 32 prompts, float32 on both sides: the figures are printed; almost every answer
    is the same text, and where one is not, the two agree on its first tokens (they part where two tokens are
    nearly tied, as batched and unbatched arithmetic differ in the last bits)."""
    result = caft("bench", "distill", "--server", server, "--max-samples", str(PROMPTS), "--max-new-tokens",
                  str(NEW_TOKENS), "--batch-size", str(PROMPTS), "--output", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    print(json.dumps({key: bench[key] for key in ("in_process", "server", "server_over_in_process", "identical",
                                                  "differing")}), file=sys.stderr)
    assert bench["answers"] == PROMPTS and bench["server"]["prompt_as"] == "token ids"
    assert bench["server"]["tokenizer_check"] == "/tokenize"
    assert bench["identical"] >= PROMPTS - 4
    assert all(d["first_difference_at_token"] >= 4 for d in bench["differing"])


def test_a_server_killed_midway_leaves_a_file_that_the_rerun_completes(server, vllm_python, tmp_path):
    """A second server is killed (its whole process group) once 6 answers are written: `caft distill` stops with
    one line; the same command pointed at a live server completes the file, every prompt answered once."""
    output = tmp_path / "distilled.jsonl"
    args = ("distill", "--output", str(output), "--max-samples", "24", "--max-new-tokens", str(NEW_TOKENS),
            "--concurrency", "2", "--retries", "2")
    with vllm_server(vllm_python, resolve_model_path(BUNDLED_MODEL), tmp_path / "doomed.log") as (url, process):
        run = subprocess.Popen([sys.executable, "-m", "caftkit.cli", *args, "--server", url], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 600
        while not (output.exists() and len(output.read_text().splitlines()) >= 6):
            assert run.poll() is None, run.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        stop(process)
        _, err = run.communicate(timeout=300)
    assert run.returncode == 2
    assert err.strip().splitlines()[-1].endswith("run the same command again to complete it")
    written = ids_of(output)
    assert 6 <= len(written) < 24 and len(set(written)) == len(written)
    rerun = caft(*args, "--server", server)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    completed = ids_of(output)
    assert len(completed) == 24 and len(set(completed)) == 24 and completed[:len(written)] == written


def requests_served(url: str) -> float:
    """vLLM's count of finished requests (`vllm:request_success_total`, summed over its labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def test_a_server_of_another_model_is_refused_before_any_prompt(server, tmp_path):
    """A local model whose tokenizer has two ids exchanged (" a" and " the"): refused in one line naming the
    server, no request reaches the engine, nothing is written."""
    bundled = Path(resolve_model_path(BUNDLED_MODEL))
    other = tmp_path / "other-model"
    other.mkdir()
    for item in bundled.iterdir():
        if item.name != "tokenizer.json":
            (other / item.name).symlink_to(item)
    spec = json.loads((bundled / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["Ġa"], vocab["Ġthe"] = vocab["Ġthe"], vocab["Ġa"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    before = requests_served(server)
    result = caft("distill", "--model", str(other), "--server", server, "--output", str(tmp_path / "out.jsonl"),
                  "--max-samples", "4")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{server} serves" in result.stderr and f"whose tokenizer is not that of '{other}'" in result.stderr
    assert requests_served(server) == before
    assert not (tmp_path / "out.jsonl").exists()
