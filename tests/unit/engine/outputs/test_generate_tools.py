"""The sampling tools of ``gantrain generate`` and its API: --seeds, --truncation, --truncation-grid, --interpolate
and --walk, from a training checkpoint and from a ``gantrain export`` file alike, against the plain -n images and
independent slerp/lerp references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gantrain.engine.errors import ConfigError
from gantrain.engine.outputs.generate import (generate, interpolate, load_generator, parse_indices, parse_truncations,
                                              truncation_grid)

CELL = 34  # a 32-pixel image and 2 pixels of padding


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def _cell(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    top, left = 2 + CELL * row, 2 + CELL * col
    return grid[top : top + 32, left : left + 32]


def _gif_frames(path: Path) -> list[np.ndarray]:
    frames = []
    with Image.open(path) as gif:
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("L")).copy())
    return frames


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("safetensors")
    from gantrain.engine.outputs.export import export_generator

    out = tmp_path_factory.mktemp("export") / "g.safetensors"
    path, _ = export_generator(trained_run / "checkpoints" / "last.pt", out)
    return path


@pytest.fixture(params=["checkpoint", "export"])
def source(request: pytest.FixtureRequest, trained_run: Path) -> Path:
    """The tiny run's generator as a training checkpoint and as a `gantrain export` file."""
    if request.param == "checkpoint":
        return trained_run / "checkpoints" / "last.pt"
    return request.getfixturevalue("exported")


@pytest.fixture(scope="module")
def plain(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images 0..69 of seed 0 of a plain -n 70 run, each as its own file (000000.png ...)."""
    folder = tmp_path_factory.mktemp("plain")
    generate(trained_run / "checkpoints" / "last.pt", n=70, out=folder / "grid.png", individual=folder / "each",
             device="cpu")
    return folder / "each"


# ----- --seeds ---------------------------------------------------------------------------------------------
def test_parse_indices_ranges_order_and_refusals() -> None:
    assert parse_indices("0-3,100") == [0, 1, 2, 3, 100]
    assert parse_indices(" 7 , 2-2,0 ") == [7, 2, 0]  # the order written; spaces ignored
    assert parse_indices("3,17,42,3", "--walk", repeats=True) == [3, 17, 42, 3]
    for text, says in [("", "no images"), ("1,,2", "empty item"), ("5-2", "runs backwards (write 2-5)"),
                       ("-3", "'-3' is not a whole number"), ("x", "'x' is not"), ("1.5", "'1.5' is not"),
                       ("0-3,2", "image 2 is listed twice"), ("99999999", "above the largest"), ("1-2-3", "is not")]:
        with pytest.raises(ConfigError, match="^--seeds: ") as info:
            parse_indices(text)
        assert says in str(info.value), (text, str(info.value))
    with pytest.raises(ConfigError, match="^--interpolate: '0-3' is not a whole number >= 0$"):
        parse_indices("0-3", "--interpolate", ranges=False)


def test_seeds_pick_the_plain_images_in_the_given_order(source: Path, plain: Path, tmp_path: Path) -> None:
    """Image i of --seeds is bit-identical (as 8-bit pixels) to image i of a plain -n run of the same seed, from a
    checkpoint and from an export; the grid shows them in the order asked; files are named by index."""
    seeds = [69, 3, 0, 1, 2, 40]
    result = generate(source, seeds="69,3,0-2,40", out=tmp_path / "grid.png", individual=tmp_path / "each",
                      nrow=4, device="cpu")
    assert result.indices == seeds
    assert [p.name for p in result.individual] == [f"{i:06d}.png" for i in seeds]
    grid = _pixels(result.grid)
    assert grid.shape == (2 * CELL + 2, 4 * CELL + 2)
    for k, i in enumerate(seeds):
        image = _pixels(plain / f"{i:06d}.png")
        assert np.array_equal(_pixels(tmp_path / "each" / f"{i:06d}.png"), image), i
        assert np.array_equal(_cell(grid, k // 4, k % 4), image), (k, i)
    assert generate(source, seeds=[5], out=tmp_path / "one.png", device="cpu").indices == [5]


def test_n_and_seeds_together_are_refused(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^-n and --seeds: give one"):
        generate(trained_run / "checkpoints" / "last.pt", n=4, seeds="0-3", out=tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


# ----- --truncation and --truncation-grid ------------------------------------------------------------------
def test_truncation_is_index_stable_through_generate(source: Path, tmp_path: Path, plain: Path) -> None:
    many = generate(source, n=6, truncation=0.5, out=tmp_path / "a.png", individual=tmp_path / "a", device="cpu")
    picked = generate(source, seeds="5,2", truncation=0.5, out=tmp_path / "b.png", individual=tmp_path / "b",
                      device="cpu")
    for i in (5, 2):
        assert np.array_equal(_pixels(tmp_path / "b" / f"{i:06d}.png"), _pixels(tmp_path / "a" / f"{i:06d}.png"))
    assert len(many.individual) == 6 and picked.indices == [5, 2]
    # truncated images differ from the plain ones; psi = inf is the plain image
    assert not np.array_equal(_pixels(tmp_path / "a" / "000002.png"), _pixels(plain / "000002.png"))
    generate(source, seeds="2", truncation=float("inf"), out=tmp_path / "c.png", individual=tmp_path / "c",
             device="cpu")
    assert np.array_equal(_pixels(tmp_path / "c" / "000002.png"), _pixels(plain / "000002.png"))


@pytest.mark.parametrize("psi", [0.0, -0.5, float("nan")])
def test_truncation_refusals(trained_run: Path, tmp_path: Path, psi: float) -> None:
    with pytest.raises(ConfigError, match="^--truncation: must be > 0"):
        generate(trained_run / "checkpoints" / "last.pt", truncation=psi, out=tmp_path / "g.png")


def test_truncation_grid_rows_are_generate_runs(source: Path, tmp_path: Path) -> None:
    """One row per psi, in order, of the same images: row psi is generate(truncation=psi)'s grid; inf: plain."""
    result = truncation_grid(source, "0.5, 1.5,inf", seeds="4,0,9", out=tmp_path / "tg.png", device="cpu")
    assert result.indices == [4, 0, 9]
    grid = _pixels(result.grid)
    assert grid.shape == (3 * CELL + 2, 3 * CELL + 2)
    for row, psi in enumerate((0.5, 1.5, None)):
        alone = generate(source, seeds="4,0,9", truncation=psi, out=tmp_path / f"{row}.png", nrow=3, device="cpu")
        assert np.array_equal(grid[row * CELL : row * CELL + CELL + 2], _pixels(alone.grid)), psi
    default = truncation_grid(source, [0.7], out=tmp_path / "d.png", device="cpu")
    assert default.indices == list(range(8)) and _pixels(default.grid).shape == (CELL + 2, 8 * CELL + 2)


def test_parse_truncations() -> None:
    assert parse_truncations("0.5,0.7, 1.0,inf") == [0.5, 0.7, 1.0, float("inf")]
    for text, says in [("0.5,x", "'x' is not a number"), ("0.5,0", "must be > 0"), ("", "is not a number"),
                       ("nan", "must be > 0")]:
        with pytest.raises(ConfigError, match="^--truncation-grid: ") as info:
            parse_truncations(text)
        assert says in str(info.value), text


# ----- --interpolate and --walk ----------------------------------------------------------------------------
def test_interpolation_grid_and_gif(source: Path, plain: Path, tmp_path: Path) -> None:
    result = interpolate(source, [2, 5], frames=5, out=tmp_path / "i.png", device="cpu")
    assert result.gif == tmp_path / "i.gif" and result.indices == [2, 5] and result.frames == 5
    grid = _pixels(result.grid)
    assert grid.shape == (CELL + 2, 5 * CELL + 2)  # one row of 5 frames
    assert np.array_equal(_cell(grid, 0, 0), _pixels(plain / "000002.png"))  # the ends are the plain images
    assert np.array_equal(_cell(grid, 0, 4), _pixels(plain / "000005.png"))
    frames = _gif_frames(result.gif)
    assert len(frames) == 5
    for k, frame in enumerate(frames):  # the GIF holds the row's images, uncropped and unchanged
        assert np.array_equal(frame, _cell(grid, 0, k)), k


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_interpolation_frames_are_slerp_or_lerp_of_the_noise(trained_run: Path, tmp_path: Path, kind: str) -> None:
    """Frame k of a pair is G of the reference slerp (normal noise) or lerp (uniform) of the ends' noise at k / 4.
    The uniform case is the same weights with the config's loss.noise set to uniform."""
    from gantrain.engine.gan.sampling import generate_images, indexed_noise
    from gantrain.engine.outputs.images import make_grid
    from gantrain.engine.state.checkpoint import load_checkpoint

    checkpoint = trained_run / "checkpoints" / "last.pt"
    if kind == "uniform":
        state = load_checkpoint(checkpoint)
        state["run"]["config"]["loss"]["noise"] = "uniform"
        checkpoint = tmp_path / "uniform.pt"
        torch.save(state, checkpoint)
    g, cfg = load_generator(checkpoint, "cpu")
    assert cfg.loss.noise == kind
    result = interpolate(checkpoint, [1, 6], frames=5, out=tmp_path / "i.png", device="cpu")
    a, b = indexed_noise([1, 6], cfg.model.nz, kind, 0).double().numpy()
    omega = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    grid = _pixels(result.grid)
    for k in range(5):
        t = k / 4
        if kind == "normal":  # Shoemake's slerp as White (2016) writes it
            z = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
        else:
            z = (1 - t) * a + t * b
        image = make_grid(generate_images(g, torch.from_numpy(z).float()[None]), nrow=1, padding=0)
        assert np.abs(_cell(grid, 0, k).astype(int) - image.astype(int)).max() <= 1, k


def test_walk_rows_join_and_the_gif_runs_through(source: Path, plain: Path, tmp_path: Path) -> None:
    result = interpolate(source, "3,7,3", frames=4, out=tmp_path / "w.png", gif=tmp_path / "walk.gif", device="cpu")
    assert result.indices == [3, 7, 3] and result.gif == tmp_path / "walk.gif"
    grid = _pixels(result.grid)
    assert grid.shape == (2 * CELL + 2, 4 * CELL + 2)  # a row per pair
    three, seven = _pixels(plain / "000003.png"), _pixels(plain / "000007.png")
    assert np.array_equal(_cell(grid, 0, 0), three) and np.array_equal(_cell(grid, 0, 3), seven)
    assert np.array_equal(_cell(grid, 1, 0), seven) and np.array_equal(_cell(grid, 1, 3), three)
    frames = _gif_frames(result.gif)
    assert len(frames) == 2 * 3 + 1  # the shared end once
    expected = [_cell(grid, 0, k) for k in range(4)] + [_cell(grid, 1, k) for k in range(1, 4)]
    assert all(np.array_equal(f, e) for f, e in zip(frames, expected))


def test_interpolation_refusals(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = trained_run / "checkpoints" / "last.pt"
    for points, frames, match in [([3], 8, "^--interpolate: at least 2 images"), ("3", 8, "^--walk: at least 2"),
                                  ("3,x", 8, "^--walk: 'x'"), ([1, 2], 1, "^--frames: at least 2"),
                                  ([1, -2], 8, "^--interpolate: image indices must be in")]:
        with pytest.raises(ConfigError, match=match):
            interpolate(checkpoint, points, frames=frames, out=tmp_path / "i.png")
    with pytest.raises(ConfigError, match="^--out: .*i.gif would hold a PNG grid; name it i.png"):
        interpolate(checkpoint, [1, 2], out=tmp_path / "i.gif")
    with pytest.raises(ConfigError, match="^--out: .* both the grid PNG and the GIF"):
        interpolate(checkpoint, [1, 2], out=tmp_path / "i.png", gif=tmp_path / "i.png")
    with pytest.raises(ConfigError, match="^--truncation: must be > 0"):
        interpolate(checkpoint, [1, 2], truncation=0)


# ----- the command line ------------------------------------------------------------------------------------
def test_cli_tools_write_their_files(source: Path, tmp_path: Path, cli, unwrap) -> None:
    result = cli("generate", source, "--seeds", "3,0-1", "--truncation", 0.8, "--out", tmp_path / "s.png",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "(3 images)" in unwrap(result.output)
    result = cli("generate", source, "--truncation-grid", "0.5,1,inf", "-n", 5, "--out", tmp_path / "t.png",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "3 rows of 5 images" in unwrap(result.output)
    assert _pixels(tmp_path / "t.png").shape == (3 * CELL + 2, 5 * CELL + 2)
    result = cli("generate", source, "--interpolate", 2, 5, "--frames", 6, "--out", tmp_path / "i.png",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "i.gif").is_file() and _pixels(tmp_path / "i.png").shape == (CELL + 2, 6 * CELL + 2)
    result = cli("generate", source, "--walk", "3,17,42,3", "--out", tmp_path / "w.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "3 rows of 8 frames" in unwrap(result.output) and "22 frames" in unwrap(result.output)  # --frames default 8


@pytest.mark.parametrize("args, says", [
    (["-n", 4, "--seeds", "0-3"], "-n and --seeds: give one"),
    (["--seeds", "1,x"], "--seeds: 'x' in '1,x' is not a whole number"),
    (["--seeds", "4-1"], "--seeds: the range 4-1 runs backwards"),
    (["--truncation", 0], "--truncation: must be > 0"),
    (["--truncation", "strong"], "--truncation: 'strong' is not a number"),
    (["--truncation", "0.5,0.7"], "--truncation: one PSI, got '0.5,0.7' (--truncation-grid takes several)"),
    (["--truncation-grid", "0.5,big"], "--truncation-grid: 'big' is not a number"),
    (["--truncation-grid", "0.5", "--truncation", 0.5], "--truncation: not used with --truncation-grid"),
    (["--interpolate", 1, "x"], "--interpolate: 'x' is not a whole number >= 0"),
    (["--interpolate", 1, 2, "--walk", "1,2"], "--interpolate and --walk: give one of them"),
    (["--interpolate", 1, 2, "--frames", 1], "--frames: at least 2"),
    (["--interpolate", 1, 2, "-n", 3], "-n: not used with --interpolate"),
    (["--walk", "1,2", "--individual", "each"], "--individual: not used with --walk"),
    (["--walk", "5"], "--walk: at least 2 images"),
    (["--frames", 4], "--frames: only with --interpolate or --walk"),
    (["--truncation-grid", "1", "--nrow", 3], "--nrow: not used with --truncation-grid"),
])
def test_cli_refusals_are_one_line_and_exit_2(trained_run: Path, tmp_path: Path, cli, unwrap, args, says) -> None:
    result = cli("generate", trained_run / "checkpoints" / "last.pt", *args, "--out", tmp_path / "g.png")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and result.output.strip().count("\n") == 0, result.output
    assert says in unwrap(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "g.png").exists()


def test_every_generate_option_says_its_default() -> None:
    from typer.main import get_command

    from gantrain.cli import app

    command = get_command(app).commands["generate"]
    options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
    assert {"seeds", "truncation", "truncation_grid", "interpolate", "walk", "frames"} <= {p.name for p in options}
    shown = [p.name for p in options if p.default is not None and p.default is not False]  # typer shows these
    assert sorted(shown) == ["device", "out", "seed"]
    assert [p.name for p in options if p.name not in shown and "default" not in (p.help or "")] == []


def test_the_api_makes_the_command_lines_checks(trained_run: Path, tmp_path: Path) -> None:
    """`gantrain.generate(out="x.jpg")` wrote PNG bytes into x.jpg, nrow=0 raised ZeroDivisionError, out=None a
    TypeError, a seed past 64 bits an overflow: the command line refused them, the API did not. Each is now one
    ConfigError, before the checkpoint is read (a missing one is not reached)."""
    missing = tmp_path / "none.pt"
    for kwargs, says in [({"out": tmp_path / "x.jpg"}, "x.jpg would hold a PNG grid; name it x.png"),
                         ({"out": None}, "--out: give the grid's path"),
                         ({"nrow": 0}, "--nrow: must be an integer of at least 1, got 0"),
                         ({"seed": 10**20}, "--seed: must be an integer between 0 and 17,592,186,044,415"),
                         ({"seed": -1}, "--seed")]:
        with pytest.raises(ConfigError, match=says):
            generate(missing, **{"out": tmp_path / "g.png", **kwargs})
    with pytest.raises(ConfigError, match="x.jpg would hold a PNG grid"):
        truncation_grid(missing, "0.5,inf", out=tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())
    # numpy integers are taken as ints (torch's seeding refused an np.int64 seed before)
    made = generate(trained_run / "checkpoints" / "last.pt", n=2, seed=np.int64(3), nrow=np.int64(2),
                    out=tmp_path / "np.png", device="cpu")
    assert made.grid.is_file()


def test_a_truncation_without_effect_on_uniform_noise_is_said(trained_run: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Uniform noise is truncated by scaling only when PSI < 1: `--truncation 1.5` on a uniform-noise generator
    wrote the untruncated images, byte for byte, without a word. Now one warning says so; PSI 0.5 and normal
    noise say nothing."""
    from gantrain.engine.outputs import generate as gen
    from gantrain.engine.state.checkpoint import load_checkpoint

    state = load_checkpoint(trained_run / "checkpoints" / "last.pt")
    state["run"]["config"]["loss"]["noise"] = "uniform"
    uniform = tmp_path / "uniform.pt"
    torch.save(state, uniform)
    said = []
    monkeypatch.setattr(gen.log, "warning", lambda msg, *args: said.append(msg % args))
    plain = generate(uniform, n=4, out=tmp_path / "plain.png", device="cpu")
    psi = generate(uniform, n=4, truncation=1.5, out=tmp_path / "psi.png", device="cpu")
    assert psi.grid.read_bytes() == plain.grid.read_bytes()  # the reason for the warning
    assert said == ["--truncation 1.5: without effect on this generator's uniform noise U(-1, 1) (a PSI below 1 "
                    "scales it)"]
    generate(uniform, n=4, truncation=0.5, out=tmp_path / "half.png", device="cpu")
    generate(trained_run / "checkpoints" / "last.pt", n=4, truncation=1.5, out=tmp_path / "n.png", device="cpu")
    truncation_grid(uniform, "0.5,1,2,inf", n=2, out=tmp_path / "grid.png", device="cpu")
    assert said[1:] == ["--truncation-grid 1, 2: without effect on this generator's uniform noise U(-1, 1) (a PSI "
                        "below 1 scales it)"]
