"""Quality metrics: the formulas against references (scipy, known cases), the extractors, evaluation of
generators and checkpoints, tracking during training, and the CLI.

Tests that need the FashionMNIST extractor share one fit per session (conftest ``fashion_extractor``) and
are marked slow; every test writes the metrics cache only into the session's cache folder, never ``~``.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from gantrain.engine.config import override, preset
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.models import build_models
from gantrain.engine.gan.sampling import Latent
from gantrain.engine.metrics import METRIC_KEYS, Evaluator, ensure_extractor, evaluate_generator, parse_dataset, formulas as stats
from gantrain.engine.metrics.cache import cache_dir
from gantrain.engine.metrics.evaluate import compare, extract, load_reference
from gantrain.engine.metrics.reference import load_split
from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.train.loop import Trainer
from checkpoints import flattened
from standing_reference import update_bn_reference


def _random_covariance(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.standard_normal((dim, rank or 2 * dim))
    return factor @ factor.T / factor.shape[1]


# ----- matrix square root and Fréchet distance -----------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 16, 128])
def test_sqrtm_psd_matches_scipy(dim: int) -> None:
    rng = np.random.default_rng(dim)
    sigma = _random_covariance(rng, dim)
    ours = stats.sqrtm_psd(sigma)
    np.testing.assert_allclose(ours, scipy.linalg.sqrtm(sigma).real, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours @ ours, sigma, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dim, rank", [(8, None), (64, None), (128, None), (32, 10)])
def test_trace_sqrt_product_matches_scipy(dim: int, rank: int | None) -> None:
    """tr((S1 S2)^1/2) via two symmetric eigendecompositions equals scipy's general sqrtm of the product,
    including rank-deficient covariances (fewer samples than dimensions)."""
    rng = np.random.default_rng(dim + (rank or 0))
    s1, s2 = _random_covariance(rng, dim, rank), _random_covariance(rng, dim, rank)
    reference = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert stats.trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_frechet_distance_matches_scipy_formula_and_is_zero_for_itself() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3000, 32)), rng.standard_normal((3000, 32)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = stats.mean_and_covariance(a), stats.mean_and_covariance(b)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert stats.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussians_has_the_closed_form() -> None:
    """N(0, I) vs N(m, 4I) in d dims: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d."""
    dim, shift = 10, np.full(10, 0.5)
    fd = stats.frechet_distance(np.zeros(dim), np.eye(dim), shift, 4 * np.eye(dim))
    assert fd == pytest.approx(dim * 0.25 + dim)


# ----- KID, precision/recall, classifier score -----------------------------------------------------------
def test_kid_is_unbiased_on_identical_distributions() -> None:
    """Over many independent pairs of samples of one distribution, KID averages to 0 within its standard error
    (the biased estimator, with the kernel diagonal, would sit clearly above 0) and goes negative at times."""
    rng = np.random.default_rng(1)
    values = [stats.kernel_inception_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)),
                                              subsets=5, subset_size=200, seed=i)[0] for i in range(30)]
    standard_error = np.std(values) / np.sqrt(len(values))
    assert abs(np.mean(values)) < 3 * standard_error
    assert min(values) < 0 < max(values)
    shifted = stats.kernel_inception_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)) + 0.3,
                                              subsets=5, subset_size=200)[0]
    assert shifted > 20 * standard_error


def test_kid_reports_mean_and_spread_over_subsets() -> None:
    rng = np.random.default_rng(2)
    mean, std = stats.kernel_inception_distance(rng.standard_normal((500, 8)), rng.standard_normal((500, 8)) + 1,
                                                subsets=10, subset_size=100)
    assert mean > 0 and 0 < std < mean


def test_precision_recall_identical_and_disjoint_sets() -> None:
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 8))
    assert stats.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert stats.precision_recall(real, far) == (0.0, 0.0)


def test_precision_recall_separate_fidelity_from_diversity() -> None:
    """Dropping half of the real modes keeps precision where full coverage has it and halves recall."""
    rng = np.random.default_rng(4)
    centres = np.repeat(np.eye(8) * 20, 100, axis=0)  # 8 well separated modes, 100 points each
    real = centres + rng.standard_normal(centres.shape)
    full = centres[::2] + rng.standard_normal((400, 8))  # every mode, 50 points each
    half = centres[:400] + rng.standard_normal((400, 8))  # only the first 4 modes
    (precision_full, recall_full), (precision_half, recall_half) = (stats.precision_recall(real, full),
                                                                    stats.precision_recall(real, half))
    assert precision_half > 0.8 and precision_full > 0.8  # k-NN balls never cover a finite sample's whole mode
    assert recall_full > 0.8
    assert 0.35 < recall_half < 0.55 and recall_half < 0.6 * recall_full


def test_classifier_score_and_histogram() -> None:
    confident = torch.eye(10).repeat(50, 1)  # each class equally often, predicted with certainty
    assert stats.classifier_score(confident) == pytest.approx(10.0, rel=1e-6)
    collapsed = torch.zeros(500, 10)
    collapsed[:, 3] = 1
    assert stats.classifier_score(collapsed) == pytest.approx(1.0, rel=1e-6)
    assert stats.class_histogram(collapsed)[3] == 1.0
    np.testing.assert_allclose(stats.class_histogram(confident), 0.1)


# ----- configuration, cache location, Inception availability --------------------------------------------
def test_eval_config_fields_validate() -> None:
    cfg = override(preset("fashion32"), {"eval_every": 2, "eval_samples": 500})
    assert (cfg.eval.eval_every, cfg.eval.eval_samples) == (2, 500)
    assert preset("fashion32").eval.eval_every == 0
    with pytest.raises(ConfigError, match="--eval-every"):
        override(preset("fashion32"), {"eval_every": -1})
    with pytest.raises(ConfigError, match="--eval-samples"):
        override(preset("fashion32"), {"eval_samples": 10})


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GANTRAIN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gantrain" / "metrics"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "gantrain" / "metrics"
    monkeypatch.setenv("GANTRAIN_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_parse_dataset(tmp_path: Path) -> None:
    assert parse_dataset("mnist", str(tmp_path)).root == tmp_path
    folder = parse_dataset(f"folder:{tmp_path}", channels=1)
    assert (folder.dataset, folder.root, folder.channels, folder.task) == ("folder", tmp_path, 1, "rotation")
    for bad in ("cifar", "folder:"):
        with pytest.raises(ConfigError, match="--dataset"):
            parse_dataset(bad)


# ----- an image-folder extractor (self-supervised rotation), on a tiny synthetic folder -------------------
def _write_faces(folder: Path, count: int) -> Path:
    """Images with an up/down structure (bright top, dark bottom, a random blob) that rotations change."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = np.zeros((64, 64, 3), np.uint8)
        image[:24] = 200
        y, x = rng.integers(30, 56, size=2)
        image[y - 4 : y + 4, x - 4 : x + 4] = rng.integers(50, 255, size=3)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def test_folder_extractor_learns_rotations_and_evaluates(tmp_path: Path, quiet_console) -> None:
    spec = parse_dataset(f"folder:{_write_faces(tmp_path / 'faces', 25)}", channels=3)
    extractor = ensure_extractor(spec, cache=tmp_path / "cache", epochs=20, console=quiet_console, quiet=True)
    assert extractor.fitted_now and extractor.info["task"] == "rotation"
    assert extractor.info["train_images"] == 20 and extractor.info["test_accuracy"] > 0.5  # chance is 0.25
    assert not ensure_extractor(spec, cache=tmp_path / "cache", quiet=True).fitted_now

    reference = load_reference(spec, cache=tmp_path / "cache", quiet=True)
    images = load_split(spec, "test").images
    features, probs = extract(reference.extractor, iter([images]), len(images), "test", quiet=True)
    assert features.shape == (5, 128) and probs.shape == (5, 4, 4)  # all four rotations of each image
    values = compare(features, probs, reference)
    assert values["fd"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 <= values["classifier_score"] <= 4.0
    assert set(k for k in values if k.startswith("hist_")) == {"hist_0deg", "hist_90deg", "hist_180deg", "hist_270deg"}


def test_real_features_follow_the_extractor_weights(tmp_path: Path) -> None:
    """A refit (--force, other --epochs) or an edited cache file puts other weights under the same cache name; the
    real features must then be those of the new weights, computed here directly with the new network, never the
    cached ones of the old weights (which would make every FD a distance between two feature spaces)."""
    spec = parse_dataset(f"folder:{_write_faces(tmp_path / 'faces', 25)}", channels=3)
    cache = tmp_path / "cache"
    first = ensure_extractor(spec, cache=cache, epochs=20, quiet=True)
    old_real = load_reference(spec, cache=cache, quiet=True).real.features
    refit = ensure_extractor(spec, cache=cache, epochs=25, force=True, quiet=True)
    assert refit.path == first.path and refit.weights_sha256 != first.weights_sha256
    images = load_split(spec, "test").images
    for extractor in (refit, ensure_extractor(spec, cache=cache, quiet=True)):  # as fitted, and as loaded again
        assert extractor.weights_sha256 == refit.weights_sha256
    direct = refit.net.features_and_logits(images.float() / 127.5 - 1.0)[0].float()
    new_real = load_reference(spec, cache=cache, quiet=True).real.features
    torch.testing.assert_close(new_real, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(new_real, old_real, atol=1e-3)
    assert len(list((cache / "real").glob("*.pt"))) == 2  # one per weights

    state = torch.load(refit.path, weights_only=True)  # one weight changed by hand in the cache file
    name = next(k for k, v in state["weights"].items() if v.is_floating_point())
    state["weights"][name] = state["weights"][name] + 0.5
    torch.save(state, refit.path)
    edited = ensure_extractor(spec, cache=cache, quiet=True)
    assert not edited.fitted_now and edited.weights_sha256 not in (first.weights_sha256, refit.weights_sha256)
    edited_real = load_reference(spec, cache=cache, quiet=True).real.features
    torch.testing.assert_close(edited_real, edited.net.features_and_logits(images.float() / 127.5 - 1.0)[0].float(),
                               rtol=1e-5, atol=1e-5)


# ----- the FashionMNIST extractor (one fit per session) -------------------------------------------------
@pytest.mark.slow
def test_fashion_extractor_fit_reaches_90_percent(fashion_extractor) -> None:
    extractor, fit_output = fashion_extractor
    assert extractor.info["test_accuracy"] >= 0.90
    assert extractor.info["train_images"] == 60000 and len(extractor.info["train_sha256"]) == 64
    assert extractor.path.is_file() and extractor.path.parent.name == "extractors"
    if extractor.fitted_now:  # fitted in this session (not found in the cache): its progress bar was shown
        assert "fit extractor" in fit_output


@pytest.mark.slow
def test_fd_grows_monotonically_with_noise(fashion_extractor, fashion_raw: Path, train_root: Path) -> None:
    """Real test images in the generated role, corrupted by more and more Gaussian noise: FD rises every time."""
    extractor, _ = fashion_extractor
    spec = parse_dataset("fashion-mnist", str(train_root))
    reference = load_reference(spec, cache=extractor.path.parent.parent, quiet=True)
    clean = load_split(spec, "test").images[:1000].float().mul(2 / 255).sub(1)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    distances = []
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        features, _ = reference.extractor((clean + sigma * noise).clamp(-1, 1))
        mean, covariance = stats.mean_and_covariance(features)
        distances.append(stats.frechet_distance(mean, covariance, reference.real.mean, reference.real.covariance))
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > 10 * distances[0], distances


@pytest.mark.slow
def test_evaluate_generator_contract(fashion_extractor, tiny_cfg, capsys) -> None:
    """The tune objective: metric keys, no change to G (mode, BatchNorm statistics), quiet off the main thread."""
    cfg = tiny_cfg("unused")
    torch.manual_seed(0)
    generator, _ = build_models(cfg.model, cfg.data.image_size, cfg.data.channels)
    generator.train()
    buffers = {k: v.clone() for k, v in generator.state_dict().items()}
    found: dict = {}
    worker = threading.Thread(target=lambda: found.update(evaluate_generator(generator, cfg, num_samples=300)))
    worker.start()
    worker.join()
    assert set(METRIC_KEYS) <= found.keys() and all(np.isfinite(found[k]) for k in METRIC_KEYS)
    assert found["fd"] > 0 and 0 <= found["precision"] <= 1 and 1 <= found["classifier_score"] <= 10
    assert generator.training
    for key, value in generator.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert "generated features" not in capsys.readouterr().err  # quiet in a worker thread
    again = evaluate_generator(generator, cfg, num_samples=300, quiet=True)
    assert again == found  # fixed noise and subsets: the same generator scores the same


@pytest.mark.slow
def test_training_with_eval_every(fashion_extractor, tiny_cfg, quiet_console) -> None:
    """Metrics every epoch land in metrics.jsonl, metrics.png and best.pt, and leave training bit-identical."""
    cfg = tiny_cfg("eval", limit=256, max_steps=16, eval_every=1, eval_samples=100)  # batch 32: 2 epochs of 8
    trainer = Trainer(cfg, console=quiet_console)
    trainer.fit()
    run = cfg.run_dir
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"fd"' in line]
    assert [(r["step"], r["epoch"]) for r in evals] == [(8, 1), (16, 2)]
    assert all(set(METRIC_KEYS) <= r.keys() and r["eval_samples"] == 100 for r in evals)
    best = min(evals, key=lambda r: r["fd"])
    assert evals[-1]["best_fd"] == best["fd"]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["position"]["step"] == best["step"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["quality"]["best_fd"] == \
        pytest.approx(best["fd"], abs=1e-6)
    assert (run / "metrics.png").is_file()
    assert trainer.last_eval["step"] == 16

    plain = Trainer(tiny_cfg("plain", limit=256, max_steps=16), console=quiet_console)
    plain.fit()
    for key, value in plain.gan.g.state_dict().items():
        assert torch.equal(value, trainer.gan.g.state_dict()[key]), key


@pytest.mark.slow
def test_a_run_that_ends_between_evaluations_evaluates_its_last_step(fashion_extractor, tiny_cfg,
                                                                    quiet_console) -> None:
    """Before: a run whose last step fell between evaluations (--max-steps mid-epoch, a cadence that does not
    divide the run) ended unmeasured, so best.pt and the final samples could be an older, worse step's (a user's
    run: "final samples from best.pt (step 1875, FD 2.47)" while the last step measured 1.40). Now the last step is
    evaluated, once, and best.pt, last.pt's best FD and the final samples follow the lowest FD of them all."""
    cfg = tiny_cfg("end", limit=256, max_steps=12, eval_every=1, eval_samples=100, samples_from_best=True)
    trainer = Trainer(cfg, console=quiet_console)  # batch 32: 8 steps an epoch, so the run ends mid-epoch 2
    trainer.fit()

    def evals() -> list[dict]:
        lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"fd"' in line]

    assert [(r["step"], r["epoch"]) for r in evals()] == [(8, 1), (12, 1.5)]
    best = min(evals(), key=lambda r: r["fd"])
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "best.pt")["position"]["step"] == best["step"]
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["quality"]["best_fd"] == \
        pytest.approx(best["fd"], abs=1e-6)
    log_text = (cfg.run_dir / "train.log").read_text()
    assert "evaluating the last step (12): the run ended between its evaluations" in log_text
    assert ("final samples from the last step (12)" if best["step"] == 12 else
            "final samples from checkpoints/best.pt (step 8") in log_text
    # resumed to an epoch's end: step 12 is not measured again, the end (an epoch end) once
    Trainer(tiny_cfg("end", limit=256, max_steps=16, eval_every=1, eval_samples=100, samples_from_best=True),
            console=quiet_console, resume="auto").fit()
    assert [r["step"] for r in evals()] == [8, 12, 16]
    assert (cfg.run_dir / "train.log").read_text().count("evaluating the last step") == 1
    # a cadence by steps that does not divide the run; a checkpoint due at the last step is saved before the end's
    # evaluation, and saved again when that evaluation is the best, so last.pt holds the best FD
    steps = tiny_cfg("steps", limit=256, max_steps=12, eval_every_steps=5, eval_samples=100,
                     checkpoint_every_steps=6)
    Trainer(steps, console=quiet_console).fit()
    lines = (steps.run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if '"fd"' in line]
    assert [r["step"] for r in evals] == [5, 10, 12]
    best = min(evals, key=lambda r: r["fd"])
    assert best["step"] == 12  # (deterministic: the case where last.pt's best FD was stale)
    assert load_checkpoint(steps.run_dir / "checkpoints" / "last.pt")["quality"]["best_fd"] == \
        pytest.approx(best["fd"], abs=1e-6)
    assert load_checkpoint(steps.run_dir / "checkpoints" / "best.pt")["position"]["step"] == 12


@pytest.mark.slow
def test_training_with_standing_ema_statistics(fashion_extractor, tiny_cfg, quiet_console) -> None:
    """--ema-bn standing through a whole run: the evaluated generator, best.pt and last.pt hold statistics
    recomputed for their own EMA weights (torch's update_bn on the documented noise), not G's."""
    cfg = tiny_cfg("standing", limit=256, max_steps=16, eval_every=1, eval_samples=100, ema_decay=0.9,
                   ema_bn="standing", samples_from_best=True)
    trainer = Trainer(cfg, console=quiet_console)
    trainer.fit()
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(cfg.run_dir / "checkpoints" / name)["gan"]
        reference = update_bn_reference(trainer.gan.g_ema, cfg, state=state["generator_ema"])
        for key, value in reference.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(state["generator_ema"][key], value, rtol=1e-5, atol=1e-6)
                assert not torch.allclose(state["generator_ema"][key], state["generator"][key]), key


@pytest.mark.slow
def test_best_fd_survives_resume(fashion_extractor, tiny_cfg, quiet_console) -> None:
    first = Trainer(tiny_cfg("resume", limit=256, max_steps=8, eval_every=1, eval_samples=100), console=quiet_console)
    first.fit()
    resumed = Trainer(tiny_cfg("resume", limit=256, max_steps=16, eval_every=1, eval_samples=100),
                      console=quiet_console, resume="auto")
    assert resumed.best_fd == first.best_fd and resumed.tracker.best_fd == first.best_fd
    resumed.fit()
    evals = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines() if '"fd"' in line]
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[1]["best_fd"] == min(r["fd"] for r in evals)


@pytest.mark.slow
def test_a_resume_that_measures_otherwise_measures_best_pt_again(fashion_extractor, tiny_cfg, quiet_console) -> None:
    """best.pt's FD of 100 samples does not compare with FDs of 300 (the FD's bias falls with the sample count):
    a resume with --eval-samples 300 measures best.pt again with 300 (the reference below: best.pt's generator
    loaded and evaluated directly), says so in one line, and later evaluations must beat that. A resume as
    measured before keeps the stored FD; a checkpoint from before the measurement was stored is measured again."""
    from gantrain.engine.outputs.generate import load_generator
    from gantrain.engine.state.checkpoint import atomic_save, sealed

    first = Trainer(tiny_cfg("m", limit=256, max_steps=8, eval_every=1, eval_samples=100), console=quiet_console)
    first.fit()
    checkpoints = first.run_dir / "checkpoints"
    measured_by = {"extractor_weights_sha256": fashion_extractor[0].weights_sha256, "eval_samples": 100,
                   "eval_seed": 0}
    assert load_checkpoint(checkpoints / "last.pt")["quality"]["best_fd_measured_by"] == measured_by

    same = Trainer(tiny_cfg("m", limit=256, max_steps=16, eval_every=1, eval_samples=100), console=quiet_console,
                   resume="auto")
    assert same.tracker.best_fd == first.best_fd  # the same measurement: kept as stored, not measured again
    rng_as_resumed = torch.get_rng_state()  # the global RNG stream once a resume is built, nothing measured again
    same.close()
    assert "resume: best.pt's FD" not in (first.run_dir / "train.log").read_text()

    cfg = tiny_cfg("m", limit=256, max_steps=16, eval_every=1, eval_samples=300)
    resumed = Trainer(cfg, console=quiet_console, resume="auto")
    # measuring best.pt again builds a network, but draws nothing from the run's RNG stream
    assert torch.equal(torch.get_rng_state(), rng_as_resumed)
    generator, _ = load_generator(checkpoints / "best.pt")
    expected = Evaluator.for_config(cfg, quiet=True).evaluate(generator, Latent.of(cfg), num_samples=300,
                                                              seed=0).values["fd"]
    assert resumed.tracker.best_fd == pytest.approx(expected, rel=1e-6) and expected != first.best_fd
    resumed.fit()
    log_text = (first.run_dir / "train.log").read_text()
    assert (f"resume: best.pt's FD {first.best_fd:.4g} was measured with --eval-samples 100 (now 300); measured "
            f"again as this run measures: FD {expected:.4g}") in log_text
    last = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines() if '"fd"' in line][-1]
    assert last["step"] == 16 and last["best_fd"] == pytest.approx(min(expected, last["fd"]), abs=1e-6)
    assert load_checkpoint(checkpoints / "last.pt")["quality"]["best_fd_measured_by"] == \
        {**measured_by, "eval_samples": 300}

    state = flattened(load_checkpoint(checkpoints / "last.pt"))  # as a checkpoint from before the measurement
    del state["best_fd_measured_by"]  # was stored: version 1, flat
    atomic_save(sealed(state, version=1), checkpoints / "last.pt")
    legacy = Trainer(tiny_cfg("m", limit=256, max_steps=24, eval_every=1, eval_samples=300), console=quiet_console,
                     resume="auto")
    best_now = load_generator(checkpoints / "best.pt")[0]
    assert legacy.tracker.best_fd == pytest.approx(
        Evaluator.for_config(cfg, quiet=True).evaluate(best_now, Latent.of(cfg), num_samples=300, seed=0).values["fd"],
        rel=1e-6)
    legacy.fit()
    assert "was measured by a checkpoint that does not record how" in (first.run_dir / "train.log").read_text()

    (checkpoints / "best.pt").unlink()  # nothing to measure again: the next evaluation starts afresh
    gone = Trainer(tiny_cfg("m", limit=256, max_steps=32, eval_every=1, eval_samples=200), console=quiet_console,
                   resume="auto")
    assert gone.tracker.best_fd is None
    gone.close()
    same_but_gone = Trainer(tiny_cfg("m", limit=256, max_steps=32, eval_every=1, eval_samples=300),
                            console=quiet_console, resume="auto")  # measured as stored, yet best.pt is gone
    assert same_but_gone.tracker.best_fd is None
    same_but_gone.close()
    assert ("was measured as this run measures, and best.pt cannot be measured again (there is no best.pt)"
            in (first.run_dir / "train.log").read_text())
    assert ("was measured with --eval-samples 300 (now 200), and best.pt cannot be measured again (there is no "
            "best.pt): the next evaluation starts the comparison afresh") in (first.run_dir / "train.log").read_text()


# ----- the CLI --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_eval_table_and_json(fashion_extractor, trained_run: Path, cli, unwrap, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = cli("eval", trained_run / "checkpoints" / "last.pt", "-n", "300", "--json", out)
    assert result.exit_code == 0, result.output
    text = unwrap(result.output)
    for label in ("Fréchet distance (FD)", "KID (mean ± std)", "precision", "recall", "density", "coverage",
                  "classifier score", "Inception FID", "not requested (--inception)", "t-shirt"):
        assert label in text, label
    report = json.loads(out.read_text())
    assert report["mode"] == "generator" and report["step"] == 6 and report["num_generated"] == 300
    assert set(METRIC_KEYS) <= report["metrics"].keys() and report["inception_fid"] is None
    assert report["inception"] is None and "--inception" in report["inception_note"]
    assert report["extractor"]["weights_sha256"] == fashion_extractor[0].weights_sha256  # which weights scored it
    assert sum(report["class_histogram"].values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_cli_eval_real_vs_real_is_the_floor(fashion_extractor, train_root: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    result = cli("eval", "--real-vs-real", "--dataset", "fashion-mnist", "--data-root", train_root, "-n", "1000",
                 "--json", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["fd"] < 1.0 and abs(metrics["kid_mean"]) < 0.01
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8  # k-NN balls never cover a finite sample fully


def test_cli_eval_errors_are_one_line(cli, tmp_path: Path) -> None:
    result = cli("eval")
    assert result.exit_code == 2 and "CHECKPOINT" in result.output and "Traceback" not in result.output
    result = cli("eval", tmp_path / "missing.pt")
    assert result.exit_code == 1 and "no checkpoint" in result.output
    result = cli("metrics", "fit-extractor", "--dataset", "cifar")
    assert result.exit_code == 2 and "--dataset" in result.output


@pytest.mark.slow
def test_cli_fit_extractor_finds_the_cached_one(fashion_extractor, train_root: Path, cli, unwrap) -> None:
    extractor, _ = fashion_extractor
    result = cli("metrics", "fit-extractor", "--dataset", "fashion-mnist", "--data-root", train_root,
                 "--metrics-cache", extractor.path.parent.parent)
    assert result.exit_code == 0, result.output
    assert "cached" in unwrap(result.output) and "accuracy" in result.output


def test_evaluator_needs_real_data_with_an_extractor(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="synthetic"):
        Evaluator.for_config(tiny_cfg("x", dataset="synthetic"))


def test_tests_never_use_the_home_cache() -> None:
    assert cache_dir() != Path.home() / ".cache" / "gantrain" / "metrics"  # conftest points it elsewhere


# ----- an extractor near chance is not used for scores ----------------------------------------------------
def test_check_usable_thresholds_worked_out_by_hand(tmp_path: Path) -> None:
    from gantrain.engine.metrics.extractor import Extractor, ExtractorNearChance, check_usable

    def extractor(accuracy: float, classes: int, targets: int) -> Extractor:
        info = {"test_accuracy": accuracy, "class_names": [str(i) for i in range(classes)], "test_targets": targets,
                "label": "folder-x-3ch", "task": "rotation"}
        return Extractor(None, info, tmp_path / "x.pt")

    # 4 rotations, 20 held-out targets: chance 0.25, 3 standard errors = 3 * sqrt(0.25 * 0.75 / 20) = 0.2905
    check_usable(extractor(0.55, 4, 20))
    with pytest.raises(ExtractorNearChance, match=r"25\.0% rotation accuracy on 20 held-out targets, near chance"):
        check_usable(extractor(0.25, 4, 20))
    with pytest.raises(ExtractorNearChance, match=r"54\.0% needed"):  # 0.25 + 0.2905 = 0.5405
        check_usable(extractor(0.54, 4, 20))
    # 10 classes, 10000 targets: the 10-point margin decides (3 standard errors are 0.009): 0.2 needed
    check_usable(extractor(0.2, 10, 10000))
    with pytest.raises(ExtractorNearChance, match="--metrics-cache"):
        check_usable(extractor(0.19, 10, 10000))


def _write_noise(folder: Path, count: int) -> Path:
    """Images of pure noise: no up or down, so no rotation classifier can beat chance on them."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_near_chance_extractor_is_refused_for_scores(tmp_path: Path, cli, unwrap) -> None:
    from gantrain.engine.metrics.extractor import ExtractorNearChance

    folder = _write_noise(tmp_path / "noise", 30)
    spec = parse_dataset(f"folder:{folder}", channels=3)
    extractor = ensure_extractor(spec, cache=tmp_path / "cache", epochs=2, quiet=True)
    assert extractor.info["test_targets"] == 24 and extractor.info["test_accuracy"] < 0.55
    with pytest.raises(ExtractorNearChance):
        load_reference(spec, cache=tmp_path / "cache", quiet=True)
    result = cli("eval", "--real-vs-real", "--dataset", f"folder:{folder}", "-n", "100",
                 "--metrics-cache", tmp_path / "cache")
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert "near chance" in unwrap(result.output) and "Traceback" not in result.output
    fit = cli("metrics", "fit-extractor", "--dataset", f"folder:{folder}", "--metrics-cache", tmp_path / "cache")
    assert fit.exit_code == 1 and "near chance" in unwrap(fit.output) and "accuracy" in unwrap(fit.output)


@pytest.mark.slow
def test_samples_from_best(fashion_extractor, tiny_cfg, quiet_console, tmp_path: Path) -> None:
    """--samples-from-best: final.png shows best.pt's (EMA) generator on the fixed noise, not the last step's, and
    says so in the log; the weights trained are untouched."""
    from gantrain.engine.gan.sampling import fixed_noise
    from gantrain.engine.outputs.images import save_grid

    cfg = tiny_cfg("best", limit=256, max_steps=24, eval_every=1, eval_samples=100, samples_from_best=True,
                   ema_decay=0.9)
    trainer = Trainer(cfg, console=quiet_console)
    last_g = {k: v.clone() for k, v in trainer.gan.g.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(v, last_g[k]) for k, v in trainer.gan.g.state_dict().items())
    best_state = load_checkpoint(cfg.run_dir / "checkpoints" / "best.pt")
    log_text = (cfg.run_dir / "train.log").read_text()
    best_step = best_state["position"]["step"]
    if best_step == trainer.step:  # (before: "best.pt (step 24) rather than the last step (24)")
        assert f"final samples from the last step ({trainer.step}), which is also best.pt's (FD " in log_text
    else:
        assert f"final samples from checkpoints/best.pt (step {best_step}, FD " in log_text

    def grid_of(state_key: str, state: dict, name: str) -> np.ndarray:
        g, _ = build_models(cfg.model, cfg.data.image_size, cfg.data.channels, "aten")
        g.load_state_dict(state["gan"][state_key])
        with torch.no_grad():
            images = g.eval()(fixed_noise(cfg.model.nz, cfg.loss.noise, cfg.run.seed, torch.device("cpu")))
        return np.asarray(Image.open(save_grid(images, tmp_path / name)))

    final = np.asarray(Image.open(cfg.run_dir / "final.png"))
    assert np.abs(final.astype(int) - grid_of("generator_ema", best_state, "best.png")).max() <= 1
    last_state = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    if best_step != last_state["position"]["step"]:
        assert np.abs(final.astype(int) - grid_of("generator_ema", last_state, "last.png")).max() > 1


@pytest.mark.slow
@pytest.mark.parametrize("train_px", [64, 128])
def test_a_perfect_generator_scores_at_the_floor_at_every_training_size(fashion_extractor, fashion_raw: Path,
                                                                        train_px: int) -> None:
    """5,000 training images in a generator's role, made at ``train_px`` as the loader makes them: FD, KID and
    recall as at the metric's own size (32 px), the train-vs-test floor. Before real images took the generator's
    road, a perfect 64-px generator was charged an FD of 1.4 and lost a third of its recall."""
    from gantrain.engine.data.pixels import to_unit
    from gantrain.engine.data.sources import load_images
    from gantrain.engine.metrics.generated import prepare_generated
    from gantrain.engine.metrics.reference import DatasetSpec

    root = fashion_raw.parent.parent

    def score(spec: DatasetSpec, px: int) -> dict[str, float]:
        reference = load_reference(spec, quiet=True)
        images = to_unit(load_images("fashion-mnist", str(root), px, 1, limit=5000))
        batches = (prepare_generated(chunk, spec) for chunk in images.split(500))
        return compare(*extract(reference.extractor, batches, len(images), "perfect", quiet=True), reference)

    floor = score(DatasetSpec("fashion-mnist", root, 1, train_px=32), 32)
    perfect = score(DatasetSpec("fashion-mnist", root, 1, train_px=train_px), train_px)
    assert perfect["fd"] <= 1.5 * floor["fd"] + 0.01, (perfect, floor)
    assert perfect["kid_mean"] <= floor["kid_mean"] + 0.001 and perfect["recall"] >= floor["recall"] - 0.02
    direct = score(DatasetSpec("fashion-mnist", root, 1), train_px)  # the old road: real images straight to 32 px
    assert direct["fd"] > 10 * floor["fd"] and direct["recall"] < floor["recall"] - 0.15


def test_small_samples_are_named_and_a_kid_spread_over_identical_subsets_is_not_zero() -> None:
    """Worked by hand: 100 images in 128-d features make singular covariances (rank <= 99); KID subsets of 1000
    over sets of 100 and 300 are 100 images, the whole of one set; with both whole the spread is not measured
    (NaN), and its mean is then the one unbiased MMD^2 of the two sets."""
    rng = np.random.default_rng(3)
    fake, real = rng.standard_normal((100, 128)), rng.standard_normal((300, 128)) + 0.1
    notes = stats.sample_size_warnings(100, 300, 128, 1000, "test features")
    assert len(notes) == 2
    assert notes[0].startswith("FD in test features from 100 generated and 300 real images in 128-d features")
    assert notes[1] == "KID in test features: subsets of 100 images instead of 1000; its spread is underestimated"
    assert stats.sample_size_warnings(100, 100, 128, 1000)[1] == (
        "KID: subsets of 100 images instead of 1000; its spread is not measured (every subset is both whole sets)")
    assert stats.sample_size_warnings(5000, 10000, 128, 1000) == []
    assert stats.sample_size_warnings(500, 10000, 128, 1000) == [
        "KID: subsets of 500 images instead of 1000; its spread is underestimated"]
    mean, std = stats.kernel_inception_distance(fake, real[:100], subsets=50, subset_size=1000)
    assert math.isnan(std)
    x, y = fake, real[:100]
    k = lambda a, b: (a @ b.T / 128 + 1) ** 3  # noqa: E731 - the polynomial kernel, by hand
    m = len(x)
    by_hand = ((k(x, x).sum() - np.trace(k(x, x)) + k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
               - 2 * k(x, y).mean())
    assert mean == pytest.approx(by_hand, rel=1e-9)
    assert stats.kernel_inception_distance(fake, real, subsets=20, subset_size=1000)[1] > 0  # real subsets differ


# ----- gantrain eval on folders, datasets and saved statistics --------------------------------------------
def _png_folder(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture
def two_folders(tmp_path: Path, train_root: Path) -> tuple[Path, Path]:
    """The first 400 and the next 400 FashionMNIST training images as 32-px PNG folders."""
    from gantrain.engine.data.sources import load_images

    images = load_images("fashion-mnist", str(train_root), 32, 1, limit=800)
    return _png_folder(tmp_path / "a", images[:400]), _png_folder(tmp_path / "b", images[400:])


def _features_by_hand(extractor, folder: Path) -> np.ndarray:
    """The extractor's features of a folder's PNGs read with Pillow alone, in file-name order."""
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])[:, None]
    return extractor(torch.from_numpy(pixels))[0].double().numpy()


@pytest.mark.slow
def test_cli_eval_two_folders_json_to_stdout_matches_a_scipy_fd(fashion_extractor, two_folders, train_root: Path,
                                                                cli_runner, monkeypatch) -> None:
    """pytorch-fid's `DIR1 DIR2`: one JSON object alone on stdout with --json -, its FD that of scipy's formula on
    the extractor's features of the PNGs read independently."""
    from gantrain.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    a, b = two_folders
    result = cli_runner.invoke(app, ["eval", str(a), str(b), "--dataset", "fashion-mnist", "--data-root",
                                     str(train_root), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # nothing else on stdout: tables and progress went to stderr
    assert (report["mode"], report["source"], report["reference"]) == ("folder", str(a), str(b))
    assert report["num_generated"] == report["num_real"] == 400 and report["seconds"] >= report["domain_seconds"]
    fa, fb = (_features_by_hand(fashion_extractor[0], folder) for folder in (a, b))
    covmean = scipy.linalg.sqrtm(np.cov(fa, rowvar=False) @ np.cov(fb, rowvar=False)).real
    fd = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(np.cov(fa, rowvar=False) + np.cov(fb, rowvar=False)
                                                           - 2 * covmean)
    assert report["metrics"]["fd"] == pytest.approx(fd, rel=1e-4)
    assert report["metrics"]["kid_std"] is None  # 400 vs 400: every KID subset is both whole sets
    assert any("its spread is not measured" in w for w in report["warnings"])
    assert "gantrain eval:" in result.stderr and "Fréchet distance" in result.stderr


@pytest.mark.slow
def test_cli_eval_saved_statistics_are_reused_exactly(fashion_extractor, two_folders, train_root: Path, cli,
                                                      unwrap, tmp_path: Path) -> None:
    a, _ = two_folders
    stats, direct_json, reused_json = tmp_path / "fm.npz", tmp_path / "direct.json", tmp_path / "reused.json"
    result = cli("eval", "fashion-mnist", "--data-root", train_root, "--save-stats", stats)
    test_images = len(load_split(parse_dataset("fashion-mnist", str(train_root)), "test").images)  # 512 or 10000
    assert result.exit_code == 0 and f"statistics of {test_images} images" in unwrap(result.output), result.output
    assert cli("eval", a, "fashion-mnist", "--data-root", train_root, "--json", direct_json).exit_code == 0
    assert cli("eval", a, stats, "--json", reused_json).exit_code == 0
    direct, reused = (json.loads(p.read_text()) for p in (direct_json, reused_json))
    assert reused["metrics"] == direct["metrics"] and reused["reference"] == str(stats)
    assert direct["reference"] == "fashion-mnist test split"
    with np.load(stats) as saved:
        assert saved["domain_features"].shape == (test_images, 128) and "mu" not in saved  # no Inception asked for


@pytest.mark.slow
def test_cli_eval_of_a_generator_against_the_other_idx_dataset_says_so(fashion_extractor, trained_run: Path, cli,
                                                                      unwrap, datasets_root: Path, two_folders,
                                                                      tmp_path: Path) -> None:
    """A FashionMNIST generator scored against MNIST's test split ran without a word (a folder of colour photographs
    is refused as an FD across domains): it is the user's choice to make, said in one warning; against its own
    dataset, nothing is said."""
    checkpoint = trained_run / "checkpoints" / "last.pt"
    result = cli("eval", checkpoint, "mnist", "--data-root", datasets_root, "-n", "300")
    assert result.exit_code == 0, result.output
    assert (f"{checkpoint} trained on fashion-mnist and is scored against the mnist test split: an FD across "
            "datasets") in unwrap(result.output)
    same = cli("eval", checkpoint, "fashion-mnist", "--data-root", datasets_root, "-n", "300")
    assert same.exit_code == 0 and "across datasets" not in unwrap(same.output), same.output
    flag = cli("eval", checkpoint, "--dataset", "mnist", "--data-root", datasets_root, "-n", "300")  # no REFERENCE
    assert flag.exit_code == 0 and "scored against the mnist test split: an FD across datasets" in \
        unwrap(flag.output), flag.output
    # saved statistics remember where their images came from (MNIST's test split in the FashionMNIST extractor:
    # before, the file named only the extractor's domain and nothing was said)
    for name, images in (("mnist", "mnist"), ("fashion-mnist", "fashion-mnist"), ("folder", None)):
        stats = tmp_path / f"{name}.npz"
        source = [two_folders[0], "--dataset", "fashion-mnist"] if images is None else [images, "--dataset",
                                                                                        "fashion-mnist"]
        assert cli("eval", *source, "--data-root", datasets_root, "--save-stats", stats).exit_code == 0
        with np.load(stats) as saved:
            meta = json.loads(str(saved["meta"]))
        assert meta["images_from"] == (images or "folder") and meta["dataset"] == "fashion-mnist"
        saved_run = cli("eval", checkpoint, stats, "-n", "300")
        assert saved_run.exit_code == 0, saved_run.output
        said = (f"{checkpoint} trained on fashion-mnist and is scored against the mnist test split (statistics "
                "mnist.npz): an FD across datasets")
        assert (said in unwrap(saved_run.output)) == (name == "mnist"), saved_run.output


@pytest.mark.slow
def test_cli_eval_a_checkpoint_against_a_folder(fashion_extractor, trained_run: Path, two_folders, cli,
                                                tmp_path: Path) -> None:
    out = tmp_path / "vs.json"
    result = cli("eval", trained_run / "checkpoints" / "last.pt", two_folders[1], "-n", "300", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["mode"], report["reference"], report["num_generated"], report["num_real"]) == (
        "generator", str(two_folders[1]), 300, 400)
    assert report["metrics"]["fd"] > 0 and report["step"] == 6


def test_cli_eval_sets_refuse_in_one_line(cli, unwrap, two_folders, tmp_path: Path) -> None:
    a, b = two_folders
    foreign = tmp_path / "other.npz"
    np.savez(foreign, mu=np.zeros(3))
    for args, code, message in (
            ([a], 2, f"error: {a}: an image folder needs a REFERENCE"),
            ([a, tmp_path / "nope"], 2, f"error: {tmp_path / 'nope'}: no such file or folder"),
            ([a, b, "--save-stats", tmp_path / "s.npz"], 2, "error: --save-stats: give one SOURCE"),
            ([a, foreign], 2, f"error: {foreign}: not statistics written by gantrain eval --save-stats"),
            (["fashion-mnist", "--save-stats", tmp_path / "s.txt"], 2, "must end in .npz")):
        result = cli("eval", *args)
        assert result.exit_code == code, result.output
        assert message in unwrap(result.output) and unwrap(result.output).count("error:") == 1, result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_cli_eval_folders_with_inception_and_saved_inception_statistics(stand_in_package: Path, fashion_extractor,
                                                                         two_folders, train_root: Path, cli,
                                                                         tmp_path: Path) -> None:
    """Every metric on each pair, the Inception ones included; the saved mu/sigma (pytorch-fid's key names) are
    those of the reference's Inception features, and reusing them gives the same Inception FID."""
    a, b = two_folders
    stats, first, again = tmp_path / "b.npz", tmp_path / "first.json", tmp_path / "again.json"
    flags = ["--dataset", "fashion-mnist", "--data-root", train_root, "--inception"]
    assert cli("eval", b, "--save-stats", stats, *flags).exit_code == 0
    assert cli("eval", a, b, *flags, "--json", first).exit_code == 0
    assert cli("eval", a, stats, *flags, "--json", again).exit_code == 0
    first_report, again_report = (json.loads(p.read_text()) for p in (first, again))
    assert first_report["inception"]["num_real"] == 400 and first_report["inception_fid"] > 0
    assert again_report["inception_fid"] == pytest.approx(first_report["inception_fid"], rel=1e-9)
    with np.load(stats) as saved:
        features = saved["inception_features"]
        np.testing.assert_allclose(saved["mu"], features.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(saved["sigma"], np.cov(features.astype(np.float64), rowvar=False), rtol=1e-6,
                                   atol=1e-9)
    assert len(features) == 400  # (the stand-in network's features are 64-d, the real one's 2048)


def test_a_folder_that_is_its_own_extractors_data_gives_its_test_split_only(tmp_path: Path) -> None:
    """The rotation extractor of a reference folder is fitted on 4 of every 5 of its images: the reference
    features are those of the fifth (as a dataset's test split), never of images the extractor trained on."""
    from gantrain.engine.metrics.report import evaluate_sets
    from gantrain.engine.metrics.sets import Side

    faces, other = _write_faces(tmp_path / "faces", 25), _write_faces(tmp_path / "other", 12)
    cache = tmp_path / "cache"
    ensure_extractor(parse_dataset(f"folder:{faces}", channels=3), cache=cache, epochs=20, quiet=True)
    result = evaluate_sets(Side("folder", other), Side("folder", faces), cache=str(cache), device="cpu")
    assert (result.report.num_generated, result.report.num_real) == (12, 5)  # 25 / 5 test images
    assert result.extractor["label"] == parse_dataset(f"folder:{faces}").label


@pytest.mark.slow
def test_saved_statistics_of_another_road_are_refused(fashion_extractor, train_root: Path, tmp_path: Path, cli,
                                                      unwrap) -> None:
    """Statistics of real images taken straight to 32 px cannot score images made at 64 px (the bias of
    docs/results/metric-resize-bias.md); saved at that size they can."""
    from gantrain.engine.data.sources import load_images

    folder64 = _png_folder(tmp_path / "f64", load_images("fashion-mnist", str(train_root), 64, 1, limit=120))
    straight, via64 = tmp_path / "fm32.npz", tmp_path / "fm64.npz"
    assert cli("eval", "fashion-mnist", "--data-root", train_root, "--save-stats", straight).exit_code == 0
    result = cli("eval", folder64, straight)
    assert result.exit_code == 2 and "its images were made at 32 px" in unwrap(result.output), result.output
    assert cli("eval", "fashion-mnist", "--data-root", train_root, "--size", 64, "--save-stats", via64).exit_code == 0
    assert cli("eval", folder64, via64).exit_code == 0


@pytest.mark.slow
def test_cli_eval_of_a_folder_says_what_it_read(fashion_extractor, two_folders, train_root: Path, cli, unwrap,
                                                tmp_path: Path) -> None:
    """`gantrain eval FOLDER` read a folder as training does but said nothing of it (commands other than `run` set
    up no logging: their INFO lines were dropped): now the folder's line (images, files left out), a line when
    its images differ in size (read at the first one's shorter side), and a warning naming images whose body
    could not be decoded (left out of the metrics)."""
    folder = tmp_path / "mixed"
    shutil.copytree(two_folders[0], folder)
    (folder / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "zz_big.png")
    whole = (folder / "zz_big.png").read_bytes()
    (folder / "zz_cut.png").write_bytes(whole[: len(whole) // 2])  # a valid header, a truncated body
    result = cli("eval", folder, "fashion-mnist", "--data-root", train_root)
    assert result.exit_code == 0, result.output
    said = unwrap(result.output)
    assert f"folder {folder}: 402 images (PNG 402); left out 1 file(s): not an image 1 (notes.txt)" in said, said
    assert f"{folder}: images of several sizes, read at 32 px, the first one's shorter side (--size sets it)" in said
    assert f"{folder}: 1 image(s) that could not be decoded are left out (zz_cut.png)" in said


@pytest.mark.slow
def test_cli_eval_refusals_and_notes_found_by_a_new_user(fashion_extractor, trained_run: Path, two_folders, cli,
                                                          unwrap, datasets_root: Path, tmp_path: Path) -> None:
    """A folder of 1 or 2 images ended `eval` in a traceback (a covariance of one sample, precision/recall's k=3);
    --size and --channels on a checkpoint were ignored without a word; --real-vs-real lowered -n silently; saved
    statistics scored in another extractor than --dataset named a weights mismatch, not the real reason."""
    checkpoint = trained_run / "checkpoints" / "last.pt"
    for count in (1, 3):
        few = _png_folder(tmp_path / f"few{count}", torch.full((count, 1, 32, 32), 128, dtype=torch.uint8))
        for args in ([few, "fashion-mnist"], [two_folders[0], few, "--dataset", "fashion-mnist"]):
            result = cli("eval", *args, "--data-root", datasets_root)
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert f"error: {few}: {count} readable image(s): the metrics need at least 4" in unwrap(result.stderr)
    for flag, value in (("--size", "64"), ("--channels", "1")):
        result = cli("eval", checkpoint, flag, value, "-n", "100")
        assert result.exit_code == 2 and unwrap(result.stderr).startswith(
            f"error: {flag}: reads image folders; {checkpoint} makes its images at its training size"), result.output
    report = tmp_path / "rvr.json"
    result = cli("eval", "--real-vs-real", "--dataset", "fashion-mnist", "--data-root", datasets_root, "-n", "7000",
                 "--json", report)
    assert result.exit_code == 0, result.output
    lowered = "-n 7000: each real half holds at most half the test split, 5000 images"
    assert lowered in unwrap(result.output) and lowered in json.loads(report.read_text())["warnings"]
    stats = tmp_path / "fm.npz"
    assert cli("eval", "fashion-mnist", "--data-root", datasets_root, "--save-stats", stats).exit_code == 0
    result = cli("eval", checkpoint, stats, "--dataset", "mnist", "--data-root", datasets_root, "-n", "100")
    assert result.exit_code == 2 and unwrap(result.stderr) == (
        f"error: {stats}: statistics in the fashion-mnist extractor's features, --dataset names mnist's: drop "
        "--dataset, or save the statistics with it"), result.output
