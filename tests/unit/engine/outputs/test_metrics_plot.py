"""metrics.png (--eval-every): one axis per scale, every series with point markers, KID's spread as error bars,
the 0-1 axis for precision, recall, density and coverage, the epoch on top; read from the Figure that is saved."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from gantrain.engine.metrics.tracking import QUALITY_PANELS, QualityTracker
from gantrain.engine.outputs.images import panel_figure

STEPS_PER_EPOCH = 50


def evaluation(epoch: int, **values) -> dict:
    """An evaluation record as QualityTracker writes it (at the end of epoch ``epoch``)."""
    record = {"step": epoch * STEPS_PER_EPOCH, "epoch": epoch, "fd": 40.0 / epoch, "kid_mean": 0.04 / epoch,
              "kid_std": 0.005, "precision": 0.2 * epoch, "recall": 0.15 * epoch, "density": 0.25 * epoch,
              "coverage": 0.1 * epoch, "classifier_score": 1.5 + epoch, "best_fd": 40.0 / epoch,
              "eval_samples": 100, "eval_s": 1.0, "time": 0.0}
    record.update(values)
    return record


def figure_of(records: list[dict]):
    fig = panel_figure(records, QUALITY_PANELS, "Quality metrics")
    assert fig is not None
    return fig


def labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def by_title(fig) -> dict[str, object]:
    return {ax.get_title().split(" (")[0]: ax for ax in fig.axes}


def test_one_axis_per_scale_with_markers_and_kid_apart_from_precision() -> None:
    fig = figure_of([evaluation(e) for e in (1, 2, 3, 4)])
    axes = by_title(fig)
    assert len(fig.axes) == 4
    assert {name: labels(ax) for name, ax in axes.items()} == {
        "Fréchet distance": ["fd"], "KID": ["kid_mean"],
        "precision, recall, density, coverage": ["precision", "recall", "density", "coverage"],
        "classifier score": ["classifier_score"]}
    kid = [ax for ax in fig.axes if "kid_mean" in labels(ax)]
    precision = [ax for ax in fig.axes if "precision" in labels(ax)]
    assert len(kid) == len(precision) == 1 and kid[0] is not precision[0]
    for ax in fig.axes:
        handles, _ = ax.get_legend_handles_labels()
        assert all(line.get_marker() == "o" for line in handles), ax.get_title()
        assert ax.get_xlabel() == "step"
    # every point of a series is drawn at its step
    fd_line = axes["Fréchet distance"].get_legend_handles_labels()[0][0]
    assert list(fd_line.get_xdata()) == [50, 100, 150, 200]
    assert list(fd_line.get_ydata()) == pytest.approx([40.0, 20.0, 40 / 3, 10.0])


def test_the_share_axis_runs_from_0_to_1_and_grows_for_a_density_above_1() -> None:
    within = by_title(figure_of([evaluation(e) for e in (1, 2, 3, 4)]))  # density up to 1.0
    assert within["precision, recall, density, coverage"].get_ylim() == pytest.approx((-0.03, 1.03))
    above = by_title(figure_of([evaluation(e) for e in (1, 2, 3, 4)] + [evaluation(6)]))  # density 1.5
    low, high = above["precision, recall, density, coverage"].get_ylim()
    assert low == pytest.approx(-0.03 * 1.5) and high == pytest.approx(1.03 * 1.5)
    assert above["KID"].get_ylim()[1] < 0.1  # KID keeps its own scale


def test_kid_spread_as_error_bars_where_finite() -> None:
    """A null spread (metrics.jsonl's non-finite) and a NaN one are points without a bar, not an error."""
    records = [evaluation(1), evaluation(2, kid_std=None), evaluation(3, kid_std=math.nan), evaluation(4, kid_std=0.01)]
    kid = by_title(figure_of(records))["KID"]
    (container,) = kid.containers
    (bars,) = container.lines[2]
    segments = [tuple(map(tuple, seg)) for seg in bars.get_segments()]
    assert segments == [((50, pytest.approx(0.035)), (50, pytest.approx(0.045))),
                        ((200, pytest.approx(0.0)), (200, pytest.approx(0.02)))]
    assert list(kid.get_legend_handles_labels()[0][0].get_xdata()) == [50, 100, 150, 200]  # every point drawn
    nothing = by_title(figure_of([evaluation(1, kid_std=None), evaluation(2, kid_std=math.nan)]))["KID"]
    assert nothing.containers == [] and labels(nothing) == ["kid_mean"]


def test_inception_scores_join_fd_and_kid_and_an_absent_metric_drops_its_axis() -> None:
    records = [{k: v for k, v in evaluation(e, inception_fid=90.0 / e, inception_kid_mean=0.08 / e,
                                            inception_kid_std=0.01).items() if k != "classifier_score"}
               for e in (1, 2)]
    fig = figure_of(records)
    assert len(fig.axes) == 3
    axes = by_title(fig)
    assert labels(axes["Fréchet distance"]) == ["fd", "inception_fid"]
    assert labels(axes["KID"]) == ["kid_mean", "inception_kid_mean"]
    assert len(axes["KID"].containers) == 2
    assert "classifier score" not in axes


def test_epochs_on_top() -> None:
    fig = figure_of([evaluation(e) for e in (1, 2, 3, 4)])
    FigureCanvasAgg(fig).draw()  # secondary axes take their limits when drawn
    for ax in fig.axes:
        (top,) = ax.child_axes
        assert top.get_xlabel() == "epoch"
        low, high = ax.get_xlim()
        assert top.get_xlim() == pytest.approx((low / STEPS_PER_EPOCH, high / STEPS_PER_EPOCH))


def test_plot_writes_metrics_png_from_the_evaluation_records(tmp_path: Path) -> None:
    records = [{"step": 10, "epoch": 0, "loss_d": 1.2, "loss_g": 0.8}, evaluation(1),
               {"step": 60, "epoch": 1, "loss_d": 1.1, "loss_g": 0.9}, evaluation(2, kid_std=None)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = QualityTracker.plot(tmp_path)
    assert path == tmp_path / "metrics.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 800 and png.size[1] > 600


def test_no_evaluation_record_writes_no_plot(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss_d": 1.0}) + "\n")
    assert QualityTracker.plot(tmp_path) is None and not (tmp_path / "metrics.png").exists()
    assert panel_figure([evaluation(1, fd=None, kid_mean=None, precision=None, recall=None, density=None,
                                    coverage=None, classifier_score=None)], QUALITY_PANELS, "t") is None


def test_a_short_runs_loss_curves_mark_their_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """losses.png of a 20-step run (one log record) drew a line of one point: nothing. Up to FEW_POINTS points
    each is marked; a long run's curves stay plain lines."""
    from gantrain.engine.outputs import images

    figures = []
    monkeypatch.setattr(images, "save_figure", lambda fig, path: figures.append(fig) or path)
    images.plot_curves([{"step": 20, "loss_d": 1.2, "loss_g": 0.7}], ["loss_d", "loss_g"], tmp_path / "a.png",
                       "GAN losses", "BCE loss")
    assert [line.get_marker() for line in figures[0].axes[0].get_lines()] == ["o", "o"]
    many = [{"step": i, "loss_d": 1.0, "loss_g": 2.0} for i in range(images.FEW_POINTS + 1)]
    images.plot_curves(many, ["loss_d", "loss_g"], tmp_path / "b.png", "GAN losses", "BCE loss")
    assert [line.get_marker() for line in figures[1].axes[0].get_lines()] == ["None", "None"]
