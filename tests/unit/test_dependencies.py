"""What a fresh install has is enough: gantrain's module-level imports name only the standard library, the core
dependencies pyproject.toml declares, and gantrain itself. (Optional extras are imported inside functions or
try blocks, so their absence is one error line; a transitive package such as click, which typer 0.29 no longer
depends on, must not be imported at all without a guard.)"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"pillow": "PIL"}  # distribution name -> the module it installs, where they differ
# Packages that need an extra as a whole: the CLI imports them only after checking the extra is installed.
EXTRA_PACKAGES = {"gantrain/tune": {"ray", "pandas", "optuna", "hyperopt"}}


def _core_dependencies() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in deps}
    return {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names}


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports executed when the module is imported: at the top level or inside top-level if/with blocks, not in
    functions, classes or try blocks (a try is how an optional import is guarded)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, (ast.If, ast.With)):
            todo += node.body + getattr(node, "orelse", [])
    return found


def test_module_level_imports_are_stdlib_core_dependencies_or_gantrain() -> None:
    allowed = set(sys.stdlib_module_names) | _core_dependencies() | {"gantrain"}
    bad = []
    for path in sorted((REPO / "gantrain").rglob("*.py")):
        extra = set().union(*(names for folder, names in EXTRA_PACKAGES.items()
                              if path.is_relative_to(REPO / folder)))
        for line, name in _module_level_imports(ast.parse(path.read_text())):
            if name not in allowed | extra:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert bad == [], "\n".join(bad)


def test_the_check_catches_an_undeclared_import() -> None:
    tree = ast.parse("import click\ntry:\n    import ray\nexcept ImportError:\n    pass\n\ndef f():\n    import wandb\n")
    assert [name for _, name in _module_level_imports(tree)] == ["click"]
