"""Precision policy in one place: autocast dtype, the GradScaler (fp16 only), channels-last, input batches.

Models and every input batch go channels-last together; losses are computed in fp32 from the logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from gantrain.engine.config import FP16_NEEDS_CUDA
from gantrain.engine.data.pixels import to_unit_
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.hardware import bf16_faster

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 computes faster than fp32 here, measured (:func:`~gantrain.engine.gan.hardware.bf16_faster`)."""
    return bf16_faster(device)[0]


def resolve_amp(mode: str, device: torch.device) -> str:
    """What an --amp mode means on ``device``: 'off' (fp32), 'bf16' or 'fp16'. ``auto`` is bf16 where the device
    computes it faster than fp32 (:func:`native_bf16`), else off. Raises :class:`ConfigError` for fp16 off CUDA.

    The one reading of the mode: the policy, the extractor's fit and ``gantrain bench`` take its answer."""
    if mode == "auto":
        mode = "bf16" if native_bf16(device) else "off"
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError(f"--amp: {FP16_NEEDS_CUDA}")
    return mode


def compute_name(amp: str) -> str:
    """'fp32', 'bf16' or 'fp16': what a resolved mode computes in (the keys of the bench's peak FLOP/s)."""
    return "fp32" if amp == "off" else amp


@dataclass
class PrecisionPolicy:
    device: torch.device
    amp: str = "off"
    """The --amp mode; once built, the resolved one (:func:`resolve_amp`), with the one asked for in ``requested``."""
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.requested, self.amp = self.amp, resolve_amp(self.amp, self.device)
        # why --amp auto chose as it did (the measurement), for the bench's JSON and the run log
        self.why = bf16_faster(self.device)[1] if self.requested == "auto" else "asked for"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def describe(self) -> str:
        amp = "fp32" if self.amp == "off" else f"{self.amp} autocast"
        how = ""
        if self.requested == "auto":
            how = " (auto)" if self.amp != "off" or self.device.type != "cpu" else " (auto: bf16 is not faster on this CPU)"
        return f"{amp}{how}, {'channels-last' if self.channels_last else 'NCHW'}"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPES.get(self.amp)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def prepare_batch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> [-1, 1] in the model's memory format, on the device (floats pass through).

        Under AMP the batch is made in the autocast dtype: D then sees real and generated images in the same
        dtype (one compiled graph, not two) and the first convolution skips a cast.
        """
        x = images_uint8.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = to_unit_(x.to(dtype=torch.float32, memory_format=self.memory_format))
        # else: a loader that normalises itself (DALI) already gave floats in [-1, 1]
        dtype = self.autocast_dtype or torch.float32
        return x.to(dtype=dtype, memory_format=self.memory_format)

    def input_grad(self, output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The gradient of ``output.sum()`` with respect to ``inputs`` (which require it), in fp32 or wider, with
        its graph kept so that a penalty on it trains (R1). Under fp16 the sum is multiplied by the loss scale before
        autograd and the gradient divided by it after (the "gradient penalty" recipe of PyTorch's AMP examples),
        so small gradients do not flush to zero; an overflow makes the loss non-finite and the scaler skips the
        step (the caller decides what to log for it). No host sync."""
        (grad,) = torch.autograd.grad(self.scaler.scale(output.sum()), inputs, create_graph=True)  # unscaled if off
        grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
        return grad / self.scaler.scale(torch.ones((), device=grad.device)) if self.scaler.is_enabled() else grad

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Scaled backward and optimiser step; one scaler serves both the D and the G step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)

    def end_iteration(self) -> None:
        """Updates the loss scale once per iteration, after both optimisers stepped."""
        if self.scaler.is_enabled():
            self.scaler.update()
