"""`gantrain bench --to-quality`: the summaries from evaluation points (values worked out by hand), contender
parsing, and the report files written from a hand-made report."""

from __future__ import annotations

import io
import json
import math

import pytest

from gantrain.bench import to_quality as tq
from gantrain.bench.hardware import system_info
from gantrain.engine.config import override, preset
from gantrain.engine.errors import ConfigError


EXTRACTOR = {"label": "fashion-mnist", "task": "class", "test_accuracy": 0.9086, "weights_sha256": "a" * 64}


def stub_extractor(monkeypatch, weights_sha256="a" * 64):
    """The bench's Evaluator without a fit: an extractor known only by its info (``EXTRACTOR``, these weights)."""
    from types import SimpleNamespace

    from gantrain.engine.metrics import evaluate

    info = {**EXTRACTOR, "weights_sha256": weights_sha256, "epochs": 3}
    evaluator = SimpleNamespace(reference=SimpleNamespace(extractor=SimpleNamespace(info=info)))
    monkeypatch.setattr(evaluate.Evaluator, "for_config", classmethod(lambda cls, *a, **k: evaluator))


def points(*pairs, every=1000):
    """Evaluation points: (train_s, fd) pairs, ``every`` images apart; each evaluation took 2 s."""
    return [{"images": every * (i + 1), "epochs": 0.25 * (i + 1), "train_s": t, "eval_s": 2.0, "fd": fd}
            for i, (t, fd) in enumerate(pairs)]


def test_first_reach_is_the_first_evaluation_at_or_below_the_target():
    run = points((10, 50.0), (20, 12.0), (30, 9.0), (40, 11.0), (50, 4.0))
    assert tq.first_reach(run, 10) == {"train_s": 30, "images": 3000, "fd": 9.0}
    assert tq.first_reach(run, 12.0) == {"train_s": 20, "images": 2000, "fd": 12.0}  # "reaches" includes equal
    assert tq.first_reach(run, 3) is None
    assert tq.first_reach(points((10, None), (20, 5.0)), 100) == {"train_s": 20, "images": 2000, "fd": 5.0}


def test_spread_counts_a_missed_target_as_infinite():
    assert tq.spread([30.0, 10.0, 20.0]) == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3, "of": 3}
    # two of three got there: the median (the middle of 10, 30, inf) is 30, the maximum is unknown
    assert tq.spread([10.0, None, 30.0]) == {"median": 30.0, "min": 10.0, "max": None, "n": 2, "of": 3}
    # one of three: no finite median
    assert tq.spread([None, 7.0, None])["median"] is None
    assert tq.spread([])["of"] == 0
    assert tq.spread([4.0, 8.0])["median"] == 6.0


def test_contender_summary_by_hand():
    runs = [{"seed": 0, "images_per_s": 100.0, "points": points((10, 30.0), (20, 8.0), (30, 6.0))},
            {"seed": 1, "images_per_s": 120.0, "points": points((12, 25.0), (24, 14.0), (36, 4.0))},
            {"seed": 2, "error": "boom"}]
    s = tq.contender_summary(runs, [20, 10, 5])
    assert s["seeds"] == [0, 1] and s["failed"] == 1
    assert s["reach_s"]["20"]["median"] == 22.0  # 20 (seed 0's 30.0 at 10 s is above 20) and 24
    assert s["reach_s"]["10"] == {"median": 28.0, "min": 20, "max": 36, "n": 2, "of": 2}
    assert s["reach_images"]["10"]["median"] == 2500.0  # 2000 and 3000 images
    assert s["reach_s"]["5"] == {"median": None, "min": 36, "max": None, "n": 1, "of": 2}
    assert s["best_fd"]["median"] == 5.0 and s["final_fd"] == {"median": 5.0, "min": 4.0, "max": 6.0, "n": 2, "of": 2}
    assert s["eval_s"] == 12.0 and s["images_per_s"]["median"] == 110.0


def test_headline_is_the_time_to_the_tutorial_loops_final_fd():
    tutorial = {"name": "tutorial", "kind": "baseline",
                "runs": [{"seed": 0, "points": points((100, 20.0), (200, 9.0), (300, 6.0), (400, 7.0))}]}
    fast = {"name": "fashion32-tuned", "kind": "engine",
            "runs": [{"seed": 0, "points": points((10, 8.0), (20, 5.0))},
                     {"seed": 1, "points": points((10, 9.0), (20, 6.5))},
                     {"seed": 2, "points": points((10, 12.0), (20, 7.5))}]}
    contenders = [tutorial, fast]
    for c in contenders:
        c["summary"] = tq.contender_summary(c["runs"], [10])
    head = tq.headline(contenders)
    assert head["target_fd"] == 7.0  # the tutorial loop's final FD; it first reached it at 300 s
    assert head["contenders"]["tutorial"]["median"] == 300 and head["contenders"]["tutorial"]["sooner"] == 1.0
    # the seeds reach 7.0 at 10, 20 and never: median 20 s, 15x sooner
    assert head["contenders"]["fashion32-tuned"]["median"] == 20
    assert head["contenders"]["fashion32-tuned"]["sooner"] == pytest.approx(15.0)
    assert tq.headline([fast]) is None


def test_contenders_parse_presets_and_changes():
    base = preset("fashion32")
    common = {"limit": 512}
    tutorial = tq.parse_contender("tutorial", base, common)
    assert tutorial.kind == "baseline" and tutorial.cfg.data.limit == 512 and tutorial.cfg.optim.lr_g == 2e-4
    tuned = tq.parse_contender("fashion32-tuned ema-decay=0.99 eval_every=0", base, common)
    assert tuned.kind == "engine" and tuned.cfg.gan.ema_decay == 0.99 and tuned.cfg.optim.lr_g == 1.5e-3
    assert tuned.cfg.data.limit == 512 and tuned.name == "fashion32-tuned ema-decay=0.99 eval_every=0"
    for text, message in (("nonsense", "neither 'tutorial' nor a preset"), ("fashion32 lr_g", "not FIELD=VALUE"),
                          ("fashion32 no_such=1", "unknown config field"), ("", "empty"),
                          ("fashion32 ema_decay=2", "ema_decay")):
        with pytest.raises(ConfigError, match=message):
            tq.parse_contender(text, base, common)
    # a contender's changes are checked with the common settings as one config (a colour preset under a common
    # --dataset fashion-mnist is valid once the contender sets channels=1)
    gray = tq.parse_contender("dcgan64 image_size=32 channels=1", base, {"dataset": "fashion-mnist", "limit": 512})
    assert (gray.cfg.data.dataset, gray.cfg.data.channels, gray.cfg.data.image_size) == ("fashion-mnist", 1, 32)
    with pytest.raises(ConfigError, match="fashion-mnist is grayscale"):
        tq.parse_contender("dcgan64 image_size=32", base, {"dataset": "fashion-mnist"})
    assert tq.default_contenders("fashion32") == ["tutorial", "fashion32", "fashion32-tuned"]
    assert tq.default_contenders("cats64") == ["tutorial", "cats64", "cats64-diffaug"]
    assert tq.default_contenders("dcgan64") == ["tutorial", "dcgan64"]  # nothing measured for it


def test_the_report_files(tmp_path):
    runs = [{"seed": 0, "images_per_s": 300.0, "setup_s": 1.0, "points": points((100, 30.0), (200, 9.0))}]
    fast = [{"seed": s, "images_per_s": 700.0, "setup_s": 1.0, "points": points((20, 12.0), (40, 4.0 + s))}
            for s in (0, 1, 2)]
    report = {"system": system_info(), "device": "cpu", "preset": "fashion32", "targets": [20.0, 5.0], "seeds": 3,
              "baseline_seeds": 1, "budget_epochs": 0.5, "eval_every_epochs": 0.25, "eval_samples": 2000,
              "wall_s": 600.0,
              "contenders": [{"name": "tutorial", "kind": "baseline", "config": {}, "runs": runs},
                             {"name": "fashion32", "kind": "engine", "config": {},
                              "runs": [*fast, {"seed": 3, "error": "killed"}]}]}
    from rich.console import Console

    with open(tmp_path / "console.txt", "w") as fh:
        tq.finish_report(report, tmp_path, Console(file=fh, width=200))
    markdown = (tmp_path / "to_quality.md").read_text()
    assert "| contender | seeds | images/s | to FD ≤ 20 | to FD ≤ 5 | to tutorial's final FD 9.00 | × sooner |" in markdown
    assert "| tutorial | 1 | 300 | 200 s | not reached (0/1) | 200 s | 1.0× | 9.00 | 9.00 | 9.00 | 4 |" in markdown
    # 3 seeds reach 9.0 at 40 s: 5x sooner; FD <= 5: seeds 0 and 1 (4.0, 5.0) at 40 s, seed 2 never
    assert "| fashion32 | 3 | 700 | 20 s (20–20, 3/3) | 40 s (40–∞, 2/3) | 40 s (40–40, 3/3) | 5.0× |" in markdown
    assert "4.00, 5.00, 6.00" in markdown
    saved = json.loads((tmp_path / "to_quality.json").read_text())
    assert saved["headline"]["contenders"]["fashion32"]["sooner"] == 5.0
    assert saved["contenders"][1]["summary"]["failed"] == 1
    assert (tmp_path / "to_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fashion32, seed 3 failed: killed" in (tmp_path / "console.txt").read_text()
    assert not math.isnan(saved["contenders"][0]["summary"]["best_fd"]["median"])


def summarised(contenders: list[dict], targets: list[float], budget_epochs: float) -> dict:
    """A finished report as ``bench_to_quality`` makes it, from hand-made runs."""
    report = {"system": system_info(), "device": "cpu", "preset": "fashion32", "targets": targets,
              "budget_epochs": budget_epochs, "eval_every_epochs": 0.25, "eval_samples": 2000,
              "contenders": contenders}
    for c in contenders:
        c["summary"] = tq.contender_summary(c["runs"], targets)
    report["headline"] = tq.headline(contenders)
    return report


def console_text(report: dict) -> str:
    """The report's console table as an 80-column terminal shows it."""
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=80).print(tq.rendered(report)[0])
    return out.getvalue()


def test_the_console_table_fits_80_columns():
    runs = [{"seed": s, "images_per_s": 415.0, "points": points((145, 11.7), (290, 4.6), (434, 2.99))}
            for s in (0, 1, 2)]
    report = summarised([{"name": "tutorial", "kind": "baseline", "runs": [{**runs[0], "seed": 0}]},
                         {"name": "fashion32-tuned", "kind": "engine", "runs": runs}], [20.0, 10.0, 5.0, 3.0], 3)
    text = console_text(report)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    assert "* the tutorial loop's final FD" in text
    row = next(line for line in lines if "fashion32-tuned (3)" in line)
    # FD 11.7 at 145 s (<= 20, not <= 10), 4.6 at 290 s, 2.99 at 434 s; the tutorial's final FD is 2.99 too
    assert row.split()[1:] == ["(3)", "145", "s", "290", "s", "290", "s", "434", "s", "434", "s", "1.0", "2.99"]


def test_stop_when_reached_runs_the_tutorial_first_and_passes_its_final_fd(tmp_path, monkeypatch):
    """The stub stands for the worker: it records the order and the stop FD each run was given, and stops an
    engine run at its first FD at or below it, as the worker's loop does."""
    from rich.console import Console

    stub_extractor(monkeypatch)
    base = preset("fashion32")
    contenders = [tq.Contender("fashion32-tuned", "engine", base), tq.Contender("tutorial", "baseline", base)]
    tutorial_finals = {0: 6.0, 1: 4.0}  # median 5.0
    calls = []

    def run_one(contender, seed, spec, env):
        calls.append((contender.name, seed, spec.get("stop_fd")))
        if contender.kind == "baseline":
            return {"seed": seed, "images_per_s": 400.0, "points": points((100, 9.0), (200, tutorial_finals[seed]))}
        fds = [7.0, 4.5, 3.0]  # stops at 4.5, the first <= 5.0
        kept = fds[:next(i for i, fd in enumerate(fds) if fd <= spec["stop_fd"]) + 1]
        return {"seed": seed, "images_per_s": 600.0, "stopped": True,
                "points": points(*[(30.0 * (i + 1), fd) for i, fd in enumerate(kept)])}

    with open(tmp_path / "console.txt", "w") as fh:
        report = tq.bench_to_quality(base, contenders, seeds=2, baseline_seeds=2, targets=[5.0], budget_epochs=1,
                                     eval_every_epochs=0.25, eval_samples=100, out=tmp_path / "tq",
                                     console=Console(file=fh, width=200), stop_when_reached=True, run_one=run_one)
    assert calls == [("tutorial", 0, None), ("tutorial", 1, None),
                     ("fashion32-tuned", 0, 5.0), ("fashion32-tuned", 1, 5.0)]
    tuned = report["contenders"][0]["summary"]
    assert tuned["final_fd"]["median"] == 4.5 and [p["stopped"] for p in tuned["per_seed"]] == [True, True]
    assert report["headline"]["contenders"]["fashion32-tuned"]["median"] == 60.0  # 4.5 <= 5.0 at 60 s
    markdown = (tmp_path / "tq" / "to_quality.md").read_text()
    assert "4.50†, 4.50†" in markdown and "stopped at their first FD ≤ the tutorial loop's final FD 5.00" in markdown


def test_stop_when_reached_needs_the_tutorial(tmp_path):
    from rich.console import Console

    base = preset("fashion32")
    with pytest.raises(ConfigError, match="--stop-when-reached: .* needs the 'tutorial' contender"):
        tq.bench_to_quality(base, [tq.Contender("fashion32", "engine", base)], seeds=1, baseline_seeds=None,
                            targets=[5.0], budget_epochs=1, eval_every_epochs=0.25, eval_samples=100,
                            out=tmp_path / "tq", console=Console(), stop_when_reached=True)
    assert not (tmp_path / "tq").exists()  # refused before anything was made


def test_the_console_legend_names_the_tutorial_target_only_when_there_is_one():
    """Without the tutorial contender there is no headline column, so the legend must not explain its '*'."""
    runs = [{"seed": 0, "images_per_s": 590.0, "points": points((100, 12.0), (250, 3.6))}]
    report = summarised([{"name": "fashion32-tuned", "kind": "engine", "runs": runs}], [20.0, 10.0], 2.5)
    assert report["headline"] is None
    text = console_text(report)
    assert "tutorial" not in text and "*" not in text and "final: the last FD" in text
    assert next(line for line in text.splitlines() if "fashion32-tuned (1)" in line).split()[2:] == \
        ["100", "s", "250", "s", "3.60"]  # FD 12 <= 20 at 100 s, 3.6 <= 10 at 250 s


def test_a_tutorial_contender_says_which_settings_the_plain_loop_lacks(tmp_path, monkeypatch):
    """--preset fashion32-tuned makes the tutorial contender the plain loop on that recipe, without its EMA and
    R1 (its learning-rate decay it applies, see the next tests): one line says so; gantrain's own contenders (which apply it) get no such line."""
    from rich.console import Console

    stub_extractor(monkeypatch)
    base = preset("fashion32-tuned")
    contenders = [tq.parse_contender("tutorial", base, {}), tq.parse_contender("fashion32-tuned", base, {})]

    def run_one(contender, seed, spec, env):
        return {"seed": seed, "images_per_s": 500.0, "points": points((100, 4.0))}

    out = tmp_path / "console.txt"
    with open(out, "w") as fh:
        tq.bench_to_quality(base, contenders, seeds=1, baseline_seeds=None, targets=[5.0], budget_epochs=1,
                            eval_every_epochs=1, eval_samples=100, out=tmp_path / "tq",
                            console=Console(file=fh, width=300), run_one=run_one)
    lines = [line for line in out.read_text().splitlines() if "the plain loop has no" in line]
    assert lines == ["tutorial: the plain loop has no generator EMA half-life 20,000 images, ramp-up 0.05 (standing "
                     "BN statistics), R1 gamma 0.3 every 16 D steps; it trains the rest of fashion32-tuned's recipe"]


def earlier_report(tmp_path, base, *, finals=(6.0, 4.0), system=None, name="earlier.json", extractor=EXTRACTOR,
                   **spec_changes):
    """A to_quality.json as an earlier measurement wrote it: the tutorial loop on ``base``'s recipe, two seeds."""
    spec = {"budget_epochs": 1, "eval_every_epochs": 0.25, "eval_samples": 100, "eval_seed": 0, "num_workers": 2,
            **spec_changes}
    runs = [{"seed": s, "images_per_s": 400.0, "points": points((100, 9.0), (150, 4.8), (200, fd))}
            for s, fd in enumerate(finals)]
    report = {"system": {**system_info(), "date": "2026-11-01T00:00:00+00:00", "git_commit": "abc123", **(system or {})},
              **spec, "contenders": [{"name": "tutorial", "kind": "baseline", "config": base.to_dict(), "runs": runs}]}
    if extractor is not None:
        report["extractor"] = extractor
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def test_baseline_from_takes_the_tutorial_runs_of_an_earlier_report(tmp_path, monkeypatch):
    """With --baseline-from the tutorial loop is not trained: its runs come from the file, the stop FD and the
    headline are worked out from them (median final FD of 6 and 4 is 5; the loop first reaches 5 at 200 s, the
    engine at 60 s: 3.33x), one line and the caption say where they came from."""
    from rich.console import Console

    stub_extractor(monkeypatch)
    base = preset("fashion32")
    path = earlier_report(tmp_path, override(base, {"data_root": "elsewhere/datasets"}))  # spelling may differ
    contenders = [tq.Contender("tutorial", "baseline", base), tq.Contender("fashion32-tuned", "engine", base)]
    calls = []

    def run_one(contender, seed, spec, env):
        calls.append((contender.name, seed, spec.get("stop_fd")))
        return {"seed": seed, "images_per_s": 600.0, "stopped": True, "points": points((30.0, 7.0), (60.0, 4.5))}

    with open(tmp_path / "console.txt", "w") as fh:
        report = tq.bench_to_quality(base, contenders, seeds=2, baseline_seeds=None, targets=[5.0], budget_epochs=1,
                                     eval_every_epochs=0.25, eval_samples=100, out=tmp_path / "tq",
                                     console=Console(file=fh, width=300), stop_when_reached=True,
                                     baseline_from=path, run_one=run_one)
    assert calls == [("fashion32-tuned", 0, 5.0), ("fashion32-tuned", 1, 5.0)]
    tutorial = report["contenders"][0]
    assert [r["seed"] for r in tutorial["runs"]] == [0, 1] and report["baseline_seeds"] == 2
    assert tutorial["reused_from"] == {"path": str(path), "date": "2026-11-01T00:00:00+00:00", "git_commit": "abc123"}
    assert report["headline"]["contenders"]["fashion32-tuned"]["sooner"] == pytest.approx(150 / 60)
    assert f"tutorial: 2 run(s) taken from {path} (measured 2026-11-01, commit abc123), not trained again" in \
        (tmp_path / "console.txt").read_text()
    assert "taken from" in (tmp_path / "tq" / "to_quality.md").read_text()
    saved = json.loads((tmp_path / "tq" / "to_quality.json").read_text())
    assert saved["contenders"][0]["runs"] == tutorial["runs"]
    # --baseline-seeds 1 takes the first run only: the loop's final FD is then 6
    report = tq.bench_to_quality(base, contenders, seeds=1, baseline_seeds=1, targets=[5.0], budget_epochs=1,
                                 eval_every_epochs=0.25, eval_samples=100, out=tmp_path / "tq1", console=Console(file=io.StringIO()),
                                 baseline_from=path, run_one=run_one)
    assert len(report["contenders"][0]["runs"]) == 1 and report["headline"]["target_fd"] == 6.0


@pytest.mark.parametrize(("earlier", "message"), [
    ({"recipe": {"lr_g": 1e-3}}, r"optim\.lr_g 0\.001 \(here 0\.0002\)"),
    ({"recipe": {"batch_size": 64}}, r"data\.batch_size 64 \(here 128\)"),
    ({"recipe": {"seed": 7}}, r"run\.seed 7 \(here 0\)"),
    ({"spec": {"eval_every_epochs": 1.0}}, r"eval_every_epochs 1\.0 \(here 0\.25\)"),
    ({"spec": {"budget_epochs": 20}}, r"budget_epochs 20 \(here 1\)"),
    ({"system": {"cpu": "Another CPU"}}, r"cpu 'Another CPU' \(here "),
    ({"system": {"torch_threads": 97}}, r"torch_threads 97 \(here "),
])
def test_baseline_from_refuses_runs_that_are_not_this_measurements_tutorial_loop(tmp_path, earlier, message):
    """Another recipe, seed, evaluation grid, budget or machine would make the headline divide incomparable times:
    refused before any folder is made, naming what differs."""
    from rich.console import Console

    base = preset("fashion32")
    path = earlier_report(tmp_path, override(base, earlier.get("recipe", {})), system=earlier.get("system"),
                          **earlier.get("spec", {}))
    with pytest.raises(ConfigError, match=r"--baseline-from: .* measured another tutorial loop than this run would: "
                                          + message):
        tq.bench_to_quality(base, [tq.Contender("tutorial", "baseline", base)], seeds=1, baseline_seeds=None,
                            targets=[5.0], budget_epochs=1, eval_every_epochs=0.25, eval_samples=100,
                            out=tmp_path / "tq", console=Console(), baseline_from=path)
    assert not (tmp_path / "tq").exists()


def test_baseline_from_reads_a_field_an_older_report_lacks_as_its_default(tmp_path, monkeypatch):
    """A report written before a field existed (here --lr-decay) measured that field's default: it stands in for
    a tutorial loop at the default, and is refused, naming the field, for one that sets it otherwise."""
    from rich.console import Console

    stub_extractor(monkeypatch)
    base = preset("fashion32")
    path = earlier_report(tmp_path, base)
    old = json.loads(path.read_text())
    for key in ("lr_decay", "lr_decay_start"):
        del old["contenders"][0]["config"]["optim"][key]
    path.write_text(json.dumps(old))

    def run_one(contender, seed, spec, env):
        raise AssertionError("the tutorial loop is not trained again")

    report = tq.bench_to_quality(base, [tq.Contender("tutorial", "baseline", base)], seeds=1, baseline_seeds=None,
                                 targets=[5.0], budget_epochs=1, eval_every_epochs=0.25, eval_samples=100,
                                 out=tmp_path / "tq", console=Console(file=io.StringIO()), baseline_from=path,
                                 run_one=run_one)
    assert len(report["contenders"][0]["runs"]) == 2
    decaying = override(base, {"lr_decay": "cosine"})
    with pytest.raises(ConfigError, match=r"optim\.lr_decay 'none' \(here 'cosine'\)"):
        tq.bench_to_quality(decaying, [tq.Contender("tutorial", "baseline", decaying)], seeds=1, baseline_seeds=None,
                            targets=[5.0], budget_epochs=1, eval_every_epochs=0.25, eval_samples=100,
                            out=tmp_path / "tq2", console=Console(file=io.StringIO()), baseline_from=path,
                            run_one=run_one)


def test_baseline_from_refuses_unreadable_or_foreign_files(tmp_path):
    from rich.console import Console

    base = preset("fashion32")
    tutorial = tq.Contender("tutorial", "baseline", base)
    (tmp_path / "speed.json").write_text(json.dumps({"results": []}))  # a speed bench report
    (tmp_path / "broken.json").write_text("{not json")
    odd = json.loads(earlier_report(tmp_path, base, name="odd.json").read_text())
    odd["system"], odd["contenders"][0]["config"]["optim"] = "a CPU", [0.1]  # hand-edited into other shapes
    (tmp_path / "odd.json").write_text(json.dumps(odd))
    empty = earlier_report(tmp_path, base, finals=(), name="empty.json")
    cases = [(tmp_path / "missing.json", [tutorial], None, "cannot read .*missing.json"),
             (tmp_path / "speed.json", [tutorial], None, "is not a to_quality.json with a tutorial-loop run"),
             (tmp_path / "broken.json", [tutorial], None, "is not a to_quality.json with a tutorial-loop run"),
             (tmp_path / "odd.json", [tutorial], None, "is not a to_quality.json with a tutorial-loop run"),
             (empty, [tutorial], None, "holds no finished tutorial-loop run"),
             (earlier_report(tmp_path, base), [tutorial], 3,
              "holds 2 tutorial-loop run.s., --baseline-seeds asks for 3"),
             (empty, [tq.Contender("fashion32", "engine", base)], None, "needs the 'tutorial' contender")]
    for path, contenders, baseline_seeds, message in cases:
        with pytest.raises(ConfigError, match=f"--baseline-from: (.* )?{message}"):
            tq.bench_to_quality(base, contenders, seeds=1, baseline_seeds=baseline_seeds, targets=[5.0],
                                budget_epochs=1, eval_every_epochs=0.25, eval_samples=100, out=tmp_path / "tq",
                                console=Console(), baseline_from=path)


def test_the_report_names_the_extractor_that_scored_it(tmp_path, monkeypatch):
    """Every FD is a distance in one extractor's feature space: the JSON records which (label, task, held-out
    accuracy, weights SHA-256) and the Markdown caption names it."""
    from rich.console import Console

    stub_extractor(monkeypatch, weights_sha256="0123456789ab" + "c" * 52)
    base = preset("fashion32")

    specs = []

    def run_one(contender, seed, spec, env):
        specs.append(spec)
        return {"seed": seed, "images_per_s": 500.0, "points": points((100, 4.0))}

    report = tq.bench_to_quality(base, [tq.Contender("fashion32", "engine", base)], seeds=1, baseline_seeds=None,
                                 targets=[5.0], budget_epochs=1, eval_every_epochs=1, eval_samples=100,
                                 out=tmp_path / "tq", console=Console(file=io.StringIO()), run_one=run_one)
    expected = {**EXTRACTOR, "weights_sha256": "0123456789ab" + "c" * 52}
    assert report["extractor"] == expected
    assert json.loads((tmp_path / "tq" / "to_quality.json").read_text())["extractor"] == expected
    assert ("(extractor fashion-mnist class, 90.86% held-out accuracy, weights 0123456789ab)"
            in (tmp_path / "tq" / "to_quality.md").read_text())
    assert [spec["extractor_weights_sha256"] for spec in specs] == [expected["weights_sha256"]]  # workers check it


def test_a_worker_scored_by_other_weights_refuses_to_train(monkeypatch):
    """A worker whose extractor is not the one the report names (the cache changed mid-measurement) fails its
    run before training, rather than file FDs of other weights under the report's extractor."""
    stub_extractor(monkeypatch, weights_sha256="c" * 64)
    spec = {"contender": "engine", "budget_epochs": 1, "eval_every_epochs": 1, "eval_samples": 10, "eval_seed": 0,
            "extractor_weights_sha256": "d" * 64}
    with pytest.raises(ConfigError, match=r"feature extractor \(weights cccccccccccc\) is not the one the report "
                                          r"names \(dddddddddddd\)"):
        tq.train_to_quality(preset("fashion32"), spec)


def test_baseline_from_needs_the_same_extractor(tmp_path, monkeypatch):
    """FDs from another extractor's weights (a refit, another machine's fit) do not compare: refused before any
    folder is made, naming both; the same weights pass silently; a report from before the weights were recorded
    passes with one line saying its FDs are taken as this extractor's."""
    from rich.console import Console

    base = preset("fashion32")
    contenders = [tq.Contender("tutorial", "baseline", base), tq.Contender("fashion32-tuned", "engine", base)]

    def run_one(contender, seed, spec, env):
        return {"seed": seed, "images_per_s": 600.0, "points": points((30.0, 7.0), (60.0, 4.5))}

    def bench(path, out):
        text = io.StringIO()
        tq.bench_to_quality(base, contenders, seeds=1, baseline_seeds=None, targets=[5.0], budget_epochs=1,
                            eval_every_epochs=0.25, eval_samples=100, out=tmp_path / out,
                            console=Console(file=text, width=400), baseline_from=path, run_one=run_one)
        return text.getvalue()

    stub_extractor(monkeypatch, weights_sha256="b" * 64)
    other = earlier_report(tmp_path, base, name="other.json")  # scored by weights "aaa…"
    with pytest.raises(ConfigError, match=r"--baseline-from: .*other\.json was scored by another feature extractor "
                                          r"\(weights aaaaaaaaaaaa, here bbbbbbbbbbbb: refitted or fitted elsewhere\)"):
        bench(other, "refused")
    assert not (tmp_path / "refused").exists()

    same = earlier_report(tmp_path, base, name="same.json", extractor={**EXTRACTOR, "weights_sha256": "b" * 64})
    assert "feature extractor" not in bench(same, "same")
    legacy = earlier_report(tmp_path, base, name="legacy.json", extractor=None)
    lines = [line for line in bench(legacy, "legacy").splitlines() if "feature extractor" in line]
    assert lines == [f"--baseline-from: {legacy} does not record its feature extractor (written before gantrain "
                     "recorded it); its FDs are taken as measured by this one (fashion-mnist, weights bbbbbbbbbbbb)"]


class _Recording:
    """LRDecay recording every update's (step, total steps, G's rate)."""

    @staticmethod
    def patch(monkeypatch):
        import gantrain.engine as engine
        from gantrain.engine.gan import lr_schedule
        from gantrain.engine.train import loop

        seen = []

        class Recording(lr_schedule.LRDecay):
            def apply(self, step):
                super().apply(step)
                seen.append((step, self.total_steps, self.optimizers[0][1].param_groups[0]["lr"]))

        for module in (engine, lr_schedule, loop):  # the API first: it reads its value from lr_schedule
            monkeypatch.setattr(module, "LRDecay", Recording)
        return seen


DECAY_BY_HAND = [(0, 12, pytest.approx(1e-3)), (1, 12, pytest.approx(1e-3 * 11 / 12)),
                 (2, 12, pytest.approx(1e-3 * 10 / 12))]


def _decay_cfg(train_root):
    return override(preset("fashion32"), {"data_root": str(train_root), "limit": 256, "batch_size": 32, "ngf": 8,
                                          "ndf": 8, "epochs": 20, "lr_decay": "linear", "lr_g": 1e-3,
                                          "device": "cpu", "amp": "off"})


def test_the_engine_contender_decays_its_rates_over_the_budget(monkeypatch, train_root, tmp_path):
    """gantrain's step (through the Trainer) with --lr-decay decays over the bench's budget (not the config's
    --epochs), one update at a time, as a run of --epochs budget would: 256 images / batch 32 = 8 updates per
    epoch, budget 1.5 epochs = 12; G's optimiser trains at the rate worked out by hand."""
    from gantrain.engine.train.loop import Trainer

    seen = _Recording.patch(monkeypatch)
    spec = {"budget_epochs": 1.5}
    run_cfg = tq.engine_run_config(_decay_cfg(train_root), spec, tmp_path / "run")
    assert (run_cfg.run.epochs, run_cfg.run.max_steps, run_cfg.checkpoint.checkpoint_every) == (2, 0, 0)

    class StopAfterThree:
        def after_step(self, trainer):
            return "three" if trainer.step == 3 else None

    trainer = Trainer(run_cfg, console=__import__("rich.console").console.Console(file=io.StringIO()),
                      hooks=[StopAfterThree()], last_step=lambda per_epoch: tq.budget_steps(spec, per_epoch))
    assert trainer.loader.steps_per_epoch == 8 and trainer.total_steps == 12
    trainer.fit()
    assert seen == DECAY_BY_HAND and trainer.stop_reason == "three"


def test_the_tutorial_contender_decays_its_rates_over_the_budget(monkeypatch, train_root):
    """The plain loop alike (a torch scheduler's rates over the budget): 8 updates per epoch, 12 in 1.5 epochs."""
    seen = _Recording.patch(monkeypatch)

    class Clock:
        def start(self, num_images):
            self.num_images, self.calls = num_images, []

        steps = 12

        def after_images(self, images, generator):
            self.calls.append(images)
            return "three" if len(self.calls) == 3 else None

    clock = tq._train_baseline(_decay_cfg(train_root), __import__("torch").device("cpu"),
                               {"budget_epochs": 1.5, "num_workers": 0}, Clock())
    assert clock.num_images == 256 and clock.calls == [32, 64, 96]
    assert seen == DECAY_BY_HAND


def test_the_clock_evaluates_on_its_image_cadence_and_at_the_budgets_end(monkeypatch):
    """Budget 2.5 epochs of 100 images, an FD every 0.75 epoch: evaluations at the first step reaching 75, 150,
    225 images and at 250 (the end), each once even when a step jumps past two marks; the training seconds
    exclude the evaluations; a stop FD ends the run early, a non-finite FD as diverged."""
    import types

    fds = iter([9.0, 7.0, 5.0, 3.0])
    evaluations = []

    def evaluate(generator, cfg, num_samples, seed):
        evaluations.append((num_samples, seed))
        return types.SimpleNamespace(values={"fd": next(fds)})

    evaluator = types.SimpleNamespace(evaluate=evaluate)
    cfg = override(preset("fashion32"), {"batch_size": 40})
    spec = {"budget_epochs": 2.5, "eval_every_epochs": 0.75, "eval_samples": 500, "eval_seed": 3}
    clock = tq.QualityClock(evaluator, cfg, spec, __import__("torch").device("cpu"))
    clock.start(100)
    assert clock.steps == 7  # ceil(250 / 40)
    asked = []

    def generator():
        asked.append(clock.images)
        return None

    reasons = [clock.after_images(images, generator) for images in (40, 80, 120, 160, 200, 240, 280)]
    assert reasons == [None, None, None, None, None, None, "budget spent"]
    assert [p["images"] for p in clock.points] == [80, 160, 240, 280]
    assert asked == [80, 160, 240, 280]  # the generator only when evaluating (standing BN statistics cost a pass)
    assert [p["epochs"] for p in clock.points] == [0.8, 1.6, 2.4, 2.8]
    assert evaluations == [(500, 3)] * 4
    assert all(p["train_s"] <= q["train_s"] for p, q in zip(clock.points, clock.points[1:]))
    result = clock.result()
    assert result["num_images"] == 100 and not result["diverged"] and not result["stopped"]

    clock = tq.QualityClock(types.SimpleNamespace(evaluate=lambda *a, **k: types.SimpleNamespace(
        values={"fd": 4.0})), cfg, {**spec, "stop_fd": 4.5}, __import__("torch").device("cpu"))
    clock.start(100)
    assert [clock.after_images(i, lambda: None) for i in (40, 80)] == [None, "reached --stop-fd"]
    assert clock.result()["stopped"]
    clock = tq.QualityClock(types.SimpleNamespace(evaluate=lambda *a, **k: types.SimpleNamespace(
        values={"fd": math.nan})), cfg, spec, __import__("torch").device("cpu"))
    clock.start(100)
    assert [clock.after_images(i, lambda: None) for i in (40, 80)] == [None, "diverged"]
    assert clock.result()["diverged"] and clock.points[-1]["fd"] is None


def test_the_engine_contender_is_evaluated_by_the_trainers_image_cadence(train_root):
    """gantrain's contender: the clock is the Trainer's evaluation. 256 images, batch 32, budget 1.5 epochs, an FD
    every 0.5 epoch (128 images): due by hand after steps 4, 8 and 12 (128, 256, 384 images; 12 is also the
    budget's last step), as the tutorial loop's clock is; the generator evaluated is the Trainer's, and the
    training seconds stop while it is measured."""
    import types

    import torch

    asked = []

    def evaluate(generator, cfg, num_samples, seed):
        asked.append(generator)
        return types.SimpleNamespace(values={"fd": 10.0 - len(asked)})

    cfg = _decay_cfg(train_root)
    spec = {"budget_epochs": 1.5, "eval_every_epochs": 0.5, "eval_samples": 100, "eval_seed": 0}
    clock = tq.QualityClock(types.SimpleNamespace(evaluate=evaluate), cfg, spec, torch.device("cpu"))
    clock = tq._train_engine(cfg, torch.device("cpu"), spec, clock)
    assert [p["images"] for p in clock.points] == [128, 256, 384]
    assert [p["epochs"] for p in clock.points] == [0.5, 1.0, 1.5]
    assert [p["fd"] for p in clock.points] == [9.0, 8.0, 7.0]
    assert all(isinstance(g, torch.nn.Module) for g in asked)
    assert clock.result()["num_images"] == 256 and not clock.result()["diverged"]

    stopping = tq.QualityClock(types.SimpleNamespace(evaluate=lambda *a, **k: types.SimpleNamespace(
        values={"fd": 4.0})), cfg, {**spec, "stop_fd": 4.5}, torch.device("cpu"))
    stopping = tq._train_engine(cfg, torch.device("cpu"), {**spec, "stop_fd": 4.5}, stopping)
    assert [p["images"] for p in stopping.points] == [128] and stopping.result()["stopped"]
    assert stopping.images == 128  # the run ended at that step


def test_without_a_budget_each_contender_trains_its_own_recipes_epochs(tmp_path, monkeypatch):
    """No --budget-epochs: the tutorial loop gets --preset's epochs (fashion32: 20), a preset its own
    (fashion32-tuned: 5) and ``epochs=N`` its N; each run's spec carries its budget (so its decay spans it), the
    report records each, and the caption names each. A report of per-contender budgets is reused by
    --baseline-from for a tutorial loop of the same budget, and refused for another."""
    from rich.console import Console

    stub_extractor(monkeypatch)
    base = preset("fashion32")
    assert (base.run.epochs, preset("fashion32-tuned").run.epochs) == (20, 5)  # the recipes this test relies on
    contenders = [tq.parse_contender(text, base, {}) for text in ("tutorial", "fashion32-tuned",
                                                                  "fashion32-tuned epochs=2")]
    budgets = []

    def run_one(contender, seed, spec, env):
        budgets.append((contender.name, spec["budget_epochs"]))
        return {"seed": seed, "images_per_s": 500.0, "points": points((100, 4.0))}

    def measure(out, budget_epochs, baseline_from=None, chosen=contenders):
        return tq.bench_to_quality(base, chosen, seeds=1, baseline_seeds=None, targets=[5.0],
                                   budget_epochs=budget_epochs, eval_every_epochs=1, eval_samples=100, out=out,
                                   console=Console(file=io.StringIO()), run_one=run_one, baseline_from=baseline_from)

    report = measure(tmp_path / "own", None)
    assert budgets == [("tutorial", 20.0), ("fashion32-tuned", 5.0), ("fashion32-tuned epochs=2", 2.0)]
    assert report["budget_epochs"] is None
    assert [c["budget_epochs"] for c in report["contenders"]] == [20.0, 5.0, 2.0]
    assert "epochs: tutorial 20, fashion32-tuned 5, fashion32-tuned epochs=2 2," in \
        (tmp_path / "own" / "to_quality.md").read_text()
    budgets.clear()
    report = measure(tmp_path / "given", 3.0)  # --budget-epochs 3: every contender alike
    assert budgets == [("tutorial", 3.0), ("fashion32-tuned", 3.0), ("fashion32-tuned epochs=2", 3.0)]
    assert "3 epochs each," in (tmp_path / "given" / "to_quality.md").read_text()
    budgets.clear()
    report = measure(tmp_path / "reused", None, baseline_from=tmp_path / "own" / "to_quality.json",
                     chosen=contenders[:2])
    assert budgets == [("fashion32-tuned", 5.0)]  # the tutorial loop's 20-epoch run came from the file
    assert report["contenders"][0]["reused_from"]["path"] == str(tmp_path / "own" / "to_quality.json")
    with pytest.raises(ConfigError, match=r"budget_epochs 20.0 \(here 3.0\)"):
        measure(tmp_path / "refused", 3.0, baseline_from=tmp_path / "own" / "to_quality.json",
                chosen=contenders[:2])
