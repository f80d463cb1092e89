"""The Trainer's evaluation cadence (epochs, steps, images, the last step) and its after-eval hooks."""

from __future__ import annotations

import io
import itertools
import json
import types

import numpy as np
import pytest
import torch
from rich.console import Console

from gantrain.engine import Cadence, Trainer, load_checkpoint, preset
from gantrain.engine.config import ConfigError, override


def _reference_due(cadence: Cadence, step: int, before: int, after: int, last: int) -> bool:
    """By enumeration: a multiple of ``steps`` is ``step``, or some multiple of ``images`` lies in (before, after]."""
    if cadence.steps and step in np.arange(cadence.steps, step + 1, cadence.steps):
        return True
    if cadence.images:
        multiples = np.arange(1, after // cadence.images + 2) * cadence.images
        if np.any((multiples > before) & (multiples <= after)):
            return True
    return cadence.at_end and step >= last


@pytest.mark.parametrize("steps,images,batch", [(0, 100, 32), (3, 0, 32), (5, 64, 32), (0, 7, 96), (4, 1000, 250)])
def test_cadence_after_step_matches_enumeration(steps, images, batch):
    for at_end in (False, True):
        cadence = Cadence(steps=steps, images=images, at_end=at_end)
        got = [cadence.after_step(s, (s - 1) * batch, s * batch, 40) for s in range(1, 41)]
        want = [_reference_due(cadence, s, (s - 1) * batch, s * batch, 40) for s in range(1, 41)]
        assert got == want


def test_cadence_by_hand():
    """Every 100 images at batch 32 (one step may not land on a multiple): steps 4, 7, 10, 13 (128, 224, 320,
    416 images); a fraction of an epoch's images (75.5) works alike; epochs by their own predicate."""
    every_100 = Cadence(images=100)
    assert [s for s in range(1, 14) if every_100.after_step(s, (s - 1) * 32, s * 32)] == [4, 7, 10, 13]
    fractional = Cadence(images=75.5)
    assert [s for s in range(1, 8) if fractional.after_step(s, (s - 1) * 32, s * 32)] == [3, 5]
    assert [e for e in range(1, 7) if Cadence(epochs=2).at_epoch_end(e)] == [2, 4, 6]
    assert not Cadence().active and Cadence(at_end=True).active
    assert not Cadence(epochs=3).after_step(3, 0, 96, 3)  # epochs are not steps
    with pytest.raises(ValueError):
        Cadence(steps=-1)


def test_eval_cadence_fields_validate():
    cfg = override(preset("fashion32"), {"eval_every_steps": 500, "eval_every_images": 60000})
    assert (cfg.eval.eval_every_steps, cfg.eval.eval_every_images, cfg.eval.evaluates) == (500, 60000, True)
    assert not preset("fashion32").eval.evaluates
    for name in ("eval_every_steps", "eval_every_images"):
        with pytest.raises(ConfigError, match=name.replace("_", "-")):
            override(preset("fashion32"), {name: -1})


class _Recorder:
    """A caller's evaluation (steps 3, 6, ...; 100 images; the last step) and an after-eval hook that records what
    it got; ``stop_after`` evaluations end the run."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.cadence = Cadence(steps=3, images=100, at_end=True)
        self.evaluated, self.hooked, self.stop_after = [], [], stop_after

    def evaluate(self, trainer) -> dict:
        self.evaluated.append((trainer.step, trainer.epoch, trainer.pos.images_seen))
        return {"fd": float(len(self.evaluated)), "step": trainer.step}

    def after_eval(self, trainer, record) -> str | None:
        self.hooked.append(record)
        return "enough" if self.stop_after and len(self.hooked) >= self.stop_after else None


def test_a_callers_evaluation_runs_on_its_cadence_and_feeds_after_eval_hooks(tiny_cfg, quiet_console):
    """256 images, batch 32: 8 steps an epoch, 16 steps. Due by hand: steps 3, 6, 9, 12, 15 (every 3), 4, 7, 10,
    13, 16 (each 100 images crossed: 128, 224, 320, 416, 512), 16 (the last). Step 16 ends epoch 2, so it is
    evaluated once at that epoch's end (after the epoch's statistics), as epoch 2; the rest mid-epoch."""
    recorder = _Recorder()
    cfg = tiny_cfg("caller", limit=256, max_steps=16)
    trainer = Trainer(cfg, console=quiet_console, hooks=[recorder], evaluation=recorder)
    trainer.fit()
    steps = [3, 4, 6, 7, 9, 10, 12, 13, 15, 16]
    assert [s for s, _, _ in recorder.evaluated] == steps
    assert [e for _, e, _ in recorder.evaluated] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    assert [i for _, _, i in recorder.evaluated] == [32 * s for s in steps]
    assert [r["step"] for r in recorder.hooked] == steps  # the hook sees each record, in order
    assert not (cfg.run_dir / "checkpoints" / "best.pt").exists()  # a caller's evaluation keeps no best.pt
    assert '"fd"' not in (cfg.run_dir / "metrics.jsonl").read_text()  # nor writes the run's records


def test_an_after_eval_hook_ends_the_run_cleanly(tiny_cfg, quiet_console):
    """The second evaluation (step 4) returns a reason: the run stops there, its checkpoint at step 4."""
    recorder = _Recorder(stop_after=2)
    cfg = tiny_cfg("stop", limit=256, max_steps=16)
    result = Trainer(cfg, console=quiet_console, hooks=[recorder], evaluation=recorder).fit()
    assert (result.steps, result.stop_reason) == (4, "enough")
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["position"]["step"] == 4


def test_evaluation_leaves_training_bit_identical(tiny_cfg, quiet_console):
    """A caller's evaluation that samples the generator changes no weight (fixed noise, eval mode)."""

    class Sampling(_Recorder):
        def evaluate(self, trainer):
            with torch.no_grad():
                trainer.gan.sample(torch.randn(4, trainer.cfg.model.nz, 1, 1, generator=torch.Generator()
                                               .manual_seed(0)))
            return super().evaluate(trainer)

    evaluated = Trainer(tiny_cfg("a", limit=256, max_steps=10), console=quiet_console, hooks=[],
                        evaluation=Sampling())
    evaluated.fit()
    plain = Trainer(tiny_cfg("b", limit=256, max_steps=10), console=quiet_console)
    plain.fit()
    for key, value in plain.gan.g.state_dict().items():
        assert torch.equal(value, evaluated.gan.g.state_dict()[key]), key


def test_an_evaluation_due_when_a_stop_lands_on_an_epochs_last_step_runs_on_resume(tiny_cfg, quiet_console):
    """Every 8 steps = each epoch's last step. A stop signal agreed at step 8 ends the run before the epoch's end
    (no evaluation yet); the resumed run ends that epoch first and evaluates it there, then at step 16: none
    lost, none twice."""
    import signal

    from gantrain.engine import Interrupted

    cfg = tiny_cfg("stop8", limit=256, max_steps=16)

    class StopAt8:
        def after_step(self, trainer):
            if trainer.step == 8:
                trainer.agreed_stop = signal.SIGTERM  # as the ranks' agreement on a signal sets it

    first = _Recorder()
    first.cadence = Cadence(steps=8)
    with pytest.raises(Interrupted):
        Trainer(cfg, console=quiet_console, hooks=[StopAt8(), first], evaluation=first).fit()
    assert first.evaluated == []
    again = _Recorder()
    again.cadence = Cadence(steps=8)
    Trainer(cfg, console=quiet_console, hooks=[again], evaluation=again, resume="auto").fit()
    assert [(s, e) for s, e, _ in again.evaluated] == [(8, 1), (16, 2)]


@pytest.mark.slow
def test_the_runs_own_evaluation_by_steps_and_epochs(fashion_extractor, tiny_cfg, quiet_console):
    """--eval-every-steps 5 with --eval-every 1 (8 steps an epoch, 16 steps): evaluations at 5 (epoch 0),
    8 (epoch 1's end), 10, 15 (epoch 1), 16 (epoch 2's end), each once; best.pt is the lowest FD's step; the
    log names the step or the epoch."""
    cfg = tiny_cfg("steps", limit=256, max_steps=16, eval_every=1, eval_every_steps=5, eval_samples=100)
    seen = []
    hook = types.SimpleNamespace(after_eval=lambda trainer, record: seen.append(record["step"]))
    trainer = Trainer(cfg, console=quiet_console, hooks=[hook])
    trainer.fit()
    run = cfg.run_dir
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"fd"' in line]
    # epochs done, a fraction mid-epoch (5 of 8 steps: 0.625), so metrics.png's epoch axis maps steps exactly
    assert [(r["step"], r["epoch"]) for r in evals] == [(5, 0.625), (8, 1), (10, 1.25), (15, 1.875), (16, 2)]
    assert seen == [5, 8, 10, 15, 16]
    best = min(evals, key=lambda r: r["fd"])
    assert load_checkpoint(run / "checkpoints" / "best.pt")["position"]["step"] == best["step"]
    log = (run / "train.log").read_text()
    assert "step 5: FD " in log and "epoch 1: FD " in log and "step 15: FD " in log
    # the closing line names what the folder holds: metrics.png too, once evaluations drew it
    assert f"run folder: {run} (final.png, losses.png, metrics.png, progress.gif, checkpoints/)" in " ".join(log.split())
