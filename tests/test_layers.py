"""Settings sit below the layers they configure: config.py imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import hsplitlora.config

ABOVE_CONFIG = ("engines", "strategies", "roles", "method")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_config_imports_nothing_from_engines_strategies_roles_or_method():
    imported = imported_modules(Path(hsplitlora.config.__file__))
    above = sorted(m for m in imported if m.startswith("hsplitlora.") and m.split(".")[1] in ABOVE_CONFIG)
    assert above == []
    assert "torch" not in imported  # settings are read and checked on their own terms without torch
    assert "hsplitlora.errors" in imported  # the walk sees config's imports at all


def test_runconfig_validate_stays_short():
    tree = ast.parse(Path(hsplitlora.config.__file__).read_text())
    validate = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "validate")
    assert validate.end_lineno - validate.lineno + 1 <= 60
