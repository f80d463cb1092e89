"""The training bar: the run's real length, images/s from the first steps, and the ETA at 80 columns."""

from __future__ import annotations

import io
import time

from rich.console import Console

from gantrain.engine.outputs.writer import RunOutputs


def _rendered(outputs: RunOutputs, width: int) -> str:
    out = Console(file=io.StringIO(), width=width, color_system=None)
    out.print(outputs.bar.get_renderable())
    return out.file.getvalue()


def _bar(tiny_cfg, width: int, **overrides) -> RunOutputs:
    cfg = tiny_cfg(**overrides)
    outputs = RunOutputs(cfg, Console(file=io.StringIO(), width=width), is_main=True, world_size=1)
    return outputs


def test_the_bar_counts_the_runs_real_epochs_and_shows_speed_from_the_first_steps(tiny_cfg) -> None:
    outputs = _bar(tiny_cfg, 80, epochs=20, max_steps=40, batch_size=32)  # 16 steps/epoch: 40 steps = 3 epochs
    with outputs.live(0, 40, False, steps_per_epoch=16):
        text = _rendered(outputs, 80)
        assert "epoch 1/3" in text and "0/40" in text and "- img/s" in text and "ETA" in text
        for step in range(1, 21):  # each step advances the bar (no log record needed)
            time.sleep(0.01)
            outputs.advance(step)
        text = _rendered(outputs, 80)
    assert "epoch 2/3" in text and "20/40" in text and "img/s" in text and "- img/s" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80 and "ETA 0:00:" in lines[0]  # one line, the ETA kept


def test_a_wide_console_also_shows_losses_and_elapsed_time(tiny_cfg) -> None:
    outputs = _bar(tiny_cfg, 130, max_steps=8)
    with outputs.live(0, 8, False, steps_per_epoch=16):
        outputs.advance(1)
        wide = _rendered(outputs, 130)
    assert "D - G -" in wide and "ETA" in wide and "epoch 1/1" in wide
    narrow = _bar(tiny_cfg, 80, max_steps=8)
    with narrow.live(0, 8, False, steps_per_epoch=16):
        assert "D - G -" not in _rendered(narrow, 80)
