"""`gantrain bench`: the side-by-side matrix, its JSON and Markdown reports (figures are not asserted)."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
from rich.console import Console

from faults import one_error_line
from gantrain.bench.baseline import plain_loop_omits
from gantrain.bench.hardware import system_info
from gantrain.bench.suite import _add_ratios, matrix, rendered
from gantrain.bench.timing import quantile
from gantrain.engine.config import override, preset
from gantrain.engine.gan.precision import resolve_amp


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_matrix_adds_one_feature_per_row(amp):
    rows = matrix(amp, nproc=2)
    names = [r.name for r in rows]
    assert names[0].startswith("baseline") and rows[0].kind == "baseline"
    assert rows[-1].nproc == 2 and rows[-1].changes["amp"] == amp
    all_row = next(r for r in rows if "(all)" in r.name)
    assert all_row.changes == {"loader": "memory", "channels_last": True, "amp": amp, "compile": True, "layer_impl": "fast"}
    assert rows[1].changes == {"loader": "torch", "amp": "off", "channels_last": False, "compile": False, "layer_impl": "aten"}
    cumulative = [r for r in rows[1:] if not r.name.startswith("all") and "not the default" not in r.name]
    assert len(cumulative) == (6 if amp == "bf16" else 5)
    for before, after in itertools.pairwise(cumulative):
        changed = {k for k in after.changes if after.changes[k] != before.changes.get(k)}
        assert len(changed) == 1 and set(before.changes) <= set(after.changes)
    assert not [r for r in matrix(amp, nproc=2, device_type="cuda") if "not the default" in r.name]  # CPU only
    forced = [r for r in rows if "not the default" in r.name]
    # where the default leaves bf16 off, one row still shows it, the default otherwise
    assert [r.changes for r in forced] == ([] if amp == "bf16" else [{**all_row.changes, "compile": False, "amp": "bf16"}])


def test_reports_without_a_baseline_row_print_dashes():
    """`--only` may leave the baseline out: no speed-up then, and the reports still render."""
    row = {"name": "all, no compile", "images_per_s": 700.0, "images_per_s_p10": 650.0, "images_per_s_p90": 720.0,
           "step_ms": 180.0, "data_wait_ms": 0.1, "compute_ms": 179.9, "warmup_s": 1.0, "peak_mem_gib": 0.5, "amp": "bf16"}
    report = {"system": system_info(), "device": "cpu", "preset": "fashion32", "batch_size": 128, "flops_per_image": 0.41e9,
              "peak_tflops": {"fp32": 0.2, "bf16": 0.4, "fp16": 0.4, "source": "--peak-tflops"}, "results": [row]}
    _add_ratios(report["results"], report["flops_per_image"], report["peak_tflops"])
    assert row["speedup"] is None and row["mfu"] == pytest.approx(700 * 0.41e9 / 0.4e12)
    table, markdown = rendered(report)
    assert "| all, no compile | 700 | 650–720 | - | 180.0 |" in markdown
    assert table.row_count == 1


def test_console_table_fits_80_columns_and_markdown_keeps_every_column():
    names = [r.name for r in matrix("off", nproc=2)] + [r.name for r in matrix("bf16", nproc=2)]
    rows = [{"name": n, "images_per_s": 1234.5, "images_per_s_p10": 1000.0, "images_per_s_p90": 1999.0,
             "step_ms": 1234.5, "data_wait_ms": 12.3, "compute_ms": 1222.2, "warmup_s": 41.0, "peak_mem_gib": 12.25,
             "amp": "bf16"} for n in dict.fromkeys(names)]
    report = {"system": system_info(), "device": "cpu", "preset": "fashion32", "batch_size": 128,
              "flops_per_image": 0.41e9, "peak_tflops": {"fp32": 0.2, "bf16": 0.1, "fp16": 0.1, "source": "x"},
              "results": rows}
    _add_ratios(report["results"], report["flops_per_image"], report["peak_tflops"])
    table, markdown = rendered(report)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for name in dict.fromkeys(names):
        assert name in text and f"| {name} | 1234 | 1000–1999 |" in markdown
    assert "506.1%" in text  # 1234.5 img/s x 0.41 GFLOP over 0.1 TFLOP/s = 5.061: the widest MFU still fits
    assert "| 12.3 | 1222.2 | 41.0 |" in markdown and "12.25 |" in markdown  # the columns the console leaves out
    report["results"][1] = {"name": rows[1]["name"], "error": "RuntimeError: oneDNN went away " + "x" * 150}
    table, markdown = rendered(report)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "failed: RuntimeError: oneDNN went away" in text and text.count("x") >= 150  # the whole error, wrapped


def test_quantiles():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quantile(values, 0.5) == 3.0 and quantile(values, 0.0) == 1.0 and quantile(values, 1.0) == 5.0
    assert quantile(values, 0.1) == pytest.approx(1.4)


def test_fashion32_step_flops_match_hand_count():
    """0.41 GFLOP per image for the tutorial's D step + G step (forward and backward)."""
    from gantrain.engine import step_flops

    cfg = preset("fashion32")
    assert step_flops(cfg.model, cfg.data.image_size, cfg.data.channels) == pytest.approx(0.41e9, rel=0.02)


@pytest.mark.slow
def test_bench_profile_of_a_lazy_r1_recipe_holds_one_period(cli, tmp_path) -> None:
    """R1 every 16 D steps: 5 profiled steps would hold one R1 step in 5 (or none), not its share in training;
    the profile takes 16, the first of them an R1 step (the timed steps before it are multiples of 16 too), so
    R1's double backward appears for exactly one step (D's three LeakyReLUs differentiated twice)."""
    result = cli("bench", "--quick", "--preset", "fashion32-tuned", "--dataset", "synthetic", "--limit", "512",
                 "--only", "all, no compile", "--peak-tflops", "0.2", "--device", "cpu", "--windows", "1",
                 "--profile", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert "--profile: 16 steps per row (R1 every 16 D steps: whole R1 periods" in " ".join(result.output.split())
    trace = tmp_path / "p" / "all-no-compile" / "trace_steps_1-16.json"
    events = [e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    assert events.count("g_step") == 16 and events.count("d_step") == 16
    assert events.count("LeakyReluBackwardBackward0") == 3
    # D's strided convolutions torch computes (its first one is a rewrite where this CPU's probe chose it)
    assert events.count("ConvolutionBackwardBackward0") in (2, 3)


@pytest.mark.slow
def test_bench_quick_writes_reports(cli, tmp_path, train_root):
    json_path, md_path = tmp_path / "new" / "bench.json", tmp_path / "bench.md"
    result = cli("bench", "--quick", "--data-root", str(train_root), "--limit", "1024", "--batch-size", "32",
                  "--only", "baseline", "--only", "all, no compile", "--peak-tflops", "0.2", "--windows", "2", "--device", "cpu",
                  "--json", str(json_path), "--markdown", str(md_path), "--profile", str(tmp_path / "profile"))
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["system"]["torch"] == torch.__version__ and report["system"]["cpu_cores"] >= 1
    assert report["peak_tflops"]["source"] == "--peak-tflops"
    chosen = resolve_amp("auto", torch.device("cpu"))
    assert report["amp_auto"]["chosen"] == chosen and " TFLOP/s = " in report["amp_auto"]["why"]
    # the fast-layer row's rewrites, measured anew at its layers' shapes (fashion32 at batch 32: the 1-channel
    # convolution 1->64 at 32 px for space-to-depth, 128->256 at 8 px for the dilated weight gradient)
    rewrites = report["layer_rewrites"]
    assert (rewrites["dtype"], rewrites["layout"]) == ("bf16" if chosen == "bf16" else "fp32", "channels-last")
    assert [(r["rewrite"], r["shape"]) for r in rewrites["layers"]] == \
        [("dilated", [32, 128, 256, 8]), ("space_to_depth", [32, 1, 64, 32])]
    for r in rewrites["layers"]:
        assert r["rewrite_ms"] > 0 and r["torch_ms"] > 0 and isinstance(r["used"], bool)
        if not r["why"].startswith("the rounds disagreed"):
            assert r["used"] == (r["why"] == "faster than torch's")
    # the row ran with what the cache then held: the parent's measurement, not one of its own
    row = next(r for r in report["results"] if r["name"] == "all, no compile")
    assert [[(x["rewrite"], x["used"], x["rewrite_ms"]) for x in ran["layers"]] for ran in row["layer_rewrites"]] == \
        [[(r["rewrite"], r["used"], r["rewrite_ms"]) for r in rewrites["layers"]]] * row["passes"]
    assert all(ran["source"].startswith("kept in ") for ran in row["layer_rewrites"])
    assert set(report["system"]["cpu_features"]) == {"isa", "amx_tile", "avx512_bf16"}
    # --profile: five more steps per row after its timing, a trace and a top-ops table each
    for slug, phases in (("baseline-tutorial-loop", set()), ("all-no-compile", {"d_step", "g_step"})):
        trace = tmp_path / "profile" / slug / "trace_steps_1-5.json"
        events = [e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
        assert phases <= set(events) and any(e.startswith("aten::") for e in events)
        assert (trace.parent / "top_ops_steps_1-5.txt").read_text().startswith("torch.profiler, steps 1 to 5")
    assert [r["profile_trace"] for r in report["results"]] == [
        str(tmp_path / "profile" / slug / "trace_steps_1-5.json") for slug in ("baseline-tutorial-loop", "all-no-compile")]
    names = [r["name"] for r in report["results"]]
    assert names == ["baseline (tutorial loop)", "all, no compile"]
    for r in report["results"]:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["images_per_s_p10"] <= r["images_per_s"] <= r["images_per_s_p90"]
        assert r["timed_steps"] == 4 and r["warmup_steps"] == 3
        assert r["step_ms"] == pytest.approx(r["data_wait_ms"] + r["compute_ms"])
        assert 0 < r["mfu"] and r["config"]["data"]["batch_size"] == 32
    assert report["results"][0]["speedup"] == pytest.approx(1.0)
    assert report["results"][1]["config"]["perf"]["amp"] == resolve_amp("auto", torch.device("cpu"))
    assert "| baseline (tutorial loop) |" in md_path.read_text()


@pytest.mark.slow
def test_to_quality_quick_mechanics(cli, tmp_path, train_root, fashion_extractor):
    """`--to-quality --quick` (tiny models, 256 images): one target every run reaches, one none can, times that
    only grow, a tutorial loop on fewer seeds, and the three report files."""
    out = tmp_path / "tq"
    result = cli("bench", "--to-quality", "--quick", "--data-root", str(train_root), "--seeds", "2",
                 "--baseline-seeds", "1", "--targets", "0.001,1e9", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "to_quality.json").read_text())
    assert report["targets"] == [1e9, 0.001] and report["eval_samples"] == 100 and report["budget_epochs"] == 1.0
    assert [c["name"] for c in report["contenders"]] == ["tutorial", "fashion32", "fashion32-tuned"]
    assert [len(c["runs"]) for c in report["contenders"]] == [1, 2, 2]
    for c in report["contenders"]:
        assert c["config"]["model"]["ngf"] == 8 and c["config"]["data"]["limit"] == 256
        for run in c["runs"]:
            assert "error" not in run, run
            pts = run["points"]
            assert [p["images"] for p in pts] == [128, 256]  # every 0.5 epoch of 256 images
            assert all(b["train_s"] > a["train_s"] > 0 for a, b in itertools.pairwise(pts))
            assert all(p["eval_s"] > 0 and p["fd"] > 0 for p in pts)
        s = c["summary"]
        assert s["reach_s"]["1000000000.0"]["n"] == len(c["runs"])  # reached at the first evaluation
        assert s["reach_s"]["1000000000.0"]["median"] == pytest.approx(
            sorted(r["points"][0]["train_s"] for r in c["runs"])[len(c["runs"]) // 2]
            if len(c["runs"]) % 2 else sum(r["points"][0]["train_s"] for r in c["runs"]) / 2)
        assert s["reach_s"]["0.001"] == {"median": None, "min": None, "max": None, "n": 0, "of": len(c["runs"])}
    assert report["headline"]["tutorial"] == "tutorial"
    assert (out / "to_quality.png").stat().st_size > 1000
    assert "not reached (0/2)" in (out / "to_quality.md").read_text()


@pytest.mark.slow
def test_to_quality_stop_when_reached_ends_runs_at_the_tutorial_final_fd(cli, tmp_path, train_root,
                                                                          fashion_extractor):
    """The worker's loop: a gantrain run ends at its first FD at or below the tutorial loop's final FD, or runs
    its whole budget when it never gets there (the tiny models may go either way; both are checked)."""
    out = tmp_path / "tq"
    result = cli("bench", "--to-quality", "--quick", "--data-root", str(train_root), "--contender", "fashion32",
                 "--contender", "tutorial", "--eval-every-epochs", "0.25", "--stop-when-reached", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "to_quality.json").read_text())
    tutorial = report["contenders"][1]["runs"][0]
    assert len(tutorial["points"]) == 4 and not tutorial["stopped"]  # the tutorial runs its budget
    assert report["stop_fd"] == tutorial["points"][-1]["fd"]
    run = report["contenders"][0]["runs"][0]
    fds = [p["fd"] for p in run["points"]]
    assert all(fd > report["stop_fd"] for fd in fds[:-1])  # no earlier evaluation was at or below it
    if run["stopped"]:
        assert fds[-1] <= report["stop_fd"] and len(fds) <= 4
    else:
        assert len(fds) == 4 and fds[-1] > report["stop_fd"]
    result = cli("bench", "--to-quality", "--contender", "fashion32", "--stop-when-reached", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "needs the 'tutorial' contender" in result.output


def test_to_quality_refuses_bad_options(cli, tmp_path):
    for args, message in ((["--targets", "ten"], "--targets: expected numbers"),
                          (["--contender", "nope"], "neither 'tutorial' nor a preset"),
                          (["--contender", "fashion32", "--contender", "mnist32"], "same dataset"),
                          (["--baseline-from", str(tmp_path / "none.json")], "--baseline-from: cannot read"),
                          (["--contender", "fashion32", "--baseline-from", str(tmp_path / "none.json")],
                           "needs the 'tutorial' contender"),
                          (["--profile", str(tmp_path / "p")],
                           "--profile: profiles the speed rows only, not --to-quality")):
        result = cli("bench", "--to-quality", "--out", str(tmp_path / "x"), *args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_the_plain_loop_names_what_it_does_not_do():
    assert plain_loop_omits(preset("fashion32")) == [] and plain_loop_omits(preset("cats64")) == []
    assert plain_loop_omits(preset("fashion32-tuned")) == [
        "generator EMA half-life 20,000 images, ramp-up 0.05 (standing BN statistics)", "R1 gamma 0.3 every 16 D steps"]
    assert plain_loop_omits(override(preset("cats64-diffaug"), {"hflip": True, "ema_decay": 0.999})) == \
        ["generator EMA 0.999", "DiffAugment color,translation,cutout", "horizontal flips"]


def test_bench_says_when_the_baseline_lacks_what_the_engine_rows_apply(monkeypatch):
    """The speed bench of cats64-diffaug: the engine rows augment, the tutorial loop does not; one line says so
    before any timing (the timing itself is stubbed out)."""
    from gantrain.bench import suite

    class Timed(Exception):
        pass

    def no_timing(*args, **kwargs):
        raise Timed

    monkeypatch.setattr(suite, "run_suite", no_timing)
    for name, expected in (("cats64-diffaug", ["baseline: the tutorial loop has no DiffAugment color,translation,"
                                               "cutout; the engine rows have them, so their ratios include what "
                                               "that costs"]), ("cats64", [])):
        out = io.StringIO()
        with pytest.raises(Timed):
            suite.bench(preset(name), quick=True, nproc=1, peak_override=None, json_path=None, markdown_path=None,
                        console=Console(file=out, width=300))
        assert [line for line in out.getvalue().splitlines() if "tutorial loop has no" in line] == expected


def test_a_bench_whose_every_row_fails_exits_1_with_the_workers_one_line(cli, tmp_path, unwrap) -> None:
    """Before: each row's failure was the last lines of its worker's traceback (`File ".../download.py", line 99,
    ... raise DataNotFound(...)`) in the table's caption, and the command exited 0 having timed nothing. Now the
    worker says a user error in one line, and a bench with no row timed is one error line, exit 1."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    result = cli("bench", "--preset", "dcgan64", "--data-root", empty, "--only", "baseline", "--only", "all, no "
                 "compile", "--repeats", "1", "--quick")
    assert result.exit_code == 1, result.output
    line = unwrap(one_error_line(result))
    assert line.startswith("error: bench: every row failed (2); the first: ") and str(empty) in line, line
    assert "Traceback" not in result.output and 'File "' not in result.output and "error: error:" not in line


def test_the_speed_bench_times_whole_r1_periods(monkeypatch):
    """With R1 every N D steps the default warm-up and windows become multiples of N (each window holds the same
    R1 steps: 5-step windows of R1 every 16 held one in 3 windows, none with --quick), said in one line; without
    R1, or with windows given, the timing is as asked."""
    from gantrain.bench import suite
    from gantrain.engine.config import override

    seen = []

    def no_timing(cfg, *, rows, timing, **kwargs):
        seen.append(dict(timing))
        raise RuntimeError("stubbed")

    monkeypatch.setattr(suite, "run_suite", no_timing)
    cases = [(preset("fashion32-tuned"), {}, True, (16, 3, 16)), (preset("fashion32-tuned"), {}, False, (16, 6, 16)),
             (override(preset("fashion32"), {"r1_gamma": 1.0, "r1_every": 4}), {}, True, (4, 3, 4)),
             (preset("fashion32"), {}, True, (3, 3, 2)), (preset("fashion32-tuned"), {"window": 5}, False, (5, 6, 5))]
    for cfg, given, quick, expected in cases:
        out = io.StringIO()
        with pytest.raises(RuntimeError, match="stubbed"):
            suite.bench(cfg, quick=quick, nproc=1, peak_override=None, json_path=None, markdown_path=None,
                        console=Console(file=out, width=300), **given)
        assert (seen[-1]["warmup"], seen[-1]["windows"], seen[-1]["window"]) == expected, (cfg.loss, quick, given)
        said = [line for line in out.getvalue().splitlines() if line.startswith("R1 every")]
        assert len(said) == int(cfg.loss.r1_gamma > 0 and not given)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="reads /proc")
def test_a_worker_ends_soon_after_its_bench_is_killed():
    """A bench killed by a signal it cannot catch (SIGKILL) leaves its worker orphaned: the worker's watch ends it
    within its poll interval, though the dead bench is not reaped yet (a zombie: this test, its parent, waits on it
    only afterwards); while the bench lives, its watching worker keeps running (the control)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    worker = ("import sys, time; from gantrain.bench.timing import exit_with_parent; assert exit_with_parent(0.1); "
              "print('watching', flush=True); time.sleep(120)")
    bench = ("import subprocess, sys, time; from gantrain.bench.timing import worker_env; "
             f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], env=worker_env()); "
             "print(p.pid, flush=True); time.sleep(120)")
    child = None
    with subprocess.Popen([sys.executable, "-c", bench], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as parent:
        try:
            child = int(parent.stdout.readline())
            assert parent.stdout.readline().strip() == "watching"  # the child's watch runs (its stdout is ours)
            time.sleep(0.5)
            assert _alive(child)  # the bench lives: so does its worker
            os.kill(parent.pid, signal.SIGKILL)
            killed = time.monotonic()
            while _alive(child) and time.monotonic() - killed < 10:
                time.sleep(0.05)
            assert not _alive(child)
            assert "the bench (pid %d) has ended" % parent.pid in parent.stderr.read()  # the worker's one line
        finally:
            parent.kill()
            if child is not None and _alive(child):
                os.kill(child, signal.SIGKILL)


def test_exit_with_parent_needs_a_pid_and_tells_a_reused_one(monkeypatch):
    """No watch without a pid (unset, not a number, 0 or negative: kill(0, 0) would always succeed); a process
    counts as ended when its start time differs from the one recorded (its pid was reused) and as running when it
    matches."""
    import os

    from gantrain.bench import timing

    monkeypatch.delenv(timing.PARENT_ENV, raising=False)
    assert timing.exit_with_parent() is False
    for value in ("not a pid", "0", "-1"):
        monkeypatch.setenv(timing.PARENT_ENV, value)
        assert timing.exit_with_parent() is False
    assert timing.worker_env()[timing.PARENT_ENV] == str(os.getpid())
    if os.path.isdir("/proc/self"):
        with open("/proc/self/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]  # field 22, read here on its own
        assert timing._gone(os.getpid(), started) is False
        assert timing._gone(os.getpid(), str(int(started) + 1)) is True
    assert timing._gone(os.getpid(), None) is False
