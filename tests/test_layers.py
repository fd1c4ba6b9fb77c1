"""Every file stands above what it imports: the library files never import the loop or the commands
built on it, so drop.py stays the one place a reader finds the whole loop."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts under test
LIBRARY = [
    "checkpoint.py",
    "classifier.py",
    "datasets.py",
    "dice.py",
    "dynamics.py",
    "eval.py",
    "nets.py",
    "sac.py",
    "tasks.py",
]
ABOVE_THE_LIBRARY = {"drop", "bench", "diagnostics", "sweep"}


def imported_modules(path: str) -> set[str]:
    """Every module the file imports, at the top or inside a function."""
    with open(path) as file:
        tree = ast.parse(file.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("file", LIBRARY)
def test_library_files_import_neither_the_loop_nor_its_commands(file):
    assert not imported_modules(os.path.join(ROOT, file)) & ABOVE_THE_LIBRARY
