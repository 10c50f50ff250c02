"""The scripts the sandbox's processes run, assembled from the source of caftkit's own functions: the code that
runs in the program's, the judge's and the sandbox's processes is written, linted and tested like the rest of the
package, and runs there as a standalone script (the package itself is hidden from those processes)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def _names_looked_up(code: types.CodeType) -> set[str]:
    """The names `code`, and the code nested in it, look up: globals, builtins and attributes alike."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_looked_up(constant)
    return names


def _functions_of(member: Callable | type) -> list[types.FunctionType]:
    members = vars(member).values() if isinstance(member, type) else [member]
    return [function for function in members if inspect.isfunction(function)]


def assemble_script(imports: str, functions: Sequence[Callable | type], constants: Mapping[str, Any],
                    main: str) -> str:
    """A Python script made of `import <imports>`, the `constants` (name: value, written with `repr`), the source
    of these functions and classes, and the line `main`. A name of a function's own module that it uses but the
    script lacks raises RuntimeError here, rather than a NameError in the process that would pass for the
    program's."""
    provided = {*imports.split(", "), *constants, *(function.__name__ for function in functions)}
    for member in functions:
        missing = {name for function in _functions_of(member) for name in _names_looked_up(function.__code__)
                   if name in function.__globals__ and not name.startswith("__")} - provided
        if missing:
            raise RuntimeError(f"{member.__name__} uses {', '.join(sorted(missing))}, which its script lacks")
    parts = ["from __future__ import annotations", f"import {imports}"]
    parts += [f"{name} = {value!r}" for name, value in constants.items()]
    parts += [inspect.getsource(function) for function in functions]
    parts.append(main)
    return "\n".join(parts)
