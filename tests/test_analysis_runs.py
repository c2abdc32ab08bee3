"""Collecting run directories: fields, lineage, left-out runs, training curves, bad files."""

import json

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import make_run

from analysis import collect_curves, collect_runs, read_curve
from analysis.points import read_points_csv
from lab.errors import UserError


def test_collects_nested_runs_with_config_and_lineage(tmp_path):
    parent = make_run(tmp_path, "ladder/s1", N=1e7, D=2e8, loss=3.1, lr=3e-3, batch_size=16)
    make_run(
        parent / "branches", "d20", N=1e7, D=1.6e8, loss=3.2,
        parent=str(parent), branch_step=800, decay_steps=200,
    )  # fmt: skip
    make_run(tmp_path, "ladder/s2", N=4e7, D=8e8, loss=2.9, flops=2.5e17, config=False)
    runs = collect_runs(str(tmp_path)).set_index("N", drop=False)
    assert len(runs) == 3 and runs.attrs["skipped"] == []
    branch = runs[runs["parent"].notna()].iloc[0]
    assert branch["parent"] == str(parent)
    assert branch["branch_step"] == 800 and branch["decay_steps"] == 200
    top = runs[(runs["N"] == 1e7) & runs["parent"].isna()].iloc[0]
    assert top["lr"] == 3e-3 and top["batch_size"] == 16 and top["seq_len"] == 512
    assert top["batch_tokens"] == 16 * 512
    assert top["schedule"] == "wsd" and top["decay_shape"] == "1-sqrt"
    assert top["D"] == 2e8 and top["C"] == pytest.approx(6 * 1e7 * 2e8)
    assert top["non_embedding_params"] == pytest.approx(0.8e7)
    no_cfg = runs.loc[4e7]
    assert no_cfg["C"] == 2.5e17  # the summary's flops, not 6ND
    assert np.isnan(no_cfg["lr"]) and pd.isna(no_cfg["schedule"])


def test_unfinished_and_diverged_runs_are_reported_and_left_out(tmp_path):
    make_run(tmp_path, "ok", N=1e7, D=1e8, loss=3.0)
    make_run(tmp_path, "running", N=1e7, D=5e7, loss=None, status="running")
    make_run(tmp_path, "diverged", N=2e7, D=1e8, loss=9.9, status="diverged")
    make_run(tmp_path, "noloss", N=3e7, D=1e8, loss=None)
    runs = collect_runs(str(tmp_path))
    assert list(runs["run"]) == [str(tmp_path / "ok")]
    reasons = dict(runs.attrs["skipped"])
    assert reasons[str(tmp_path / "running")] == "status running"
    assert reasons[str(tmp_path / "diverged")] == "status diverged"
    assert reasons[str(tmp_path / "noloss")] == "no final_eval_loss"
    everything = collect_runs(str(tmp_path), include_unfinished=True)
    assert sorted(everything["status"]) == ["diverged", "finished", "finished", "running"]


def test_curves_use_the_runs_flops_per_token(tmp_path):
    curve = [{"step": s, "loss": 5.0 - s / 100, "lr": 1e-3, "tokens": 4096 * s} for s in (1, 2, 3)]
    curve.insert(2, {"step": 2, "eval_loss": 4.9, "tokens": 8192})  # an eval row without loss
    make_run(tmp_path, "a", N=1e6, D=4096 * 3, loss=4.97, flops=9e6 * 4096 * 3, curve=curve)
    make_run(tmp_path, "b", N=2e6, D=4096 * 3, loss=4.9, flops=None, curve=curve[:2])
    runs = collect_runs(str(tmp_path))
    assert len(read_curve(str(tmp_path / "a"))) == 4
    curves = collect_curves(runs).sort_values(["N", "D"])
    a = curves[curves["N"] == 1e6]
    assert list(a["D"]) == [4096, 8192, 12288]
    np.testing.assert_allclose(a["C"], 9e6 * a["D"])  # summary flops / tokens
    b = curves[curves["N"] == 2e6]
    np.testing.assert_allclose(b["C"], 6 * 2e6 * b["D"])  # summary flops given as 6 N D


def test_bad_run_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        collect_runs(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json"):
        collect_runs(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        collect_runs(str(bad))
    run = make_run(tmp_path, "nocurve", N=1e6, D=1e6, loss=5.0)
    with pytest.raises(UserError, match="file not found"):
        collect_curves(collect_runs(str(run)))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    with pytest.raises(UserError, match="lacks tokens"):
        collect_curves(collect_runs(str(run)))


def test_points_csv_reads_the_epoch_layout(tmp_path):
    path = tmp_path / "epoch.csv"
    path.write_text(
        "x,y,color,Model Size,Training FLOP,hex_color,loss\n"
        "1,2,#fff,1e9,6e19,#fff,2.5\n"
        "3,4,#000,2e9,2.4e20,#000,2.3\n"
    )
    df = read_points_csv(str(path))
    assert list(df["N"]) == [1e9, 2e9]
    np.testing.assert_allclose(df["D"], [1e10, 2e10])  # D = C / 6N
    np.testing.assert_allclose(df["C"], [6e19, 2.4e20])


def test_remote_paths_need_a_backend():
    """gs:// goes through etils.epath; without gcsfs installed that is a one-line UserError."""
    pytest.importorskip("etils.epath")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="gcsfs"):
        collect_runs("gs://some-bucket/runs")
