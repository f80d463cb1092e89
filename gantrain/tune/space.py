"""The search space: which config fields a search varies, and how, checked against the config tree.

A space is TOML shaped like a run's config.toml, one distribution per searched field::

    [optim]
    lr_g = { loguniform = [1e-5, 1e-2] }
    beta1 = { choice = [0.0, 0.5, 0.9] }
    [loss]
    label_smoothing = { uniform = [0.0, 0.3] }

Distributions: ``uniform``/``loguniform`` [low, high] (float fields), ``randint`` [low, high] (int fields,
both ends included), ``choice`` [values] and ``grid`` [values] (every value tried; random search only).
Every value a distribution can produce is validated by building a config from it, so a bad space fails
before any trial starts, with the field's own config error.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gantrain.engine import (Config, ConfigError, SECTION_TYPES, current_layout, field_index, override,
                             require_toml_file)

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
# PBT changes these mid-run: the restored optimisers and loss targets take new values without a restart.
PERTURBABLE = ("lr_g", "lr_d", "label_smoothing")
# Fields a trial sets itself (its folder, device and budget) or that a single-process trial cannot use.
RESERVED = {
    "out": "each trial writes into its own folder", "device": "set by --gpus-per-trial",
    "epochs": "set by --max-epochs", "max_steps": "the schedulers budget trials in epochs (--max-epochs)",
    "ddp": "a trial is one process", "nproc": "a trial is one process", "nnodes": "a trial is one process",
    "node_rank": "a trial is one process", "master_addr": "a trial is one process",
    "master_port": "a trial is one process", "sync_bn": "a trial is one process",
}

DEFAULT_SPACE = """\
# gantrain tune default search space
[optim]
lr_g = { loguniform = [1e-5, 1e-2] }
lr_d = { loguniform = [1e-5, 1e-2] }
beta1 = { choice = [0.0, 0.5, 0.9] }

[loss]
label_smoothing = { uniform = [0.0, 0.3] }
"""


@dataclass(frozen=True)
class Dimension:
    """One searched field: its section, name, distribution kind and the kind's arguments."""

    section: str
    name: str
    kind: str
    values: tuple

    def to_ray(self) -> Any:
        from ray import tune

        low, high = (self.values + (None, None))[:2]
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        if self.kind == "randint":
            return tune.randint(low, high + 1)  # Ray's upper end is exclusive; the space's is inclusive
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    @property
    def bounds(self) -> tuple[float, float] | None:
        """Range of a continuous dimension (PBT clips its perturbations into it); None for the others."""
        return (self.values[0], self.values[1]) if self.kind in ("uniform", "loguniform") else None

    def contains(self, value: Any) -> bool:
        if self.kind in ("choice", "grid"):
            return any(_same(value, candidate, self.name) for candidate in self.values)
        return self.values[0] <= value <= self.values[1]

    def describe(self) -> str:
        return f"{self.name} {self.kind}{list(self.values)}"


def _same(value: Any, candidate: Any, name: str) -> bool:
    """Whether a config value is a space's candidate: a list field's comma list, list and tuple alike."""
    if isinstance(value, tuple):
        index = field_index()
        try:  # the candidate read as the config reads that field
            return getattr(getattr(override(Config(), {name: candidate}), index[name][0]), name) == value
        except ConfigError:
            return False
    return value == candidate


@dataclass(frozen=True)
class Space:
    dimensions: tuple[Dimension, ...]
    text: str
    """The TOML the space was read from (saved in the experiment folder)."""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    @property
    def has_grid(self) -> bool:
        return any(d.kind == "grid" for d in self.dimensions)

    def num_trials(self, num_samples: int) -> int:
        """Trials the search creates: each sample runs every grid point."""
        return num_samples * math.prod(len(d.values) for d in self.dimensions if d.kind == "grid")

    def param_space(self) -> dict[str, Any]:
        """Ray's param_space: the trial config is a flat {field: value} dict (field names are unique)."""
        return {d.name: d.to_ray() for d in self.dimensions}

    def pbt_mutations(self) -> dict[str, Any]:
        mutations = {d.name: d.to_ray() for d in self.dimensions if d.name in PERTURBABLE}
        if not mutations:
            raise ConfigError(f"--space: pbt perturbs {', '.join(PERTURBABLE)}; the space searches none of them")
        return mutations

    def baseline_point(self, cfg: Config) -> dict[str, Any] | None:
        """The config's own values of the searched fields, or None where one lies outside the space."""
        index = field_index()
        point = {d.name: getattr(getattr(cfg, index[d.name][0]), d.name) for d in self.dimensions}
        if self.has_grid or not all(d.contains(point[d.name]) for d in self.dimensions):
            return None
        # a list field as the space spells it (Ray hands trials the space's values, JSON-friendly)
        return {d.name: next(c for c in d.values if _same(point[d.name], c, d.name)) if d.kind == "choice"
                else point[d.name] for d in self.dimensions}


def load_space(path: str | Path | None, base: Config) -> Space:
    """The space in ``path`` (or the default space), validated against ``base``."""
    if path is None:
        return parse_space(DEFAULT_SPACE, base, "default space")
    path = require_toml_file(path, "--space")
    return parse_space(path.read_text(), base, str(path))


def parse_space(text: str, base: Config, source: str) -> Space:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--space: {source} is not valid TOML ({exc})") from None
    dims = [_dimension(section, name, spec, source) for section, table in _sections(raw, source)
            for name, spec in table.items()]
    if not dims:
        raise ConfigError(f"--space: {source} searches no field")
    for dim in dims:
        _validate_values(dim, base, source)
    return Space(tuple(dims), text)


def _sections(raw: dict[str, Any], source: str) -> list[tuple[str, dict]]:
    """The space's tables, each field in the section it lives in now (a space written for an older layout,
    ``[loss] diffaug = ...``, still reads)."""
    for key, value in raw.items():
        if key not in SECTION_TYPES:
            raise ConfigError(f"--space: {source}: unknown section [{key}] (known: {', '.join(SECTION_TYPES)})")
        if not isinstance(value, dict):
            raise ConfigError(f"--space: {source}: [{key}] must be a table of field = {{ kind = [...] }}")
    return [(key, value) for key, value in current_layout(raw).items() if value]


def _dimension(section: str, name: str, spec: Any, source: str) -> Dimension:
    where = f"--space: {source}: {section}.{name}"
    index = field_index()
    if name not in index or index[name][0] != section:
        raise ConfigError(f"{where}: no such config field")
    if name in RESERVED:
        raise ConfigError(f"{where}: cannot be searched ({RESERVED[name]})")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: must be one distribution, e.g. {{ uniform = [0.0, 0.3] }}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list of values")
    _check_shape(kind, values, index[name][1], where)
    return Dimension(section, name, kind, tuple(values))


def _check_shape(kind: str, values: list, typ: type, where: str) -> None:
    if kind in ("choice", "grid"):
        return  # each value is checked against the field by _validate_values
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} takes [low, high], got {values}")
    low, high = values
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{where}: {kind} needs finite low < high, got {values}")
    if kind == "randint" and not (typ is int and all(isinstance(v, int) for v in values)):
        raise ConfigError(f"{where}: randint is for integer fields with integer bounds")
    if kind in ("uniform", "loguniform") and typ is not float:
        raise ConfigError(f"{where}: {kind} is for float fields; use randint or choice")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")


def _validate_values(dim: Dimension, base: Config, source: str) -> None:
    """Builds a config from each extreme or listed value: the field's own validation names the problem."""
    for value in dim.values:
        try:
            override(base, {dim.name: value})
        except ConfigError as exc:
            raise ConfigError(f"--space: {source}: {dim.section}.{dim.name} = {value!r}: {exc}") from None
