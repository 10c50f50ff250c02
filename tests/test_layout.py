"""The package's floor plan: each wing imports only the wings below it, no module imports another module's
private (`_name`) names, and an import inside a function says why it is not at the top of its module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "caftkit"

# Each wing and the wings it may import; a wing may always import its own modules. "base" is the top-level
# modules every wing stands on (models and devices, conversation data, settings, the command line) and `files/`
# (package files, resumable JSONL, JSON text, records written whole, the outputs a command may write and their
# locks).
ALLOWED = {
    "base": set(),
    "core": {"base"},              # the method: heads, their inputs, the losses, the multi-token statistics
    "tasks": {"base"},             # molecule design and HumanEval: data and scoring
    "decoding": {"base", "core"},  # greedy and speculative generation
    "evaluation": {"base", "core", "decoding", "tasks"},
    "training": {"base", "core", "decoding", "evaluation"},
    "bench": {"base", "core", "decoding", "evaluation", "training"},
    "workflows": {"base", "core", "decoding", "tasks", "evaluation", "training"},
    "cli": {"base", "core", "decoding", "tasks", "evaluation", "training", "bench", "workflows", "api"},
    "api": {"core", "decoding", "training"},  # caftkit/__init__.py: the public API
}
WINGS = {name for name in ALLOWED if name not in ("base", "cli", "api")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] in WINGS:
        return parts[1]
    return "cli" if parts[1] == "cli" else "base"


def caftkit_imports(path: Path, module: str):
    """(imported module, imported names, line) of every import of a caftkit module in `path`, the module `module`."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "caftkit" or target.startswith("caftkit."):
                yield target, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("caftkit"):
                    yield alias.name, [], node.lineno


def violations(path: Path, module: str) -> list[str]:
    """Every import of `path` (the module `module`) that goes up the wings or takes another module's private name."""
    own, found = wing(module), []
    for target, names, line in caftkit_imports(path, module):
        if wing(target) != own and wing(target) not in ALLOWED[own]:
            found.append(f"{path.name}:{line}: the {own} wing imports {target}")
        private = [name for name in names if name.startswith("_") and not name.endswith("__")]
        if private and target != module:
            found.append(f"{path.name}:{line}: imports {private} from {target}")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_known_wing():
    assert {wing(module_name(path)) for path in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_imports_go_down_the_wings_and_never_reach_private_names(path):
    assert violations(path, module_name(path)) == []


def test_the_check_finds_an_upward_import_and_a_private_name(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from ..training.trainer import CAFTTrainer\nfrom .heads import _private, get_heads\n"
                      "from caftkit.tasks.molecules import describe_molecule\n\n\n"
                      "def f():\n    import caftkit.bench.generation\n")
    assert violations(sample, "caftkit.core.sample") == [
        "sample.py:1: the core wing imports caftkit.training.trainer",
        "sample.py:2: imports ['_private'] from caftkit.core.heads",
        "sample.py:3: the core wing imports caftkit.tasks.molecules",
        "sample.py:7: the core wing imports caftkit.bench.generation",
    ]
    # from the workflows wing, training and the base modules are below; the private name and bench are not allowed
    assert violations(sample, "caftkit.workflows.sample") == [
        "sample.py:2: imports ['_private'] from caftkit.workflows.heads",
        "sample.py:7: the workflows wing imports caftkit.bench.generation",
    ]


def test_tests_are_in_the_folder_of_the_wing_they_test():
    """Each test module lives in `tests/<wing>/` (base: the modules at the package's top), or at the top of
    `tests/` for the command line (its parser, the bad inputs given to every command, the README's command block)
    and the layout itself."""
    tests = Path(__file__).resolve().parent
    folders = {path.parent.name for path in tests.rglob("test_*.py") if path.parent != tests}
    assert folders <= WINGS | {"base"}
    assert sorted(path.name for path in tests.glob("test_*.py")) == ["test_bad_inputs.py", "test_cli.py",
                                                                     "test_layout.py", "test_readme.py"]


# Writes of a file's whole content that are not records: the kernel's interface to reset the peak memory.
# A module longer than this has more than one job: split it along them.
MODULE_LINE_LIMIT = 500


def test_no_module_is_longer_than_the_limit():
    lengths = {module_name(path): len(path.read_text().splitlines()) for path in MODULES}
    assert {name: length for name, length in lengths.items() if length > MODULE_LINE_LIMIT} == {}
    assert max(lengths.values()) > MODULE_LINE_LIMIT // 2  # the lines are counted


def plain_writes_in(root: Path) -> dict[str, int]:
    """The modules under `root`, outside `files/`, that write a file's content themselves (`write_text`,
    `write_bytes`), and how many times."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name.startswith("files/"):
            continue
        calls = [node for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr in ("write_text", "write_bytes")]
        if calls:
            found[name] = len(calls)
    return found


def test_every_file_is_written_through_files():
    """A record written with `Path.write_text` is left cut short by a kill in the middle (`caft_run.json`, which
    `caft compare` reads as "this run finished", was one): every write of a file's content goes through `files/`:
    `atomic.py` (`write_json`, `write_text_atomically`) writes beside the file and renames; `controls.py` writes the
    kernel's control files, which are requests, not records."""
    assert plain_writes_in(PACKAGE) == {}


def test_the_check_finds_a_plain_write_outside_files(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "atomic.py").write_text("def write(path, text):\n    path.write_text(text)\n")
    (tmp_path / "record.py").write_text("def save(path, data):\n    path.write_bytes(data)\n    path.write_text('')\n")
    assert plain_writes_in(tmp_path) == {"record.py": 2}


def private_imports_from(roots: list[Path]) -> list[str]:
    """`file:line name` of every `_name` imported from caftkit by the files under `roots`."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("caftkit"):
                    found += [f"{path.name}:{node.lineno} {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_tests_use_only_public_names():
    """What a test needs is public: a private name may change without notice, and a test holding it pins it."""
    tests = Path(__file__).resolve().parent
    assert private_imports_from([tests, tests.parent / "tests_engines"]) == []


def test_the_check_finds_a_private_import_in_a_test(tmp_path):
    (tmp_path / "test_x.py").write_text("def test():\n    from caftkit.data import _secret, public\n")
    assert private_imports_from([tmp_path]) == ["test_x.py:2 _secret"]


# What an import inside a function carries to say why it is not at the top of its module.
DEFERRED = re.compile(r"# deferred: \S")


def unexplained_function_imports(root: Path) -> list[str]:
    """`file:line` of every import inside a function under `root` (the `commands.py` modules aside) that does not say
    why: `# deferred: <why>` on its own line, or in the comment lines just above it or above the run of imports it
    stands in."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "commands.py":
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        ending_at = {node.end_lineno: node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))}
        inside = {node.lineno: node for function in ast.walk(tree)
                  if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
        for line, node in sorted(inside.items()):
            if any(DEFERRED.search(text) for text in lines[line - 1: node.end_lineno]):
                continue
            above = line - 1  # the line above the run of imports `node` stands in
            while above in ending_at:
                above = ending_at[above].lineno - 1
            comments = []
            while above > 0 and lines[above - 1].lstrip().startswith("#"):
                comments.append(lines[above - 1])
                above -= 1
            if not any(DEFERRED.search(text) for text in comments):
                found.append(f"{path.relative_to(root).as_posix()}:{line}")
    return found


def test_function_level_imports_say_why():
    """A module imports what it needs at its top. An import inside a function says why it is there instead
    (`# deferred: <why>`): an optional extra that may be missing; the command line's start-up, which reads and
    checks settings without torch (`test_cli.py`); an import cycle; code that runs as a script of its own in a child
    process. The `commands.py` modules import their library when the command runs, as each command does."""
    assert unexplained_function_imports(PACKAGE) == []


def test_the_check_finds_a_function_level_import_that_does_not_say_why(tmp_path):
    (tmp_path / "sample.py").write_text(
        "import json\n\n\n"
        "def load():\n"
        "    import torch  # deferred: caft starts without torch\n"
        "    # deferred: optional extra, caftkit[qlora]\n"
        "    import bitsandbytes\n"
        "    from peft import LoraConfig\n"
        "\n"
        "    # hoisting it would be fine\n"
        "    from transformers import AutoConfig\n"
        "    return json, torch, bitsandbytes, LoraConfig, AutoConfig\n")
    (tmp_path / "commands.py").write_text("def command():\n    import torch\n    return torch\n")
    assert unexplained_function_imports(tmp_path) == ["sample.py:11"]
