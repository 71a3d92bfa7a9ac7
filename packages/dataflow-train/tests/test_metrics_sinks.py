"""The metrics sinks: JSONL always, TensorBoard events with the same tags and values."""

from __future__ import annotations

import json
import math

import pytest
from train_support import put_samples, tiny_objective

from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import (
    FanOutMetrics,
    JsonlMetrics,
    default_metrics,
    read_jsonl,
    tensorboard_available,
)
from dataflow.train.optim import OptimConfig
from dataflow.train.trainer import Trainer

needs_tensorboard = pytest.mark.skipif(
    not tensorboard_available(),
    reason="tensorboard is not installed (the train test session installs it)",
)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_jsonl_keeps_non_finite_values_as_valid_json_and_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = JsonlMetrics(path)
    sink.write(1, {"loss": 2.5, "grad_norm": math.inf})
    sink.close()
    sink = JsonlMetrics(path)  # a resumed run continues the file
    sink.write(2, {"loss": math.nan})
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "grad_norm": "inf"},
        {"step": 2, "loss": "nan"},
    ]


def test_fan_out_closes_every_sink_and_reports_the_first_failure(tmp_path):
    closed = []

    class Failing:
        def write(self, step, metrics):
            pass

        def close(self):
            closed.append("failing")
            raise OSError("disk gone")

    jsonl = JsonlMetrics(tmp_path / "m.jsonl")
    with pytest.raises(OSError, match="disk gone"):
        FanOutMetrics([Failing(), jsonl]).close()
    assert closed == ["failing"] and jsonl._file.closed


@needs_tensorboard
def test_a_training_run_writes_the_same_scalars_to_tensorboard_and_jsonl(tmp_path):
    store = open_store("memory://tb", retain_on_release=True)
    refs = put_samples(store, 8, lengths=[5, 8])
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, seed=1)
    config = TrainerConfig(accumulation_steps=2, optim=OptimConfig(lr=1e-2), progress=False)
    Trainer(tiny_objective(), loader, config, metrics=default_metrics(tmp_path)).fit()

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    scalars = _scalars(tmp_path / "tensorboard")
    assert [row["step"] for row in rows] == [1, 2]
    assert {"loss", "lr", "grad_norm", "train/acc_0", "train/acceptance_rate_0"} <= set(scalars)
    assert not any(tag.startswith("train/train/") for tag in scalars)
    for tag, points in scalars.items():
        assert [step for step, _ in points] == [1, 2], tag
        for (step, value), row in zip(points, rows, strict=True):
            assert value == pytest.approx(row[tag], rel=1e-6, abs=1e-7), (tag, step)


@needs_tensorboard
def test_a_resumed_run_hides_the_steps_a_crashed_run_logged_past_its_checkpoint(tmp_path):
    crashed = default_metrics(tmp_path)
    for step in (1, 2, 3, 4):  # checkpoint at 2, crash after logging 4
        crashed.write(step, {"loss": 10.0 + step})
    crashed.close()
    resumed = default_metrics(tmp_path, resumed_from=2)
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 20.0 + step})
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["loss"] == [
        (1, 11.0),
        (2, 12.0),
        (3, 23.0),
        (4, 24.0),
        (5, 25.0),
    ]
