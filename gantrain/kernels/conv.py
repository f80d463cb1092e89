"""The DCGAN convolution kernels: exact faster forms of torch's convolutions, each beside its reference.

Every public function takes ``impl``: ``"aten"`` runs torch's own convolution, the reference that the tests
compare outputs and both gradients against; ``"fast"`` (the default) runs the rewrite where it applies and
falls back to the reference where it does not (another shape, or a device, dtype or layer where it was not
measured faster: the gradient rewrites are CPU-only). The rewrites change only the order of summation, and
their backward passes are built from differentiable torch ops, so they also have a double backward (R1 needs
one). The ``nn.Module`` shells that hold the weights are in :mod:`gantrain.engine.gan.layers`.

The rewrites (docs/results/kernels-conv.md has the figures):

* **The two ends are dense layers**: G's first layer (a 4x4 transposed convolution of a 1x1 map) and D's last
  (a valid 4x4 convolution of a 4x4 map) as matrix products, on every device.
* **Input gradients into one to four channels** (:data:`SPACE_TO_DEPTH_MAX_CHANNELS`) of a stride-2 4x4
  convolution as a stride-1 2x2 transposed convolution into 4x the channels and a pixel shuffle (CPU).
* **Weight gradients of the wide layers** (from :data:`DILATED_WEIGHT_GRAD_MIN_CHANNELS` input channels) as a
  forward convolution, batch and channels swapped, the output gradient a kernel dilated by the stride (CPU).

The two CPU gradient rewrites apply within their channel bounds; inside them, whether a layer uses one is what
:func:`set_rewrites` recorded for its shape and compute dtype (a probe's verdict, :func:`measure_rewrite` timing
both forms at that layer's shape), else a rule measured on one CPU (space-to-depth in every dtype, the dilated
weight gradient in bf16 only: in fp32 oneDNN's own was faster there). Layers are named in the convolution's
view (:func:`conv_view`): its input channels, output channels and input size.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

IMPLS = ("fast", "aten")
"""``fast``: the rewrites where they apply; ``aten``: torch's convolutions as they are (the reference)."""
SPACE_TO_DEPTH_MAX_CHANNELS = 4
"""Input gradients into at most this many channels go through space-to-depth (CPU)."""
DILATED_WEIGHT_GRAD_MIN_CHANNELS = 128
"""Weight gradients of convolutions with at least this many input channels run as a forward convolution (CPU)."""
REWRITES = ("space_to_depth", "dilated")
"""The CPU gradient rewrites a probe decides per layer shape and dtype: see :func:`set_rewrites`."""
_RULE_DTYPES = {"space_to_depth": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                "dilated": (torch.bfloat16,)}
#: (rewrite, compute dtype, conv input channels, conv output channels, conv input size) -> used
_chosen: dict[tuple[str, torch.dtype, int, int, int], bool] = {}
_weight_gradients_off = 0  # > 0 inside no_weight_gradients(): the custom backward passes skip weight gradients


@contextlib.contextmanager
def no_weight_gradients():
    """Inside the block, the rewritten layers' backward passes compute no weight gradient (None), for a backward
    that asks only for an input gradient, e.g. ``torch.autograd.grad(D(x).sum(), x, create_graph=True)`` of R1:
    torch's own convolutions skip what a graph does not need, but a custom autograd Function cannot tell, and would
    compute (and, with ``create_graph``, record) the weight gradient for nothing. Process-wide, not per thread
    (autograd may run a backward on another thread), as stylegan2-ada's ``conv2d_gradfix.no_weight_gradients``; a
    weight gradient asked for inside the block comes back as None (zero)."""
    global _weight_gradients_off
    _weight_gradients_off += 1
    try:
        yield
    finally:
        _weight_gradients_off -= 1


def _wants_weight_grad(ctx: Any) -> bool:
    """Whether a custom backward computes its weight gradient: asked for, and not inside :func:`no_weight_gradients`."""
    return bool(ctx.needs_input_grad[1]) and not _weight_gradients_off


def in_bounds(name: str, c_in: int) -> bool:
    """Whether rewrite ``name`` can apply to a convolution from ``c_in`` channels (its channel bound)."""
    if name not in REWRITES:
        raise ValueError(f"rewrite must be one of {', '.join(REWRITES)}, got {name!r}")
    return c_in <= SPACE_TO_DEPTH_MAX_CHANNELS if name == "space_to_depth" else c_in >= DILATED_WEIGHT_GRAD_MIN_CHANNELS


def set_rewrites(used: dict[tuple[str, torch.dtype, int, int, int], bool | None]) -> None:
    """Records for this process whether a layer uses a rewrite: ``{(name, dtype, c_in, c_out, size): used}`` in
    the convolution's view (:func:`conv_view`), e.g. what a probe found faster on this CPU; None forgets the
    entry (the rule decides again). Entries not given keep what they had. Raises ValueError for an unknown
    rewrite."""
    for (name, dtype, c_in, c_out, size), choice in used.items():
        in_bounds(name, c_in)
        key = (name, dtype, int(c_in), int(c_out), int(size))
        if choice is None:
            _chosen.pop(key, None)
        else:
            _chosen[key] = bool(choice)


def reset_rewrites() -> None:
    """Forgets what :func:`set_rewrites` recorded: the rules alone decide again."""
    _chosen.clear()


def rewrite_enabled(name: str, dtype: torch.dtype, c_in: int, c_out: int, size: int) -> bool:
    """Whether a convolution (``c_in`` -> ``c_out`` channels at ``size`` px, computing in ``dtype``) uses rewrite
    ``name``: never outside its channel bound; inside, as recorded (:func:`set_rewrites`), else by its rule."""
    if not in_bounds(name, c_in):
        return False
    return _chosen.get((name, dtype, c_in, c_out, size), dtype in _RULE_DTYPES[name])


def conv_view(x_shape, weight_shape, transposed: bool) -> tuple[int, int, int]:
    """A strided layer as the convolution whose gradients the rewrites compute: (input channels, output channels,
    input size). A 4x4 stride-2 convolution of x (N, C, S, S) with weight (C_out, C, 4, 4) is (C, C_out, S); a
    transposed one of x (N, C, S, S) with weight (C, C_out, 4, 4) is the input gradient of the convolution
    (C_out, C, 2S)."""
    c_first, c_second = weight_shape[0], weight_shape[1]
    return (c_second, c_first, 2 * x_shape[-1]) if transposed else (c_second, c_first, x_shape[-1])


def check_impl(impl: str) -> str:
    """``impl`` when it is one of :data:`IMPLS`; raises ValueError otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out channels-last (and not also plain contiguous, as happens for 1x1 or C=1)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _like(t: torch.Tensor, layout_of: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if _channels_last(layout_of) else torch.contiguous_format)


# ----- the ends: dense layers shaped as convolutions ---------------------------------------------------------
def project_from_vector(x: torch.Tensor, weight: torch.Tensor, impl: str = "fast") -> torch.Tensor:
    """``conv_transpose2d(x, weight)`` for x (N, C_in, 1, 1) and weight (C_in, C_out, k, k) -> (N, C_out, k, k).

    ``fast``: the matrix product ``z @ W`` it is (every device); the output is channels-last when the weight
    is, as the convolution's would be. Other input sizes take the reference.
    """
    if check_impl(impl) == "aten" or x.shape[-2:] != (1, 1):
        return F.conv_transpose2d(x, weight)
    n, c_in, c_out, k = x.shape[0], weight.shape[0], weight.shape[1], weight.shape[-1]
    z = x.reshape(n, c_in)
    if _channels_last(weight):
        out = z @ weight.permute(0, 2, 3, 1).reshape(c_in, -1)
        return out.view(n, k, k, c_out).permute(0, 3, 1, 2)
    return (z @ weight.reshape(c_in, -1)).view(n, c_out, k, k)


def reduce_to_vector(x: torch.Tensor, weight: torch.Tensor, impl: str = "fast") -> torch.Tensor:
    """``conv2d(x, weight)`` for x (N, C_in, k, k) and weight (C_out, C_in, k, k) -> (N, C_out, 1, 1).

    ``fast``: the dense layer it is (every device). Other input sizes take the reference.
    """
    if check_impl(impl) == "aten" or tuple(x.shape[-2:]) != tuple(weight.shape[-2:]):
        return F.conv2d(x, weight)
    n, c_out = x.shape[0], weight.shape[0]
    if _channels_last(x):  # flatten in the order the memory already has: a view, no copy
        flat, weight = x.permute(0, 2, 3, 1).reshape(n, -1), weight.permute(0, 2, 3, 1)
    else:
        flat = x.reshape(n, -1)
    return F.linear(flat, weight.reshape(c_out, -1)).view(n, c_out, 1, 1)


# ----- stride-2, 4x4, padding-1 convolutions --------------------------------------------------------------
def _space_to_depth_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> bool:
    """For the input gradient of a convolution: grad_out (N, C_out, S/2, S/2), weight (C_out, C_in, 4, 4)."""
    return rewrite_enabled("space_to_depth", grad_out.dtype, weight.shape[1], weight.shape[0], 2 * grad_out.shape[-1])


def _dilated_weight_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """For the weight gradient of a convolution of x (N, C_in, S, S) by weight (C_out, C_in, 4, 4)."""
    return rewrite_enabled("dilated", x.dtype, x.shape[1], weight.shape[0], x.shape[-1])


def conv_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``conv2d(x, weight, stride=2, padding=1)`` (4x4 kernel, even sizes), which is also
    ``conv_transpose2d(grad_out, weight, stride=2, padding=1)``.

    With few input channels it runs as space-to-depth: the stride-2 4x4 convolution of the padded input
    equals a stride-1 2x2 convolution of its 2x2 pixel-unshuffle, whose input gradient is a 2x2 transposed
    convolution into 4x the channels followed by a pixel shuffle and removing the padding.
    """
    if not _space_to_depth_input_grad(grad_out, weight):
        return F.conv_transpose2d(grad_out, weight, stride=2, padding=1)
    return _space_to_depth(grad_out, weight)


def _space_to_depth(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    c_out, c_in = weight.shape[:2]
    # weight[o, c, 2a + u, 2b + v] -> w2[o, 4c + 2u + v, a, b], the pixel-unshuffle channel order
    w2 = weight.view(c_out, c_in, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(c_out, 4 * c_in, 2, 2)
    padded = F.pixel_shuffle(F.conv_transpose2d(grad_out, _like(w2, weight)), 2)
    return padded[:, :, 1:-1, 1:-1]


def conv_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight, stride=2, padding=1)`` (4x4 kernel) with respect to ``weight``.

    From 128 input channels up, where this layer's recorded verdict says so (:func:`set_rewrites`; else in bf16, by
    rule): :func:`dilated_weight_grad`; otherwise torch's.
    """
    if not _dilated_weight_grad(x, weight):
        return _aten_conv_grads(x, grad_out, weight, False, True)[1]
    return dilated_weight_grad(x, grad_out, weight)


def dilated_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`conv_weight_grad` as one forward convolution: x (N, C_in, H, W) with batch and channels swapped,
    correlated with the output gradient (N, C_out, H/2, W/2), also swapped, as a kernel dilated by the stride.
    Returns (C_out, C_in, 4, 4) in ``weight``'s memory format; any dtype, any size."""
    # (C_in, N, H, W) * (C_out, N, H/2, W/2) dilated by 2, padded by 1 -> (C_in, C_out, 4, 4)
    grad = F.conv2d(x.transpose(0, 1).contiguous(), grad_out.transpose(0, 1).contiguous(), dilation=2, padding=1)
    if _channels_last(weight) and grad.is_contiguous():
        # (C_in, C_out, 4, 4) as the (C_in, C_out*16) matrix it is, transposed: (C_out, 4, 4, C_in) is the weight's
        # channels-last order, and torch copies a transposed 2-D matrix in blocks (~2.7x faster than the 4-D copy)
        c_in, c_out = grad.shape[:2]
        flat = grad.view(c_in, -1).t().contiguous()
        return flat.view(c_out, *grad.shape[2:], c_in).permute(0, 3, 1, 2)
    return _like(grad.transpose(0, 1), weight)


def _aten_conv_grads(x, grad_out, weight, input_grad: bool, weight_grad: bool):
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1,
                                               [input_grad, weight_grad, False])[:2]


class _StridedConv(torch.autograd.Function):
    """conv2d(x, w, stride=2, padding=1) with the backward pass of :func:`conv_input_grad`/:func:`conv_weight_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, stride=2, padding=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], _wants_weight_grad(ctx)
        s2d = want_x and _space_to_depth_input_grad(grad_out, weight)
        dilated = want_w and _dilated_weight_grad(x, weight)
        grad_x = grad_w = None
        if (want_x and not s2d) or (want_w and not dilated):  # what the rewrites leave: one aten call, as autograd's
            grad_x, grad_w = _aten_conv_grads(x, grad_out, weight, want_x and not s2d, want_w and not dilated)
        if s2d:
            grad_x = conv_input_grad(grad_out, weight)
        if dilated:
            grad_w = dilated_weight_grad(x, grad_out, weight)
        return grad_x, grad_w


class _StridedConvTranspose(torch.autograd.Function):
    """conv_transpose2d(x, w, stride=2, padding=1), which is the input gradient of a convolution, run as one.

    Its input gradient is the convolution's forward pass and its weight gradient the convolution's weight
    gradient with the roles of input and output gradient swapped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return conv_input_grad(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = F.conv2d(grad_out, weight, stride=2, padding=1) if ctx.needs_input_grad[0] else None
        want_w = _wants_weight_grad(ctx)
        grad_w = conv_weight_grad(grad_out, x, weight) if want_w else None
        return grad_x, grad_w


def _same_dtype(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cast autocast would make for a convolution (a custom autograd function is opaque to autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype)
    return x, weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` computes in: autocast's where it is on (see :func:`_same_dtype`)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def rewrites_apply(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> bool:
    """Whether a strided layer (a convolution, or ``transposed``) of ``x`` by ``weight`` uses a rewrite in its
    compute dtype (autocast's where it is on) for what this call computes: space-to-depth (a transposed layer's
    forward pass, or a convolution's input gradient when ``x`` needs one) or the dilated weight gradient (when
    ``weight`` needs one)."""
    dtype = _compute_dtype(x)
    view = conv_view(x.shape, weight.shape, transposed)
    grads = torch.is_grad_enabled()
    return ((transposed or (grads and x.requires_grad)) and rewrite_enabled("space_to_depth", dtype, *view)) or \
        (grads and weight.requires_grad and rewrite_enabled("dilated", dtype, *view))


def strided_conv2d(x: torch.Tensor, weight: torch.Tensor, impl: str = "fast") -> torch.Tensor:
    """``conv2d(x, weight, stride=2, padding=1)``, 4x4 kernel: (N, C_in, H, W) -> (N, C_out, H/2, W/2).

    ``fast`` on CPU, where a rewrite applies: the backward of :func:`conv_input_grad`/:func:`conv_weight_grad`;
    elsewhere the reference.
    """
    if check_impl(impl) == "aten" or x.device.type != "cpu" or not rewrites_apply(x, weight, transposed=False):
        return F.conv2d(x, weight, stride=2, padding=1)
    return _StridedConv.apply(*_same_dtype(x, weight))


def strided_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, impl: str = "fast") -> torch.Tensor:
    """``conv_transpose2d(x, weight, stride=2, padding=1)``, 4x4 kernel: (N, C_in, H, W) -> (N, C_out, 2H, 2W).

    ``fast`` on CPU, where a rewrite applies to the layer read as a convolution (:func:`rewrites_apply`: its
    :func:`conv_view`, compute dtype, recorded verdict and what the call needs): :class:`_StridedConvTranspose`;
    elsewhere the reference.
    """
    if check_impl(impl) == "aten" or x.device.type != "cpu" or not rewrites_apply(x, weight, transposed=True):
        return F.conv_transpose2d(x, weight, stride=2, padding=1)
    return _StridedConvTranspose.apply(*_same_dtype(x, weight))


# ----- the probe: is each rewrite faster on this CPU? -----------------------------------------------------
def probe_forms(name: str, x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, transposed: bool = False):
    """The two computations :func:`measure_rewrite` times for rewrite ``name`` on a layer in the convolution's
    view (x (N, C_in, S, S), grad_out (N, C_out, S/2, S/2), weight (C_out, C_in, 4, 4)): ``(rewrite, torch)``,
    each a function returning the gradients it computes, the same ones both: the input gradient for
    space-to-depth; for the dilated weight gradient (input gradient, weight gradient) of a convolution, or of a
    ``transposed`` layer of this view (then x is its output gradient, grad_out its input, as in
    :class:`_StridedConvTranspose`)."""
    if name == "space_to_depth":
        return (lambda: _space_to_depth(grad_out, weight),
                lambda: F.conv_transpose2d(grad_out, weight, stride=2, padding=1))
    if transposed:
        return (lambda: (F.conv2d(x, weight, stride=2, padding=1), dilated_weight_grad(x, grad_out, weight)),
                lambda: torch.ops.aten.convolution_backward(x, grad_out, weight, None, [2, 2], [1, 1], [1, 1], True,
                                                            [0, 0], 1, [True, True, False])[:2])
    return (lambda: (_aten_conv_grads(x, grad_out, weight, True, False)[0], dilated_weight_grad(x, grad_out, weight)),
            lambda: _aten_conv_grads(x, grad_out, weight, True, True))


def measure_rewrite(name: str, dtype: torch.dtype, shape: tuple[int, int, int, int], *, channels_last: bool = True,
                    transposed: bool = False, reps: int = 7, timer=None) -> tuple[float, float]:
    """Median milliseconds of rewrite ``name`` and of the torch (oneDNN) computation it replaces, in ``dtype`` on
    the CPU, for a layer of ``shape`` = (batch, conv input channels, conv output channels, input size) in the
    convolution's view: ``(rewrite_ms, torch_ms)``. Each side is what a training step computes with it: an input
    gradient alone for space-to-depth (a transposed layer's forward, or D's first layer in G's step). The dilated
    weight gradient is timed with the other gradient the layer needs beside it, against torch's one backward
    call computing both (timed alone, oneDNN's weight gradient was seen taking up to twice its share of that
    call): for a convolution (D's layer), torch's input gradient; for a ``transposed`` layer of this view (G's),
    the forward convolution that is its input gradient, against torch's transposed backward. The two alternate,
    after one untimed call of each; ``timer`` (seconds; default ``time.perf_counter``) is for tests. Raises
    ValueError for an unknown name."""
    import statistics
    import time

    if name not in REWRITES:
        raise ValueError(f"rewrite must be one of {', '.join(REWRITES)}, got {name!r}")
    timer = timer or time.perf_counter
    n, c_in, c_out, size = shape
    layout = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)

    def made(*dims):
        return torch.randn(*dims, generator=gen).to(dtype).contiguous(memory_format=layout)

    x, grad_out, weight = made(n, c_in, size, size), made(n, c_out, size // 2, size // 2), made(c_out, c_in, 4, 4)
    forms = probe_forms(name, x, grad_out, weight, transposed)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for rep in range(reps + 1):
            for form, kept in zip(forms, times):
                start = timer()
                form()
                elapsed_ms = (timer() - start) * 1e3
                if rep:  # the first call of each is warm-up (oneDNN primitive creation)
                    kept.append(elapsed_ms)
    return statistics.median(times[0]), statistics.median(times[1])
