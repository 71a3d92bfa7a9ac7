"""Where a resumed consumer restarts from when it died before (or after) its first checkpoint."""

from dataflow.launch.builders.ranks import RankLayout
from dataflow.launch.builders.trainer_path import latest_checkpoint_step, rewind_records
from dataflow.launch.run_dir import RunDir
from dataflow.launch.trained_log import TrainedLog
from dataflow.train.distributed import LocalCollective
from dataflow.train.parallel.backend import LocalBackend


def test_no_checkpoint_means_nothing_durable(tmp_path):
    # -1 is the ledger's "nothing trained yet": reconcile then requeues every ASSIGNED/TRAINED
    # sample instead of refusing a checkpoint "ahead of the last acked step".
    run_dir = RunDir(tmp_path / "run").create()
    layout = RankLayout(0, 1, LocalCollective(), LocalBackend("fp32"))
    assert latest_checkpoint_step(run_dir, layout, "run") == -1


def test_rewind_to_no_checkpoint_drops_every_audit_line(tmp_path):
    run_dir = RunDir(tmp_path / "run").create()
    log = TrainedLog(run_dir.trained)
    log.append(1, ["a", "b"])
    log.append(2, ["c", "d"])
    rewind_records(run_dir, -1)
    assert TrainedLog(run_dir.trained).read() == []
