"""What the benchmark runs on: hardware and versions, the device's peak FLOP/s, and FLOPs per image."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s per GPU from vendor data sheets: {name fragment: {dtype: TFLOP/s}}.
# fp32 means plain FP32 CUDA cores; TF32 tensor cores are what fp32 matmuls use when TF32 is on.
KNOWN_GPUS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "tf32": 82.6, "fp32": 82.6},
    "V100": {"bf16": 0.0, "fp16": 125.0, "tf32": 0.0, "fp32": 15.7},
    "T4": {"bf16": 0.0, "fp16": 65.0, "tf32": 0.0, "fp32": 8.1},
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info() -> dict:
    """Hardware, versions, date and git commit for the benchmark JSON."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "dali": _dali_version(),
        "git_commit": git_commit(),
    }
    return info


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali  # noqa: PLC0415 - optional extra

        return dali.__version__
    except Exception:  # not installed, or a broken CUDA setup
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_peak_tflops(name: str, dtype: str) -> float | None:
    for fragment, peaks in KNOWN_GPUS.items():
        if fragment in name:
            return peaks.get(dtype) or None
    return None


def measure_matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 4096, seconds: float = 2.0) -> float:
    """A square-matmul probe: the best TFLOP/s over repeated products within ``seconds`` after one warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e12)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None = None, probe_size: int = 4096) -> dict[str, float]:
    """Peak TFLOP/s per compute dtype: the --peak-tflops figure, the known-GPU table, or a measured probe."""
    if override:
        return {"fp32": override, "bf16": override, "fp16": override, "source": "--peak-tflops"}  # type: ignore[dict-item]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {k: gpu_peak_tflops(name, k) for k in ("fp32", "tf32", "bf16", "fp16")}
        if all(table.values()):
            # fp32 convs/matmuls run on TF32 tensor cores with the engine's CUDA settings
            return {"fp32": table["tf32"], "bf16": table["bf16"], "fp16": table["fp16"], "source": f"table:{name}"}  # type: ignore[dict-item]
    peaks = {"fp32": measure_matmul_tflops(torch.float32, device, probe_size),
             "bf16": measure_matmul_tflops(torch.bfloat16, device, probe_size)}
    peaks["fp16"] = peaks["bf16"] if device.type == "cpu" else measure_matmul_tflops(torch.float16, device, probe_size)
    return {**peaks, "source": f"measured {probe_size}x{probe_size} matmul"}  # type: ignore[dict-item]


def peak_mem_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
