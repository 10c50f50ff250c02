"""The sandbox's limits over all of a program's processes together (processes and memory), and the judge's own
sandbox: a problems file's test code cannot write outside it."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from caftkit.tasks.sandbox import run_completion
from caftkit.tasks.sandbox.limits import MemoryGroup
from caftkit.tasks.sandbox.namespaces import PROCESS_LIMIT

TOY = {"task_id": "toy/0", "prompt": "def answer():\n", "entry_point": "answer",
       "test": "def check(candidate):\n    assert candidate() == 1\n"}
ANSWER = "def answer():\n    return 1\n"

# Forks `CHILDREN` children that each fill `MB` MB and wait; the program waits for all of them, then answers.
FORKED_CHILDREN = textwrap.dedent("""
    import os, time
    children = []
    for _ in range(CHILDREN):
        pid = os.fork()
        if pid == 0:
            block = b"x" * (MB * 2**20)
            time.sleep(1)
            os._exit(0)
        children.append(pid)
    print("exits", sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
""")


def own_groups() -> list[str]:
    """The memory groups this process has made and not removed."""
    group = MemoryGroup.create(256)
    assert group is not None
    parent = Path(group.path).parent
    group.remove()
    return sorted(path.name for path in parent.glob(f"caftkit-sandbox-{os.getpid()}-*"))


def test_a_memory_group_can_be_made_here_and_holds_its_limit():
    group = MemoryGroup.create(300)
    assert group is not None
    try:
        name = "memory.limit_in_bytes" if group.version == 1 else "memory.max"
        assert Path(group.path, name).read_text().strip() == str(300 * 2**20)
        assert group.out_of_memory() is False
    finally:
        group.remove()
    assert not Path(group.path).exists()


def test_forked_children_cannot_exceed_the_memory_limit_together():
    """Six children of 300 MB each stay under a 512 MB limit one by one (the address-space limit is per process),
    but not together: the sandbox's memory group stops them and the run is a memory failure, not a pass."""
    code = FORKED_CHILDREN.replace("CHILDREN", "6").replace("MB", "300") + ANSWER
    result = run_completion(TOY, code, memory_mb=512, timeout_s=30)
    assert (result.passed, result.status) == (False, "memory"), result
    assert result.detail == ("MemoryError: the memory limit of 512 MB was reached (by the program's processes "
                             "together)")
    # The same children one at a time fit: the limit is the sandbox's, not a smaller one.
    one = FORKED_CHILDREN.replace("CHILDREN", "1").replace("MB", "300") + ANSWER
    result = run_completion(TOY, one, memory_mb=512, timeout_s=30)
    assert (result.status, result.output.strip()) == ("passed", "exits [0]"), result
    assert own_groups() == []  # every run's groups are removed


def test_a_program_cannot_start_more_processes_than_the_limit():
    code = textwrap.dedent("""
        import os, time
        started = 0
        try:
            for _ in range(500):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                started += 1
        except OSError as error:
            print(type(error).__name__, started)
    """) + ANSWER
    result = run_completion(TOY, code, timeout_s=20)
    assert result.status == "passed", result
    error, started = result.output.split()
    # The program's own process counts as one of them.
    assert (error, int(started)) == ("BlockingIOError", PROCESS_LIMIT - 1)


def test_a_problems_files_test_cannot_write_outside_its_sandbox(tmp_path):
    """The judge runs the problems file's test code: in its sandbox, the host's files are read-only and the
    evaluator's temporary folders hidden; nothing is written, and the run is an error, not a pass."""
    # The checkout's folder: read-only in the sandbox, or absent where the checkout lies under a hidden directory.
    for target, refusals in ((Path(__file__).parent / f"written-by-a-test-{os.getpid()}",
                              ("OSError: [Errno 30] Read-only file system", "FileNotFoundError")),
                             (tmp_path / "written-by-a-test", ("FileNotFoundError",))):
        hostile = dict(TOY, test=f"with open({str(target)!r}, 'w') as handle:\n    handle.write('x')\n" + TOY["test"])
        result = run_completion(hostile, ANSWER)
        assert not target.exists()
        assert (result.passed, result.status) == (False, "error"), result
        assert result.detail.startswith(tuple(f"the problem's test does not run: {refusal}" for refusal in refusals))
    # In its own work directory it may write (and what it writes vanishes with it).
    scratch = dict(TOY, test="open('scratch.txt', 'w').write('x')\n" + TOY["test"])
    assert run_completion(scratch, ANSWER).status == "passed"
