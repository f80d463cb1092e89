"""The package's layers, read from its own imports (``ast``, lazy imports inside functions included): no import
circle, and no module imports one of a higher layer. A new module must be placed in LAYERS, so this stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gantrain.engine import API

PACKAGE = Path(__file__).resolve().parents[2] / "gantrain"

# Lowest first. A module may import its own layer and the ones below (without a circle), never one above.
# A package's __init__ (e.g. gantrain.engine.gan) holds no imports and sits in layer 0 through "gantrain".
LAYERS = [
    ("gantrain", "gantrain.kernels"),
    ("gantrain.engine.errors", "gantrain.engine.state.files", "gantrain.engine.state.rundir"),
    ("gantrain.engine.config",),
    ("gantrain.engine.data", "gantrain.engine.gan.layers", "gantrain.engine.gan.models", "gantrain.engine.gan.precision",
     "gantrain.engine.gan.hardware",
     "gantrain.engine.dist.runtime", "gantrain.engine.gan.sampling", "gantrain.engine.train.stats",
     "gantrain.engine.train.profile", "gantrain.engine.train.cadence",
     "gantrain.engine.outputs.runlog", "gantrain.engine.outputs.images", "gantrain.engine.state.schema",
     "gantrain.engine.state.checkpoint", "gantrain.engine.outputs.trackers",
     "gantrain.engine.outputs.export", "gantrain.engine.gan.diffaug", "gantrain.engine.gan.lr_schedule"),
    ("gantrain.engine.gan.step", "gantrain.engine.outputs.writer", "gantrain.engine.metrics",
     "gantrain.engine.outputs.generate"),
    ("gantrain.engine.train.parts", "gantrain.engine.train.dryrun"),  # dryrun: the run's own refusals
    ("gantrain.engine.train.loop",),
    ("gantrain.engine.dist.worker", "gantrain.engine.dist.restarts"),
    ("gantrain.engine.dist.launch", "gantrain.engine.dist.raytrain", "gantrain.engine.dist.preflight"),
    ("gantrain.bench", "gantrain.tune"),
    ("gantrain.cli", "gantrain.__main__", "gantrain.tune.driver", "gantrain.api"),  # entry points: processes, the API
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    if best is None:
        pytest.fail(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the gantrain modules it imports (``from gantrain.x import y`` counts x.y when y is a module)."""
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gantrain"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if node.module == "gantrain.engine" and alias.name in API:  # the public API: its module
                        full = f"gantrain.engine.{API[alias.name]}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("gantrain")}
        edges[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert _cycles(_imports(_modules())) == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = [f"{a} -> {b}" for a, targets in _imports(_modules()).items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


def test_kernels_and_metrics_stay_below_the_trainer() -> None:
    """Kernels import nothing of gantrain; metrics judge a generator, never a trainer or its step."""
    edges = _imports(_modules())
    assert {t for m, ts in edges.items() if m.startswith("gantrain.kernels") for t in ts
            if not t.startswith("gantrain.kernels")} == set()
    assert {t for m, ts in edges.items() if m.startswith("gantrain.engine.metrics") for t in ts
            if t in ("gantrain.engine.train.loop", "gantrain.engine.gan.step", "gantrain.engine.outputs.writer")} == set()


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    """The checks can fail: a made-up circle and an upward arrow are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _layer("gantrain.engine.train.loop") > _layer("gantrain.engine.metrics.evaluate")


def test_bench_and_tune_use_the_engines_public_api() -> None:
    """bench/ and tune/ import the engine through ``gantrain.engine``'s API alone, not its modules."""
    inner = []
    for name, path in _modules().items():
        if name.startswith(("gantrain.bench", "gantrain.tune")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gantrain.engine."):
                    inner.append(f"{name}: from {node.module} import ...")
                elif isinstance(node, ast.ImportFrom) and node.module == "gantrain.engine":
                    inner += [f"{name}: {a.name} is not in the API" for a in node.names if a.name not in API]
    assert inner == []


def test_every_api_name_resolves_to_its_module() -> None:
    import importlib

    import gantrain.engine as engine

    for name, module in API.items():
        assert getattr(engine, name) is getattr(importlib.import_module(f"gantrain.engine.{module}"), name)


def test_engine_is_laid_out_by_role() -> None:
    """Only the config tree, the errors and the API sit directly under engine/; the rest is in a role package."""
    direct = sorted(p.name for p in (PACKAGE / "engine").glob("*.py"))
    assert direct == ["__init__.py", "config.py", "errors.py"]
    roles = sorted(p.name for p in (PACKAGE / "engine").iterdir() if (p / "__init__.py").is_file())
    assert roles == ["data", "dist", "gan", "metrics", "outputs", "state", "train"]
