"""Run directories on an object store, tested on fsspec's in-memory filesystem (`memory://`),
which goes through the same code as `gs://` (lab.paths, fsspec) but needs no network.

The runs are trained in this process, since a subprocess does not share the memory filesystem.
orbax cannot write to memory:// (etils.epath and tensorstore know gs:// and s3://, not fsspec's
other filesystems), so these tests send a memory:// run's checkpoints to a local directory;
everything else of the run directory (config.yaml, metrics.jsonl, summary.json, tb/,
branches.json) is on memory://.
"""

import importlib.util
import json
import uuid
from pathlib import Path

import fsspec
import pytest

from helpers import TINY, run_lab
from lab import paths
from lab.config import load_config, replace
from lab.errors import UserError
from lab.run import checkpoint
from lab.run.metrics import MetricsLogger, read_metrics
from lab.run.rundir import read_json

# 12 small steps, every step logged, checkpoints at 4, 8 and 12, evaluations at 6 and 12.
SHORT = ["train.steps=12", "train.log_every=1", "train.eval_every=6", "train.eval_batches=1",
         "schedule.warmup_steps=2", "schedule.decay_steps=4", "model.n_layers=1",
         "model.d_model=64", "train.seq_len=64", "checkpoint.every_steps=4",
         "checkpoint.keep_last=3"]

memory = fsspec.filesystem("memory")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A fresh memory:// prefix; memory:// checkpoints go to a local directory (see above)."""
    url = f"memory://lab-test-{uuid.uuid4().hex[:8]}"
    local = tmp_path_factory.mktemp("memory-checkpoints")
    real = checkpoint.checkpoint_dir
    checkpoint.checkpoint_dir = lambda run_dir: real(
        str(run_dir).replace(url, str(local)) if str(run_dir).startswith(url) else run_dir)
    yield url
    checkpoint.checkpoint_dir = real
    memory.rm(url.removeprefix("memory://"), recursive=True)


def train_in_process(run_dir: str, data: str, *extra: str, progress=None) -> dict:
    from lab.train import train

    return train(load_config(TINY, [f"data.path={data}", *SHORT, *extra, f"run.dir={run_dir}"]),
                 progress)


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, small_data) -> Path:
    run_dir = tmp_path_factory.mktemp("local") / "run"
    train_in_process(str(run_dir), small_data)
    return run_dir


@pytest.fixture(scope="module")
def remote_run(bucket, small_data) -> str:
    run_dir = f"{bucket}/runs/first"
    train_in_process(run_dir, small_data)
    return run_dir


def test_run_directory_on_memory_matches_local(remote_run, local_run, capsys):
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert paths.find(remote_run, name) == [f"{remote_run}/{name}"]
    saved = load_config(f"{remote_run}/config.yaml")
    assert saved.run.dir == remote_run
    assert saved == replace(load_config(local_run / "config.yaml"), run={"dir": remote_run})

    remote, local = read_metrics(remote_run), read_metrics(local_run)
    assert [m["step"] for m in remote] == list(range(1, 13))
    assert [m["loss"] for m in remote] == pytest.approx([m["loss"] for m in local], rel=1e-6)
    assert [m["step"] for m in remote if "eval_loss" in m] == [6, 12]

    summary = read_json(f"{remote_run}/summary.json")
    assert summary["status"] == "finished"
    assert summary["name"] == "first"
    assert summary["final_eval_loss"] == pytest.approx(remote[-1]["eval_loss"])
    assert summary["tokens"] == json.loads((local_run / "summary.json").read_text())["tokens"]

    # Running it again does nothing, as on a local directory.
    capsys.readouterr()
    train_in_process(remote_run, summary["data"])
    assert "already finished" in capsys.readouterr().out
    assert len(read_metrics(remote_run)) == 12


def test_tensorboard_scalars_on_memory(remote_run, local_run):
    """The event file is read back through TensorBoard's own fsspec support, as
    `tensorboard --logdir gs://...` would read it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(f"{remote_run}/tb", size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"train/loss", "optim/lr", "optim/grad_norm", "eval/loss"} <= tags
    loss = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in acc.Tensors("train/loss")}
    assert loss == pytest.approx(losses(local_run), rel=1e-6)


def test_resume_truncates_remote_metrics(bucket, small_data, local_run):
    """A run that crashes at step 10 has metrics up to 10 and checkpoints up to 8; the rerun
    drops records 9 and 10, resumes at 8, and ends equal to an uninterrupted run."""

    class Crash:
        def show(self, step, metrics, seconds_per_step):
            if step == 10:
                raise RuntimeError("simulated crash")

    run_dir = f"{bucket}/crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(run_dir, small_data, progress=Crash())
    assert read_json(f"{run_dir}/summary.json")["status"] == "failed"
    assert max(losses(run_dir)) == 10  # flushed when the logger closed
    assert checkpoint.Checkpointer(checkpoint.checkpoint_dir(run_dir)).steps() == [4, 8]

    class Watch:
        first = None

        def show(self, step, metrics, seconds_per_step):
            if self.first is None:
                self.first = step
                # The records after the restored step are gone before training goes on.
                self.log_then = [m["step"] for m in read_metrics(run_dir)]

    watch = Watch()
    summary = train_in_process(run_dir, small_data, progress=watch)
    assert summary["status"] == "finished"
    assert watch.first == 9 and watch.log_then == list(range(1, 9))
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 13))
    assert losses(run_dir) == pytest.approx(losses(local_run), rel=1e-6)


def test_analysis_reads_remote_runs(remote_run):
    from analysis.runs import collect_runs, read_curve
    from lab.cli.fit import load_inputs

    runs = collect_runs(paths.parent(remote_run))  # searched recursively, as on a disk
    assert remote_run in list(runs["run"])
    row = runs.set_index("run").loc[remote_run]
    summary = read_json(f"{remote_run}/summary.json")
    assert row["N"] == summary["params"] and row["D"] == summary["tokens"]
    assert row["loss"] == pytest.approx(summary["final_eval_loss"])
    assert row["lr"] == load_config(f"{remote_run}/config.yaml").optim.lr
    assert list(read_curve(remote_run)["step"]) == list(range(1, 13))
    assert len(load_inputs([remote_run]).points) >= 1  # what `lab fit` reads


def test_branch_on_memory(remote_run, small_data):
    """`lab branch` on a remote parent: children and branches.json under its URL; a decay of 4
    from step 8 is the parent's own schedule, so the child repeats the parent's last steps."""
    from lab.cli.branch import main

    assert main([remote_run, "--at", "8", "--decay-steps", "4"]) == 0
    child = f"{remote_run}/branches/step8-decay4-1-sqrt"
    assert read_json(f"{remote_run}/branches.json")["points"][0]["branch_step"] == 8
    summary = read_json(f"{child}/summary.json")
    assert summary["status"] == "finished" and summary["parent"] == remote_run
    assert load_config(f"{child}/config.yaml").run.parent == remote_run
    parent = losses(remote_run)
    assert losses(child) == pytest.approx({s: parent[s] for s in (9, 10, 11, 12)}, rel=1e-6)


def test_remote_logger_flushes_on_eval_count_and_close(bucket, monkeypatch):
    """Object stores cannot append: the remote log is rewritten at an evaluation, every
    FLUSH_RECORDS records, on flush() (before a checkpoint) and at close."""
    from lab.run import metrics

    monkeypatch.setattr(metrics, "FLUSH_RECORDS", 3)
    run_dir = f"{bucket}/logger"
    paths.write_text(f"{run_dir}/metrics.jsonl", '{"step": 1, "loss": 5.0}\n')  # resumed
    logger = MetricsLogger(run_dir)
    logged = lambda: [m["step"] for m in read_metrics(run_dir)]  # noqa: E731
    logger.log(2, {"loss": 4.0})
    assert logged() == [1]
    logger.log(3, {"loss": 3.0, "eval_loss": 3.5})
    assert logged() == [1, 2, 3]
    for step in (4, 5):
        logger.log(step, {"loss": 2.0})
    assert logged() == [1, 2, 3]
    logger.log(6, {"loss": 2.0})  # the third since the last flush
    assert logged() == [1, 2, 3, 4, 5, 6]
    logger.log(7, {"loss": 1.0})
    logger.flush()
    assert logged() == [1, 2, 3, 4, 5, 6, 7]
    logger.log(8, {"loss": float("nan")})
    logger.close()
    assert logged() == [1, 2, 3, 4, 5, 6, 7, 8]
    tb = memory.find(f"{run_dir}/tb".removeprefix("memory://"))
    assert len(tb) == 1 and "tfevents" in tb[0]


def test_paths_local_and_memory(tmp_path, bucket):
    for root in (str(tmp_path), f"{bucket}/paths"):
        f = paths.join(root, "a", "b", "x.json")
        paths.makedirs(paths.parent(f))
        assert not paths.exists(f)
        paths.write_text(f, "one")
        paths.write_text(f, "two")  # replaces
        assert paths.read_text(f) == "two" and paths.is_file(f) and paths.exists(f)
        assert paths.is_dir(paths.join(root, "a"))
        assert paths.name(f) == "x.json"
        assert paths.find(root, "x.json") == [f]
        paths.remove(f)
        paths.remove(f)  # a missing file is fine
        assert not paths.exists(f)
        with pytest.raises(FileNotFoundError):
            paths.read_text(f)
    assert paths.join("gs://b/runs/", "x") == "gs://b/runs/x"
    assert paths.parent("gs://b/runs/x") == "gs://b/runs"


def test_checkpoint_dir():
    assert checkpoint.checkpoint_dir("gs://b/runs/x") == "gs://b/runs/x/checkpoints"
    assert checkpoint.checkpoint_dir("runs/x") == str(Path("runs/x/checkpoints").absolute())
    with pytest.raises(UserError, match="gs://"):
        checkpoint.checkpoint_dir("memory://runs/x")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_is_one_line():
    result = run_lab(["train", str(TINY), "run.dir=gs://some-bucket/runs/x"], expect=2)
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: gs://some-bucket/runs/x is on Cloud Storage but gcsfs "
                     "is missing; install gcsfs: pip install -e '.[gcs]'"]


def write_run(run_dir: str, tokens: int, loss: float, train_seconds: float,
              task_seconds: float) -> None:
    """A finished run's summary.json and metrics.jsonl, written through lab.paths (so on
    memory:// or on disk), with a falling loss curve of 20 logged steps."""
    from lab.run import rundir

    paths.makedirs(run_dir)
    records = [{"step": s, "tokens": s * tokens // 20, "loss": loss + 1 / s} for s in range(1, 21)]
    paths.write_text(rundir.metrics_path(run_dir), "".join(json.dumps(r) + "\n" for r in records))
    rundir.write_summary(run_dir, rundir.Summary(
        tokens=tokens, final_eval_loss=loss, status="finished", train_seconds=train_seconds,
        extra={"task_seconds": task_seconds}))


def write_branched_run(base: str) -> str:
    """A stable run with two branches, a branch of a branch, and a folder under branches/ that
    holds no run: the layout `lab branch` leaves."""
    run = paths.join(base, "run")
    write_run(run, 1000, 2.0, 10.0, 1.0)
    write_run(paths.join(run, "branches", "b2"), 1200, 1.8, 6.0, 0.5)
    write_run(paths.join(run, "branches", "b1"), 1100, 1.9, 4.0, 0.5)
    write_run(paths.join(run, "branches", "b1", "branches", "deeper"), 1300, 1.7, 100.0, 50.0)
    paths.makedirs(paths.join(run, "branches", "notes"))
    paths.write_text(paths.join(run, "branches", "notes", "readme.txt"), "not a run\n")
    return run


def test_the_report_reads_a_runs_branches_on_memory_as_on_disk(tmp_path):
    """lab.run.rundir.branch_dirs lists a run's own branches on memory:// (as on gs://) as on
    disk, and the report's readers go through it: the training-curve figure of the remote run
    is the local one byte for byte (and not the figure without the branches), and the tasks'
    cost sums the run and its two branches."""
    from analysis.report import plot_curves
    from analysis.study_downstream import task_cost
    from lab.run.rundir import branch_dirs

    url = f"memory://lab-branches-{uuid.uuid4().hex[:8]}"
    try:
        runs = {"local": write_branched_run(str(tmp_path / "local")),
                "memory": write_branched_run(url)}
        for where, run in runs.items():
            assert branch_dirs(run) == [paths.join(run, "branches", "b1"),
                                        paths.join(run, "branches", "b2")], where
            assert task_cost([run]) == {"task_seconds": 2.0, "train_seconds": 20.0,
                                        "share": 0.1}, where
        figures = {where: Path(plot_curves([run], tmp_path / f"{where}.png")).read_bytes()
                   for where, run in runs.items()}
        assert figures["memory"] == figures["local"]
        alone = str(tmp_path / "alone" / "run")
        write_run(alone, 1000, 2.0, 10.0, 1.0)
        assert branch_dirs(alone) == []
        assert Path(plot_curves([alone], tmp_path / "alone.png")).read_bytes() \
            != figures["local"]
    finally:
        memory.rm(url.removeprefix("memory://"), recursive=True)
