"""R1, the zero-centred gradient penalty on D's real inputs (gantrain/engine/gan/step.py, precision.py): the penalty
against closed forms and finite differences, D's gradient against torch's double backward through torch's own
layers, the lazy schedule and its resume, fp16-style loss scaling, compile, the config fields."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gantrain.engine.config import LossConfig, override, preset
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.precision import PrecisionPolicy
from gantrain.engine.gan.step import GANStep, r1_penalty
from gantrain.kernels import conv

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def rules_only():
    conv.reset_rewrites()
    yield
    conv.reset_rewrites()


def _gan(amp: str = "off", **flat) -> GANStep:
    cfg = override(preset("fashion32"), {"batch_size": 4, "ngf": 8, "ndf": 8, "device": "cpu", "amp": amp,
                                         "channels_last": False, "seed": 5, **flat})
    return GANStep.for_config(cfg, CPU, PrecisionPolicy(CPU, amp, cfg.perf.channels_last))


def _batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _aten_float64(d: nn.Module) -> nn.Module:
    """A float64 copy of D computing with torch's own convolutions (the reference layers)."""
    ref = copy.deepcopy(d).double()
    for m in ref.modules():
        if hasattr(m, "impl"):
            m.impl = "aten"
    return ref


def test_r1_penalty_is_the_batch_mean_of_squared_gradient_norms():
    grad = np.random.default_rng(0).normal(size=(5, 3, 4, 4))
    want = np.mean([np.sum(g ** 2) for g in grad])
    assert float(r1_penalty(torch.from_numpy(grad))) == pytest.approx(want, rel=1e-12)
    assert r1_penalty(torch.from_numpy(grad).to(torch.bfloat16)).dtype == torch.float32


class _Quadratic(nn.Module):
    """D(x)_i = sum_p a_p x_ip^2: grad_x = 2 a x, so R1 = mean_i sum_p 4 a_p^2 x_ip^2 and dR1/da = mean_i 8 a x_i^2."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1.0, 2.0, int(np.prod(shape))).reshape(shape))

    def forward(self, x):
        return (self.a * x.square()).flatten(1).sum(1)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "loss_scaled"])
def test_input_grad_penalty_and_its_parameter_gradient_match_the_closed_form(scaled):
    """The gradient the penalty takes keeps its graph (its own gradient reaches D's weights), and with a loss scale
    on (fp16's GradScaler, enabled here on the CPU with a large scale) the result is unscaled exactly."""
    x_np = np.random.default_rng(1).normal(size=(3, 2, 4, 4)).astype(np.float32)
    d = _Quadratic((2, 4, 4))
    policy = PrecisionPolicy(CPU, "off")
    if scaled:
        policy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x = torch.from_numpy(x_np).requires_grad_(True)
    penalty = r1_penalty(policy.input_grad(d(x), x))
    penalty.backward()
    a = d.a.detach().numpy()
    want = np.mean([np.sum(4 * a ** 2 * xi ** 2) for xi in x_np])
    want_grad = np.mean([8 * a * xi ** 2 for xi in x_np], axis=0)
    assert float(penalty.detach()) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(d.a.grad.numpy(), want_grad, rtol=1e-5, atol=1e-6)


def test_the_r1_term_of_a_step_matches_finite_differences():
    """The step's R1 term, gamma/2 x N x mean_i ||grad_x sum D(x)||^2 at the real batch D sees, against central
    differences of a float64 copy of D taken before the step (train mode: BatchNorm couples the samples, so the
    gradient of the sum of logits is what is differentiated; BatchNorm on batch statistics only, so torch.func
    can evaluate many perturbed batches at once)."""
    from torch.func import replace_all_batch_norm_modules_, vmap

    gamma, every = 3.0, 2
    gan = _gan(r1_gamma=gamma, r1_every=every)
    real = gan.policy.prepare_batch(_batch())
    ref = replace_all_batch_norm_modules_(_aten_float64(gan.d).train())
    x = real.double()
    _, _, _, _, r1 = gan.d_step(real)
    eps, n = 1e-6, x.numel()
    steps = torch.eye(n, dtype=torch.float64).view(n, *x.shape) * eps
    with torch.no_grad():
        total = vmap(lambda batch: ref(batch).sum(), chunk_size=256)
        grad = (total(x + steps) - total(x - steps)) / (2 * eps)
    want = gamma / 2 * every * grad.view(x.shape[0], -1).square().sum(1).mean()
    assert float(r1) == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_d_gradient_of_an_r1_step_is_torchs_double_backward_through_torchs_layers(monkeypatch, amp):
    """D's weight gradients on an R1 step (fast layers, the rewrites on: space-to-depth into D's first layer and
    the dilated weight gradient of its 128 -> 256 layer) against the loss BCE(real) + BCE(fake) + gamma/2 x N x R1
    built by hand on a float64 copy of D with torch's convolutions, differentiated by torch. fp32: equal to
    rounding; bf16 autocast: no further from it than the same step with torch's layers (layer_impl aten)."""
    gamma, every = 0.5, 4

    def errors(impl):
        gan = _gan(amp, ndf=64, r1_gamma=gamma, r1_every=every, layer_impl=impl)
        conv.set_rewrites({("dilated", torch.float32, 128, 256, 8): True})
        real = gan.policy.prepare_batch(_batch(1))
        ref = _aten_float64(gan.d).train()
        grads = {}
        monkeypatch.setattr(gan.opt_d, "step", lambda *a, **k: grads.update(
            {n: p.grad.detach().clone() for n, p in gan.d.named_parameters()}))
        fake, *_ = gan.d_step(real)
        x = real.double().requires_grad_(True)
        logits_real = ref(x).view(-1)
        g = torch.autograd.grad(logits_real.sum(), x, create_graph=True)[0]
        loss = (F.binary_cross_entropy_with_logits(logits_real, torch.ones(4, dtype=torch.float64))
                + F.binary_cross_entropy_with_logits(ref(fake.detach().double()).view(-1),
                                                     torch.zeros(4, dtype=torch.float64))
                + gamma / 2 * every * g.square().flatten(1).sum(1).mean())
        want = dict(zip((n for n, _ in ref.named_parameters()), torch.autograd.grad(loss, list(ref.parameters()))))
        assert grads.keys() == want.keys()
        return {name: float((got.double() - want[name]).norm() / want[name].norm()) for name, got in grads.items()}

    fast = errors("fast")
    if amp == "off":
        assert max(fast.values()) <= 1e-5, fast
    else:
        aten = errors("aten")
        assert all(fast[name] <= 1.5 * aten[name] + 0.01 for name in fast), (fast, aten)


def test_r1_runs_on_every_nth_step_from_the_first_and_is_logged_per_step():
    """r1_every 3: iterations 0, 3, 6 take the penalty (the term on the others is 0); the statistic's mean over the
    window is the term's mean per step."""
    gan = _gan(r1_gamma=1.0, r1_every=3)
    terms = []
    real_d_step = gan.d_step
    gan.d_step = lambda real: (lambda out: terms.append(float(out[4])) or out)(real_d_step(real))
    for i in range(7):
        gan(_batch(i))
    assert [t > 0 for t in terms] == [True, False, False, True, False, False, True]
    stats = gan.stats.read()
    assert stats["r1"] == pytest.approx(sum(terms) / 7, rel=1e-5) and gan.iteration == 7


def test_r1_off_adds_nothing_to_the_step(monkeypatch):
    gan = _gan()
    monkeypatch.setattr(gan.policy, "input_grad", lambda *a: pytest.fail("R1 ran while off"))
    for i in range(2):
        gan(_batch(i))
    assert gan.stats.names == ("loss_d", "loss_g", "d_real", "d_fake") and not gan.r1_due


def test_a_resumed_step_takes_the_penalty_at_the_same_iterations():
    """Loading a checkpoint of iteration 2 continues the lazy schedule (every 3: iteration 3 is the next R1 step),
    so 2 + 3 resumed iterations give the weights of 5 uninterrupted ones exactly."""
    straight = _gan(r1_gamma=2.0, r1_every=3)
    for i in range(5):
        straight(_batch(i))
    first = _gan(r1_gamma=2.0, r1_every=3)
    for i in range(2):
        first(_batch(i))
    state = copy.deepcopy(first.state_dict())
    resumed = _gan(r1_gamma=2.0, r1_every=3)
    resumed.load_state_dict(state, "ckpt.pt", step=2)
    assert resumed.iteration == 2
    for i in range(2, 5):
        resumed(_batch(i))
    for a, b in zip([*straight.d.parameters(), *straight.g.parameters()],
                    [*resumed.d.parameters(), *resumed.g.parameters()]):
        assert torch.equal(a, b)
    off = _gan(r1_gamma=0.0)
    for i in range(5):
        off(_batch(i))
    assert any(not torch.equal(a, b) for a, b in zip(straight.d.parameters(), off.d.parameters()))


def test_with_compile_and_r1_g_is_compiled_and_d_stays_eager():
    from torch._dynamo.eval_frame import OptimizedModule

    with_r1, without = _gan(compile=True, r1_gamma=1.0), _gan(compile=True)
    assert with_r1.d_eager and isinstance(with_r1.g_train, OptimizedModule)
    assert with_r1.d_train is with_r1.d
    assert not without.d_eager and isinstance(without.d_train, OptimizedModule)


def test_config_fields_are_checked_and_described():
    assert LossConfig(r1_gamma=0.1).r1_words() == "R1 gamma 0.1 every 4 D steps"
    assert LossConfig(r1_gamma=10, r1_every=1).r1_words() == "R1 gamma 10" and LossConfig().r1_words() == ""
    with pytest.raises(ConfigError, match="--r1-gamma: must be >= 0"):
        LossConfig(r1_gamma=-1)
    with pytest.raises(ConfigError, match="--r1-every: must be at least 1"):
        LossConfig(r1_gamma=1, r1_every=0)
    assert override(preset("fashion32"), {"r1_every": 8}).without_effect() == ["--r1-every 8 (no R1: --r1-gamma 0)"]
    assert override(preset("fashion32"), {"r1_every": 8, "r1_gamma": 1}).without_effect() == []
    with pytest.raises(ConfigError, match="r1.gamma|r1_gamma|--r1-gamma"):
        LossConfig(r1_gamma=float("nan"))


def test_an_overflowing_scaled_gradient_skips_the_step_and_logs_r1_as_0():
    """fp16's path, with the loss scaler enabled on the CPU at a scale that overflows: the scaled input gradient is
    inf, the scaler skips D's update (its weights stay), and the logged R1 term is 0, not inf (which would stop
    the run as diverged); the scale is lowered for the next step."""
    gan = _gan(r1_gamma=1.0, r1_every=1)
    gan.policy.scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    before = [p.detach().clone() for p in gan.d.parameters()]
    gan(_batch())
    assert all(torch.equal(a, b) for a, b in zip(before, gan.d.parameters()))
    stats = gan.stats.read()
    assert stats["r1"] == 0.0 and all(np.isfinite(v) for v in stats.values())
    assert gan.policy.scaler.get_scale() < 3e38


def test_r1_with_diffaugment_penalises_the_augmented_batch_d_sees(monkeypatch):
    """With --diffaug the penalty is on the gradient at D's input, the augmented real batch (a leaf that requires
    grad), drawn in the same order as without R1 (z, real, fakes): the noise stream ends where R1 off leaves it."""
    seen = []
    gan = _gan(r1_gamma=1.0, diffaug="translation,cutout")
    real_input_grad = gan.policy.input_grad
    monkeypatch.setattr(gan.policy, "input_grad", lambda out, x: seen.append(x) or real_input_grad(out, x))
    real = gan.policy.prepare_batch(_batch())
    gan.d_step(real)
    (x,) = seen
    assert x.is_leaf and x.requires_grad and x.shape == real.shape and not torch.equal(x.detach(), real)
    off = _gan(diffaug="translation,cutout")
    off.d_step(off.policy.prepare_batch(_batch()))
    assert torch.equal(gan.noise_gen.get_state(), off.noise_gen.get_state())


@pytest.mark.slow
def test_a_compiled_step_with_r1_trains_g_compiled_and_d_eager():
    """A real compiled iteration (G through torch.compile, D eager), R1 on: finite statistics, every weight moved."""
    gan = _gan(compile=True, r1_gamma=1.0, r1_every=1)
    before = [p.detach().clone() for p in [*gan.g.parameters(), *gan.d.parameters()]]
    gan(_batch())
    stats = gan.stats.read()
    assert stats["r1"] > 0 and all(np.isfinite(v) for v in stats.values())
    moved = [not torch.equal(a, b) for a, b in zip(before, [*gan.g.parameters(), *gan.d.parameters()])]
    assert all(moved)
