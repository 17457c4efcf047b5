"""Run metrics: append-only JSONL (survives kills and resumes), learning-curve plots, and
`RunDir`, the output directory every experiment writes.

    with MetricsLog(os.path.join(run_dir, "metrics.jsonl")) as log:
        log.write(dict(stage="ppo", iteration=1, reward=0.3))
    plot_curves(read_jsonl(path), os.path.join(run_dir, "curves.png"), stage="ppo",
                x="iteration", keys=("reward", "kl_ref"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence


class MetricsLog:
    """Appends one JSON object per line and flushes each, so a killed run loses nothing."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file = open(path, "a+")
        # A run killed mid-write leaves a partial line: end it so the next record stays whole.
        if self._file.tell() > 0:
            self._file.seek(self._file.tell() - 1)
            if self._file.read(1) != "\n":
                self._file.write("\n")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunDir:
    """An experiment's output directory: config.json, metrics.jsonl and curves.png.

    `log(record)` appends the record and, for records of `stage`, redraws the curves of `keys`
    against `x`, so the picture is current whenever a run is stopped. With `tensorboard`, every
    number of every record also goes to TensorBoard event files in `tb/` (tag `stage/key`, step
    the record's `x` or `step`), flushed at each record.
    """

    def __init__(self, path: str, config, stage: str, x: str, keys: Sequence[str],
                 title: str = "", tensorboard: bool = False):
        writer = _tensorboard_writer(os.path.join(path, "tb")) if tensorboard else None
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self.curves_path = os.path.join(path, "curves.png")
        self._metrics = MetricsLog(self.metrics_path)
        self._plot = dict(stage=stage, x=x, keys=keys, title=title)
        self._writer = writer

    def log(self, record: dict) -> None:
        self._metrics.write(record)
        if record.get("stage") == self._plot["stage"]:
            plot_curves(read_jsonl(self.metrics_path), self.curves_path, **self._plot)
        if self._writer is not None:
            step = record.get(self._plot["x"], record.get("step"))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{record.get('stage', 'run')}/{key}", value, step)
            self._writer.flush()

    def rewind(self, drop: Callable[[dict], bool]) -> None:
        """Remove the records `drop` selects: the work a resumed run is about to redo (logged
        by a run killed before its checkpoint), so metrics.jsonl ends as if it never stopped.
        The file is replaced atomically."""
        records = read_jsonl(self.metrics_path)
        kept = [r for r in records if not drop(r)]
        if len(kept) == len(records):
            return
        self._metrics.close()
        scratch = self.metrics_path + ".rewind"
        with open(scratch, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(scratch, self.metrics_path)
        self._metrics = MetricsLog(self.metrics_path)

    def close(self) -> None:
        self._metrics.close()
        if self._writer is not None:
            self._writer.close()


def _tensorboard_writer(directory: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs tensorboardX: pip install "
                          "'jaxrl_llm[tensorboard]' (or pip install tensorboardX)") from None
    return SummaryWriter(directory)


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics file; a truncated last line (killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_curves(records: Sequence[dict] | Mapping[str, Sequence[dict]], path: str, stage: str,
                x: str, keys: Sequence[str], title: str = "") -> None:
    """One small panel per metric in `keys` against `x`, for records with `stage == stage`.

    `records` is one run's, or `{label: records}` for one labelled line per run (comparisons).
    Resumed runs may log an iteration twice: the last record for each `x` wins. Keys that no
    record has are skipped, so one call serves configurations that log different metrics.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    runs = dict(records) if isinstance(records, Mapping) else {"": records}
    number = lambda v: isinstance(v, (int, float))
    for label, run in runs.items():
        by_x = {r[x]: r for r in run if r.get("stage") == stage and x in r}
        runs[label] = [by_x[k] for k in sorted(by_x)]
    keys = [k for k in keys if any(number(r.get(k)) for run in runs.values() for r in run)]
    if not keys:
        return
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, squeeze=False,
                             figsize=(4 * cols, 2.8 * math.ceil(len(keys) / cols)))
    for ax, key in zip(axes.flat, keys):
        for label, run in runs.items():
            points = [(r[x], r[key]) for r in run if number(r.get(key))]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3,
                        label=label or None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(x, fontsize=8)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
