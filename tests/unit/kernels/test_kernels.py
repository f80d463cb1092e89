"""The kernels of gantrain/kernels/conv.py (through the layer shells of engine/gan/layers.py) against their references:
outputs and both gradients agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gantrain.engine.config import ModelConfig, preset
from gantrain.engine.gan.layers import ProjectFromVector, ReduceToVector, StridedConv2d, StridedConvTranspose2d
from gantrain.engine.gan.models import build_models
from gantrain.kernels import conv
from gantrain.kernels.conv import conv_input_grad, conv_weight_grad, dilated_weight_grad

CL = torch.channels_last


@pytest.fixture(autouse=True)
def rules_only():
    """Every test here starts from the rules alone (a run in this process may have recorded its CPU's probe)."""
    conv.reset_rewrites()
    yield
    conv.reset_rewrites()

# (layer class, in, out, input height): each row exercises one rewrite or the plain path
CASES = [
    (StridedConv2d, 1, 16, 16),          # input gradient by space-to-depth (D's first layer, grayscale)
    (StridedConv2d, 3, 8, 16),           # ... and RGB
    (StridedConv2d, 128, 8, 8),          # weight gradient as a dilated forward convolution (bf16 only)
    (StridedConv2d, 16, 32, 8),          # neither: torch's convolution
    (StridedConvTranspose2d, 16, 1, 8),  # forward by space-to-depth (G's last layer)
    (StridedConvTranspose2d, 8, 128, 4),  # weight gradient as a dilated forward convolution (bf16 only)
    (ProjectFromVector, 20, 32, 1),
    (ReduceToVector, 32, 1, 4),
]


def _layer(cls, cin: int, cout: int, impl: str) -> nn.Module:
    if cls in (ProjectFromVector, ReduceToVector):
        return cls(cin, cout, 4, impl)
    return cls(cin, cout, impl)


def _pair(cls, cin, cout, dtype=torch.float32, memory_format=torch.contiguous_format):
    """The fast layer and its aten reference with the same weights."""
    fast, ref = _layer(cls, cin, cout, "fast"), _layer(cls, cin, cout, "aten")
    nn.init.normal_(fast.weight, 0.0, 0.2)
    ref.load_state_dict(fast.state_dict())
    return [m.to(dtype=dtype, memory_format=memory_format) for m in (fast, ref)]


def _grads(layer: nn.Module, x: torch.Tensor, grad_out_seed: int = 1, amp: bool = False):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    y.backward(grad_out.to(y.dtype))
    return y, x.grad, layer.weight.grad


def _input(cin: int, height: int, dtype=torch.float32, memory_format=torch.contiguous_format) -> torch.Tensor:
    x = torch.randn(3, cin, height, height, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x.to(dtype=dtype).contiguous(memory_format=memory_format)


@pytest.mark.parametrize("cls,cin,cout,height", CASES)
def test_fast_layer_matches_reference_in_float64(cls, cin, cout, height):
    """In float64 the rewrites agree with torch's convolutions to rounding: they are exact."""
    fast, ref = _pair(cls, cin, cout, torch.float64)
    x = _input(cin, height, torch.float64)
    for got, want in zip(_grads(fast, x), _grads(ref, x)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("cls,cin,cout,height", CASES)
def test_fast_layer_matches_reference_in_fp32_and_bf16(cls, cin, cout, height, memory_format):
    """fp32 through oneDNN agrees closely; bf16 autocast agrees within bf16 rounding, in the model's layout."""
    fast, ref = _pair(cls, cin, cout, memory_format=memory_format)
    x = _input(cin, height, memory_format=memory_format)
    for got, want in zip(_grads(fast, x), _grads(ref, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    y_fast, *grads_fast = _grads(fast, x, amp=True)
    y_ref, *grads_ref = _grads(ref, x, amp=True)
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    for got, want in zip((y_fast, *grads_fast), (y_ref, *grads_ref)):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm()
    if memory_format == CL and cls is not ReduceToVector and y_ref.shape[1] > 1:
        assert y_fast.is_contiguous(memory_format=CL), "the output keeps the model's memory format"


def test_rewrites_run_only_where_they_apply():
    """The custom autograd functions are in the graph exactly for the rewritten layers, and never for impl=aten."""
    def fn_name(layer, cin, height):
        return type(layer(_input(cin, height).requires_grad_(True)).grad_fn).__name__

    def fn_name_bf16(layer, cin, height):
        with torch.autocast("cpu", torch.bfloat16):
            return fn_name(layer, cin, height)

    assert "StridedConv" in fn_name(StridedConv2d(1, 8, "fast"), 1, 8)
    assert "StridedConv" in fn_name_bf16(StridedConv2d(128, 8, "fast"), 128, 8)
    assert "StridedConv" not in fn_name(StridedConv2d(128, 8, "fast"), 128, 8)   # fp32: oneDNN's is faster
    assert "StridedConvTranspose" in fn_name_bf16(StridedConvTranspose2d(8, 128, "fast"), 8, 4)
    assert "StridedConvTranspose" not in fn_name(StridedConvTranspose2d(8, 128, "fast"), 8, 4)
    assert "StridedConv" not in fn_name(StridedConv2d(16, 8, "fast"), 16, 8)   # between the thresholds
    assert "StridedConv" not in fn_name(StridedConv2d(1, 8, "aten"), 1, 8)
    assert "StridedConvTranspose" in fn_name(StridedConvTranspose2d(8, 1, "fast"), 8, 4)
    # nothing to rewrite in what the call computes: D's first layer on real images (no input gradient)
    assert type(StridedConv2d(1, 8, "fast")(_input(1, 8)).grad_fn).__name__.startswith("Convolution")
    assert "Convolution" in fn_name(ProjectFromVector(8, 4, 4, "aten"), 8, 1)
    assert "Convolution" not in fn_name(ProjectFromVector(8, 4, 4, "fast"), 8, 1)


@pytest.mark.parametrize("cls,cin,cout,height", [c for c in CASES if 128 in c[1:3]])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_dilated_weight_grad_through_the_layer_is_exact_in_float64(monkeypatch, cls, cin, cout, height, memory_format):
    """The dilated branch runs only in bf16 in use; forced on here, it must match torch in float64 through the
    autograd Function (layout included), so bf16's 2 % tolerance is not its only check."""
    transposed = cls is StridedConvTranspose2d
    c_in, c_out, size = (cout, cin, 2 * height) if transposed else (cin, cout, height)  # the convolution's view
    conv.set_rewrites({("dilated", torch.float64, c_in, c_out, size): True})
    fast, ref = _pair(cls, cin, cout, torch.float64, memory_format)
    x = _input(cin, height, torch.float64, memory_format)
    calls = []
    real = conv.dilated_weight_grad
    monkeypatch.setattr(conv, "dilated_weight_grad", lambda *a: calls.append(1) or real(*a))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = _grads(fast, x), _grads(ref, x)
    assert calls == [1], "the weight gradient went through the rewrite"
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert gw.is_contiguous(memory_format=memory_format)


def test_only_the_needed_gradients_are_computed():
    """D's step needs no input gradient (real images) and G's step no D weight gradient (frozen D)."""
    fast, ref = _pair(StridedConv2d, 1, 8)
    x = _input(1, 8)
    fast(x).sum().backward()
    assert fast.weight.grad is not None
    fast.weight.grad = None
    fast.requires_grad_(False)
    x = x.requires_grad_(True)
    fast(x).sum().backward()
    assert fast.weight.grad is None and x.grad is not None
    ref.requires_grad_(False)
    x2 = x.detach().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_gradient_helpers_match_autograd_of_conv2d():
    x = _input(4, 8, torch.float64).requires_grad_(True)
    w = torch.randn(6, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
    grad_out = torch.randn_like(y)
    want_x, want_w = torch.autograd.grad(y, (x, w), grad_out)
    torch.testing.assert_close(conv_input_grad(grad_out, w), want_x)
    torch.testing.assert_close(conv_weight_grad(x.detach(), grad_out, w), want_w)
    big = _input(128, 4, torch.float64)
    w = torch.randn(2, 128, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(big, w, stride=2, padding=1)
    grad_out = torch.randn_like(y)
    want_w = torch.autograd.grad(y, w, grad_out)[0]
    torch.testing.assert_close(conv_weight_grad(big, grad_out, w), want_w)
    torch.testing.assert_close(dilated_weight_grad(big, grad_out, w), want_w)  # the rewrite, exact in float64
    for c_in, height in ((4, 8), (64, 16), (3, 6)):  # any size: the dispatch only decides where it runs
        x = _input(c_in, height, torch.float64)
        w = torch.randn(5, c_in, 4, 4, dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
        grad_out = torch.randn_like(y)
        torch.testing.assert_close(dilated_weight_grad(x, grad_out, w), torch.autograd.grad(y, w, grad_out)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("c_in,c_out,size", [(128, 256, 8), (3, 5, 6), (1, 64, 32)])
def test_dilated_weight_grad_comes_in_the_weights_layout_with_the_same_values(dtype, memory_format, c_in, c_out,
                                                                                size):
    """The weight gradient is laid out as the weight is (channels-last through a blocked 2-D transpose, NCHW by a
    4-D copy): the values are the convolution's (float64: as autograd's; bf16: bit for bit what the plain copy
    of the same product gives, since only the layout step differs), the memory format the weight's."""
    gen = torch.Generator().manual_seed(c_in * 100 + c_out)
    x = torch.randn(4, c_in, size, size, generator=gen, dtype=torch.float64).contiguous(memory_format=memory_format)
    w = torch.randn(c_out, c_in, 4, 4, generator=gen, dtype=torch.float64).contiguous(memory_format=memory_format)
    grad_out = torch.randn(4, c_out, size // 2, size // 2, generator=gen, dtype=torch.float64)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    x, w, grad_out = x.to(dtype), w.to(dtype), grad_out.to(dtype)
    got = dilated_weight_grad(x, grad_out, w)
    assert got.shape == w.shape and got.is_contiguous(memory_format=memory_format) and got.dtype == dtype
    product = torch.nn.functional.conv2d(x.transpose(0, 1).contiguous(), grad_out.transpose(0, 1).contiguous(),
                                         dilation=2, padding=1)
    assert torch.equal(got, product.transpose(0, 1))
    if dtype == torch.float64:  # against an independent sum: dW[o, c, a, b] = sum x_pad[n, c, 2i + a, 2j + b] g[n, o, i, j]
        xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
        patches = xp.unfold(2, 4, 2).unfold(3, 4, 2)  # (N, C_in, S/2, S/2, 4, 4)
        want = torch.einsum("ncijab,noij->ocab", patches, grad_out)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["fashion32", "cats64"])
def test_models_with_fast_layers_are_the_reference_models(name):
    """Same parameters and state-dict keys (checkpoints move between impls) and the same outputs."""
    cfg = preset(name)
    cfg.model.ngf = cfg.model.ndf = 16
    size, channels = cfg.data.image_size, cfg.data.channels
    torch.manual_seed(0)
    fast_g, fast_d = build_models(cfg.model, size, channels, "fast")
    torch.manual_seed(0)
    ref_g, ref_d = build_models(cfg.model, size, channels, "aten")
    for fast, ref in ((fast_g, ref_g), (fast_d, ref_d)):
        assert fast.state_dict().keys() == ref.state_dict().keys()
        for (key, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), key
    z = torch.randn(4, cfg.model.nz)
    with torch.no_grad():
        torch.testing.assert_close(fast_d(fast_g(z)), ref_d(ref_g(z)), rtol=1e-4, atol=1e-5)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        StridedConv2d(1, 8, "cuda")
    with pytest.raises(ValueError, match="impl"):
        build_models(ModelConfig(), 32, 1, "triton")


@pytest.mark.parametrize("fn,weight_shape,height", [
    (conv.strided_conv2d, (8, 1, 4, 4), 8), (conv.strided_conv_transpose2d, (8, 1, 4, 4), 4),
    (conv.project_from_vector, (8, 4, 4, 4), 1), (conv.reduce_to_vector, (1, 8, 4, 4), 4)])
def test_kernel_functions_fall_back_to_the_reference_off_cpu(fn, weight_shape, height):
    """The gradient rewrites are gated to the CPU, where they were measured faster: on another device (the meta
    device here, which needs no hardware) the strided kernels run torch's convolution; the dense ends run
    everywhere. Shapes agree with the reference either way."""
    cin = weight_shape[1] if fn in (conv.strided_conv2d, conv.reduce_to_vector) else weight_shape[0]
    x = torch.empty(2, cin, height, height, device="meta", requires_grad=True)
    w = torch.empty(weight_shape, device="meta")
    out, ref = fn(x, w, "fast"), fn(x, w, "aten")
    assert out.shape == ref.shape and out.device.type == "meta"
    strided = fn in (conv.strided_conv2d, conv.strided_conv_transpose2d)
    assert ("Convolution" in type(out.grad_fn).__name__) == strided
    cpu = fn(torch.randn(x.shape, requires_grad=True), torch.randn(weight_shape))
    assert ("StridedConv" in type(cpu.grad_fn).__name__) == strided  # on the CPU the rewrite runs


def test_a_recorded_verdict_switches_a_rewrite_per_layer_shape_and_dtype_within_its_bounds():
    """set_rewrites: a layer whose rewrite was measured slower computes torch's form exactly (bit for bit); one
    measured faster uses it even outside its rule's dtypes (the dilated weight gradient in fp32); another shape or
    dtype keeps its rule; the channel bounds hold whatever is recorded; None forgets (the rule again)."""
    def fn_name(layer, cin, height, amp=False):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            return type(layer(_input(cin, height).requires_grad_(True)).grad_fn).__name__

    grad_out = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))  # a conv 1 -> 8 at 8 px
    weight = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    reference = torch.nn.functional.conv_transpose2d(grad_out, weight, stride=2, padding=1)
    assert not torch.equal(conv_input_grad(grad_out, weight), reference)  # the rule: space-to-depth (fp32 rounding)
    conv.set_rewrites({("space_to_depth", torch.float32, 1, 8, 8): False})
    assert torch.equal(conv_input_grad(grad_out, weight), reference)
    assert "StridedConv" not in fn_name(StridedConv2d(1, 8, "fast"), 1, 8)  # nothing left to rewrite there
    assert "StridedConv" in fn_name(StridedConv2d(1, 8, "fast"), 1, 16)  # 16 px: not measured, the rule
    assert conv.rewrite_enabled("space_to_depth", torch.bfloat16, 1, 8, 8)  # bf16 keeps its rule
    conv.set_rewrites({("space_to_depth", torch.float32, 1, 8, 8): None})
    assert conv.rewrite_enabled("space_to_depth", torch.float32, 1, 8, 8)

    assert "StridedConv" not in fn_name(StridedConv2d(128, 8, "fast"), 128, 8)  # fp32: the rule says torch's
    conv.set_rewrites({("dilated", torch.float32, 128, 8, 8): True})
    assert "StridedConv" in fn_name(StridedConv2d(128, 8, "fast"), 128, 8)
    # a transposed layer 8 -> 128 from 4 px is the convolution 128 -> 8 at 8 px: the same verdict
    assert "StridedConvTranspose" in fn_name(StridedConvTranspose2d(8, 128, "fast"), 8, 4)
    conv.set_rewrites({("dilated", torch.bfloat16, 128, 8, 8): False})
    assert "StridedConv" not in fn_name(StridedConv2d(128, 8, "fast"), 128, 8, amp=True)
    with pytest.raises(ValueError, match="rewrite must be one of space_to_depth, dilated"):
        conv.set_rewrites({("winograd", torch.float32, 1, 8, 8): True})
    conv.set_rewrites({("dilated", torch.float32, 64, 8, 8): True})  # below its bound: never used
    assert not conv.rewrite_enabled("dilated", torch.float32, 64, 8, 8)
    assert [conv.conv_view((2, 8, 4, 4), (8, 128, 4, 4), True), conv.conv_view((2, 128, 8, 8), (8, 128, 4, 4), False)] \
        == [(128, 8, 8), (128, 8, 8)]


def test_a_rewrite_switched_on_by_measurement_is_still_exact_in_float64():
    """The fp32-style dilated weight gradient, which only a probe turns on: through the layer in float64 it
    matches torch."""
    conv.set_rewrites({("dilated", torch.float64, 128, 8, 8): True})
    fast, ref = _pair(StridedConv2d, 128, 8, torch.float64)
    x = _input(128, 8, torch.float64)
    assert "StridedConv" in type(fast(x.requires_grad_(True)).grad_fn).__name__
    for got, want in zip(_grads(fast, x), _grads(ref, x)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


class _Clock:
    """A fake timer: every form call takes the next of its scripted durations (ms), the rewrite's and torch's
    alternating as measure_rewrite calls them."""

    def __init__(self, rewrite_ms, torch_ms):
        self.now, self.pending = 0.0, [d for pair in zip(rewrite_ms, torch_ms) for d in pair]
        self.started = False

    def __call__(self):
        if self.started:  # the end of a call: advance by its duration
            self.now += self.pending.pop(0) / 1e3
        self.started = not self.started
        return self.now


def test_measure_rewrite_reports_the_median_of_the_timed_calls_after_warm_up():
    """reps=4: one untimed warm-up call of each (100 and 900 ms here), then medians by hand: (1, 3, 2, 10) -> 2.5
    and (5, 4, 6, 50) -> 5.5."""
    clock = _Clock([100, 1, 3, 2, 10], [900, 5, 4, 6, 50])
    rewrite_ms, torch_ms = conv.measure_rewrite("space_to_depth", torch.float32, (2, 1, 4, 8), reps=4, timer=clock)
    assert (rewrite_ms, torch_ms) == pytest.approx((2.5, 5.5)) and clock.pending == []
    clock = _Clock([1, 7, 7, 7], [1, 2, 2, 2])
    assert conv.measure_rewrite("dilated", torch.bfloat16, (2, 8, 4, 8), reps=3, timer=clock) == \
        pytest.approx((7.0, 2.0))
    with pytest.raises(ValueError, match="rewrite must be one of"):
        conv.measure_rewrite("im2col", torch.float32, (2, 1, 4, 8))


@pytest.mark.parametrize("name,transposed", [("space_to_depth", False), ("dilated", False), ("dilated", True)])
def test_the_probes_two_forms_compute_the_same_gradients(name, transposed):
    """What the probe times on each side is the same arithmetic (float64): the input gradient of the layer for
    space-to-depth; (input, weight) gradients for the dilated form, of a convolution or of a transposed layer,
    checked against autograd through torch's own layer (so a wrong argument order of torch's side fails too)."""
    gen = torch.Generator().manual_seed(5)
    c_in, c_out, size = (1, 8, 8) if name == "space_to_depth" else (6, 4, 8)
    x = torch.randn(2, c_in, size, size, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, c_out, size // 2, size // 2, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 4, 4, generator=gen, dtype=torch.float64)
    rewrite, reference = conv.probe_forms(name, x, grad_out, weight, transposed)
    got, want = rewrite(), reference()
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    # autograd's: a convolution of x (its output gradient grad_out), or a transposed layer of grad_out (its
    # output gradient x)
    inp, w = (grad_out if transposed else x).clone().requires_grad_(), weight.clone().requires_grad_()
    out = (torch.nn.functional.conv_transpose2d(inp, w, stride=2, padding=1) if transposed else
           torch.nn.functional.conv2d(inp, w, stride=2, padding=1))
    out.backward(x if transposed else grad_out)
    autograd = (inp.grad,) if name == "space_to_depth" else (inp.grad, w.grad)
    for a, b, c in zip(got, want, autograd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_the_probe_times_each_rewrite_as_the_step_computes_the_layer(monkeypatch):
    """The dilated weight gradient is timed with torch's input gradient beside it, against torch's one call for
    both gradients (a layer in the step needs both); space-to-depth, an input gradient alone, against torch's
    transposed convolution. The calls of one timed repetition, in order, worked out by hand."""
    calls = []
    aten, dilated = conv._aten_conv_grads, conv.dilated_weight_grad
    monkeypatch.setattr(conv, "_aten_conv_grads", lambda x, g, w, want_x, want_w: calls.append(
        ("aten", want_x, want_w)) or aten(x, g, w, want_x, want_w))
    monkeypatch.setattr(conv, "dilated_weight_grad", lambda *a: calls.append(("dilated",)) or dilated(*a))
    conv.measure_rewrite("dilated", torch.float32, (2, 8, 4, 8), reps=1)
    rewrite, torch_form = [("aten", True, False), ("dilated",)], [("aten", True, True)]
    assert calls == (rewrite + torch_form) * 2  # the untimed call of each, then one timed repetition
    calls.clear()
    conv.measure_rewrite("space_to_depth", torch.float32, (2, 1, 4, 8), reps=1)
    assert calls == []  # neither of those: the rewrite's own transposed convolution against torch's

    class Functional:  # torch.nn.functional, recording the forward convolutions
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def conv2d(self, *args, **kwargs):
            calls.append(("conv2d",))
            return torch.nn.functional.conv2d(*args, **kwargs)

    monkeypatch.setattr(conv, "F", Functional())
    conv.measure_rewrite("dilated", torch.float32, (2, 8, 4, 8), transposed=True, reps=1)
    # G's layer: its input gradient is a forward convolution beside the rewrite, against torch's transposed
    # backward (one aten call, not through _aten_conv_grads)
    # (the dilated form is itself a forward convolution: the third call of each repetition)
    assert calls == [("conv2d",), ("dilated",), ("conv2d",)] * 2


# ----- double backward (R1 differentiates D's input gradient) ------------------------------------------------
def _penalty_grads(layer: nn.Module, x: torch.Tensor, amp: bool = False):
    """An R1-shaped second-order quantity through ``layer``: the gradients, with respect to the weight and the
    input, of ||d<y, v>/dx||^2 + ||d<y, v>/dw||^2 (v fixed random)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        y = layer(x)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(y.dtype)
    gx, gw = torch.autograd.grad((y * v).sum(), (x, layer.weight), create_graph=True)
    penalty = gx.float().square().sum() + gw.float().square().sum()
    return torch.autograd.grad(penalty, (x, layer.weight))


@pytest.mark.parametrize("cls,cin,cout,height", [c for c in CASES if c[0] in (StridedConv2d, StridedConvTranspose2d)])
def test_rewritten_layers_have_an_exact_double_backward_in_float64(cls, cin, cout, height):
    """Every rewrite (the dilated one forced on in float64) differentiates its own backward exactly as torch's
    convolution does: R1 through the fast layers is R1 through torch's."""
    transposed = cls is StridedConvTranspose2d
    c_in, c_out, size = (cout, cin, 2 * height) if transposed else (cin, cout, height)
    if c_in >= conv.DILATED_WEIGHT_GRAD_MIN_CHANNELS:
        conv.set_rewrites({("dilated", torch.float64, c_in, c_out, size): True})
    fast, ref = _pair(cls, cin, cout, torch.float64)
    x = _input(cin, height, torch.float64)
    assert "StridedConv" in type(fast(x.clone().requires_grad_(True)).grad_fn).__name__ or \
        not conv.rewrites_apply(x.requires_grad_(True), fast.weight, transposed)
    for got, want in zip(_penalty_grads(fast, x), _penalty_grads(ref, x)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn,weight_shape,height", [(conv.strided_conv2d, (3, 2, 4, 4), 6),
                                                    (conv.strided_conv_transpose2d, (3, 1, 4, 4), 3)],
                         ids=["space_to_depth_conv", "space_to_depth_transposed"])
def test_space_to_depth_second_derivatives_match_finite_differences(fn, weight_shape, height):
    """An independent reference: torch.autograd.gradgradcheck compares the analytic second derivatives of the
    rewritten layer (its custom backward differentiated) with finite differences, in float64."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, weight_shape[0] if fn is conv.strided_conv_transpose2d else weight_shape[1], height, height,
                    generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(weight_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert "StridedConv" in type(fn(x, w, "fast").grad_fn).__name__
    assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, "fast"), (x, w))


@pytest.mark.parametrize("cls,cin,cout,height", [c for c in CASES if c[0] in (StridedConv2d, StridedConvTranspose2d)])
def test_double_backward_in_bf16_agrees_with_torch_within_rounding(cls, cin, cout, height):
    """Under bf16 autocast, as R1 runs in a bf16 step: the fast layer's second-order gradients agree with torch's
    within bf16 rounding."""
    fast, ref = _pair(cls, cin, cout)
    x = _input(cin, height)
    for got, want in zip(_penalty_grads(fast, x, amp=True), _penalty_grads(ref, x, amp=True)):
        assert (got.float() - want.float()).norm() <= 0.03 * want.float().norm()


@pytest.mark.parametrize("cls,cin,cout,height", [(StridedConv2d, 1, 16, 16), (StridedConv2d, 128, 8, 8),
                                                 (StridedConvTranspose2d, 8, 128, 4)])
def test_no_weight_gradients_skips_them_in_an_input_gradient_and_keeps_its_graph(monkeypatch, cls, cin, cout, height):
    """R1's autograd.grad(D(x).sum(), x, create_graph=True) wants x's gradient only: inside no_weight_gradients the
    rewritten layers compute no weight gradient (neither torch's nor the dilated form is called for it), the input
    gradient is the same, and the penalty built on it still differentiates to the weight exactly (float64, against
    torch's layer); outside the block the weight gradient is computed again."""
    transposed = cls is StridedConvTranspose2d
    c_in, c_out, size = (cout, cin, 2 * height) if transposed else (cin, cout, height)
    if c_in >= conv.DILATED_WEIGHT_GRAD_MIN_CHANNELS:
        conv.set_rewrites({("dilated", torch.float64, c_in, c_out, size): True})
    fast, ref = _pair(cls, cin, cout, torch.float64)
    weight_grads = []
    for name in ("dilated_weight_grad", "conv_weight_grad"):
        real = getattr(conv, name)
        monkeypatch.setattr(conv, name, lambda *a, _real=real: weight_grads.append(1) or _real(*a))
    real_aten = conv._aten_conv_grads
    monkeypatch.setattr(conv, "_aten_conv_grads", lambda x, g, w, want_x, want_w: (
        weight_grads.append(1) if want_w else None) or real_aten(x, g, w, want_x, want_w))

    def penalty_and_weight_grad(layer, off: bool):
        x = _input(cin, height, torch.float64).requires_grad_(True)
        y = layer(x)
        with conv.no_weight_gradients() if off else torch.enable_grad():
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        if off:
            assert weight_grads == [], "a weight gradient was computed inside no_weight_gradients"
        penalty = gx.square().sum()  # its weight gradient runs the layer's backward again, outside the block
        return gx, torch.autograd.grad(penalty, layer.weight)[0]

    gx, gw = penalty_and_weight_grad(fast, off=True)
    weight_grads.clear()
    gx_ref, gw_ref = penalty_and_weight_grad(ref, off=False)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
    _grads(fast, _input(cin, height, torch.float64))
    assert weight_grads, "outside the block the weight gradient is computed"
