"""What the device can do, measured: peak TFLOP/s per compute dtype, whether bf16 computes faster than fp32
(``--amp auto``), the process's peak memory, and the model FLOPs of one training step (MFU's numerator).

The CPU's peaks come from a square-matmul probe, cached per machine (CPU, ISA flags, torch version, threads) in
``<metrics cache>/device/``: a run measures a short probe once (about a second) unless ``gantrain bench`` measured
the longer one first, which then serves both, so a run's MFU and the bench's agree. The bf16 rule is measured,
never keyed on a CPU name: bf16 when its matmul runs at least :data:`BF16_MARGIN` times the fp32 one
(docs/results/bf16-probe.md: 2.2x on an AMD CPU with AVX512-BF16, 6.6x with AMX, 0.5x on an Intel CPU with
AVX512-BF16 alone). A CUDA GPU's peaks come from its data sheet (:data:`KNOWN_GPUS`), else from the probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gantrain.engine.config import ModelConfig
from gantrain.engine.errors import GantrainError
from gantrain.engine.state.files import atomic_write_text, cache_dir

log = logging.getLogger("gantrain")

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
#: bf16 is chosen by ``--amp auto`` on a CPU whose bf16 matmul runs at least this many times the fp32 one.
BF16_MARGIN = 1.2
#: The run's probe (the bench measures 4096^2 for 2 s per dtype and stores it in the same cache).
RUN_PROBE = (1024, 0.3)
BENCH_PROBE = (4096, 2.0)


@dataclass(frozen=True)
class Peaks:
    """Peak TFLOP/s per compute dtype ("fp32", "bf16", "fp16") and where they come from."""

    fp32: float
    bf16: float
    fp16: float
    source: str

    def of(self, compute: str) -> float:
        """The peak of a compute dtype name (:func:`~gantrain.engine.gan.precision.compute_name`)."""
        return float(getattr(self, compute))

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for records and the cache key only: never for a decision."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    """What torch reports this CPU can run: its kernels' ISA level and the bf16 matrix extensions."""
    return {"isa": torch.backends.cpu.get_cpu_capability(), "amx_tile": bool(torch.cpu._is_amx_tile_supported()),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported())}


def gpu_peak_tflops(name: str, dtype: str) -> float | None:
    """The data-sheet peak of a GPU whose name contains a :data:`KNOWN_GPUS` key (the longest match first)."""
    for fragment in sorted(KNOWN_GPUS, key=len, reverse=True):
        if fragment in name:
            return KNOWN_GPUS[fragment].get(dtype) or None
    return None


def measure_matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 4096, seconds: float = 2.0) -> float:
    """A square-matmul probe: the best TFLOP/s over repeated ``size``^2 products within ``seconds``, after one
    warm-up product."""
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


def _cache_file(device: torch.device, what_of: str = "peaks") -> Path:
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_name()}|{sorted(cpu_features().items())}|threads={torch.get_num_threads()}")
    key = hashlib.sha256(f"{what}|torch={torch.__version__}".encode()).hexdigest()[:16]
    return cache_dir() / "device" / f"{what_of}-{device.type}-{key}.json"


def _probe(device: torch.device, size: int, seconds: float) -> Peaks:
    fp32 = measure_matmul_tflops(torch.float32, device, size, seconds)
    bf16 = measure_matmul_tflops(torch.bfloat16, device, size, seconds)
    fp16 = bf16 if device.type == "cpu" else measure_matmul_tflops(torch.float16, device, size, seconds)
    return Peaks(fp32, bf16, fp16, f"measured {size}x{size} matmul")


def device_peaks(device: torch.device, override: float | None = None, *, probe: tuple[int, float] = RUN_PROBE,
                 fresh: bool = False) -> Peaks:
    """Peak TFLOP/s per compute dtype: ``override`` (--peak-tflops) for every dtype; a known GPU's data sheet
    (fp32 as TF32, which the engine's CUDA settings use); else the matmul probe of ``probe`` = (size, seconds per
    dtype), read from the cache when a probe at least that large is stored there (``fresh``: measure anyway and
    store the result). A cache that cannot be written only costs the next process another probe."""
    if override:
        return Peaks(override, override, override, "--peak-tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {k: gpu_peak_tflops(name, k) for k in ("tf32", "bf16", "fp16")}
        if all(table.values()):
            return Peaks(table["tf32"], table["bf16"], table["fp16"], f"data sheet: {name}")
    path = _cache_file(device)
    if not fresh:
        known = _MEASURED.get(path)  # this process measured or read it already: one answer per process
        if known is not None and known[0] >= probe[0]:
            return known[1]
        stored = _read(path)
        if stored is not None and stored.get("probe_size", 0) >= probe[0]:
            peaks = Peaks(**{k: stored[k] for k in ("fp32", "bf16", "fp16", "source")})
            _MEASURED[path] = (int(stored["probe_size"]), peaks)
            return peaks
    peaks = _probe(device, *probe)
    _MEASURED[path] = (probe[0], peaks)
    log.info("measured this %s's peak: fp32 %.3g, bf16 %.3g TFLOP/s (%s; kept in %s for the runs after this one)",
             device.type.upper() if device.type == "cpu" else "GPU", peaks.fp32, peaks.bf16, peaks.source, path.parent)
    try:
        atomic_write_text(path, json.dumps({**peaks.to_dict(), "probe_size": probe[0], "cpu": cpu_name(),
                                            **cpu_features(), "torch": torch.__version__,
                                            "threads": torch.get_num_threads()}, indent=1))
    except (GantrainError, OSError):  # an unwritable cache folder (RunIOError) must not stop a run
        pass
    return peaks


_MEASURED: dict[Path, tuple[int, Peaks]] = {}  # cache file -> (probe size, peaks) known to this process


def _read(path: Path) -> dict | None:
    stored = _read_json(path)
    return stored if stored and all(isinstance(stored.get(k), (int, float)) for k in ("fp32", "bf16", "fp16")) else None


def bf16_faster(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 computes faster than fp32 on ``device``, and why: a CUDA GPU with native bf16 (Ampere or newer);
    a CPU whose measured bf16 matmul runs at least :data:`BF16_MARGIN` x its fp32 one."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"{torch.cuda.get_device_name(device)} {'has' if native else 'lacks'} native bf16"
    peaks = device_peaks(device)
    ratio = peaks.bf16 / peaks.fp32 if peaks.fp32 > 0 else 0.0
    return ratio >= BF16_MARGIN, (f"bf16 matmul {peaks.bf16:.3g} vs fp32 {peaks.fp32:.3g} TFLOP/s = {ratio:.2f}x "
                                  f"({peaks.source}; bf16 from {BF16_MARGIN}x)")


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
#: Rounds of :func:`~gantrain.kernels.conv.measure_rewrite` per layer; a verdict must agree in all of them.
REWRITE_ROUNDS = 2
#: What the cached rounds timed; entries of an older probe are measured again. 4: the dilated weight gradient
#: beside the other gradient its layers need, for each kind of layer that shares the shape (conv, transposed),
#: against torch's one backward call each, per training step (:data:`PASSES_PER_STEP`); 3: the kinds unweighted;
#: 2: as a convolution only; 1, unmarked: the weight gradient alone.
REWRITE_PROBE_FORM = 4


def layer_shapes(model: ModelConfig, image_size: int, channels: int, batch: int) -> list[tuple[int, int, int, int]]:
    """The strided layers of G and D as convolutions (:func:`~gantrain.kernels.conv.conv_view`): (batch, input
    channels, output channels, input size) each, in model order, duplicates dropped (:func:`strided_layers`)."""
    return list(strided_layers(model, image_size, channels, batch))


def strided_layers(model: ModelConfig, image_size: int, channels: int, batch: int) -> dict[tuple, tuple[str, ...]]:
    """Each strided layer shape of G and D in the convolution's view (as :func:`layer_shapes`, in model order) and
    what uses it: ``"conv"`` (D's layers), ``"transposed"`` (G's) or both. Found on the meta device (shapes only,
    milliseconds); leaves torch's global random state as it was."""
    from gantrain.engine.gan.layers import StridedConv2d, StridedConvTranspose2d
    from gantrain.engine.gan.models import build_models
    from gantrain.kernels.conv import conv_view

    kinds: dict[tuple, tuple[str, ...]] = {}

    def seen(module, inputs, output):
        transposed = isinstance(module, StridedConvTranspose2d)
        shape = (batch, *conv_view(inputs[0].shape, module.weight.shape, transposed))
        kind = "transposed" if transposed else "conv"
        kinds[shape] = tuple(sorted({*kinds.get(shape, ()), kind}))

    with torch.random.fork_rng(devices=[]), torch.device("meta"), torch.no_grad():
        g, d = build_models(model, image_size, channels, impl="fast")
        for module in (*g.modules(), *d.modules()):
            if isinstance(module, (StridedConv2d, StridedConvTranspose2d)):
                module.register_forward_hook(seen)
        d(g(torch.empty(batch, model.nz)))
    return kinds


def _valid_rounds(entry) -> bool:
    """A cache entry as :func:`layer_rewrites` writes it: REWRITE_ROUNDS pairs of positive finite milliseconds, of
    this probe's form (:data:`REWRITE_PROBE_FORM`)."""
    rounds = entry.get("rounds") if isinstance(entry, dict) else None
    return (isinstance(rounds, list) and entry.get("form") == REWRITE_PROBE_FORM and len(rounds) == REWRITE_ROUNDS
            and all(isinstance(r, list) and len(r) == 2 and all(type(v) in (int, float) and 0 < v < float("inf")
                                                                  for v in r) for r in rounds))


def layer_rewrites(dtype: torch.dtype, channels_last: bool, shapes, *, fresh: bool = False) -> dict:
    """Which CPU gradient rewrites of the fast layers (:mod:`gantrain.kernels.conv`) each layer of ``shapes``
    (:func:`strided_layers`, or a list of shapes, taken as convolutions) uses in ``dtype``: every rewrite within
    its channel bound is timed against torch's form at the layer's shape in :data:`REWRITE_ROUNDS` rounds (the
    dilated weight gradient as each kind of layer of that shape computes it, the kinds' times added per step),
    once per machine (cached beside the peaks; ``fresh``: measure these anew, keeping the file's other entries),
    and recorded for this process
    (:func:`~gantrain.kernels.conv.set_rewrites`): used where it was faster in every round, not used where slower
    in every round, left to its rule where the rounds disagree (a machine too busy to tell).

    Returns ``{"dtype", "layout", "source", "layers": [{"rewrite", "shape", "kinds", "rewrite_ms", "torch_ms",
    "used", "why"}, ...]}`` (milliseconds: the mean over rounds of each round's median, per training step: summed
    over the ``kinds`` timed, D's convolutions twice), for the run log and the bench's JSON."""
    from gantrain.kernels import conv

    name_of, layout = _labels(dtype, channels_last)
    path = _cache_file(torch.device("cpu"), "rewrites")
    stored = _read_json(path) or {}
    layers, measured = [], False
    kinds_of = shapes if isinstance(shapes, dict) else dict.fromkeys(shapes, ("conv",))
    for shape, kinds in kinds_of.items():
        for rewrite in (r for r in conv.REWRITES if conv.in_bounds(r, shape[1])):
            uses = tuple(kinds) if rewrite == "dilated" else ("conv",)  # space-to-depth: one form for both kinds
            key = f"{rewrite}|{name_of}|{layout}|{'x'.join(map(str, shape))}|{'+'.join(uses)}"
            if fresh or not _valid_rounds(stored.get(key)):
                stored[key] = {"form": REWRITE_PROBE_FORM,
                               "rounds": [_timed_round(rewrite, dtype, shape, channels_last, uses)
                                          for _ in range(REWRITE_ROUNDS)]}
                measured = True
            rounds = stored[key]["rounds"]
            verdicts = {rewrite_ms < torch_ms for rewrite_ms, torch_ms in rounds}
            faster = verdicts.pop() if len(verdicts) == 1 else None
            conv.set_rewrites({(rewrite, dtype, *shape[1:]): faster})
            layers.append({"rewrite": rewrite, "shape": list(shape), "kinds": list(uses),
                           "rewrite_ms": round(sum(r for r, _ in rounds) / len(rounds), 3),
                           "torch_ms": round(sum(t for _, t in rounds) / len(rounds), 3),
                           "used": conv.rewrite_enabled(rewrite, dtype, *shape[1:]),
                           "why": ("the rounds disagreed: its rule decides" if faster is None else
                                   "faster than torch's" if faster else "slower than torch's")})
    if measured:
        try:
            atomic_write_text(path, json.dumps(stored, indent=1))
        except (GantrainError, OSError):  # an unwritable cache only costs the next process another probe
            pass
    source = f"{'measured now, ' if measured else ''}kept in {path.parent}"
    return {"dtype": name_of, "layout": layout, "source": source, "layers": layers}


#: Backward passes per training step of one strided layer, by kind: D's convolutions run on the real and on the
#: fake batch in D's step (its weights frozen in G's step, so no weight gradient there); G's transposed layers once.
PASSES_PER_STEP = {"conv": 2, "transposed": 1}


def _passes(rewrite: str, kind: str) -> int:
    """How many times a probe figure counts a ``kind`` of layer: :data:`PASSES_PER_STEP` for the dilated weight
    gradient; 1 for space-to-depth (one input gradient, one form)."""
    return PASSES_PER_STEP[kind] if rewrite == "dilated" else 1


def _timed_round(rewrite: str, dtype: torch.dtype, shape, channels_last: bool, uses: tuple[str, ...]) -> list[float]:
    """One round of the probe for a layer shape: (rewrite ms, torch ms); for the dilated weight gradient per
    training step, each kind of layer in ``uses`` timed as it computes, weighted by its passes per step
    (:data:`PASSES_PER_STEP`)."""
    from gantrain.kernels import conv

    pairs = [(_passes(rewrite, use),
              conv.measure_rewrite(rewrite, dtype, shape, channels_last=channels_last, transposed=use == "transposed"))
             for use in uses]
    return [sum(n * p[0] for n, p in pairs), sum(n * p[1] for n, p in pairs)]


def rules_only(dtype: torch.dtype, channels_last: bool, why: str) -> dict:
    """The record of a process that keeps the rules (its probe failed: ``why``), in :func:`layer_rewrites`'s form."""
    from gantrain.kernels import conv

    conv.reset_rewrites()
    name_of, layout = _labels(dtype, channels_last)
    return {"dtype": name_of, "layout": layout, "source": f"the rules, not measured: {why}", "layers": []}


def _labels(dtype: torch.dtype, channels_last: bool) -> tuple[str, str]:
    """A record's (and the cache key's) names of a compute dtype and layout: ("bf16", "channels-last")."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")), "channels-last" if channels_last else "NCHW"


def describe_rewrites(record: dict) -> str:
    """One line for the run log: ``fast layers on this CPU (bf16, channels-last), each rewrite against torch's:
    space-to-depth 1->64 at 32 px 1.34 vs 3.45 ms, used; dilated 128->256 at 8 px 6.11 vs 9.3 ms, used (<source>)``."""
    parts = [f"{r['rewrite'].replace('_', '-')} {r['shape'][1]}->{r['shape'][2]} at {r['shape'][3]} px "
             f"{r['rewrite_ms']:.3g} vs {r['torch_ms']:.3g} ms{_per_step(r)}, {'used' if r['used'] else 'not used'}"
             + ("" if r["why"].startswith(("faster", "slower")) else f" ({r['why']})") for r in record["layers"]]
    return (f"fast layers on this CPU ({record['dtype']}, {record['layout']}), each rewrite against torch's: "
            f"{'; '.join(parts) or 'no layer timed'} ({record['source']})")


def _per_step(layer: dict) -> str:
    """What a probe figure adds up, where it is more than one pass of one layer: ' (2 D + 1 G passes a step)'."""
    passes = [(_passes(layer["rewrite"], k), "D" if k == "conv" else "G") for k in layer.get("kinds", ["conv"])]
    if layer["rewrite"] != "dilated" or sum(n for n, _ in passes) == 1:
        return ""
    return f" ({' + '.join(f'{n} {who}' for n, who in passes)} passes a step)"


def _read_json(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
        return stored if isinstance(stored, dict) else None
    except (OSError, ValueError):
        return None


def peak_mem_gib(device: torch.device) -> float:
    """Peak memory of this process so far, GiB: the CUDA allocator's peak on a GPU, the maximum resident set size
    on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def step_flops(model: ModelConfig, image_size: int, channels: int, batch: int = 8) -> float:
    """Model FLOPs per image of one training iteration in the tutorial form (D on real and on detached fakes, both
    backward; G's step through D), counted by ``torch.utils.flop_counter`` on plain fp32 modules: every
    configuration's MFU divides by the same work, including what a faster step skips (D's weight gradients in the
    G step). Convolutions and matmuls only (their count dominates; BatchNorm and activations are not counted).
    Counted on the meta device (shapes only, no arithmetic: milliseconds even for cats128, whose CPU step would
    add seconds to every run's start); leaves torch's global random state as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    from gantrain.engine.gan.models import build_models
    from gantrain.engine.gan.sampling import sample_noise

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the run's random streams stay as they were
        g, d = build_models(model, image_size, channels, impl="aten")
        real = torch.empty(batch, channels, image_size, image_size)
        noise = sample_noise(batch, model.nz, "normal", "meta")
    with FlopCounterMode(display=False) as counter:
        d(real).sum().backward()
        fake = g(noise)
        d(fake.detach()).sum().backward()
        d(fake).sum().backward()
    return counter.get_total_flops() / batch
