"""What a run records about its own speed: MFU and peak memory in every metrics.jsonl record, checked against
an independent computation, and --profile-steps's trace and top-ops table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from flops import dcgan32_step_flops
from gantrain.engine import Trainer
from gantrain.engine.gan import hardware

PEAK = hardware.Peaks(fp32=0.5, bf16=1.0, fp16=1.0, source="test peaks")


def _vm_hwm_gib() -> float:
    """The process's peak resident set size from /proc (getrusage's ru_maxrss is what the code reads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    pytest.skip("no /proc/self/status here")


def test_every_log_record_carries_mfu_peak_memory_and_the_step_split(tiny_cfg, quiet_console, monkeypatch) -> None:
    monkeypatch.setattr(hardware, "device_peaks", lambda device: PEAK)
    cfg = tiny_cfg(max_steps=4, log_every=2)  # fp32, width 16, 32 px, 1 channel, nz 100
    Trainer(cfg, console=quiet_console).fit()
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "images_per_s" in r]
    assert [r["step"] for r in records] == [2, 4]
    flops = dcgan32_step_flops(100, 16, 16, 1)
    for r in records:
        assert r["mfu"] == pytest.approx(r["images_per_s"] * flops / (PEAK.fp32 * 1e12), rel=2e-3, abs=2e-5)
        assert 0.05 < r["peak_mem_gib"] <= _vm_hwm_gib() + 1e-3
        assert {"data_ms", "d_step_ms", "g_step_ms"} <= set(r) and r["d_step_ms"] > 0 and r["g_step_ms"] > 0
    log = (cfg.run_dir / "train.log").read_text()
    assert f"MFU = images/s x {flops / 1e9:.3g} GFLOP/image over 0.5 TFLOP/s (fp32, test peaks)" in log


def test_mfu_under_ddp_divides_by_every_rank_s_peak(tiny_cfg, quiet_console, monkeypatch) -> None:
    """A world of 2 (rank 0 of it, as DistInfo says) divides the global images/s by twice one rank's peak."""
    from gantrain.engine.outputs.writer import RunOutputs

    outputs = RunOutputs(tiny_cfg(), quiet_console, is_main=True, world_size=2)
    monkeypatch.setattr(outputs, "write", lambda record: setattr(outputs, "last_record", record))
    outputs.set_roof(4e8, 2 * PEAK.bf16, hardware.torch.device("cpu"), "bf16, test peaks, x 2 processes")
    outputs.bar = type("Bar", (), {"update": lambda *a, **k: None})()
    outputs.task, outputs.window = 0, (hardware.time.perf_counter() - 1.0, 0)
    outputs.log(10, 0, {"loss_d": 1.0, "loss_g": 1.0}, {})
    r = outputs.last_record
    assert r["mfu"] == pytest.approx(r["images_per_s"] * 4e8 / 2e12, rel=2e-3)


def _trace_events(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]


def test_profile_steps_write_a_trace_naming_the_phases_and_a_top_ops_table(tiny_cfg, quiet_console) -> None:
    cfg = tiny_cfg(max_steps=5, profile_steps="2:3")
    Trainer(cfg, console=quiet_console).fit()
    folder = cfg.run_dir / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["top_ops_steps_2-3.txt", "trace_steps_2-3.json"]
    names = [e["name"] for e in _trace_events(folder / "trace_steps_2-3.json")]
    assert [names.count(phase) for phase in ("data", "d_step", "g_step")] == [2, 2, 2]  # two steps, three phases
    assert any(n.startswith("aten::") and "conv" in n for n in names)
    table = (folder / "top_ops_steps_2-3.txt").read_text()
    assert table.startswith("torch.profiler, steps 2 to 3 (2 steps), sorted by self_cpu_time_total")
    assert "aten::" in table and "Self CPU" in table
    assert "profiled steps 2 to 3" in (cfg.run_dir / "train.log").read_text()


def test_a_range_the_run_does_not_reach_is_said_and_a_stop_inside_it_writes_what_ran(tiny_cfg, quiet_console) -> None:
    cfg = tiny_cfg("outside", max_steps=3, profile_steps="5:9")
    Trainer(cfg, console=quiet_console).fit()
    assert not (cfg.run_dir / "profile").exists()
    assert "--profile-steps 5:9: this run takes steps 1 to 3; nothing is profiled" in (
        cfg.run_dir / "train.log").read_text()

    class StopAt2:
        def after_step(self, trainer):
            return "enough" if trainer.step == 2 else None

    cfg = tiny_cfg("stopped", max_steps=6, profile_steps="1:4")
    Trainer(cfg, console=quiet_console, hooks=[StopAt2()]).fit()
    names = [e["name"] for e in _trace_events(cfg.run_dir / "profile" / "trace_steps_1-2.json")]
    assert names.count("g_step") == 2


def test_a_cpu_run_says_which_layer_rewrites_its_probe_chose(tiny_cfg, quiet_console, monkeypatch) -> None:
    """Fast layers on the CPU: the run times each rewrite within its bounds at its layers' shapes, in its compute
    dtype and layout (scripted here: the space-to-depth input gradient slower, the dilated weight gradient
    faster), says so in one line of train.log, and then computes that way. tiny_cfg: widths 16 at 32 px, 1
    channel, batch 32: G's 64->32, 32->16, 16->1 and D's 1->16, 16->32, 32->64 strided layers; only the 1-channel
    convolution (1->16 at 32 px, G's last read as one too) is in a bound (no layer has 128 channels). A run of torch's layers (--layer-impl aten) measures nothing; a probe that fails
    leaves the rules, and the run goes on."""
    from gantrain.kernels import conv

    monkeypatch.setenv("GANTRAIN_CACHE", str(Path(tiny_cfg().run_dir).parent / "cache"))
    calls = []

    def measure(name, dtype, shape, channels_last=True, **_):
        calls.append((name, dtype, tuple(shape), channels_last))
        return (3.0, 2.0) if name == "space_to_depth" else (20.0, 30.0)

    monkeypatch.setattr(conv, "measure_rewrite", measure)
    conv.reset_rewrites()
    try:
        Trainer(tiny_cfg("aten", layer_impl="aten", max_steps=1), console=quiet_console).fit()
        assert calls == []
        cfg = tiny_cfg("fast", max_steps=1, channels_last=True)
        Trainer(cfg, console=quiet_console).fit()
        assert calls == [("space_to_depth", torch.float32, (32, 1, 16, 32), True)] * 2
        log = " ".join((cfg.run_dir / "train.log").read_text().split())
        assert ("fast layers on this CPU (fp32, channels-last), each rewrite against torch's: space-to-depth 1->16 "
                "at 32 px 3 vs 2 ms, not used (measured now, kept in ") in log
        assert not conv.rewrite_enabled("space_to_depth", torch.float32, 1, 16, 32)

        def broken(*args, **kwargs):
            raise RuntimeError("oneDNN said no")

        monkeypatch.setattr(conv, "measure_rewrite", broken)
        cfg = tiny_cfg("broken", max_steps=1, channels_last=False)
        assert Trainer(cfg, console=quiet_console).fit().steps == 1
        log = " ".join((cfg.run_dir / "train.log").read_text().split())
        assert ("fast layers on this CPU (fp32, NCHW), each rewrite against torch's: no layer timed (the "
                "rules, not measured: RuntimeError: oneDNN said no)") in log
        assert conv.rewrite_enabled("space_to_depth", torch.float32, 1, 16, 32)  # the rule again
    finally:
        conv.reset_rewrites()


def test_settings_without_effect_are_said_in_one_log_line(tiny_cfg, quiet_console) -> None:
    """--ema-bn standing without an EMA did nothing silently; the run now says so, once, in train.log (and trains
    as before)."""
    cfg = tiny_cfg("idle", max_steps=1, ema_bn="standing", ema_decay=0.0)
    assert Trainer(cfg, console=quiet_console).fit().steps == 1
    lines = [line for line in (cfg.run_dir / "train.log").read_text().splitlines() if "without effect" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "settings without effect in this run: --ema-bn standing (no EMA: --ema-decay and --ema-halflife 0)")


def test_a_console_that_is_not_a_terminal_gets_progress_lines(tiny_cfg, monkeypatch) -> None:
    """rich draws the bar on a terminal only: piped into a log file, a run printed nothing between its start-up
    lines and its end. Now such a console gets one plain line per log step, at most every
    PLAIN_LINE_EVERY_S (here 0), with the step, epoch, losses, the rate and MFU of metrics.jsonl's record, and an
    ETA from that rate; a terminal gets the bar alone."""
    import io

    from rich.console import Console

    from gantrain.engine.outputs import writer

    monkeypatch.setattr(hardware, "device_peaks", lambda device: PEAK)
    monkeypatch.setattr(writer, "PLAIN_LINE_EVERY_S", 0.0)
    cfg = tiny_cfg(max_steps=4, log_every=1)
    piped = io.StringIO()
    Trainer(cfg, console=Console(file=piped, width=200)).fit()
    lines = [line for line in piped.getvalue().splitlines() if line.startswith("step ")]
    records = [r for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
               if "images_per_s" in r]
    assert len(lines) == len(records) == 4

    for line, r in zip(lines, records):
        assert line.startswith(f"step {r['step']}/4 (epoch 1/1): D {r['loss_d']:.3f} G {r['loss_g']:.3f} | "), line
        shown = re.search(r"\| ([\d,]+) img/s, MFU (\d+)% \| ETA 0:00:\d\d$", line)
        assert shown, line  # the record's figures (rounded there to 0.1 img/s: +-1 at a rounding edge)
        assert abs(int(shown[1].replace(",", "")) - r["images_per_s"]) <= 1
        assert abs(int(shown[2]) - 100 * r["mfu"]) <= 1
    assert lines[-1].endswith("ETA 0:00:00")  # the last step: nothing left
    # log steps further apart than PLAIN_LINE_EVERY_S: a line at the steps between, without losses (reduced at
    # log steps only), its rate since the line before
    sparse = tiny_cfg("sparse", max_steps=4, log_every=100)
    piped = io.StringIO()
    Trainer(sparse, console=Console(file=piped, width=200)).fit()
    lines = [line for line in piped.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines[:3]] == [f"step {k}/4 (epoch 1/1)" for k in (1, 2, 3)], lines
    assert len(lines) == 4 and lines[3].startswith("step 4/4 (epoch 1/1): D "), lines
    assert all(re.search(r" \| [\d,]+ img/s, MFU \d+% \| ETA 0:00:\d\d$", line) for line in lines), lines
    terminal = io.StringIO()
    Trainer(tiny_cfg("tty", max_steps=4, log_every=2), console=Console(file=terminal, width=200,
                                                                        force_terminal=True)).fit()
    assert not [line for line in terminal.getvalue().splitlines() if line.startswith("step ")]


def test_the_bar_counts_epochs_from_where_a_resume_with_other_steps_per_epoch_stands(tiny_cfg, monkeypatch) -> None:
    """A 2-process run resumed in one process showed "epoch 2/2" while it trained epoch 3 of 3: the bar divided
    the global step by the new steps per epoch. A batch change does the same here: 128 images at batch 32 are 4
    steps an epoch, at batch 16 8; 2 epochs (8 steps) then a third at batch 16 (8 more)."""
    import io

    from rich.console import Console

    from gantrain.engine.outputs import writer

    monkeypatch.setattr(writer, "PLAIN_LINE_EVERY_S", 0.0)
    first = tiny_cfg("resized", limit=128, batch_size=32, epochs=2, max_steps=0)
    Trainer(first, console=Console(file=io.StringIO(), width=200)).fit()
    piped = io.StringIO()
    again = tiny_cfg("resized", limit=128, batch_size=16, epochs=3, max_steps=0)
    Trainer(again, resume="auto", console=Console(file=piped, width=200)).fit()
    shown = [re.match(r"step (\d+)/(\d+) \(epoch (\d+)/(\d+)\)", line) for line in piped.getvalue().splitlines()]
    shown = [tuple(map(int, m.groups())) for m in shown if m]
    assert shown and all(total == 16 and epochs == 3 for _, total, _, epochs in shown), shown
    assert [(step, epoch) for step, _, epoch, _ in shown] == [(s, 3) for s in range(9, 17)], shown


def test_the_mfu_roof_adds_no_more_cpu_peaks_than_the_cores_hold(monkeypatch) -> None:
    """`--ddp --nproc 64` on 2 cores divided by 64 single-thread peaks (MFU 0%), --nproc 3 by 3 (above the
    machine's). On CPU under torchrun a node adds at most cores / threads processes' peaks; GPUs and Ray each rank."""
    from gantrain.engine.config import override, preset
    from gantrain.engine.train.loop import _ranks_of_the_roof

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = preset("fashion32")
    assert [_ranks_of_the_roof(cfg, cpu, world) for world in (1, 2, 3, 64)] == [1, 2, 2, 2]
    assert _ranks_of_the_roof(override(cfg, {"nnodes": 2}), cpu, 6) == 4  # 2 nodes of 2 cores
    assert _ranks_of_the_roof(cfg, cuda, 64) == 64 and _ranks_of_the_roof(override(cfg, {"ray": True}), cpu, 3) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert _ranks_of_the_roof(cfg, cpu, 2) == 1  # 2 processes of 2 threads on 2 cores: one machine's peak


def test_more_processes_than_cores_is_said_once_by_the_launcher(monkeypatch) -> None:
    from gantrain.engine.config import override, preset
    from gantrain.engine.dist import launch

    said = []
    monkeypatch.setattr(launch.log, "warning", lambda msg, *args: said.append(msg % args))
    monkeypatch.setattr(launch, "device_peaks", lambda device: None)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    launch._measure_peaks_once(override(preset("fashion32"), {"nproc": 3, "device": "cpu"}), "1")
    assert said == ["--nproc 3 at 1 thread(s) each on 2 CPU cores: the processes share cores, each step waits for "
                    "the slowest (--nproc 2 fills them)"]
    said.clear()
    launch._measure_peaks_once(override(preset("fashion32"), {"nproc": 2, "device": "cpu"}), "1")
    assert said == []


def test_an_mfu_above_100_percent_says_the_peak_is_too_low_once(tiny_cfg, quiet_console, monkeypatch) -> None:
    """The bar showed "MFU 104%" without a word: the cached peak had been measured on a busy machine."""
    from gantrain.engine.outputs import writer
    from gantrain.engine.outputs.writer import RunOutputs

    said = []
    monkeypatch.setattr(writer.log, "warning", lambda msg, *args: said.append(msg % args))
    outputs = RunOutputs(tiny_cfg(), quiet_console, is_main=True, world_size=1)
    monkeypatch.setattr(outputs, "write", lambda record: setattr(outputs, "last_record", record))
    outputs.bar = type("Bar", (), {"update": lambda *a, **k: None})()
    outputs.task = 0
    outputs.set_roof(4e8, 1e-9, hardware.torch.device("cpu"), "bf16, measured 1024x1024 matmul")  # far too low
    for step in (10, 20):
        outputs.window = (hardware.time.perf_counter() - 1.0, step - 10)
        outputs.log(step, 0, {"loss_d": 1.0, "loss_g": 1.0}, {})
    assert outputs.last_record["mfu"] > 1 and len(said) == 1, said
    assert said[0].startswith("MFU ") and "at step 10: above the peak it divides by (bf16, measured 1024x1024 " \
        "matmul), so that peak is too low" in said[0]
