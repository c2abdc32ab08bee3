"""The run directory: its lock (two processes, a stale lock), and refused commands that change
nothing in it and leave no debris behind."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, TINY, run_lab
from lab.errors import UserError
from lab.run.rundir import LOCK, RunLock

HOLD = """
import sys, time
from lab.run.rundir import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on host "
                                            f"{socket.gethostname()}"):
            RunLock(str(run_dir)).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: the lock is stale (its process is gone) and is taken over.
    assert json.loads((run_dir / LOCK).read_text())["pid"] == holder.pid
    with RunLock(str(run_dir)):
        assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK).exists()


def test_a_lock_with_a_reused_process_id_is_stale(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # This very process's id, but a different start time: the holder is not this process.
    stale = {"host": socket.gethostname(), "pid": os.getpid(), "started": "1", "since": 0.0}
    (run_dir / LOCK).write_text(json.dumps(stale))
    with RunLock(str(run_dir)):
        assert json.loads((run_dir / LOCK).read_text())["started"] != "1"


def test_a_lock_from_another_host_is_left_alone(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = {"host": "elsewhere", "pid": 1, "started": None, "since": 0.0}
    (run_dir / LOCK).write_text(json.dumps(other))
    with pytest.raises(UserError, match="process 1 on host elsewhere"):
        RunLock(str(run_dir)).acquire()
    assert json.loads((run_dir / LOCK).read_text()) == other


def test_a_lock_on_a_new_directory_removes_it_with_the_lock(tmp_path):
    lock = RunLock(str(tmp_path / "new"))
    lock.acquire()
    assert (tmp_path / "new" / LOCK).is_file()
    lock.release()
    assert not (tmp_path / "new").exists()  # created for the lock, removed with it


def test_a_refused_lock_leaves_no_directory_of_its_own(tmp_path, monkeypatch):
    """Two starts race on a new run directory: this one makes the directory, the other takes
    the lock first (a live process: here, this one). This start is refused, naming the holder,
    and leaves the directory as the holder has it: the holder's lock alone, untouched."""
    import lab.run.rundir

    run_dir = tmp_path / "new"
    holder = RunLock(str(run_dir))
    makedirs = lab.run.rundir.paths.makedirs

    def made_then_taken(path):  # the other start wins the race for the lock
        makedirs(path)
        holder.acquire()

    monkeypatch.setattr(lab.run.rundir.paths, "makedirs", made_then_taken)
    late = RunLock(str(run_dir))
    with pytest.raises(UserError, match=f"in use by process {os.getpid()} on host "
                                        f"{socket.gethostname()}"):
        late.acquire()
    monkeypatch.undo()
    assert [p.name for p in run_dir.iterdir()] == [LOCK]
    assert json.loads((run_dir / LOCK).read_text()) == holder.me
    holder.release()  # the holder did not make the directory: it leaves it, empty
    assert list(run_dir.iterdir()) == []
    run_dir.rmdir()
    with RunLock(str(run_dir)):  # and the directory is free again
        assert (run_dir / LOCK).is_file()
    assert not run_dir.exists()


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def half_run(tmp_path_factory, small_data) -> Path:
    """A run stopped at its step-8 checkpoint (as if killed), with its metrics up to 8."""
    run_dir = tmp_path_factory.mktemp("half") / "run"
    run_lab(["train", str(TINY), f"run.dir={run_dir}", f"data.path={small_data}",
             "train.steps=8", "train.log_every=2", "train.eval_batches=1", "train.eval_every=0",
             "schedule.warmup_steps=2", "schedule.decay_steps=0", "model.n_layers=1",
             "checkpoint.every_steps=4"])
    (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
    return run_dir


def half_args(run_dir: Path, data: str, *extra: str) -> list[str]:
    return ["train", str(TINY), f"run.dir={run_dir}", f"data.path={data}", "train.steps=16",
            "train.log_every=2", "train.eval_batches=1", "train.eval_every=0",
            "schedule.warmup_steps=2", "schedule.decay_steps=0", "model.n_layers=1",
            "checkpoint.every_steps=4", *extra]


def test_train_refuses_a_locked_run(half_run, tmp_path, small_data):
    run_dir = tmp_path / "locked"
    shutil.copytree(half_run, run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        result = run_lab(half_args(run_dir, small_data), expect=2)
        assert f"in use by process {holder.pid}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    result = run_lab(half_args(run_dir, small_data))  # the holder is gone: the lock is stale
    assert "resuming at step 8" in result.stdout
    assert not (run_dir / LOCK).exists()


# ----------------------------------------------------------------------------- summary.json

# Summaries as `lab train` wrote them before lab.run.rundir.Summary existed (a finished branch; a
# planned run stopped by SIGTERM), with a key the class does not know.
OLD_SUMMARIES = [
    {"checkpoint_seconds": 0.276, "compile_seconds": 12.769, "data": "/data/stdlib",
     "eval_seconds": 3.381, "final_eval_loss": 3.5241057872772217, "flops": 70665633792,
     "flops_per_token": 5750784, "flops_spent": 23555211264, "name": "base/step4-decay2-1-sqrt",
     "non_embedding_params": 894080, "params": 935040, "peak_flops": 84324650531.0607,
     "peak_source": "measured float32 matmul peak of this CPU", "status": "finished",
     "steps": 6, "tokens": 12288, "train_seconds": 5.669, "parent": "runs/base",
     "branch_step": 4, "decay_steps": 2, "decay_shape": "1-sqrt"},
    {"data": "/data/stdlib", "final_eval_loss": None, "flops": 0, "flops_per_token": 5750784,
     "name": "planned", "non_embedding_params": 894080, "params": 935040,
     "predicted_interval": [3.1, 3.4], "predicted_loss": 3.25, "status": "preempted",
     "tokens": 0, "a_later_key": {"kept": [1, 2]}},
]


@pytest.mark.parametrize("old", OLD_SUMMARIES)
def test_a_summary_reads_and_writes_back_byte_for_byte(tmp_path, old):
    from lab.run.rundir import SUMMARY, Status, read_summary, write_summary

    (tmp_path / SUMMARY).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    before = (tmp_path / SUMMARY).read_bytes()
    summary = read_summary(tmp_path)
    assert summary.status is Status(old["status"]) and summary.params == 935040
    assert summary.final_eval_loss == old["final_eval_loss"]
    write_summary(tmp_path, summary)
    assert (tmp_path / SUMMARY).read_bytes() == before
    assert summary.to_dict() == old


def test_status_is_the_string_on_disk(tmp_path):
    from lab.run.rundir import SUMMARY, Status, Summary, is_finished, read_summary

    assert [str(s) for s in Status] == ["running", "finished", "failed", "diverged", "preempted"]
    assert json.dumps({"status": Status.DIVERGED}) == '{"status": "diverged"}'
    assert Status.FINISHED == "finished" and f"{Status.PREEMPTED}" == "preempted"
    assert not is_finished(tmp_path) and read_summary(tmp_path) is None  # none yet
    (tmp_path / SUMMARY).write_text('{"status": "fini')  # being written
    assert read_summary(tmp_path) is None
    # A status this version does not know is kept as it is, not turned into another.
    odd = Summary.from_dict({"status": "paused", "params": 5})
    assert odd.status == "paused" and not isinstance(odd.status, Status)
    assert odd.to_dict() == {"status": "paused", "params": 5, "final_eval_loss": None}
    (tmp_path / SUMMARY).write_text('{"status": "finished"}')
    assert is_finished(tmp_path)
