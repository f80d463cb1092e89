"""Performance features: precision policy, channels-last, frozen D in the G step, EMA, fused Adam, compile."""

from __future__ import annotations

import pytest
import torch

from gantrain.engine.config import ModelConfig
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.models import build_models
from gantrain.engine.gan.precision import PrecisionPolicy
from gantrain.engine.gan.step import make_adam
from gantrain.engine.train.loop import Trainer
from standing_reference import bn_buffers, update_bn_reference

CPU = torch.device("cpu")


def test_prepare_batch_range_dtype_and_format():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 4, 3).contiguous()
    x = PrecisionPolicy(CPU, "off", channels_last=False).prepare_batch(images)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert x[0, 0, 0, 2].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    y = PrecisionPolicy(CPU, "bf16", channels_last=True).prepare_batch(images)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert not y.is_contiguous()


def test_fp16_needs_cuda_and_scaler_only_for_fp16():
    with pytest.raises(ConfigError, match="--amp"):
        PrecisionPolicy(CPU, "fp16")
    assert not PrecisionPolicy(CPU, "bf16").scaler.is_enabled()
    assert PrecisionPolicy(CPU, "bf16").autocast_dtype is torch.bfloat16
    assert PrecisionPolicy(CPU, "off").autocast_dtype is None


def test_channels_last_trainer(tiny_cfg, quiet_console):
    trainer = Trainer(tiny_cfg(channels_last=True, amp="bf16"), console=quiet_console)
    conv = next(m for m in trainer.gan.d.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.gan(next(trainer.loader.epoch(0)))
    stats = trainer.gan.stats.read()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_g_step_computes_no_d_weight_gradients(tiny_cfg, quiet_console):
    trainer = Trainer(tiny_cfg(), console=quiet_console)
    real = trainer.policy.prepare_batch(next(trainer.loader.epoch(0)))
    fake, *_ = trainer.gan.d_step(real)
    d_grads = [p.grad.clone() for p in trainer.gan.d.parameters()]
    trainer.gan.g_step(fake)
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, trainer.gan.d.parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.gan.g.parameters())
    assert all(p.requires_grad for p in trainer.gan.d.parameters()), "D must be unfrozen after the G step"


def test_ema_tracks_generator(tiny_cfg, quiet_console):
    decay = 0.9
    trainer = Trainer(tiny_cfg(ema_decay=decay), console=quiet_console)
    before = [p.detach().clone() for p in trainer.gan.g_ema.parameters()]
    trainer.gan(next(trainer.loader.epoch(0)))
    for ema, old, new in zip(trainer.gan.g_ema.parameters(), before, trainer.gan.g.parameters()):
        torch.testing.assert_close(ema, decay * old + (1 - decay) * new)
    assert not all(torch.equal(e, g) for e, g in zip(trainer.gan.g_ema.parameters(), trainer.gan.g.parameters()))
    assert "generator_ema" in trainer.state_dict()["gan"]


def test_ema_by_images_follows_stylegan2_ada(tiny_cfg, quiet_console):
    """--ema-halflife H --ema-rampup r: after step k (batch B), EMA = beta * EMA + (1 - beta) * G with
    beta = 0.5 ** (B / min(H, r * k * B)) (StyleGAN2-ADA's training loop), worked out here with math."""
    import math

    halflife, rampup, batch = 100, 0.75, 32
    trainer = Trainer(tiny_cfg(ema_halflife=halflife, ema_rampup=rampup), console=quiet_console)
    batches = trainer.loader.epoch(0)
    for k in range(1, 5):  # half-lives 24, 48, 72 images (ramp-up), then 100 (the cap)
        before = [p.detach().clone() for p in trainer.gan.g_ema.parameters()]
        trainer.gan(next(batches))
        beta = math.exp(-math.log(2) * batch / min(halflife, rampup * k * batch))
        for ema, old, new in zip(trainer.gan.g_ema.parameters(), before, trainer.gan.g.parameters()):
            torch.testing.assert_close(ema, beta * old + (1 - beta) * new)
    assert trainer.gan.images_seen == 4 * batch
    assert not all(torch.equal(e, g) for e, g in zip(trainer.gan.g_ema.parameters(), trainer.gan.g.parameters()))


def test_ema_beta_by_images_is_the_same_average_at_any_batch() -> None:
    """Two steps of batch 32 decay the EMA as much as one of batch 64 (no ramp-up): beta(64) = beta(32) ** 2;
    a half-life of H images leaves half the weight after H images; --ema-decay alone is the per-step decay."""
    from gantrain.engine.config import GanConfig

    gan = GanConfig(ema_halflife=10_000)
    assert gan.ema_beta(64, 64) == pytest.approx(gan.ema_beta(32, 32) ** 2, rel=1e-12)
    assert gan.ema_beta(32, 32) ** (10_000 / 32) == pytest.approx(0.5, rel=1e-12)
    assert gan.ema_beta(32, 10 ** 9) == gan.ema_beta(32, 32)  # no ramp-up: the images seen do not matter
    ramped = GanConfig(ema_halflife=10_000, ema_rampup=0.05)
    assert ramped.ema_beta(32, 64_000) == pytest.approx(0.5 ** (32 / 3_200), rel=1e-12)  # 0.05 x 64,000 < 10,000
    assert ramped.ema_beta(32, 400_000) == pytest.approx(0.5 ** (32 / 10_000), rel=1e-12)  # capped
    assert GanConfig(ema_decay=0.99).ema_beta(32, 64_000) == 0.99
    assert (GanConfig().ema_on, GanConfig(ema_decay=0.9).ema_on, gan.ema_on) == (False, True, True)


def test_ema_by_images_resumes_exactly(tiny_cfg, quiet_console):
    """The ramp-up goes on from the checkpoint's images seen: 2 + 2 steps resumed = 4 straight, bit for bit."""
    flat = dict(ema_halflife=100, ema_rampup=0.75, ema_bn="standing", checkpoint_every_steps=2)
    straight = Trainer(tiny_cfg("straight", **flat), console=quiet_console)
    straight.fit()
    Trainer(tiny_cfg("split", **{**flat, "max_steps": 2}), console=quiet_console).fit()
    resumed = Trainer(tiny_cfg("split", **flat), console=quiet_console, resume="auto")
    assert resumed.gan.images_seen == 2 * 32
    resumed.fit()
    for a, b in zip(straight.gan.g_ema.state_dict().values(), resumed.gan.g_ema.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_ramp_resumes_from_the_images_seen_whatever_the_batch(tiny_cfg, quiet_console):
    """2 steps at batch 32 (64 images), resumed at batch 16: the ramp goes on from 64 images (not 2 x 16), and the
    next step's decay is that of 64 + 16 images; images_seen counts without an EMA too."""
    import math

    flat = dict(ema_halflife=100, ema_rampup=0.75)
    Trainer(tiny_cfg("split", **flat, max_steps=2), console=quiet_console).fit()
    resumed = Trainer(tiny_cfg("split", **flat, batch_size=16, max_steps=3), console=quiet_console, resume="auto")
    assert resumed.gan.images_seen == 64 and resumed.gan.images_per_step == 16
    before = [p.detach().clone() for p in resumed.gan.g_ema.parameters()]
    resumed.fit()
    beta = math.exp(-math.log(2) * 16 / min(100, 0.75 * (64 + 16)))
    for ema, old, new in zip(resumed.gan.g_ema.parameters(), before, resumed.gan.g.parameters()):
        torch.testing.assert_close(ema, beta * old + (1 - beta) * new)
    plain = Trainer(tiny_cfg("plain", max_steps=2), console=quiet_console)
    plain.fit()
    assert plain.gan.g_ema is None and plain.gan.images_seen == 64


def test_ema_settings_are_checked_and_said(tiny_cfg):
    with pytest.raises(ConfigError, match="--ema-halflife: must be >= 0 images"):
        tiny_cfg(ema_halflife=-1)
    with pytest.raises(ConfigError, match="--ema-rampup: must be >= 0"):
        tiny_cfg(ema_rampup=-0.5)
    with pytest.raises(ConfigError, match="--ema-rampup: must be a finite number"):
        tiny_cfg(ema_rampup=float("nan"))
    assert tiny_cfg(ema_decay=0.99, ema_halflife=500).without_effect() == [
        "--ema-decay 0.99 (--ema-halflife 500 sets the decay)"]
    assert tiny_cfg(ema_rampup=0.05).without_effect() == ["--ema-rampup 0.05 (no --ema-halflife)"]
    assert tiny_cfg(ema_halflife=500, ema_bn="standing").without_effect() == []
    assert tiny_cfg(ema_bn="standing").without_effect() == [
        "--ema-bn standing (no EMA: --ema-decay and --ema-halflife 0)"]
    assert tiny_cfg(ema_halflife=10_000, ema_rampup=0.05, ema_bn="standing").gan.ema_words() == \
        "EMA half-life 10,000 images, ramp-up 0.05 (standing BN statistics)"


def test_standing_ema_statistics(tiny_cfg, quiet_console, monkeypatch):
    """--ema-bn standing: G and D train exactly as with copied statistics; the EMA G's BatchNorm statistics are
    recomputed for its weights when it is used after a change (not every step), match torch's update_bn, and are
    what checkpoints store."""
    import gantrain.engine.gan.step as step_module

    cfg_copy, cfg_standing = tiny_cfg("copy", ema_decay=0.9), tiny_cfg("standing", ema_decay=0.9, ema_bn="standing")
    copied, standing = Trainer(cfg_copy, console=quiet_console), Trainer(cfg_standing, console=quiet_console)
    calls, real = [], step_module.standing_bn_stats_
    monkeypatch.setattr(step_module, "standing_bn_stats_", lambda *a, **k: calls.append(1) or real(*a, **k))
    batches_copy, batches_standing = copied.loader.epoch(0), standing.loader.epoch(0)
    for i in range(3):
        copied.gan(next(batches_copy))
        standing.gan(next(batches_standing))
        if i == 2:  # what a checkpoint stores, taken before anything else asked for the generator
            saved = standing.gan.state_dict()["generator_ema"]
        standing.gan.generator  # a recompute between steps must not touch training
        assert len(calls) == i + 1
    standing.gan.generator
    assert len(calls) == 3, "no recompute while the EMA weights are unchanged"
    for name in ("g", "d", "g_ema"):
        ours, theirs = getattr(copied.gan, name).parameters(), getattr(standing.gan, name).parameters()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), name
    assert torch.equal(copied.gan.noise_gen.get_state(), standing.gan.noise_gen.get_state())

    assert all(torch.equal(a, b) for a, b in zip(bn_buffers(copied.gan.g_ema), bn_buffers(copied.gan.g)))
    reference = update_bn_reference(standing.gan.g_ema, cfg_standing)
    for ours, theirs, g_own in zip(bn_buffers(standing.gan.generator), bn_buffers(reference),
                                   bn_buffers(standing.gan.g)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, g_own), "G's own running statistics, not the EMA weights' ones"
    assert not standing.gan.generator.training
    # Its own noise, not the run seed's (the sample grid's and the metrics' latents): other statistics.
    in_sample = update_bn_reference(standing.gan.g_ema, cfg_standing, offset=0)
    assert not torch.allclose(bn_buffers(in_sample)[0], bn_buffers(reference)[0])

    for key, value in reference.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6)
    # A checkpoint of --ema-bn copy resumed with standing: its EMA statistics are recomputed, not kept.
    resumed = Trainer(tiny_cfg("resumed", ema_decay=0.9, ema_bn="standing"), console=quiet_console)
    resumed.gan.load_state_dict(copied.gan.state_dict(), "copy.pt", step=3)
    expected = update_bn_reference(copied.gan.g_ema, cfg_standing)
    for ours, theirs in zip(bn_buffers(resumed.gan.generator), bn_buffers(expected)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # The same for images from such a checkpoint (the end-of-run samples from best.pt).
    noise = torch.randn(8, cfg_standing.model.nz, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(standing.gan.sample_from(copied.gan.state_dict(), noise, "copy.pt"),
                                   expected.eval()(noise), rtol=1e-5, atol=1e-5)


def test_standing_statistics_before_the_first_step(tiny_cfg, quiet_console):
    """A fresh run's EMA generator (as G at initialisation) already has statistics of its own weights."""
    trainer = Trainer(tiny_cfg(ema_decay=0.9, ema_bn="standing"), console=quiet_console)
    expected = update_bn_reference(trainer.gan.g, trainer.cfg)
    for ours, theirs in zip(bn_buffers(trainer.gan.generator), bn_buffers(expected)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_ema_bn_mode_is_checked(tiny_cfg):
    with pytest.raises(ConfigError, match="--ema-bn: must be one of copy, standing"):
        tiny_cfg(ema_bn="running")


def test_adam_is_fused_or_foreach():
    g, _ = build_models(ModelConfig(ngf=8, ndf=8), 32, 1)
    fused = make_adam(g.parameters(), 1e-3, (0.5, 0.999), CPU, fused=True)
    plain = make_adam(g.parameters(), 1e-3, (0.5, 0.999), CPU, fused=False)
    assert fused.defaults["fused"] or fused.defaults["foreach"]
    assert plain.defaults["foreach"] and not plain.defaults["fused"]


@pytest.mark.parametrize("preset_name", ["fashion32", "cats128"])
def test_models_compile_without_graph_breaks(preset_name):
    from gantrain.engine.config import preset

    cfg = preset(preset_name)
    cfg.model.ngf = cfg.model.ndf = 4
    g, d = build_models(cfg.model, cfg.data.image_size, cfg.data.channels)
    z = torch.randn(2, cfg.model.nz)
    explain_g = torch._dynamo.explain(g)(z)
    explain_d = torch._dynamo.explain(d)(g(z))
    assert explain_g.graph_break_count == 0 and explain_g.graph_count == 1
    assert explain_d.graph_break_count == 0 and explain_d.graph_count == 1


@pytest.mark.slow
def test_compiled_training_has_no_recompiles_after_warmup(tiny_cfg, quiet_console, tmp_path, monkeypatch):
    """The AMP + channels-last + compile step compiles during its first step and never again."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    trainer = Trainer(tiny_cfg(compile=True, amp="bf16", channels_last=True, batch_size=16), console=quiet_console)
    batches = trainer.loader.epoch(0)
    for _ in range(2):
        trainer.gan(next(batches))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            trainer.gan(next(batches))
    stats = trainer.gan.stats.read()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    torch._dynamo.reset()
