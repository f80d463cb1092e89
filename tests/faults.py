"""Helpers the fault tests share: a tiny CLI run's flags, strict JSON records, the one error line, a tiny config."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_flags(datasets_root: Path, out: Path, *, limit: int = 64, batch: int = 32) -> list:
    """A tiny fp32 CPU run: ``limit`` images, batch ``batch``, width 8, a log line every step."""
    return ["--data-root", datasets_root, "--limit", limit, "--batch-size", batch, "--ngf", 8, "--ndf", 8,
            "--log-every", 1, "--sample-every", 0, "--device", "cpu", "--amp", "off", "--no-channels-last",
            "--out", out]


def strict_records(path: Path) -> list[dict]:
    """metrics.jsonl parsed as RFC 8259 JSON: bare NaN/Infinity (Python's extension) fail the test."""
    def no_constants(name):
        raise AssertionError(f"{path}: {name} is not JSON")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text(encoding="utf-8").splitlines()]


def one_error_line(result) -> str:
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback, a clean exit
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def tiny(tiny_cfg, **overrides):
    return tiny_cfg("run", **{"ngf": 8, "ndf": 8, "log_every": 4, **overrides})
