"""The judge's process: runs a problem's `check(candidate)`, with the prompt's helper functions but never the
program, where `candidate` sends each call's arguments to the program's process and gets back what the function
returned or the exception it raised; the verdict goes to a file the program cannot reach. The problem's test code
comes from a problems file, so the judge runs in a sandbox of its own too. It runs as a standalone script
(`judge_script`)."""

from __future__ import annotations

import builtins
import functools
import json
import linecache
import os
import random
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any

from .plain_data import (
    MESSAGE_LIMIT_BYTES,
    SHARED_FUNCTIONS,
    decode_plain,
    describe_error,
    encode_plain,
    write_all,
)
from .scripts import assemble_script

# The statuses a program may report for itself before its calls (`ready` false); anything else is an error.
_PROGRAM_STATUSES = ("failed", "syntax_error", "memory", "error")


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
    line = replies.readline(MESSAGE_LIMIT_BYTES + 1)
    if not line:
        raise _SandboxFault("ended", "the program ended before its checks finished")
    if len(line) > MESSAGE_LIMIT_BYTES:
        raise _SandboxFault("failed", f"the program's answer is longer than {MESSAGE_LIMIT_BYTES} bytes")
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
            write_all(request_fd, request)
        except OSError:
            raise _SandboxFault("ended", "the program ended before its checks finished") from None
        return _answer_value(_receive_message(replies))

    return candidate


def _check_failure(error: BaseException) -> tuple[str, str]:
    """The status and detail of a check that raised `error`."""
    traceback.print_exc()
    origin = getattr(error, "caft_candidate", None)
    if origin is None:
        return "failed", describe_error(error, "<test>", "test")
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
            return "error", f"the problem's {part} does not run: {describe_error(error, filename, part)}"
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
    write_all(verdict_fd, json.dumps({"status": status, "detail": detail}).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)



@functools.cache
def judge_script() -> str:
    """The script of the judge's process: `python -c <script> <request fd> <reply fd> <verdict fd>`, the problem on
    stdin."""
    return assemble_script("builtins, json, linecache, os, random, sys, traceback", (
        *SHARED_FUNCTIONS, _SandboxFault, _CandidateError, _receive_message, _candidate_error, _answer_value,
        _remote_candidate, _check_failure, _judge, _judge_main,
    ), {"MESSAGE_LIMIT_BYTES": MESSAGE_LIMIT_BYTES, "_PROGRAM_STATUSES": _PROGRAM_STATUSES},
        "_judge_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")
