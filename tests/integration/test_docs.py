"""The docs: the README's links, the reference pages generated from the code (scripts/docs.py), and the MkDocs site
built with --strict (broken internal links, anchors or missing pages fail it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO

README_MAX_LINES = 300


def _docs_script():
    spec = importlib.util.spec_from_file_location("gantrain_docs_script", REPO / "scripts" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_and_its_relative_links_exist() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to its docs pages"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_cli_reference_walks_every_command_and_option_of_the_app() -> None:
    import typer.main

    from gantrain.cli import app

    page = _docs_script().cli_markdown()
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="gantrain")
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        assert f"`gantrain {name}" in page, name
        if hasattr(command, "commands"):
            continue
        sub_ctx = command.context_class(command, info_name=name, parent=ctx)
        for param in command.get_params(sub_ctx):
            if param.name != "help" and not param.hidden and param.param_type_name == "option":
                assert param.opts[0] in page, (name, param.opts[0])
    assert "`gantrain metrics fit-extractor`" in page
    # a config field's flag links its entry in the configuration reference; other options show their default
    assert "| `--lr-g <float>` | [`optim.lr_g`](config.md#lr_g) |" in page
    assert re.search(r"\| `--out <path>` \| `generator\.safetensors` \|", page)


def test_the_config_reference_has_every_field_its_docstring_and_each_presets_value() -> None:
    from gantrain.engine.config import PRESETS, SECTION_TYPES, field_docs, preset

    script = _docs_script()
    page = script.config_markdown()
    for section, cls in SECTION_TYPES.items():
        assert f"## `[{section}]`" in page
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f"### `{f.name}` {{#{f.name}}}" in page, f.name
            words = " ".join(docs.get(f.name, "").split()[:4])
            if words and "[" not in words:  # (rich markup, which --help and the page drop)
                assert script._escape(words) in page, (f.name, words)
    for name in PRESETS:
        assert f"`{name}`" in page
    tuned = preset("fashion32-tuned")
    assert f"`fashion32-tuned`: `{tuned.data.batch_size}`" in page  # batch 32, where the default is 128


@pytest.mark.slow
def test_the_site_builds_with_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` with the hook: the generated references are in the site and every internal link
    resolves. Skips where the docs extra is not installed."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("needs the docs extra (pip install -e '.[docs]')")
    written = _docs_script().write(tmp_path / "reference-pages")
    assert [p.name for p in written] == ["cli.md", "config.md"]
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    config = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert "gantrain run" in cli and "--lr-g" in cli and "gantrain tune" in cli
    assert 'id="lr_g"' in config and "fashion32-tuned" in config
    assert (site / "results" / "index.html").is_file()  # docs/results/README.md is the section's index
    assert (site / "results" / "to_quality-fashion32-20epochs-decay-cpu.json").is_file()  # data files travel along
