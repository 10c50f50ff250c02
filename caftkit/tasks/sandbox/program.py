"""The program's process: defines the program (code written by a model), then answers the judge's calls of its
entry point, one JSON line each way (`plain_data`). It runs as a standalone script (`runner_script`), inside the
sandbox or, where isolation was given up, as a plain limited process."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
import types
from collections.abc import Callable

from .plain_data import SHARED_FUNCTIONS, decode_plain, describe_error, encode_plain, error_text, write_all
from .scripts import assemble_script

# The exit status of a program's process that ran out of memory.
EXIT_MEMORY = 5
# Where the program's source is written in its work directory, so that tracebacks show its lines.
_PROGRAM_FILE = "program.py"
# Written as they are on a MemoryError, when building a message could fail for want of memory.
_MEMORY_HELLO = b'{"ready": false, "status": "memory", "detail": "MemoryError"}\n'
_MEMORY_REPLY = b'{"raised": ["MemoryError", "", null]}\n'
# Libraries that start a thread per core (numpy's BLAS) start one: the sandbox limits its processes and threads.
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _exit_text(exit: SystemExit) -> str:
    """`SystemExit <code>`, however odd the code object the program passed."""
    try:
        return f"SystemExit {exit.code!r}"[:100]
    except BaseException:
        return "SystemExit"


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
        data = json.dumps({"not_plain": f"{type(error).__name__}: {error_text(error)[:200]}"}).encode() + b"\n"
    _flush_output()
    write_all(fd, data)


def _out_of_memory(fd: int, message: bytes) -> None:
    # Nothing that allocates: the memory is still held by the program's objects.
    os.write(2, b"MemoryError: the memory limit was reached\n")
    write_all(fd, message)
    os._exit(EXIT_MEMORY)


def _not_ready(fd: int, status: str, detail: str) -> None:
    """Tell the judge the program cannot be called (it does not compile, fails or exits), and end."""
    _send_message(fd, {"ready": False, "status": status, "detail": detail})
    _finish(0)


def _refuse_sockets() -> None:
    """Refuse sockets inside Python, by replacing their constructors and name lookups: a best effort for programs
    run without the sandbox's empty network namespace. The refusing classes are subclasses, so modules that
    subclass socket.socket when imported (ssl, asyncio) still import."""
    # deferred: run as this function's source in the program's process, which imports sockets only to refuse them
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
        detail = describe_error(error, path, "program")
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
        return {"raised": [type(error).__name__, error_text(error)[:500], line]}
    try:
        return {"value": encode_plain(value)}
    except (TypeError, ValueError, RecursionError) as error:
        return {"not_plain": error_text(error)[:200]}


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


def program_environment(home: str) -> dict[str, str]:
    """A minimal environment: no proxies, no PYTHONPATH, home and temporary files in the work directory, numeric
    libraries on one thread."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", **dict.fromkeys(_ONE_THREAD, "1")}


@functools.cache
def runner_script() -> str:
    """The script of the program's process: `python -c <script> <request fd> <reply fd>`, the setup on stdin."""
    return assemble_script("json, os, sys, traceback, types", (
        *SHARED_FUNCTIONS, _exit_text, _flush_output, _finish, _send_message, _out_of_memory, _not_ready,
        _refuse_sockets, _load_program, _call_candidate, _serve_calls, _runner_main,
    ), {"_PROGRAM_FILE": _PROGRAM_FILE, "EXIT_MEMORY": EXIT_MEMORY, "_MEMORY_HELLO": _MEMORY_HELLO,
        "_MEMORY_REPLY": _MEMORY_REPLY}, "_runner_main(int(sys.argv[1]), int(sys.argv[2]))")
