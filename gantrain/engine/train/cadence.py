"""When something is due, as a pure predicate of the run's one clock (optimiser steps, images seen, whole epochs).

A :class:`Cadence` holds ``every N`` for each unit (0 = not by that unit). After a step that took the run from
``images_before`` to ``images`` images and to step ``step``, :meth:`Cadence.after_step` is true when a multiple of
``steps`` was reached or a multiple of ``images`` was crossed (a batch rarely lands on the multiple itself);
:meth:`Cadence.at_epoch_end` when ``epochs_done`` is a multiple of ``epochs``. ``at_end`` makes the run's last
step due as well (bench --to-quality measures the end of its budget).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cadence:
    epochs: int = 0
    steps: int = 0
    images: float = 0  # (a fraction of an epoch's images need not be whole)
    at_end: bool = False

    def __post_init__(self) -> None:
        if min(self.epochs, self.steps, self.images) < 0:
            raise ValueError(f"a cadence counts up: every {self.epochs} epochs, {self.steps} steps, "
                             f"{self.images} images")

    @property
    def active(self) -> bool:
        return bool(self.epochs or self.steps or self.images or self.at_end)

    def after_step(self, step: int, images_before: int, images: int, last_step: int | None = None) -> bool:
        """Due right after optimiser step ``step`` (counted from 1), which brought the images seen from
        ``images_before`` to ``images``; ``last_step``: the run's last step (due when ``at_end``)."""
        if self.steps and step % self.steps == 0:
            return True
        if self.images and images // self.images > images_before // self.images:
            return True
        return self.at_end and last_step is not None and step >= last_step

    def at_epoch_end(self, epochs_done: int) -> bool:
        """Due at the end of whole epoch ``epochs_done`` (counted from 1)."""
        return bool(self.epochs) and epochs_done % self.epochs == 0
