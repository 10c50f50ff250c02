"""The tasks caftkit knows, by name: `caft data <name>`, `caft eval --task <name>`, `caft compare`'s `task:`.

A new task is a module with a `Task` subclass and one line below. `register_task` adds one at run time (a plugin, a
test); the command line reads the registry when it starts, so a task registered before `caftkit.cli.main` runs has
its `caft data` command and its `--task` name.
"""

from __future__ import annotations

from .humaneval import HumanEvalTask
from .math_problems import MathTask
from .molecule_task import MoleculeTask
from .task import Task

_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Make `task` known by its name; a name already taken is refused unless `replace`. Returns the task."""
    if not isinstance(task, Task):
        raise TypeError(f"expected a Task, got {type(task).__name__}")
    if not task.name.isidentifier() or task.name == "loss":  # `loss` is caft eval's own measurement
        raise ValueError(f"task name {task.name!r}: use a Python-style name other than 'loss'")
    if task.name in _TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Forget the task `name` (a test's own task, once it is done)."""
    _TASKS.pop(name, None)


def task_names() -> tuple[str, ...]:
    """The registered tasks' names, in registration order."""
    return tuple(_TASKS)


def get_task(name: str) -> Task:
    """The task registered as `name`; an unknown name is one line listing the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(_TASKS)}") from None


register_task(MoleculeTask())
register_task(HumanEvalTask())
register_task(MathTask())
