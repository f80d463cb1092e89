"""The structure figures of issue 28, read from the source with ``ast``: python scripts/structure_report.py [ROOT].

Prints one JSON object: package lines, modules directly under ``engine/``, the largest module and class in lines,
broad ``except`` clauses, modules that spell a run-folder file name or a checkpoint key as a string, loops over a
loader's batches outside the Trainer, and test modules that skip without ``../shared``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

# Names of the files and folders of a run folder (outside bench/tune reports).
RUN_FILES = {"last.pt", "best.pt", "checkpoints", "samples", "config.toml", "train.log", "metrics.jsonl",
             "final.png", "losses.png", "metrics.png", "progress.gif", "trackers.json", "tb", "mlflow.db",
             ".gantrain.lock", "replicas.json"}
# Fixtures (tests/conftest.py) that skip without ../shared/datasets.
SHARED_FIXTURES = r"\b(datasets_root|fashion_raw|mnist_raw|cats_dir|fashion_extractor|DATASETS)\b"
# Top-level keys of a checkpoint that no other record uses.
CKPT_KEYS = {"generator", "discriminator", "generator_ema", "opt_g", "opt_d", "scaler", "epoch_images",
             "images_seen", "global_batch", "num_images", "world_size", "best_fd", "best_fd_measured_by",
             "planned_steps", "digest"}


def _strings(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def _key_uses(tree: ast.AST) -> set[str]:
    """String constants used as a subscript, a .get/.pop/.setdefault argument or a dict literal key."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "pop", "setdefault") and node.args \
                and isinstance(node.args[0], ast.Constant):
            keys.add(node.args[0].value)
        elif isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return {k for k in keys if isinstance(k, str)}


TRAIN_CALLS = {"step", "gan", "train_step"}  # a training step: GANStep (self.gan(real)), a plain loop's model.step


def _batch_loops(tree: ast.AST) -> list[int]:
    """Lines of the innermost loops over batches that train: a loop whose body calls a training step
    (:data:`TRAIN_CALLS`, by name or attribute) directly, not inside a nested function."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.For, ast.While)):
            continue
        stack = list(node.body)
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.For, ast.While)):
                continue
            if isinstance(n, ast.Call):
                f = n.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in TRAIN_CALLS:
                    lines.append(node.lineno)
                    break
            stack.extend(ast.iter_child_nodes(n))
    return lines


def report(root: Path) -> dict:
    pkg = root / "gantrain"
    modules = sorted(pkg.rglob("*.py"))
    lines, classes, broad, run_files, ckpt_keys, loops = {}, {}, 0, [], [], []
    doc_bytes = src_bytes = 0
    for path in modules:
        rel = str(path.relative_to(root))
        text = path.read_text()
        tree = ast.parse(text)
        lines[rel] = len(text.splitlines())
        src_bytes += len(text.encode())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                doc_bytes += len(doc.encode()) if doc else 0
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[f"{rel}:{node.name}"] = node.end_lineno - node.lineno + 1
            if isinstance(node, ast.ExceptHandler):
                names = [node.type] if not isinstance(node.type, ast.Tuple) else list(node.type.elts)
                if node.type is None or any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException")
                                            for n in names):
                    broad += 1
        strings = _strings(tree)
        if strings & RUN_FILES:
            run_files.append(rel)
        if _key_uses(tree) & CKPT_KEYS:
            ckpt_keys.append(rel)
        loops += [f"{rel}:{line}" for line in _batch_loops(tree)]
    engine = pkg / "engine"
    direct = sorted(p.name for p in engine.glob("*.py") if p.name != "__init__.py")
    tests = sorted((root / "tests").rglob("test_*.py"))
    shared = [str(t.relative_to(root)) for t in tests
              if re.search(SHARED_FIXTURES, t.read_text())]
    largest_module = max(lines.items(), key=lambda kv: kv[1])
    largest_class = max(classes.items(), key=lambda kv: kv[1])
    return {"package_lines": sum(lines.values()), "modules": len(lines),
            "modules_directly_under_engine": len(direct), "largest_module": list(largest_module),
            "largest_class": list(largest_class), "broad_except": broad,
            "docstring_share": round(doc_bytes / src_bytes, 3),
            "modules_spelling_run_files": run_files, "modules_spelling_checkpoint_keys": ckpt_keys,
            "loops_over_batches": loops, "test_modules_needing_shared": shared}


if __name__ == "__main__":
    print(json.dumps(report(Path(sys.argv[1] if len(sys.argv) > 1 else ".")), indent=1))
