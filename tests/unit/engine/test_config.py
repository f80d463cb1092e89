"""The config tree: presets, validation messages naming the flag, TOML round trips and precedence."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from paths import GOLDEN, REPO

from gantrain.engine.config import (PRESETS, Config, current_layout, field_index, from_dict, load_toml, override, preset,
                                    resolve, to_toml)
from gantrain.engine.errors import ConfigError
from gantrain.engine.train.dryrun import value_sources

EXPECTED_PRESETS = {
    # name: (dataset, image size, channels, arch, kernel, batch, lr_g, lr_d, smoothing, noise)
    "fashion32": ("fashion-mnist", 32, 1, "dcgan", 4, 128, 2e-4, 2e-4, 0.0, "normal"),
    "fashion32-tuned": ("fashion-mnist", 32, 1, "dcgan", 4, 32, 1.5e-3, 4e-4, 0.25, "normal"),
    "mnist32": ("mnist", 32, 1, "dcgan", 4, 128, 2e-4, 2e-4, 0.0, "normal"),
    "cats64": ("folder", 64, 3, "dcgan", 4, 128, 2e-4, 2e-4, 0.0, "normal"),
    "cats64-diffaug": ("folder", 64, 3, "dcgan", 4, 128, 2e-4, 2e-4, 0.0, "normal"),
    "dcgan64": ("folder", 64, 3, "dcgan", 4, 128, 2e-4, 2e-4, 0.0, "normal"),
    "cats128": ("folder", 128, 3, "dense", 5, 64, 2e-4, 5e-5, 0.1, "uniform"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_presets_build_with_their_values(name: str) -> None:
    cfg = preset(name)
    assert isinstance(cfg, Config) and cfg.preset == name
    got = (cfg.data.dataset, cfg.data.image_size, cfg.data.channels, cfg.model.arch, cfg.model.kernel_size,
           cfg.data.batch_size, cfg.optim.lr_g, cfg.optim.lr_d, cfg.loss.label_smoothing, cfg.loss.noise)
    assert got == EXPECTED_PRESETS[name]
    assert cfg.run_dir == Path("runs") / name
    assert preset(name) is not cfg and preset(name) == cfg  # a fresh, equal tree every call


def test_preset_registry_is_exactly_these() -> None:
    assert set(PRESETS) == set(EXPECTED_PRESETS)


def test_the_tuned_recipe_differs_from_the_tutorial_only_where_it_says() -> None:
    """fashion32-tuned: the search's lrs and smoothing, D half as wide at batch 32 with R1 every 16th D step, an
    EMA by images (ramped up) with standing BatchNorm statistics, Adam betas (0, 0.99) with a linear lr decay over
    a budget of 5 epochs, FD every epoch, final samples from best.pt; the rest (G, data, engine settings) is
    fashion32's."""
    tuned, plain = preset("fashion32-tuned").to_dict(), preset("fashion32").to_dict()
    changed = {(section, key) for section in plain if isinstance(plain[section], dict)
               for key in plain[section] if plain[section][key] != tuned[section][key]}
    assert changed == {("optim", "lr_g"), ("optim", "lr_d"), ("optim", "beta1"), ("optim", "beta2"),
                       ("optim", "lr_decay"), ("loss", "label_smoothing"), ("loss", "r1_gamma"), ("loss", "r1_every"),
                       ("gan", "ema_halflife"), ("gan", "ema_rampup"), ("gan", "ema_bn"), ("eval", "eval_every"),
                       ("eval", "samples_from_best"), ("model", "ndf"), ("data", "batch_size"), ("run", "epochs")}
    assert (tuned["run"]["epochs"], plain["run"]["epochs"]) == (5, 20)
    assert (tuned["gan"]["ema_halflife"], tuned["gan"]["ema_rampup"], tuned["gan"]["ema_decay"]) == (20_000, 0.05, 0)
    assert (tuned["gan"]["ema_bn"], plain["gan"]["ema_bn"]) == ("standing", "copy")
    assert (tuned["loss"]["r1_gamma"], tuned["loss"]["r1_every"]) == (0.3, 16)
    assert (tuned["model"]["ngf"], tuned["model"]["ndf"], tuned["data"]["batch_size"]) == (64, 32, 32)
    assert (tuned["optim"]["beta1"], tuned["optim"]["beta2"], tuned["optim"]["lr_decay"]) == (0.0, 0.99, "linear")
    assert tuned["optim"]["lr_decay_start"] == plain["optim"]["lr_decay_start"] == 0.0
    assert preset("fashion32").gan.ema_decay == 0 and not preset("fashion32").eval.samples_from_best
    assert preset("fashion32-tuned").without_effect() == []


def test_the_diffaug_recipe_differs_from_cats64_only_in_diffaug() -> None:
    """cats64-diffaug was measured against cats64 with nothing else changed; the preset must be that contender."""
    recipe, plain = preset("cats64-diffaug").to_dict(), preset("cats64").to_dict()
    changed = {(section, key) for section in plain if isinstance(plain[section], dict)
               for key in plain[section] if plain[section][key] != recipe[section][key]}
    assert changed == {("gan", "diffaug")}
    assert recipe["gan"]["diffaug"] == ["color", "translation", "cutout"] and plain["gan"]["diffaug"] == []


@pytest.mark.parametrize("flat, flag", [
    ({"lr_g": 0.0}, "--lr-g"),
    ({"checkpoint_every": -1}, "--checkpoint-every"),
    ({"lr_g": -1e-4}, "--lr-g"),
    ({"lr_d": 0.0}, "--lr-d"),
    ({"lr_d": math.nan}, "--lr-d"),
    ({"lr_g": math.inf}, "--lr-g"),
    ({"label_smoothing": 0.5}, "--label-smoothing"),
    ({"label_smoothing": -0.1}, "--label-smoothing"),
    ({"image_size": 48}, "--image-size"),
    ({"channels": 2}, "--channels"),
    ({"batch_size": 0}, "--batch-size"),
    ({"beta1": 1.0}, "--beta1"),
    ({"dataset": "cifar"}, "--dataset"),
    ({"kernel_size": 3}, "--kernel-size"),
    ({"max_steps": -1}, "--max-steps"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2**44}, "--seed"),  # 10**20 overflowed torch's 64-bit seeds mid-run (a traceback)
    ({"channels": 3}, "--channels"),  # fashion-mnist is grayscale: the run refused it after the dry run passed
    ({"dataset": "mnist", "channels": 3}, "--channels"),
    ({"device": "tpu"}, "--device"),
    ({"amp": "fp8"}, "--amp"),
    ({"ema_decay": 1.0}, "--ema-decay"),
    ({"layer_impl": "cuda"}, "--layer-impl"),
    ({"arch": "dense", "kernel_size": 4}, "--kernel-size"),
    ({"amp": "fp16", "device": "cpu"}, "--amp"),
    ({"batch_size": "many"}, "--batch-size"),
    ({"batch_size": 2.5}, "--batch-size"),
])
def test_invalid_values_name_the_flag(flat: dict, flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        override(preset("fashion32"), flat)
    assert str(info.value).startswith(flag + ":"), str(info.value)


def test_valid_edges_are_accepted() -> None:
    cfg = override(preset("fashion32"), {"label_smoothing": 0.49, "image_size": 128, "lr_g": 1e-9, "batch_size": 1.0,
                                         "seed": 2**44 - 1})
    assert cfg.loss.label_smoothing == 0.49 and cfg.data.image_size == 128 and cfg.optim.lr_g == 1e-9
    assert cfg.data.batch_size == 1 and isinstance(cfg.data.batch_size, int)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match=r"^--preset: unknown preset 'nope'.*fashion32"):
        preset("nope")
    with pytest.raises(ConfigError, match="--preset"):
        resolve("nope", None, {})


def test_unknown_toml_field_and_section(tmp_path: Path) -> None:
    bad_field = tmp_path / "field.toml"
    bad_field.write_text("[data]\nbatch_size = 16\nbatchsize = 16\n")
    with pytest.raises(ConfigError, match=r"unknown field data\.batchsize") as info:
        load_toml(bad_field)
    assert str(bad_field) in str(info.value)
    bad_section = tmp_path / "section.toml"
    bad_section.write_text("[training]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[training\]"):
        load_toml(bad_section)


def test_bad_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^--config: no such file"):
        load_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\nbatch_size = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(broken)
    wrong_type = tmp_path / "types.toml"
    wrong_type.write_text("[run]\nout = 5\n")
    with pytest.raises(ConfigError, match="^--out: must be a string"):
        load_toml(wrong_type)
    wrong_bool = tmp_path / "bool.toml"
    wrong_bool.write_text("[data]\nstrict = 1\n")
    with pytest.raises(ConfigError, match="^--strict: must be true or false"):
        load_toml(wrong_bool)


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_toml_round_trip_of_presets(name: str, tmp_path: Path) -> None:
    cfg = preset(name)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_toml(path) == cfg


def test_toml_round_trip_of_awkward_values(tmp_path: Path) -> None:
    cfg = override(preset("cats128"), {
        "data_root": 'C:\\data\\"cats" [x]', "out": "runs/with space/ünïcode", "compile_cache_dir": "a\tb\nc\x01d",
        "lr_d": 5e-5, "init_std": 1e-7, "seed": 2**44 - 1, "strict": True, "ema_decay": 0.999,
    })
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    loaded = load_toml(path)
    assert loaded == cfg
    assert loaded.perf.compile_cache_dir == "a\tb\nc\x01d"
    assert loaded.data.data_root == 'C:\\data\\"cats" [x]'


def test_toml_documents_fields_and_unset_values() -> None:
    text = to_toml(preset("fashion32"))
    assert 'preset = "fashion32"' in text
    assert "lr_g = 0.0002  # Adam learning rate of the generator." in text
    assert "# data_root is unset" in text
    for section in ("[data]", "[model]", "[optim]", "[loss]", "[gan]", "[run]", "[checkpoint]", "[logging]", "[eval]",
                    "[perf]", "[dist]"):
        assert section in text


def test_round_trip_with_overrides_on_top(tmp_path: Path) -> None:
    base = override(preset("fashion32"), {"batch_size": 64, "lr_g": 1e-3, "out": "runs/a"})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(base))
    cfg = resolve(None, str(path), {"batch_size": 16, "label_smoothing": 0.1, "lr_d": None})
    assert cfg.data.batch_size == 16            # the flag wins
    assert cfg.loss.label_smoothing == 0.1      # a flag the file did not change
    assert cfg.optim.lr_g == 1e-3               # the file's value survives
    assert cfg.optim.lr_d == 2e-4               # None means "not given"
    assert cfg.run.out == "runs/a"


def test_a_config_toml_written_before_a_field_existed_keeps_that_fields_default(tmp_path: Path) -> None:
    """A config.toml gantrain wrote before --lr-decay existed, of a fashion32-tuned run (then betas (0.5, 0.999),
    constant rates): loaded today it must not take the preset's new decay, the run it records had none; a
    partial file of the user's still takes the preset's values for what it leaves out."""
    old_run = override(preset("fashion32-tuned"), {"beta1": 0.5, "beta2": 0.999, "lr_decay": "none"})
    lines = [line for line in to_toml(old_run).splitlines() if not line.startswith(("lr_decay", "lr_decay_start"))]
    written = tmp_path / "config.toml"
    written.write_text("\n".join(lines))
    cfg = resolve(None, str(written), {})
    assert (cfg.optim.lr_decay, cfg.optim.lr_decay_start, cfg.optim.beta1) == ("none", 0.0, 0.5)
    assert cfg.preset == "fashion32-tuned" and cfg.model.ndf == 32 and cfg.gan.ema_bn == "standing"  # the file's
    sources = value_sources(None, str(written), {})  # --dry-run says where each value came from
    assert (sources["optim.lr_decay"], sources["optim.beta1"]) == ("default", f"file {written}")
    partial = tmp_path / "partial.toml"
    partial.write_text('preset = "fashion32-tuned"\n[optim]\nlr_g = 0.001\n')
    mine = resolve(None, str(partial), {})
    assert (mine.optim.lr_g, mine.optim.lr_decay, mine.optim.beta1) == (0.001, "linear", 0.0)  # the preset's today
    assert value_sources(None, str(partial), {})["optim.lr_decay"] == "preset fashion32-tuned"


def test_resolve_precedence_preset_then_toml_then_flags(tmp_path: Path) -> None:
    partial = tmp_path / "partial.toml"
    partial.write_text("[optim]\nlr_g = 0.001\n[data]\nbatch_size = 16\nimage_size = 64\n")
    cfg = resolve("cats128", str(partial), {"batch_size": 8})
    assert cfg.preset == "cats128"
    assert cfg.model.arch == "dense" and cfg.optim.lr_d == 5e-5   # from the preset
    assert cfg.optim.lr_g == 0.001 and cfg.data.image_size == 64  # the file over the preset
    assert cfg.data.batch_size == 8                               # the flag over the file
    # Without --preset the file's own preset line is the base; without either, fashion32.
    named = tmp_path / "named.toml"
    named.write_text('preset = "cats128"\n[run]\nepochs = 3\n')
    cfg = resolve(None, str(named), {})
    assert cfg.model.arch == "dense" and cfg.run.epochs == 3 and cfg.loss.noise == "uniform"
    assert resolve(None, None, {}) == preset("fashion32")


def test_gantrain_data_fills_an_unset_data_root_once_at_resolve(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from gantrain.engine.train.dryrun import value_sources

    monkeypatch.setenv("GANTRAIN_DATA", "/env/data")
    assert resolve(None, None, {}).data.data_root == "/env/data"
    assert value_sources(None, None, {})["data.data_root"] == "env $GANTRAIN_DATA"
    assert resolve(None, None, {"data_root": "/flag"}).data.data_root == "/flag"  # a flag, a file or a preset wins
    rooted = tmp_path / "rooted.toml"
    rooted.write_text('[data]\ndata_root = "/file"\n')
    assert resolve(None, str(rooted), {}).data.data_root == "/file"
    assert value_sources(None, str(rooted), {})["data.data_root"] == f"file {rooted}"
    # written into config.toml, so the config file a DDP worker or a later run reads names the same folder
    assert load_toml(_write(tmp_path / "c.toml", to_toml(resolve(None, None, {})))).data.data_root == "/env/data"
    monkeypatch.delenv("GANTRAIN_DATA")
    assert resolve(None, None, {}).data.data_root is None


def test_a_relative_data_root_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative --data-root or $GANTRAIN_DATA (as the README's ../shared/datasets) means the folder as seen from
    where the run started: the config keeps it absolute, so eval or a resume from another directory reads the
    same folder; ~ is expanded."""
    monkeypatch.chdir(tmp_path)
    root = resolve(None, None, {"data_root": "../shared/datasets"}).data.data_root
    assert os.path.isabs(root) and Path(root).resolve() == (tmp_path.parent / "shared" / "datasets").resolve()
    monkeypatch.setenv("GANTRAIN_DATA", "data")
    assert resolve(None, None, {}).data.data_root == str(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert resolve(None, None, {"data_root": "~/d"}).data.data_root == str(tmp_path / "home" / "d")
    written = _write(tmp_path / "c.toml", to_toml(resolve(None, None, {})))
    monkeypatch.delenv("GANTRAIN_DATA")
    monkeypatch.chdir(tmp_path / "home")  # read back elsewhere: the same folder
    assert load_toml(written).data.data_root == str(tmp_path / "data")


def test_a_config_file_naming_another_preset_than_preset_is_refused(tmp_path: Path) -> None:
    """--preset A with a file saying preset = "B": the file's label over A's values would name the run (and its
    folder) after B while training A: refused; the same preset, or a file that names none, is A's run."""
    other = _write(tmp_path / "other.toml", 'preset = "cats64"\n')
    with pytest.raises(ConfigError, match="names preset 'cats64', --preset 'fashion32-tuned': drop --preset to train the file's cats64, or "
                                         "the file's preset line to lay it over fashion32-tuned"):
        resolve("fashion32-tuned", str(other), {})
    same = _write(tmp_path / "same.toml", 'preset = "fashion32-tuned"\n[optim]\nlr_g = 0.001\n')
    cfg = resolve("fashion32-tuned", str(same), {})
    assert (cfg.preset, cfg.model.ndf, cfg.optim.lr_g) == ("fashion32-tuned", 32, 0.001)
    unnamed = _write(tmp_path / "unnamed.toml", '[optim]\nlr_d = 0.001\n')
    cfg = resolve("fashion32-tuned", str(unnamed), {})
    assert (cfg.preset, cfg.model.ndf, cfg.optim.lr_d) == ("fashion32-tuned", 32, 0.001)
    assert resolve(None, str(other), {}).preset == "cats64"  # the file alone names its base


def test_settings_without_effect_are_named_with_why() -> None:
    """Each setting that does nothing in its run, worked out by hand: standing statistics without an EMA,
    SyncBatchNorm in one process (CUDA, so the config accepts it; a run under an outside torchrun is distributed
    without --ddp); the presets as shipped hold none."""
    assert all(preset(name).without_effect() == [] for name in PRESETS)
    cfg = override(preset("fashion32-tuned"), {"ema_halflife": 0, "ema_rampup": 0.0, "device": "cuda",
                                               "sync_bn": True})
    assert cfg.without_effect() == ["--ema-bn standing (no EMA: --ema-decay and --ema-halflife 0)",
                                    "--sync-bn (not distributed: no --ddp, --ray or torchrun)"]
    assert cfg.without_effect(distributed=True) == ["--ema-bn standing (no EMA: --ema-decay and --ema-halflife 0)"]
    assert override(cfg, {"ddp": True, "ema_decay": 0.9}).without_effect() == []
    assert override(cfg, {"ray": True, "ema_decay": 0.9}).without_effect() == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_amp_modes_are_resolved_in_one_place() -> None:
    import torch

    from gantrain.engine.gan import precision

    cpu = torch.device("cpu")
    assert precision.resolve_amp("auto", cpu) == ("bf16" if precision.native_bf16(cpu) else "off")
    assert [precision.resolve_amp(m, cpu) for m in ("off", "bf16")] == ["off", "bf16"]
    with pytest.raises(ConfigError, match="--amp: fp16 needs CUDA; use --amp bf16 on CPU"):
        precision.resolve_amp("fp16", cpu)
    policy = precision.PrecisionPolicy(cpu, "auto")
    assert (policy.requested, policy.amp) == ("auto", precision.resolve_amp("auto", cpu))
    assert [precision.compute_name(m) for m in ("off", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize(("bf16", "fp32", "fast"), [
    (2.38, 0.36, True),    # AMX-BF16 (issue 30's Xeon): 6.6x
    (0.39, 0.17, True),    # AMD Zen 4, AVX512-BF16: 2.2x
    (0.16, 0.32, False),   # Intel AVX512-BF16 without AMX: 0.5x
    (0.20, 0.18, False),   # about equal: not worth the rounding
])
def test_auto_amp_picks_bf16_where_the_measured_matmul_is_faster(monkeypatch, bf16, fp32, fast) -> None:
    """The rule reads the probe's figures (docs/results/bf16-probe.md), whatever the CPU's vendor or flags."""
    import torch

    from gantrain.engine.gan import hardware, precision

    monkeypatch.setattr(hardware, "device_peaks", lambda device: hardware.Peaks(fp32, bf16, bf16, "test probe"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not fast)  # flags are not what decides
    cpu = torch.device("cpu")
    assert precision.resolve_amp("auto", cpu) == ("bf16" if fast else "off")
    policy = precision.PrecisionPolicy(cpu, "auto")
    assert policy.describe() == ("bf16 autocast (auto), NCHW" if fast else
                                 "fp32 (auto: bf16 is not faster on this CPU), NCHW")
    assert policy.why == (f"bf16 matmul {bf16:.3g} vs fp32 {fp32:.3g} TFLOP/s = {bf16 / fp32:.2f}x (test probe; "
                          "bf16 from 1.2x)")
    asked = precision.PrecisionPolicy(cpu, "bf16")
    assert (asked.describe(), asked.why) == ("bf16 autocast, NCHW", "asked for")  # asked for: always honoured


def test_from_dict_rejects_non_tables_and_unknown_flags() -> None:
    with pytest.raises(ConfigError, match=r"\[data\] must be a table"):
        from_dict({"data": 3})
    with pytest.raises(ConfigError, match="unknown config field 'batchsize'"):
        override(preset("fashion32"), {"batchsize": 3})


# ----- sections by component; files of the layout before ---------------------------------------------------------
def test_each_component_has_its_own_section() -> None:
    """The checkpoint cadence, logging, evaluation and the GAN's EMA and DiffAugment each have a section of their
    own; every field is in exactly one section and keeps its flag."""
    index = field_index()
    assert {name: index[name][0] for name in ("checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                                              "logger", "eval_every", "eval_samples", "samples_from_best",
                                              "metrics_cache", "eval_metrics", "ema_decay", "ema_bn", "diffaug",
                                              "epochs", "seed", "amp")} == {
        "checkpoint_every": "checkpoint", "keep_checkpoints": "checkpoint", "log_every": "logging",
        "sample_every": "logging", "logger": "logging", "eval_every": "eval", "eval_samples": "eval",
        "samples_from_best": "eval", "metrics_cache": "eval", "eval_metrics": "eval", "ema_decay": "gan",
        "ema_bn": "gan", "diffaug": "gan", "epochs": "run", "seed": "run", "amp": "perf"}


def test_a_config_toml_of_the_layout_before_loads_every_value(tmp_path) -> None:
    """tests/golden holds a config.toml written by gantrain before the sections by component ([run] held the
    checkpoint, logging and evaluation fields, [perf] the EMA, [loss] DiffAugment): it loads to the config it
    recorded, each value in its section of today, and written again it loads to the same."""
    old = GOLDEN / "config-before-sections-fashion32-tuned.toml"
    text = old.read_text()
    assert "[run]\n" in text and "eval_every = 1" in text and "[gan]" not in text and "[eval]" not in text
    expected = override(preset("fashion32-tuned"), {"diffaug": "color,cutout", "checkpoint_every_steps": 7,
                                                    "log_every": 5, "logger": "tensorboard", "out": "runs/old",
                                                    "epochs": 20,  # the preset's values when it was written:
                                                    "batch_size": 64, "ema_decay": 0.99, "ema_halflife": 0,
                                                    "ema_rampup": 0.0, "r1_gamma": 0.0, "r1_every": 4})
    loaded = load_toml(old)
    assert loaded == expected
    assert (loaded.eval.eval_every, loaded.gan.ema_decay, loaded.gan.diffaug, loaded.checkpoint.checkpoint_every_steps,
            loaded.logging.logger) == (1, 0.99, ("color", "cutout"), 7, ("tensorboard",))
    again = tmp_path / "config.toml"
    again.write_text(to_toml(loaded))
    assert load_toml(again) == expected and "[eval]\n" in again.read_text()


def test_current_layout_moves_only_what_moved() -> None:
    raw = {"preset": "cats64", "run": {"epochs": 3, "eval_every": 2}, "perf": {"amp": "off", "ema_bn": "standing"},
           "loss": {"noise": "uniform", "diffaug": "color"}, "eval": {"eval_samples": 500}}
    assert current_layout(raw) == {"preset": "cats64", "run": {"epochs": 3}, "perf": {"amp": "off"},
                                   "loss": {"noise": "uniform"}, "eval": {"eval_samples": 500, "eval_every": 2},
                                   "gan": {"ema_bn": "standing", "diffaug": "color"}}
    assert raw["run"] == {"epochs": 3, "eval_every": 2}  # the caller's dict is left as it was
    with pytest.raises(ConfigError, match="unknown field run.amp"):  # a field in a wrong section is still an error
        from_dict({"run": {"amp": "off"}})


def test_the_measured_figures_of_each_recommended_recipe_come_from_data_with_their_source() -> None:
    """`gantrain presets` prints what each recommended recipe measured: from the package's data file, each entry
    naming the report (docs/results/) it was taken from, for every recipe a preset points to."""
    import json
    from importlib import resources

    from gantrain.engine.config import RECOMMENDED, recommended_measured

    data = json.loads(resources.files("gantrain.resources").joinpath("measured.json").read_text())
    assert set(data["recommended"]) == set(RECOMMENDED.values()) == set(recommended_measured())
    root = REPO
    for name, entry in data["recommended"].items():
        report = json.loads((root / entry["source"]).read_text())
        assert entry["contender"] in {c["name"] for c in report["contenders"]}, (name, entry["source"])
        [contender] = [c for c in report["contenders"] if c["name"] == entry["contender"]]
        finals = [run["points"][-1]["fd"] for run in contender["runs"]]
        assert all(f"{fd:.2f}" in entry["text"] for fd in finals), (name, finals)  # the text cites its report


def test_list_fields_are_lists_in_toml_and_checkpoints(tmp_path) -> None:
    """--logger, --eval-metrics and --diffaug hold lists: TOML arrays in config.toml, lists in a checkpoint's config;
    a comma list (a flag, a file written before) and a repeated flag give the same value."""
    from gantrain.engine.config import LIST_FIELDS

    assert set(LIST_FIELDS) == {name for name, (_, typ) in field_index().items() if typ is tuple}
    cfg = override(preset("cats64"), {"logger": "tensorboard, wandb", "eval_metrics": "inception",
                                      "diffaug": ["color", "cutout"]})
    assert (cfg.logging.logger, cfg.eval.eval_metrics, cfg.gan.diffaug) == (("tensorboard", "wandb"), ("inception",),
                                                                           ("color", "cutout"))
    text = to_toml(cfg)
    assert 'logger = ["tensorboard", "wandb"]' in text and 'diffaug = ["color", "cutout"]' in text
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_toml(path) == cfg and cfg.to_dict()["logging"]["logger"] == ["tensorboard", "wandb"]
    older = tmp_path / "older.toml"
    older.write_text('preset = "cats64"\n[run]\nlogger = "tensorboard,wandb"\neval_metrics = "inception"\n'
                     '[loss]\ndiffaug = "color,cutout"\n')
    assert load_toml(older) == cfg
    assert override(preset("fashion32"), {"logger": "none"}).logging.logger == ()
    with pytest.raises(ConfigError, match="--logger: must be a list of names"):
        from_dict({"logging": {"logger": 3}})


def test_repeated_and_comma_list_flags_give_one_value(cli, tmp_path) -> None:
    one = cli("run", "--logger", "tensorboard", "--logger", "mlflow", "--diffaug", "color,cutout", "--dry-run")
    other = cli("run", "--logger", "tensorboard,mlflow", "--diffaug", "color", "--diffaug", "cutout", "--dry-run")
    assert one.exit_code == other.exit_code == 0, one.output
    assert "'tensorboard,mlflow'" in one.stdout and "'color,cutout'" in one.stdout
    assert one.stdout == other.stdout


def test_dry_run_names_the_file_for_the_fields_of_an_older_layout() -> None:
    """--dry-run's sources read a config.toml of the layout before as load_toml does: [run] eval_every and
    [perf] ema_decay come from the file, under their sections of today."""
    sources = value_sources(None, str(GOLDEN / "config-before-sections-fashion32-tuned.toml"), {})
    file = f"file {GOLDEN / 'config-before-sections-fashion32-tuned.toml'}"
    assert sources["gan.ema_decay"] == sources["eval.eval_every"] == sources["gan.diffaug"] == file
    assert sources["checkpoint.checkpoint_every_steps"] == sources["logging.logger"] == file


@pytest.mark.parametrize(("value", "message"), [
    ("5", "must be A:B, the first and last step to profile (e.g. 20:25), got '5'"),
    ("a:b", "must be A:B, the first and last step to profile (e.g. 20:25), got 'a:b'"),
    ("0:3", "must be A:B with 1 <= A <= B, got '0:3'"),
    ("7:3", "must be A:B with 1 <= A <= B, got '7:3'"),
])
def test_profile_steps_are_a_range_from_step_1(value: str, message: str) -> None:
    from gantrain.engine.config import LoggingConfig

    assert LoggingConfig(profile_steps=" 20:25 ").profile_range == (20, 25)
    assert LoggingConfig(profile_steps="3:3").profile_range == (3, 3)
    assert LoggingConfig().profile_range is None
    with pytest.raises(ConfigError) as info:
        LoggingConfig(profile_steps=value)
    assert str(info.value) == f"--profile-steps: {message}"


def test_resume_flags_carry_the_run_folder_and_the_launch() -> None:
    """The line of an interrupted run said `--resume auto` alone: without --out it looked in the default preset's
    folder, and a DDP run continued as one process (the launch comes from the command, not the checkpoint)."""
    cfg = override(preset("cats64"), {"out": "runs/my cats"})
    assert cfg.resume_flags == "--resume auto --out 'runs/my cats'"
    assert preset("fashion32").resume_flags == "--resume auto --out runs/fashion32"
    assert override(cfg, {"ddp": True, "nproc": 4}).resume_flags == \
        "--resume auto --out 'runs/my cats' --ddp --nproc 4"
    assert override(cfg, {"ddp": True, "nproc": 2, "nnodes": 3}).resume_flags.endswith("--ddp --nproc 2 --nnodes 3")
    assert override(cfg, {"ray": True, "ray_workers": 3}).resume_flags.endswith("--ray --ray-workers 3")
