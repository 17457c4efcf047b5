"""Metrics JSONL survives a kill mid-write; plots keep the last record of a resumed iteration."""

import dataclasses
import os

from jaxrl_llm.metrics import MetricsLog, plot_curves, read_jsonl


def test_jsonl_round_trip_skips_a_truncated_line(tmp_path):
    path = str(tmp_path / "run" / "metrics.jsonl")
    with MetricsLog(path) as log:
        log.write(dict(stage="ppo", iteration=1, reward=0.5))
    with open(path, "a") as f:
        f.write('{"stage": "ppo", "iter')  # a kill during a write
    with MetricsLog(path) as log:  # a resumed run appends
        log.write(dict(stage="ppo", iteration=2, reward=0.7))
    assert [r["iteration"] for r in read_jsonl(path)] == [1, 2]


def test_plot_curves_writes_a_png_and_skips_absent_keys(tmp_path, monkeypatch):
    records = [dict(stage="ppo", iteration=1, reward=0.1), dict(stage="sft", step=1, loss=2.0),
               dict(stage="ppo", iteration=1, reward=0.2), dict(stage="ppo", iteration=2,
                                                                reward=0.3)]
    plotted = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: plotted.append(a) or original(self, *a, **k))
    path = str(tmp_path / "curves.png")
    plot_curves(records, path, stage="ppo", x="iteration", keys=("reward", "absent"))
    assert os.path.getsize(path) > 1000
    assert plotted == [((1, 2), (0.2, 0.3))]  # last record of iteration 1 wins
    plot_curves(records, str(tmp_path / "none.png"), stage="ppo", x="iteration", keys=("x",))
    assert not os.path.exists(tmp_path / "none.png")


def test_rewind_drops_the_work_a_resumed_run_redoes(tmp_path):
    from jaxrl_llm.metrics import RunDir

    @dataclasses.dataclass
    class Config:
        seed: int = 0

    run = RunDir(str(tmp_path), Config(), stage="ppo", x="iteration", keys=("reward",))
    for iteration in (1, 2, 3):
        run.log(dict(stage="ppo", iteration=iteration, reward=0.1 * iteration))
    run.rewind(lambda r: r["iteration"] > 1)  # checkpointed at 1: iterations 2 and 3 are redone
    run.log(dict(stage="ppo", iteration=2, reward=0.25))
    run.close()
    assert [(r["iteration"], r["reward"]) for r in read_jsonl(run.metrics_path)] == [
        (1, 0.1), (2, 0.25)]


def read_scalars(directory):
    """(tag, step, value) of every scalar in the TensorBoard event files of `directory`."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):  # TFRecord framing: length, its crc, payload, its crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_run_dir_writes_every_number_to_tensorboard(tmp_path):
    from jaxrl_llm.metrics import RunDir

    @dataclasses.dataclass
    class Config:
        seed: int = 0

    run = RunDir(str(tmp_path), Config(), stage="ppo", x="iteration", keys=("reward",),
                 tensorboard=True)
    run.log(dict(stage="sft", step=3, loss=0.5, done=True, note="text"))
    run.log(dict(stage="ppo", iteration=1, reward=0.25))
    run.close()
    scalars = read_scalars(os.path.join(tmp_path, "tb"))
    assert ("sft/loss", 3, 0.5) in scalars and ("ppo/reward", 1, 0.25) in scalars
    assert not any(tag.endswith(("/done", "/note")) for tag, _, _ in scalars)
