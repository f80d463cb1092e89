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
    """Scripted rounds of the rewrite probe: ``script[(name, dtype)]`` is a list of (rewrite_ms, torch_ms) handed
    out in order; every call is logged. The cache in tmp_path; the kernels' record reset before and after."""
    from gantrain.kernels import conv

    monkeypatch.setenv("GANTRAIN_CACHE", str(tmp_path / "cache"))
    script: dict = {}
    calls: list = []

    def measure(name, dtype, *, channels_last=True, **_):
        calls.append((name, dtype, channels_last))
        return script[(name, dtype)].pop(0)

    monkeypatch.setattr(conv, "measure_rewrite", measure)
    conv.reset_rewrites()
    yield script, calls
    conv.reset_rewrites()


def test_each_rewrite_is_used_where_every_round_found_it_faster(rewrite_rounds, tmp_path: Path) -> None:
    """bf16: space-to-depth slower in both rounds -> off; dilated faster in both -> on. fp32: space-to-depth rounds
    disagree -> its rule (on in every dtype); dilated faster in both -> on, although its rule says bf16 only. The
    record gives each round's mean; the next process reads the verdicts from the cache without measuring, and a
    fresh probe measures again."""
    from gantrain.kernels import conv

    script, calls = rewrite_rounds
    script.update({("space_to_depth", torch.bfloat16): [(5.0, 4.0), (4.4, 4.0)],
                   ("dilated", torch.bfloat16): [(7.0, 9.4), (7.2, 9.0)],
                   ("space_to_depth", torch.float32): [(1.0, 2.0), (3.0, 2.0)],
                   ("dilated", torch.float32): [(20.0, 30.0), (21.0, 30.0)]})
    record = hardware.layer_rewrites(torch.bfloat16, True)
    assert record["dtype"] == "bf16" and record["layout"] == "channels-last"
    assert record["rewrites"]["space_to_depth"] == {"rewrite_ms": 4.7, "torch_ms": 4.0, "used": False,
                                                    "why": "slower than torch's"}
    assert record["rewrites"]["dilated"]["used"] and record["rewrites"]["dilated"]["rewrite_ms"] == 7.1
    assert record["source"].startswith("measured now, kept in ")
    assert (conv.rewrite_enabled("space_to_depth", torch.bfloat16), conv.rewrite_enabled("dilated", torch.bfloat16)) \
        == (False, True)
    record = hardware.layer_rewrites(torch.float32, False)
    assert record["layout"] == "NCHW"
    assert record["rewrites"]["space_to_depth"]["used"] is True  # the rule, the rounds disagreeing
    assert record["rewrites"]["space_to_depth"]["why"] == "the rounds disagreed: its rule decides"
    assert record["rewrites"]["dilated"]["used"] is True and conv.rewrite_enabled("dilated", torch.float32)
    assert len(calls) == 8 and all(script[k] == [] for k in script)
    assert hardware.describe_rewrites(record) == (
        "fast layers on this CPU (fp32, NCHW): space-to-depth 2 vs torch 2 ms, used (the rounds disagreed: its rule "
        f"decides); dilated 20 vs torch 30 ms, used ({record['source']})")

    conv.reset_rewrites()  # a new process: the verdicts come from the cache
    again = hardware.layer_rewrites(torch.bfloat16, True)
    assert len(calls) == 8 and again["rewrites"] == hardware.layer_rewrites(torch.bfloat16, True)["rewrites"]
    assert again["source"] == f"kept in {tmp_path / 'cache' / 'device'}"
    assert not conv.rewrite_enabled("space_to_depth", torch.bfloat16)
    script.update({("space_to_depth", torch.bfloat16): [(1.0, 4.0), (1.0, 4.0)],
                   ("dilated", torch.bfloat16): [(9.0, 7.0), (9.0, 7.0)]})
    fresh = hardware.layer_rewrites(torch.bfloat16, True, fresh=True)
    assert len(calls) == 12 and [r["used"] for r in fresh["rewrites"].values()] == [True, False]


def test_an_unreadable_or_unwritable_rewrite_cache_costs_a_probe_not_the_run(rewrite_rounds, tmp_path: Path,
                                                                            monkeypatch) -> None:
    script, calls = rewrite_rounds
    folder = tmp_path / "cache" / "device"
    folder.mkdir(parents=True)
    path = hardware._cache_file(CPU, "rewrites")
    path.write_text("{not json")
    script.update({(name, torch.bfloat16): [(1.0, 2.0)] * 2 for name in ("space_to_depth", "dilated")})
    assert all(r["used"] for r in hardware.layer_rewrites(torch.bfloat16, True)["rewrites"].values())
    assert len(calls) == 4 and json.loads(path.read_text())  # measured, and the file mended

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(hardware, "atomic_write_text", refuse)
    script.update({(name, torch.float32): [(1.0, 2.0)] * 2 for name in ("space_to_depth", "dilated")})
    assert hardware.layer_rewrites(torch.float32, True)["rewrites"]["dilated"]["used"]
