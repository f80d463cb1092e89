"""DiffAugment (gantrain/engine/gan/diffaug.py): each op against a numpy reference fed the same drawn parameters,
gradients, determinism, ranges, dtypes and memory formats, the config field and its wiring into GANStep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gantrain.engine.gan import diffaug as da
from gantrain.engine.state.checkpoint import resumed_config
from gantrain.engine.config import (
    DIFFAUG_OPS,
    GanConfig,
    from_dict,
    load_toml,
    override,
    preset,
    to_toml,
)
from gantrain.engine.errors import ConfigError
from checkpoints import placeholder_state

CL = torch.channels_last


def _images(b=6, c=3, h=32, w=32, seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- numpy references, written from the paper's definitions (not from the module) ----------------------------
def np_brightness(x, b):
    return x + b[:, None, None, None]


def np_saturation(x, s):
    mean = x.mean(axis=1, keepdims=True)
    return (x - mean) * s[:, None, None, None] + mean


def np_contrast(x, c):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * c[:, None, None, None] + mean


def np_translate(x, shift):
    out = np.zeros_like(x)
    h, w = x.shape[2:]
    for n, (dy, dx) in enumerate(shift):
        for i in range(h):
            for j in range(w):
                if 0 <= i - dy < h and 0 <= j - dx < w:
                    out[n, :, i, j] = x[n, :, i - dy, j - dx]
    return out


def np_cutout(x, centre):
    out = x.copy()
    h, w = x.shape[2:]
    ky, kx = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    for n, (cy, cx) in enumerate(centre):
        top, left = cy - ky // 2, cx - kx // 2
        out[n, :, max(top, 0):max(top + ky, 0), max(left, 0):max(left + kx, 0)] = 0
    return out


def np_policy(x, ops, p):
    for op in ops:
        if op == "color":
            x = np_contrast(np_saturation(np_brightness(x, p["brightness"]), p["saturation"]), p["contrast"])
        elif op == "translation":
            x = np_translate(x, p["translation"])
        else:
            x = np_cutout(x, p["cutout"])
    return x


def _np_params(params: da.AugmentParams) -> dict:
    return {k: getattr(params, k).numpy().astype(np.float64 if getattr(params, k).is_floating_point() else np.int64)
            for k in ("brightness", "saturation", "contrast", "translation", "cutout")
            if getattr(params, k) is not None}


# ----- each op against its reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout",
                                    "cutout,translation,color"])
def test_ops_match_the_numpy_reference_for_drawn_parameters(policy: str, channels: int) -> None:
    x = _images(c=channels, seed=1)
    params = da.draw_params(policy, x.shape[0], 32, 32, _gen(5))
    got = da.apply(x, policy, params)
    want = np_policy(x.double().numpy(), policy.split(","), _np_params(params))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    assert torch.equal(got, da.diff_augment(x, policy, _gen(5)))  # draw + apply == diff_augment


def test_apply_refuses_parameters_of_another_policy() -> None:
    params = da.draw_params("color", 2, 8, 8, _gen())
    with pytest.raises(ValueError, match="no parameters drawn for DiffAugment op 'cutout'"):
        da.apply(_images(b=2, h=8, w=8), "color,cutout", params)
    with pytest.raises(ValueError, match="unknown DiffAugment op 'zoom' \\(known: color, translation, cutout\\)"):
        da.apply(_images(b=2, h=8, w=8), "zoom", params)


def test_each_colour_op_alone_matches_its_formula() -> None:
    x = _images(seed=2)
    xn = x.double().numpy()
    b, s, c = torch.tensor([-0.5, 0.49, 0.0, 0.1, -0.2, 0.3]), torch.linspace(0, 1.99, 6), torch.linspace(0.5, 1.49, 6)
    np.testing.assert_allclose(da.brightness(x, b).numpy(), np_brightness(xn, b.double().numpy()), atol=1e-6)
    np.testing.assert_allclose(da.saturation(x, s).numpy(), np_saturation(xn, s.double().numpy()), atol=1e-5)
    np.testing.assert_allclose(da.contrast(x, c).numpy(), np_contrast(xn, c.double().numpy()), atol=1e-5)


def test_saturation_is_the_identity_on_one_channel() -> None:
    x = _images(c=1)
    assert torch.equal(da.saturation(x, torch.full((6,), 1.7)), x)


@pytest.mark.parametrize("size", [32, 64])
def test_translation_and_cutout_at_the_extremes(size: int) -> None:
    """Hand-picked parameters: the largest shifts both ways and cutout squares clipped at every border."""
    r = da.max_shift(size)
    assert r == size // 8
    k = da.cutout_size(size)
    assert k == size // 2
    x = _images(b=4, h=size, w=size, seed=3)
    shift = torch.tensor([[r, r], [-r, -r], [r, -r], [0, 0]])
    np.testing.assert_array_equal(da.translate(x, shift).numpy(), np_translate(x.numpy(), shift.numpy()))
    assert torch.equal(da.translate(x, shift)[3], x[3])
    # shift (r, r): the first r rows and columns are the zeros shifted in, the rest is the image moved down-right
    assert torch.all(da.translate(x, shift)[0, :, :r] == 0) and torch.all(da.translate(x, shift)[0, :, :, :r] == 0)
    assert torch.equal(da.translate(x, shift)[0, :, r:, r:], x[0, :, :-r, :-r])

    centre = torch.tensor([[0, 0], [size, size], [size // 2, size // 2], [size - 1, 3]])
    out = da.cutout(x, centre)
    np.testing.assert_array_equal(out.numpy(), np_cutout(x.numpy(), centre.numpy()))
    assert torch.all(out[0, :, : k // 2, : k // 2] == 0) and torch.equal(out[0, :, k // 2:], x[0, :, k // 2:])
    assert torch.all(out[1, :, size - k // 2:, size - k // 2:] == 0)
    assert int((out[2] == 0).sum()) == 3 * k * k  # fully inside: a whole k x k square per channel


# ----- gradients -----------------------------------------------------------------------------------------------
def _grad(fn, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (fn(x) * weight).sum().backward()
    return x.grad


def test_gradients_match_the_analytic_ones() -> None:
    x, w = _images(seed=4), _images(seed=5)  # w: the upstream gradient
    b, s, c = torch.rand(6) - 0.5, torch.rand(6) * 2, torch.rand(6) + 0.5
    assert torch.equal(_grad(lambda t: da.brightness(t, b), x, w), w)  # d(x + b)/dx = 1
    # saturation: d/dx_k sum_j w_j ((x_j - m) s + m) = s w_k + (1 - s) mean_c(w)
    want = s.view(-1, 1, 1, 1) * w + (1 - s.view(-1, 1, 1, 1)) * w.mean(1, keepdim=True)
    torch.testing.assert_close(_grad(lambda t: da.saturation(t, s), x, w), want)
    # contrast: the same with the mean over the whole image
    want = c.view(-1, 1, 1, 1) * w + (1 - c.view(-1, 1, 1, 1)) * w.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(_grad(lambda t: da.contrast(t, c), x, w), want)
    # translation moves the gradient back: the gradient is the upstream one shifted the other way
    shift = torch.tensor([[4, -3], [-4, 4], [0, 1], [2, 2], [-1, 0], [3, -4]])
    assert torch.equal(_grad(lambda t: da.translate(t, shift), x, w), da.translate(w, -shift))
    # cutout: the gradient is zero under the square and the upstream one elsewhere
    centre = torch.tensor([[0, 0], [32, 32], [16, 16], [5, 20], [31, 0], [10, 10]])
    assert torch.equal(_grad(lambda t: da.cutout(t, centre), x, w), da.cutout(w, centre))


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_gradcheck_against_finite_differences(policy: str) -> None:
    x = _images(b=2, c=3, h=8, w=8, seed=6, dtype=torch.float64).requires_grad_(True)
    params = da.draw_params(policy, 2, 8, 8, _gen(7))
    assert torch.autograd.gradcheck(lambda t: da.apply(t, policy, params), (x,))
    x.grad = None
    da.apply(x, policy, params).sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0  # the gradient reaches the input


# ----- determinism and the generator ---------------------------------------------------------------------------
def test_same_generator_state_same_output_other_seeds_differ() -> None:
    x = _images()
    policy = "color,translation,cutout"
    a, b = da.diff_augment(x, policy, _gen(11)), da.diff_augment(x, policy, _gen(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, da.diff_augment(x, policy, _gen(12)))
    g = _gen(11)
    first, second = da.diff_augment(x, policy, g), da.diff_augment(x, policy, g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the stream moves on: fresh draws each call
    state = _gen(3).get_state()
    g = torch.Generator()
    g.set_state(state)
    assert torch.equal(da.diff_augment(x, policy, g), da.diff_augment(x, policy, _gen(3)))  # a restored stream


def test_off_returns_the_input_and_draws_nothing() -> None:
    x, g = _images(), _gen(1)
    before = g.get_state()
    assert da.diff_augment(x, "", g) is x
    assert da.diff_augment(x, (), g) is x
    assert torch.equal(g.get_state(), before)
    assert da.draw_params("", 6, 32, 32, g) == da.AugmentParams()
    assert torch.equal(g.get_state(), before)


def test_draws_happen_in_policy_order() -> None:
    """Parameters are drawn op by op in the policy's order, so the order is part of the random stream."""
    a = da.draw_params("color,cutout", 4, 32, 32, _gen(2))
    b = da.draw_params("cutout,color", 4, 32, 32, _gen(2))
    c = da.draw_params("color", 4, 32, 32, _gen(2))
    assert torch.equal(a.brightness, c.brightness) and not torch.equal(a.brightness, b.brightness)


# ----- ranges, dtypes, memory formats --------------------------------------------------------------------------
def test_parameter_ranges() -> None:
    n = 4096
    p = da.draw_params("color,translation,cutout", n, 32, 32, _gen(9))
    assert p.brightness.dtype == torch.float32 and p.brightness.shape == (n,)
    assert -0.5 <= p.brightness.min() and p.brightness.max() < 0.5
    assert 0 <= p.saturation.min() and p.saturation.max() < 2
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5
    assert p.translation.dtype == torch.int64 and p.translation.shape == (n, 2)
    assert set(p.translation.unique().tolist()) == set(range(-4, 5))  # whole pixels, both extremes reached
    assert p.cutout.shape == (n, 2) and set(p.cutout.unique().tolist()) == set(range(33))  # 0..32 as the reference


@pytest.mark.parametrize("channels, bound", [(1, 3.0), (3, 7.0)])
def test_output_ranges(channels: int, bound: float) -> None:
    """Inputs at the corners of [-1, 1]: brightness stays in [-1.5, 1.5], colour within the documented bound,
    translation and cutout only move values or insert zeros."""
    x = torch.randint(0, 2, (512, channels, 32, 32), generator=_gen(4)).float() * 2 - 1
    p = da.draw_params("color,translation,cutout", 512, 32, 32, _gen(8))
    assert da.brightness(x, p.brightness).abs().max() <= 1.5
    assert da.apply(x, "color", p).abs().max() <= bound
    for policy in ("translation", "cutout"):
        values = set(da.apply(x, policy, p).unique().tolist())
        assert values <= {-1.0, 0.0, 1.0} and 0.0 in values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_dtype_and_memory_format_are_kept(dtype: torch.dtype, fmt: torch.memory_format) -> None:
    x = _images(dtype=dtype).contiguous(memory_format=fmt)
    out = da.diff_augment(x, "color,translation,cutout", _gen(1))
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=fmt)
    ref = da.diff_augment(x.float().contiguous(), "color,translation,cutout", _gen(1))
    # channels-last reductions sum in another order: float32 within rounding, bf16 within its precision
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 0.05)


def test_under_autocast_and_with_channels_last_gradients() -> None:
    x = _images(dtype=torch.bfloat16).contiguous(memory_format=CL).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = da.diff_augment(x, "color,translation,cutout", _gen(2))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


# ----- the config field ----------------------------------------------------------------------------------------
def test_module_and_config_agree_on_the_op_names() -> None:
    assert da.OPS == DIFFAUG_OPS == ("color", "translation", "cutout")


@pytest.mark.parametrize("given, stored", [("", ()), ("none", ()), (" color , cutout ", ("color", "cutout")),
                                           ("translation,color", ("translation", "color")),
                                           ("color,translation,cutout", ("color", "translation", "cutout")),
                                           (["color", "cutout"], ("color", "cutout")), ([], ()), (["none"], ())])
def test_config_normalises_the_policy(given, stored: tuple) -> None:
    """A comma list (a flag, an older config.toml or checkpoint) and a list (a TOML array) give one policy."""
    assert GanConfig(diffaug=given).diffaug == stored
    assert override(preset("fashion32"), {"diffaug": given}).gan.diffaug == stored


@pytest.mark.parametrize("given, message", [
    ("colour", "--diffaug: unknown op 'colour': must be empty (off) or a comma list of color, translation, cutout"),
    ("color,flip", "--diffaug: unknown op 'flip'"),
    ("color,color", "--diffaug: 'color' is listed twice"),
])
def test_config_rejects_unknown_ops_in_one_line(given: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        override(preset("fashion32"), {"diffaug": given})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_round_trips_through_toml(tmp_path) -> None:
    cfg = override(preset("cats64"), {"diffaug": "color,translation,cutout"})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert 'diffaug = ["color", "translation", "cutout"]' in path.read_text()
    assert load_toml(path) == cfg
    assert from_dict({"loss": {"diffaug": "cutout"}}).gan.diffaug == ("cutout",)  # an older file's spelling


def test_resume_reports_a_changed_policy_like_other_loss_settings() -> None:
    saved = override(preset("fashion32"), {"diffaug": "color", "label_smoothing": 0.1})
    now = override(preset("fashion32"), {"diffaug": "color,translation,cutout", "label_smoothing": 0.1})
    state = placeholder_state(1, config=saved.to_dict())
    assert resumed_config(now, state, "last.pt") == ["--diffaug 'color' -> 'color,translation,cutout'"]
    old = saved.to_dict()
    del old["gan"]  # a checkpoint written before the field (and its section): off
    assert resumed_config(override(preset("fashion32"), {"label_smoothing": 0.1}), placeholder_state(1, config=old),
                          "x") == []


def test_run_help_shows_the_flag_and_bad_ops_exit_2(cli, unwrap) -> None:
    result = cli("run", "--help")
    assert result.exit_code == 0
    text = unwrap(result.stdout)
    assert "--diffaug" in text and "Differentiable augmentation (DiffAugment" in text
    bad = cli("run", "--diffaug", "color,zoom", "--dry-run")
    assert bad.exit_code == 2
    assert "--diffaug: unknown op 'zoom'" in unwrap(bad.stderr) and "Traceback" not in bad.output


def test_tune_exposes_and_searches_the_policy(cli, unwrap) -> None:
    from gantrain.tune.space import parse_space

    assert "--diffaug" in cli("tune", "--help").stdout
    space = parse_space('[loss]\ndiffaug = { choice = ["", "color,translation,cutout"] }\n', preset("cats64"), "s")
    assert space.dimensions[0].values == ("", "color,translation,cutout")
    with pytest.raises(ConfigError, match="gan.diffaug = 'zoom': --diffaug: unknown op 'zoom'"):
        parse_space('[loss]\ndiffaug = { choice = ["zoom"] }\n', preset("cats64"), "s")


def test_repeated_flag_and_dry_run(cli, unwrap) -> None:
    result = cli("run", "--diffaug", "color", "--diffaug", "cutout", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "color,cutout" in unwrap(result.stdout)


# ----- the step --------------------------------------------------------------------------------------------------
def _gan(diffaug: str, amp: str = "off", channels_last: bool = False):
    from gantrain.engine.gan.precision import PrecisionPolicy
    from gantrain.engine.gan.step import GANStep

    cfg = override(preset("fashion32"), {"batch_size": 4, "ngf": 8, "ndf": 8, "device": "cpu", "amp": amp,
                                         "channels_last": channels_last, "diffaug": diffaug, "seed": 5})
    device = torch.device("cpu")
    return GANStep.for_config(cfg, device, PrecisionPolicy(device, amp, channels_last))


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=_gen(0))


def test_step_off_draws_only_the_noise(monkeypatch) -> None:
    from gantrain.engine.gan import step as step_module
    from gantrain.engine.gan.sampling import sample_noise

    calls = []
    monkeypatch.setattr(step_module, "diff_augment", lambda *a: calls.append(a) or a[0])
    gan = _gan("")
    gan(_batch())
    expected = torch.Generator().manual_seed(5 * 7919 + 1)
    sample_noise(4, 100, "normal", torch.device("cpu"), expected)
    assert calls == [] and torch.equal(gan.noise_gen.get_state(), expected.get_state())


def test_step_on_augments_every_d_input_with_fresh_draws(monkeypatch) -> None:
    from gantrain.engine.gan import step as step_module

    seen = []
    real_diff_augment = step_module.diff_augment

    def spy(images, policy, generator):
        out = real_diff_augment(images, policy, generator)
        seen.append((images, out, policy, generator))
        return out

    monkeypatch.setattr(step_module, "diff_augment", spy)
    gan = _gan("color,translation,cutout")
    real = gan.policy.prepare_batch(_batch())
    fake, loss_d, *_ = gan.d_step(real)
    assert len(seen) == 2  # the real batch, then the detached fakes
    assert torch.equal(seen[0][0], real) and not seen[1][0].requires_grad and torch.equal(seen[1][0], fake)
    assert all(policy == ("color", "translation", "cutout") and gen is gan.noise_gen for *_, policy, gen in seen)
    loss_g = gan.g_step(fake)
    assert len(seen) == 3 and seen[2][0] is fake and seen[2][1].requires_grad  # G's gradient goes through
    assert not torch.equal(seen[1][1], seen[2][1].detach())  # a fresh draw for the G step
    assert torch.isfinite(loss_d) and torch.isfinite(loss_g)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gan.g.parameters())


def test_step_with_diffaug_is_deterministic_and_differs_from_off() -> None:
    def weights_after_two_steps(diffaug: str) -> list[torch.Tensor]:
        gan = _gan(diffaug)
        for _ in range(2):
            gan(_batch())
        return [p.detach().clone() for p in [*gan.d.parameters(), *gan.g.parameters()]]

    a, b = weights_after_two_steps("color,translation,cutout"), weights_after_two_steps("color,translation,cutout")
    off = weights_after_two_steps("")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, off))


def test_step_with_bf16_channels_last() -> None:
    gan = _gan("color,translation,cutout", amp="bf16", channels_last=True)
    gan(_batch())
    assert all(torch.isfinite(p).all() for p in gan.d.parameters())


def test_tunes_baseline_trial_includes_a_searched_policy() -> None:
    """The baseline trial (the config's own values) is kept when the space searches --diffaug, in the space's own
    spelling, whether the space lists comma strings or arrays."""
    from gantrain.tune.space import parse_space

    for space_text in ('[gan]\ndiffaug = { choice = ["", "color,translation,cutout"] }\n',
                       '[gan]\ndiffaug = { choice = [[], ["color", "translation", "cutout"]] }\n'):
        space = parse_space(space_text, preset("cats64"), "s")
        values = [v for v in space.dimensions[0].values]
        assert space.baseline_point(preset("cats64")) == {"diffaug": values[0]}
        assert space.baseline_point(preset("cats64-diffaug")) == {"diffaug": values[1]}
    narrow = parse_space('[gan]\ndiffaug = { choice = ["color"] }\n', preset("cats64"), "s")
    assert narrow.baseline_point(preset("cats64")) is None  # its policy is not in the space
