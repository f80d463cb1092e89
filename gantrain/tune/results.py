"""An experiment's results: ranked trial rows, ``results.csv``, ``best.toml``, ``trials.png`` and the table.

Trials are ranked by the last value of the objective each reported (what rerunning its config for the same
budget gives), best first; trials with no finite objective (errors, NaN divergence) rank last.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from gantrain.engine import Config, RunDir, atomic_write_text, override, read_metrics, save_figure, to_toml
from gantrain.tune.settings import TuneSettings
from gantrain.tune.space import Space
from gantrain.tune.trainable import (CHECKPOINT_FILE, LOSS_KEYS, QUALITY_KEYS, REFUSED, RUN_FOLDER, TRAIN_FOLDER,
                                     report_every, trial_epochs)

BEST_RUN_FOLDER = "best-run"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    """The trial's last report."""
    status: str
    note: str = ""
    checkpoint: str = ""
    history: list[tuple[float, float]] = field(default_factory=list)
    """(epoch, objective) of every report."""
    baseline: bool = False
    rank: int = 0

    def objective(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def trial_number(self) -> str:
        """The trial's index within the experiment (its id without the experiment's prefix)."""
        return self.trial_id.rpartition("_")[2]

    @property
    def epochs(self) -> int:
        return int(self.metrics.get("epoch", 0) or 0)


@dataclass
class Outcome:
    folder: Path
    rows: list[TrialRow]
    settings: TuneSettings
    space: Space
    interrupted: bool
    best_config: Path | None
    results_csv: Path
    plot: Path | None

    @property
    def best(self) -> TrialRow | None:
        return self.rows[0] if self.rows and self.rows[0].objective(self.settings.metric) is not None else None

    @property
    def baseline(self) -> TrialRow | None:
        return next((r for r in self.rows if r.baseline), None)


# ----- rows from Ray's ResultGrid ------------------------------------------------------------------------
def summarise(grid, cfg: Config, settings: TuneSettings, space: Space, folder: Path) -> Outcome:
    """Ranks the trials and writes results.csv, best.toml and trials.png into ``folder``."""
    # PBT moves every trial's values, the baseline's too: it is then no un-tuned reference
    baseline = space.baseline_point(cfg) if settings.baseline and settings.scheduler != "pbt" else None
    rows = rank([row_from(result, settings, trial_epochs(cfg, settings), baseline) for result in grid],
                settings.metric, settings.mode)
    # Ray marks every trial that ended (finished, stopped, diverged) as done; Ctrl-C leaves some running or
    # not yet created.
    interrupted = len(rows) < space.num_trials(settings.num_samples) or any(r.status == "unfinished" for r in rows)
    outcome = Outcome(folder, rows, settings, space, interrupted, None, folder / "results.csv", None)
    write_csv(outcome, outcome.results_csv)
    if outcome.best is not None:
        outcome.best_config = write_best(outcome.best, cfg, settings, folder)
    outcome.plot = plot_trials(rows, settings.metric, folder / "trials.png")
    return outcome


def row_from(result, settings: TuneSettings, total_epochs: int, baseline: dict[str, Any] | None) -> TrialRow:
    metrics = dict(result.metrics or {})
    params = {k: _plain(v) for k, v in (result.config or {}).items()}
    status, note = trial_status(metrics, result.error, total_epochs)
    if result.checkpoint:
        checkpoint = str(Path(result.checkpoint.path) / CHECKPOINT_FILE)
    else:  # a multi-worker trial: its Train job keeps the checkpoints (Tune gets its reports only): the newest
        kept = sorted((Path(result.path) / TRAIN_FOLDER).glob(f"checkpoint_*/{CHECKPOINT_FILE}"),
                      key=lambda p: p.stat().st_mtime)
        checkpoint = str(kept[-1]) if kept else ""
    return TrialRow(Path(result.path).name.removeprefix("trial_"), params, metrics, status, note, checkpoint,
                    merged_history(history(result, settings.metric), own_history(Path(result.path), settings.metric)),
                    baseline is not None and params == baseline)


def trial_status(metrics: dict, error: BaseException | None, total_epochs: int) -> tuple[str, str]:
    if error is not None:
        return "error", _last_line(error)
    if metrics.get(REFUSED):
        return "refused", str(metrics[REFUSED])
    if metrics.get("diverged"):
        return "diverged", str(metrics["diverged"])
    if metrics.get("epoch", 0) >= total_epochs:  # its whole budget reported: done, whatever "done" says (Ray's
        return "done", ""  # saved state can hold the last result before Ray marked it done: a resume read that)
    if not metrics.get("done"):
        return "unfinished", ""
    return "stopped", "by the scheduler, before the end of its budget"


def _last_line(error: BaseException) -> str:
    """Ray wraps a trial's exception with its whole traceback; the last line names the actual error."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1].strip() if lines else type(error).__name__)[:200]


def history(result, metric: str) -> list[tuple[float, float]]:
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or "epoch" not in frame:
        return []
    return [(float(e), float(v)) for e, v in zip(frame["epoch"], frame[metric]) if math.isfinite(float(v))]


def own_history(trial_dir: Path, metric: str) -> list[tuple[float, float]]:
    """(epoch, objective) of every evaluation the trial wrote into its own run folder's metrics.jsonl: what it
    reported, including reports Ray never took in (sent while its driver was being killed)."""
    records = read_metrics(RunDir(trial_dir / RUN_FOLDER).metrics)
    return [(float(r["epoch"]), float(r[metric])) for r in records
            if "eval_samples" in r and "epoch" in r and isinstance(r.get(metric), (int, float))
            and math.isfinite(r[metric])]


def merged_history(reported: list[tuple[float, float]], own: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Ray's history of a trial with the epochs only the trial's metrics.jsonl holds added, by epoch."""
    epochs = {epoch for epoch, _ in reported}
    return sorted(reported + [(epoch, value) for epoch, value in own if epoch not in epochs])


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def rank(rows: list[TrialRow], metric: str, mode: str) -> list[TrialRow]:
    sign = 1.0 if mode == "min" else -1.0

    def key(row: TrialRow) -> tuple[int, float]:
        value = row.objective(metric)
        return (1, 0.0) if value is None else (0, sign * value)

    ordered = sorted(rows, key=key)
    for i, row in enumerate(ordered, 1):
        row.rank = i
    return ordered


# ----- files ----------------------------------------------------------------------------------------------
def write_csv(outcome: Outcome, path: Path) -> Path:
    names = outcome.space.names
    metric_keys = [*QUALITY_KEYS, *LOSS_KEYS, "epoch", "step"]
    header = ["rank", "trial", "status", "note", "baseline", *names, *metric_keys, "checkpoint"]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for row in outcome.rows:
        writer.writerow([row.rank, row.trial_id, row.status, row.note, row.baseline,
                         *[row.params.get(n, "") for n in names], *[row.metrics.get(k, "") for k in metric_keys],
                         row.checkpoint])
    return atomic_write_text(path, text.getvalue())


def best_config(row: TrialRow, cfg: Config, settings: TuneSettings, folder: Path) -> Config:
    """The config the best trial trained with, as a normal run: its values, the experiment's budget, the quality
    metrics logged at the epochs the trial reported them (so the run's FD compares with the trial's), and for
    trials of --workers-per-trial N a DDP run of N processes (the same global batch; before, best.toml ran one
    process at 1/N of the trial's batch)."""
    launch = {"ddp": True, "nproc": settings.workers_per_trial} if settings.workers_per_trial > 1 else {}
    return override(cfg, {**row.params, "epochs": trial_epochs(cfg, settings), "eval_every": report_every(cfg),
                          "out": str(folder / BEST_RUN_FOLDER), **launch})


def write_best(row: TrialRow, cfg: Config, settings: TuneSettings, folder: Path) -> Path:
    path = folder / "best.toml"
    value = row.objective(settings.metric)
    header = (f"# best trial {row.trial_id} of gantrain tune experiment {folder.name}: {settings.metric} = {value:.6g} "
              f"after {row.epochs} epochs\n# reproduce it with: gantrain run --config {path}\n")
    return atomic_write_text(path, header + to_toml(best_config(row, cfg, settings, folder)))


def plot_trials(rows: list[TrialRow], metric: str, path: Path) -> Path | None:
    """The objective of every trial against its training epochs; best and baseline drawn heavier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    drawn = [r for r in rows if r.history]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in reversed(drawn):  # the best on top
        style = _line_style(row)
        ax.plot(*zip(*row.history), marker="o", markersize=3, **style)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} of every trial over training ({len(drawn)} trials)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _line_style(row: TrialRow) -> dict[str, Any]:
    label = f"#{row.rank} {row.trial_id}" + (" (baseline)" if row.baseline else "")
    if row.rank == 1:
        return {"label": label, "linewidth": 2.5, "color": "tab:green"}
    if row.baseline:
        return {"label": label, "linewidth": 2.0, "color": "black", "linestyle": "--"}
    return {"label": label, "linewidth": 1.0, "alpha": 0.7}


# ----- the console table ----------------------------------------------------------------------------------
# Optional columns, in the order they are dropped from the table when the console is too narrow for them.
OPTIONAL_COLUMNS = (("loss G", "loss_g"), ("loss D", "loss_d"), ("recall", "recall"), ("prec", "precision"))


def results_table(outcome: Outcome, width: int = 120) -> Table:
    """The top trials: rank, id, searched values, FD, the other metrics and losses as ``width`` allows, status."""
    settings, names = outcome.settings, outcome.space.names
    shown = outcome.rows[: settings.top]
    rows = [_row_cells(row, names) for row in shown]
    headers = ["#", "trial", *names, "fd", *[h for h, _ in reversed(OPTIONAL_COLUMNS)], "epochs", "status"]
    keep = _fitting_columns(headers, rows, width)
    caption = _caption(shown)
    table = Table(title=f"top {len(shown)} of {len(outcome.rows)} trials by {settings.metric} ({settings.mode})",
                  caption=caption, box=box.SIMPLE_HEAD)
    for i in keep:
        header = headers[i].replace("_", "\n") if len(headers[i]) > 8 else headers[i]  # label_smoothing: 2 lines
        table.add_column(header, justify="left" if headers[i] in ("trial", "status") else "right",
                         no_wrap=headers[i] != "status")
    for cells in rows:
        table.add_row(*[cells[i] for i in keep])
    return table


def _row_cells(row: TrialRow, names: list[str]) -> list[str]:
    values = [_cell(row.params.get(n)) for n in names]
    optional = [_cell(row.metrics.get(key)) for _, key in reversed(OPTIONAL_COLUMNS)]
    status = row.status + (f": {row.note}" if row.status in ("diverged", "error", "refused") else "")
    return [str(row.rank), row.trial_number + ("*" if row.baseline else ""), *values, _cell(row.metrics.get("fd")),
            *optional, str(row.epochs), status]


def _caption(rows: list[TrialRow]) -> str | None:
    """Where trial N lives (Ray's trial ids share one prefix per experiment) and what * marks."""
    if not rows:
        return None
    prefix = rows[0].trial_id.rpartition("_")[0]
    baseline = ", * the baseline (the config's own values)" if any(r.baseline for r in rows) else ""
    return f"trial N: folder trial_{prefix}_N{baseline}"


def _fitting_columns(headers: list[str], rows: list[list[str]], width: int) -> list[int]:
    """Indices of the columns to show: all that fit in ``width``, dropping the optional ones first."""
    def needed(i: int) -> int:
        header = max(len(part) for part in headers[i].split("_")) if len(headers[i]) > 8 else len(headers[i])
        cells = [len(r[i]) if headers[i] != "status" else min(len(r[i]), 14) for r in rows]  # status may wrap
        return max([header, *cells]) + 3  # padding and the gap between columns

    keep = list(range(len(headers)))
    for header, _ in OPTIONAL_COLUMNS:
        if sum(needed(i) for i in keep) + 2 <= width:
            break
        keep.remove(headers.index(header))
    return keep


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value in (None, "") else str(value)
    return f"{value:.3g}"


def comparison(outcome: Outcome) -> str | None:
    """One line: the best trial's objective against the baseline trial's (the config's own values)."""
    best, base, metric = outcome.best, outcome.baseline, outcome.settings.metric
    if best is None or base is None or base.objective(metric) is None:
        return None
    budget = "the same budget" if base.epochs == best.epochs else f"{base.epochs} vs {best.epochs} epochs"
    return (f"best {metric} {best.objective(metric):.4g} (trial {best.trial_id}) vs baseline "
            f"{base.objective(metric):.4g} (trial {base.trial_id}, the config's own values) at {budget}")


def print_outcome(outcome: Outcome, console) -> None:
    """The table, the best-vs-baseline line and where the files are (paths unwrapped, for copying)."""
    console.print(results_table(outcome, console.width))
    line = comparison(outcome)
    if line:
        console.print(line)
    if outcome.best_config is not None:
        console.print(f"best config: {outcome.best_config} (gantrain run --config {outcome.best_config})",
                      soft_wrap=True)
        if outcome.best is not None and outcome.best.checkpoint:
            console.print(f"best generator: {outcome.best.checkpoint}", soft_wrap=True)
    plot = f", {outcome.plot.name}" if outcome.plot else ""
    console.print(f"results: {outcome.results_csv}{plot} in {outcome.folder}", soft_wrap=True)
