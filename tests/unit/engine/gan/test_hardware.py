"""The device's measured capability: the cached peak probe, the bf16 rule's inputs, FLOPs per image by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flops import dcgan32_step_flops

from gantrain.engine import ModelConfig
from gantrain.engine.gan import hardware

CPU = torch.device("cpu")


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[int, float]]:
    """Each probe the code runs (size, seconds), answered with fixed figures; the cache in tmp_path."""
    monkeypatch.setenv("GANTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_MEASURED", {})  # each test starts as a fresh process would
    calls: list[tuple[int, float]] = []

    def probe(device, size, seconds):
        calls.append((size, seconds))
        return hardware.Peaks(0.17 * len(calls), 0.39, 0.39, f"measured {size}x{size} matmul")

    monkeypatch.setattr(hardware, "_probe", probe)
    return calls


def test_the_probe_runs_once_per_machine_and_a_larger_one_replaces_it(probes, tmp_path: Path) -> None:
    first = hardware.device_peaks(CPU)
    assert probes == [hardware.RUN_PROBE] and first.fp32 == pytest.approx(0.17)
    assert hardware.device_peaks(CPU) == first and len(probes) == 1  # read back from the cache
    stored = json.loads(next((tmp_path / "cache" / "device").glob("peaks-cpu-*.json")).read_text())
    assert stored["probe_size"] == hardware.RUN_PROBE[0] and stored["torch"] == torch.__version__
    assert set(stored) >= {"isa", "amx_tile", "avx512_bf16", "cpu", "threads"}
    bench = hardware.device_peaks(CPU, probe=hardware.BENCH_PROBE)  # the bench's larger probe is measured...
    assert probes[-1] == hardware.BENCH_PROBE and bench.fp32 == pytest.approx(0.34)
    assert hardware.device_peaks(CPU) == bench and len(probes) == 2  # ...and serves the runs after it
    assert hardware.device_peaks(CPU, fresh=True).fp32 == pytest.approx(0.51)  # fresh: measured again


def test_a_corrupt_or_unwritable_cache_costs_a_probe_not_the_run(probes, tmp_path: Path, monkeypatch) -> None:
    hardware.device_peaks(CPU)
    cached = next((tmp_path / "cache" / "device").glob("*.json"))
    cached.write_text("{not json")
    assert hardware.device_peaks(CPU).fp32 == pytest.approx(0.17) and len(probes) == 1  # this process knows it
    hardware._MEASURED.clear()  # a new process
    assert hardware.device_peaks(CPU).fp32 == pytest.approx(0.34) and len(probes) == 2
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("GANTRAIN_CACHE", str(blocker))  # a file where the folder should be
    assert hardware.device_peaks(CPU).fp32 == pytest.approx(0.51) and len(probes) == 3
    assert hardware.device_peaks(CPU).fp32 == pytest.approx(0.51) and len(probes) == 3  # unwritable: one probe


def test_override_and_known_gpus_need_no_probe(probes) -> None:
    assert hardware.device_peaks(CPU, override=1.5) == hardware.Peaks(1.5, 1.5, 1.5, "--peak-tflops")
    assert hardware.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # the longer name wins over "H100"
    assert hardware.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.0
    assert hardware.gpu_peak_tflops("NVIDIA L40S", "fp16") == 362.0  # not L4's
    assert hardware.gpu_peak_tflops("Tesla T4", "bf16") is None and hardware.gpu_peak_tflops("RX 7900", "fp32") is None
    assert probes == []


def test_the_real_probe_measures_a_positive_rate() -> None:
    rate = hardware.measure_matmul_tflops(torch.float32, CPU, size=128, seconds=0.05)
    assert 0 < rate < 100


def test_step_flops_match_a_count_by_hand() -> None:
    assert hardware.step_flops(ModelConfig(nz=16, ngf=8, ndf=8), 32, 1) == dcgan32_step_flops(16, 8, 8, 1)
    assert hardware.step_flops(ModelConfig(nz=100, ngf=64, ndf=64), 32, 3) == dcgan32_step_flops(100, 64, 64, 3)


def test_counting_flops_leaves_the_global_random_state_as_it_was() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    hardware.step_flops(ModelConfig(nz=16, ngf=8, ndf=8), 32, 1)
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture
def rewrite_rounds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Scripted rounds of the rewrite probe: ``script[(name, dtype, shape)]`` is a list of (rewrite_ms, torch_ms)
    handed out in order; every call is logged. The cache in tmp_path; the kernels' record reset before and after."""
    from gantrain.kernels import conv

    monkeypatch.setenv("GANTRAIN_CACHE", str(tmp_path / "cache"))
    script: dict = {}
    calls: list = []

    def measure(name, dtype, shape, *, channels_last=True, transposed=False, **_):
        calls.append((name, dtype, tuple(shape), channels_last, transposed))
        return script[(name, dtype, tuple(shape))].pop(0)

    monkeypatch.setattr(conv, "measure_rewrite", measure)
    conv.reset_rewrites()
    yield script, calls
    conv.reset_rewrites()


S2D, WIDE, MIDDLE = (128, 1, 64, 32), (128, 128, 256, 8), (128, 64, 128, 16)  # (batch, c_in, c_out, size)


def test_each_layer_uses_a_rewrite_where_every_round_found_it_faster(rewrite_rounds, tmp_path: Path) -> None:
    """bf16: space-to-depth slower in both rounds -> off; dilated faster in both -> on; the middle layer is in
    neither rewrite's bounds, so nothing is timed for it. fp32: space-to-depth rounds disagree -> its rule (on in
    every dtype); dilated faster in both -> on, although its rule says bf16 only. The record gives the mean of the
    rounds; the next process reads the verdicts from the cache without measuring; fresh measures those layers
    again and keeps the file's other entries."""
    from gantrain.kernels import conv

    script, calls = rewrite_rounds
    script.update({("space_to_depth", torch.bfloat16, S2D): [(5.0, 4.0), (4.4, 4.0)],
                   ("dilated", torch.bfloat16, WIDE): [(7.0, 9.4), (7.2, 9.0)],
                   ("space_to_depth", torch.float32, S2D): [(1.0, 2.0), (3.0, 2.0)],
                   ("dilated", torch.float32, WIDE): [(20.0, 30.0), (21.0, 30.0)]})
    record = hardware.layer_rewrites(torch.bfloat16, True, [S2D, MIDDLE, WIDE])
    assert record["dtype"] == "bf16" and record["layout"] == "channels-last"
    assert record["layers"][0] == {"rewrite": "space_to_depth", "shape": list(S2D), "kinds": ["conv"],
                                   "rewrite_ms": 4.7, "torch_ms": 4.0, "used": False, "why": "slower than torch's"}
    # the dilated figures per training step: a shape of D's convolutions passes twice (7.1 ms a pass)
    assert [(r["rewrite"], r["used"], r["rewrite_ms"]) for r in record["layers"]] == \
        [("space_to_depth", False, 4.7), ("dilated", True, 14.2)]
    assert record["source"].startswith("measured now, kept in ")
    assert not conv.rewrite_enabled("space_to_depth", torch.bfloat16, 1, 64, 32)
    assert conv.rewrite_enabled("dilated", torch.bfloat16, 128, 256, 8)
    assert conv.rewrite_enabled("space_to_depth", torch.bfloat16, 1, 64, 16)  # another layer: its rule
    record = hardware.layer_rewrites(torch.float32, False, [S2D, WIDE])
    assert record["layout"] == "NCHW"
    assert record["layers"][0]["used"] is True  # the rule, the rounds disagreeing
    assert record["layers"][0]["why"] == "the rounds disagreed: its rule decides"
    assert record["layers"][1]["used"] is True and conv.rewrite_enabled("dilated", torch.float32, 128, 256, 8)
    assert len(calls) == 8 and all(script[k] == [] for k in script)
    assert hardware.describe_rewrites(record) == (
        "fast layers on this CPU (fp32, NCHW), each rewrite against torch's: space-to-depth 1->64 at 32 px 2 vs 2 "
        "ms, used (the rounds disagreed: its rule decides); dilated 128->256 at 8 px 41 vs 60 ms (2 D passes a "
        f"step), used ({record['source']})")

    conv.reset_rewrites()  # a new process: the verdicts come from the cache
    again = hardware.layer_rewrites(torch.bfloat16, True, [S2D, WIDE])
    assert len(calls) == 8 and again["source"] == f"kept in {tmp_path / 'cache' / 'device'}"
    assert not conv.rewrite_enabled("space_to_depth", torch.bfloat16, 1, 64, 32)
    script.update({("dilated", torch.bfloat16, WIDE): [(9.0, 7.0), (9.0, 7.0)]})
    fresh = hardware.layer_rewrites(torch.bfloat16, True, [WIDE], fresh=True)
    assert len(calls) == 10 and [r["used"] for r in fresh["layers"]] == [False]
    kept = json.loads(hardware._cache_file(CPU, "rewrites").read_text())
    assert len(kept) == 4  # the fp32 and space-to-depth entries survived the fresh probe


KEY = f"dilated|bf16|channels-last|{'x'.join(map(str, WIDE))}|conv"


@pytest.mark.parametrize("text", ["{not json", json.dumps([1, 2]), json.dumps({KEY: 1}),
                                  json.dumps({KEY: {"rounds": [[1, 2], [1, 2]]}}),  # the older probe's form
                                  json.dumps({KEY: {"form": 1, "rounds": [[1, 2], [1, 2]]}}),
                                  *[json.dumps({KEY: {"form": hardware.REWRITE_PROBE_FORM, "rounds": rounds}})
                                    for rounds in ([[1, 2]], [[1, 2, 3], [1, 2]], [["5", "4"], [5, 4]],
                                                   [[True, 2], [1, 2]], [[1e999, 2], [1, 2]], [[-1, 2], [1, 2]],
                                                   [1, 2], "rounds")]])
def test_a_broken_rewrite_cache_costs_a_probe_not_the_run(rewrite_rounds, tmp_path: Path, text) -> None:
    """A file that is not JSON or not a table, or an entry of another form (not a table, an older probe's timing,
    one round, a triple, strings, a bool, infinity, a negative time, not a list of pairs), is measured again and
    mended."""
    script, calls = rewrite_rounds
    path = hardware._cache_file(CPU, "rewrites")
    path.parent.mkdir(parents=True)
    key = KEY
    path.write_text(text)
    script[("dilated", torch.bfloat16, WIDE)] = [(1.0, 2.0)] * 2
    assert hardware.layer_rewrites(torch.bfloat16, True, [WIDE])["layers"][0]["used"]
    assert len(calls) == 1 * hardware.REWRITE_ROUNDS
    # per training step: D's convolution passes twice
    assert json.loads(path.read_text())[key] == {"form": hardware.REWRITE_PROBE_FORM, "rounds": [[2.0, 4.0]] * 2}


def test_an_unwritable_rewrite_cache_costs_the_next_process_a_probe(rewrite_rounds, monkeypatch) -> None:
    script, calls = rewrite_rounds

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(hardware, "atomic_write_text", refuse)
    script[("dilated", torch.float32, WIDE)] = [(1.0, 2.0)] * 4
    assert hardware.layer_rewrites(torch.float32, True, [WIDE])["layers"][0]["used"]
    assert hardware.layer_rewrites(torch.float32, True, [WIDE])["source"].startswith("measured now")
    assert len(calls) == 4


def test_layer_shapes_are_each_strided_layer_as_a_convolution() -> None:
    """fashion32 (ngf 64, ndf 64, 32 px, 1 channel) at batch 128, worked out by hand: G's transposed layers
    256->128 (4->8 px), 128->64 (8->16), 64->1 (16->32) are the convolutions 128->256 at 8, 64->128 at 16, 1->64
    at 32; D's 1->64 at 32, 64->128 at 16, 128->256 at 8 are the same three."""
    from gantrain.engine.config import preset

    cfg = preset("fashion32")
    assert (cfg.model.ngf, cfg.model.ndf, cfg.data.image_size) == (64, 64, 32)
    assert hardware.layer_shapes(cfg.model, 32, 1, 128) == [(128, 128, 256, 8), (128, 64, 128, 16), (128, 1, 64, 32)]
    half = preset("fashion32-tuned")  # ndf 32: D's layers differ from G's
    assert hardware.layer_shapes(half.model, 32, 1, 64) == [(64, 128, 256, 8), (64, 64, 128, 16), (64, 1, 64, 32),
                                                            (64, 1, 32, 32), (64, 32, 64, 16), (64, 64, 128, 8)]
    # what uses each shape: at fashion32 every shape is one of G's and one of D's; at fashion32-tuned G's three
    # and D's three differ (the dilated rewrite's only layer there, 128->256 at 8 px, is G's)
    both = ("conv", "transposed")
    assert hardware.strided_layers(cfg.model, 32, 1, 128) == {(128, 128, 256, 8): both, (128, 64, 128, 16): both,
                                                               (128, 1, 64, 32): both}
    assert hardware.strided_layers(half.model, 32, 1, 64) == {
        (64, 128, 256, 8): ("transposed",), (64, 64, 128, 16): ("transposed",), (64, 1, 64, 32): ("transposed",),
        (64, 1, 32, 32): ("conv",), (64, 32, 64, 16): ("conv",), (64, 64, 128, 8): ("conv",)}


def test_the_dilated_probe_adds_the_forms_of_every_kind_of_layer_sharing_a_shape(rewrite_rounds) -> None:
    """A shape used by D's layer and G's: each round times the rewrite as each computes it (a convolution's pair,
    then a transposed layer's) and adds them per training step, D's twice (the real and the fake batch): 2 x 3
    + 4 = 10 against 2 x 4 + 2.5 = 10.5 ms -> used, though one pass of each added (7 against 6.5) would not have
    been. A shape of G's alone is timed as G computes it, once, under its own cache key."""
    from gantrain.kernels import conv

    script, calls = rewrite_rounds
    script[("dilated", torch.bfloat16, WIDE)] = [(3.0, 4.0), (4.0, 2.5)] * 2
    record = hardware.layer_rewrites(torch.bfloat16, True, {WIDE: ("conv", "transposed")})
    assert [(r["rewrite"], r["kinds"], r["rewrite_ms"], r["torch_ms"], r["used"]) for r in record["layers"]] == \
        [("dilated", ["conv", "transposed"], 10.0, 10.5, True)]
    assert [c[-1] for c in calls] == [False, True, False, True]  # transposed, per call
    assert conv.rewrite_enabled("dilated", torch.bfloat16, *WIDE[1:])
    assert "dilated 128->256 at 8 px 10 vs 10.5 ms (2 D + 1 G passes a step), used" in \
        hardware.describe_rewrites(record)
    script[("dilated", torch.bfloat16, WIDE)] = [(2.0, 4.0)] * 2
    alone = hardware.layer_rewrites(torch.bfloat16, True, {WIDE: ("transposed",)})["layers"][0]
    assert (alone["rewrite_ms"], alone["torch_ms"], alone["used"]) == (2.0, 4.0, True)
    assert [c[-1] for c in calls[4:]] == [True, True]
    keys = json.loads(hardware._cache_file(CPU, "rewrites").read_text())
    stem = f"dilated|bf16|channels-last|{'x'.join(map(str, WIDE))}"
    assert sorted(keys) == [f"{stem}|conv+transposed", f"{stem}|transposed"]
