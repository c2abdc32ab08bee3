"""Branch-and-decay through the real commands: a branch equals the run trained straight through,
plans are checked, children are independent and skipped when finished, compute is accounted."""

import json
from pathlib import Path

import pytest

from helpers import TINY, run_lab
from lab.config import load_config
from lab.model.accounting import flops_per_token, with_vocab
from lab.run.branch_points import planned_pairs
from lab.run.metrics import read_metrics
from lab.studies.branch import compute_report

# A small stable phase: 12 steps, every step logged.
SMALL = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "model.n_layers=1",
         "schedule.warmup_steps=2", "checkpoint.every_steps=0"]


def common(run_dir: Path, data: str, *extra: str) -> list[str]:
    return ["train", str(TINY), f"run.dir={run_dir}", f"data.path={data}", *SMALL, *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def stable(tmp_path_factory, small_data) -> Path:
    """A stable WSD run of 12 steps that declares branch points 4, 6 and 8 (kept checkpoints)."""
    run_dir = tmp_path_factory.mktemp("stable") / "run"
    run_lab(common(run_dir, small_data, "train.steps=12", "schedule.decay_steps=0",
                   "branch.at_steps=[4,6,8]", "branch.decay_steps=[1,2,4]"))
    return run_dir


def exactness(stable: Path, tmp_path: Path, data: str, shape: str) -> None:
    straight = tmp_path / f"straight-{shape}"
    run_lab(common(straight, data, "train.steps=12", "schedule.decay_steps=4",
                   f"schedule.decay_shape={shape}"))
    out = run_lab(["branch", str(stable), "--at", "8", "--decay-steps", "4", "--shape", shape])
    child = stable / "branches" / f"step8-decay4-{shape}"
    assert "1 of 1 branches finished" in out.stdout
    ref, got = losses(straight), losses(child)
    assert sorted(got) == [9, 10, 11, 12]
    for step in got:  # every step of the decay
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), (shape, step)
    summary = json.loads((child / "summary.json").read_text())
    ref_summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_eval_loss"] == pytest.approx(ref_summary["final_eval_loss"], rel=1e-6)
    assert summary["parent"] == str(stable) and summary["branch_step"] == 8
    assert summary["decay_steps"] == 4 and summary["tokens"] == ref_summary["tokens"]
    assert summary["flops"] == ref_summary["flops"]
    assert summary["flops_spent"] == summary["flops"] * 4 // 12


def test_branch_equals_straight_run_1_sqrt(stable, tmp_path, small_data):
    exactness(stable, tmp_path, small_data, "1-sqrt")


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_branch_equals_straight_run_other_shapes(stable, tmp_path, small_data, shape):
    exactness(stable, tmp_path, small_data, shape)


def test_stable_run_keeps_its_branch_points(stable):
    kept = sorted(int(p.name) for p in (stable / "checkpoints").iterdir() if p.name.isdigit())
    assert {4, 6, 8} <= set(kept)


def test_rerun_skips_finished_children(stable, small_data):
    run_lab(["branch", str(stable), "--at", "6", "--decay-steps", "2"])
    child = stable / "branches" / "step6-decay2-1-sqrt"
    mtime = (child / "summary.json").stat().st_mtime
    again = run_lab(["branch", str(stable), "--at", "6", "--decay-steps", "2"])
    assert "finished already, skipped" in again.stdout
    assert (child / "summary.json").stat().st_mtime == mtime
    # A child is an ordinary run: `lab train CHILD/config.yaml` says it is done.
    out = run_lab(["train", str(child / "config.yaml")])
    assert "already finished" in out.stdout


@pytest.mark.slow
def test_declared_plan_gives_nine_points_with_lineage(stable):
    from analysis import collect_runs

    out = run_lab(["branch", str(stable)], timeout=1200)
    assert "9 of 9 branches finished" in out.stdout
    df = collect_runs(str(stable / "branches"))
    # Other tests of this module add linear and cosine children of the same run.
    df = df[df["parent"].notna() & (df["decay_shape"] == "1-sqrt")]
    pairs = sorted(zip(df["branch_step"].astype(int), df["decay_steps"].astype(int),
                       strict=True))
    assert pairs == [(s, d) for s in (4, 6, 8) for d in (1, 2, 4)]
    assert (df["D"] == (df["branch_step"] + df["decay_steps"]) * 16 * 128).all()
    assert df["loss"].notna().all() and (df["N"] == df["N"].iloc[0]).all()
    report = json.loads((stable / "branches.json").read_text())
    assert len(report["points"]) == 9


@pytest.mark.parametrize("extra, fragment", [
    (["branch.at_steps=[20]"], "outside the stable phase"),
    (["branch.at_steps=[4]", "branch.decay_steps=[5]"], "longer than the run before it"),
    (["branch.at_steps=[1]"], "outside the stable phase"),  # inside the warmup
])
def test_bad_plans_are_refused_before_training(tmp_path, small_data, extra, fragment):
    run_dir = tmp_path / "bad"
    result = run_lab(common(run_dir, small_data, "train.steps=12", "schedule.decay_steps=0",
                            *extra), expect=2)
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--at", "20", "--decay-steps", "2"], "outside the stable phase"),
    (["--at", "10", "--decay-steps", "2"], "no checkpoint at step 10"),
    (["--at", "4", "--decay-steps", "6"], "longer than the run before it"),
    (["--at", "4"], "--decay-steps"),
    (["--at", "x", "--decay-steps", "2"], "integers"),
    (["--at", "4", "--decay-steps", "2", "--final-ratio", "3"], "final-ratio"),
])
def test_bad_branch_commands_exit_2(stable, args, fragment):
    before = sorted(p.name for p in (stable / "checkpoints").iterdir())
    result = run_lab(["branch", str(stable), *args], expect=2)
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (stable / "checkpoints").iterdir()) == before


def test_branch_of_a_missing_run_exits_2(tmp_path):
    result = run_lab(["branch", str(tmp_path / "nothing"), "--at", "4", "--decay-steps", "1"],
                     expect=2)
    assert "not a run directory" in result.stderr


def test_compute_report_for_a_four_point_plan():
    cfg = load_config(TINY, ["train.steps=1000", "branch.at_steps=[200,400,600,800]",
                             "branch.decay_fractions=[0.25]"])
    cfg = cfg.__class__(**{**cfg.__dict__, "model": with_vocab(cfg.model, 257)})
    pairs = planned_pairs(cfg, 10**6)
    assert pairs == [(200, 50), (400, 100), (600, 150), (800, 200)]
    report = compute_report(cfg, pairs)
    per_step = flops_per_token(cfg.model, 128) * 16 * 128
    scratch = per_step * (250 + 500 + 750 + 1000)
    branched = per_step * (800 + 50 + 100 + 150 + 200)
    assert report["flops_from_scratch"] == scratch
    assert report["flops_branched"] == branched
    assert report["saving"] == pytest.approx(1 - 1300 / 2500)  # 48% saved


def test_tokens_per_param_plan():
    cfg = load_config(TINY, ["branch.at_tokens_per_param=[1,2]", "branch.decay_steps=[3]"])
    # 16 x 128 = 2048 tokens a step; 1 token/param of 20,480 params = 10 steps.
    assert planned_pairs(cfg, 20_480) == [(10, 3), (20, 3)]


# A known schedule law (Tissue et al. 2024): L(n) = L0 + A S1^-alpha - C S2, lam on the fit's grid.
KNOWN_LAW = {"L0": 1.5, "A": 0.2, "alpha": 0.5, "C": 40.0, "lam": 0.9}


def known_law_loss(lr_T, n: int) -> float:
    """The known law's loss after n updates, its annealing area in closed form,
    S2(n) = sum_k delta_k (1 - lam^(n-k)) / (1 - lam), not by the fit's recursion."""
    import math

    k = KNOWN_LAW
    s1 = math.fsum(lr_T[:n])
    s2 = math.fsum(max(lr_T[i - 1] - lr_T[i], 0.0) * (1 - k["lam"] ** (n - i)) / (1 - k["lam"])
                   for i in range(1, n))
    return k["L0"] + k["A"] * s1 ** -k["alpha"] - k["C"] * s2


def write_known_curve(run_dir: Path) -> None:
    """Replace a run's logged losses (step k: after k - 1 updates) and its final eval loss
    (after all of them) by the known law's."""
    from lab.studies.branch_predict import lr_sequence

    lr_T = [float(x) for x in lr_sequence(load_config(run_dir / "config.yaml"))]
    rows = [{"step": s, "loss": known_law_loss(lr_T, s - 1)}
            for s in range(3, len(lr_T) + 1)]  # S1 > 0 from 2 updates on (warmup from 0)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["final_eval_loss"] = known_law_loss(lr_T, len(lr_T))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_predict_prints_the_schedule_law_and_trains_nothing(stable, tmp_path):
    """`lab branch --predict` on curves drawn from a known law recovers the law and prints
    each planned branch's end loss as the known law gives it, training nothing."""
    import shutil

    from lab.run.branch_points import child_config
    from lab.studies.branch_predict import lr_sequence

    run_lab(["branch", str(stable), "--at", "8", "--decay-steps", "4"])  # one finished decay
    known = tmp_path / "known"
    shutil.copytree(stable, known)
    finished = [p.parent for p in known.rglob("summary.json")
                if json.loads(p.read_text()).get("status") == "finished"]
    assert known in finished and known / "branches" / "step8-decay4-1-sqrt" in finished
    for run_dir in finished:
        write_known_curve(run_dir)
    before = sorted(p.name for p in (known / "branches").iterdir())
    out = run_lab(["branch", str(known), "--at", "4,6", "--decay-steps", "3", "--predict"])
    assert sorted(p.name for p in (known / "branches").iterdir()) == before  # nothing made
    fitted_on = out.stdout.split("fitted on ", 1)[1].split(":", 1)[0].split(", ")
    assert fitted_on[0] == "known" and "step8-decay4-1-sqrt" in fitted_on
    law = out.stdout.split("L = ", 1)[1].split()
    assert float(law[0]) == pytest.approx(KNOWN_LAW["L0"], abs=2e-4)  # L0, as printed
    assert f"(lam {KNOWN_LAW['lam']:g};" in out.stdout
    parent = load_config(known / "config.yaml")
    for step in (4, 6):
        lr_T = [float(x) for x in lr_sequence(child_config(parent, str(known), step, 3,
                                                           "1-sqrt", 0.0))]
        row = next(line.split() for line in out.stdout.splitlines()
                   if line.split()[:3] == [str(step), "3", "1-sqrt"])
        assert int(row[3]) == len(lr_T)
        assert float(row[4]) == pytest.approx(known_law_loss(lr_T, len(lr_T)), abs=2e-4), row

    # A stable run alone cannot fix the annealing term: refused, one line, nothing touched.
    bare = tmp_path / "bare"
    shutil.copytree(stable, bare, ignore=shutil.ignore_patterns("branches"))
    result = run_lab(["branch", str(bare), "--at", "4", "--decay-steps", "3", "--predict"],
                     expect=2)
    assert "annealing term is unidentified" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (bare / "branches").exists()


@pytest.mark.slow
def test_final_ratio_is_part_of_the_child(stable):
    """A branch with another final ratio is another child, not one 'finished already'; a child
    whose saved config differs from what the command asks is refused."""
    run_lab(["branch", str(stable), "--at", "4", "--decay-steps", "1"])
    out = run_lab(["branch", str(stable), "--at", "4", "--decay-steps", "1", "--final-ratio",
                   "0.5"])
    assert "finished already" not in out.stdout and "1 of 1 branches finished" in out.stdout
    half = stable / "branches" / "step4-decay1-1-sqrt-final0.5"
    assert load_config(half / "config.yaml").schedule.final_ratio == 0.5
    assert load_config(stable / "branches" / "step4-decay1-1-sqrt" / "config.yaml"
                       ).schedule.final_ratio == 0.0
    text = (half / "config.yaml").read_text()
    (half / "config.yaml").write_text(text.replace("final_ratio: 0.5", "final_ratio: 0.25"))
    refused = run_lab(["branch", str(stable), "--at", "4", "--decay-steps", "1",
                       "--final-ratio", "0.5"], expect=2)
    assert "schedule.final_ratio" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("main_process", [True, False])
def test_every_host_joins_and_only_process_0_writes_the_plan(stable, tmp_path, monkeypatch,
                                                             main_process):
    """On a pod every host runs `lab branch`: all join the distributed runtime and train every
    child (together), but only process 0 writes branches.json and the children's configs."""
    import lab.accel.sharding
    import lab.train

    parent = tmp_path / "parent"
    parent.mkdir()
    for name in ("config.yaml", "checkpoints"):  # links: the shared run gets no branches
        src = stable / name
        (parent / name).symlink_to(src, target_is_directory=src.is_dir())
    calls = {"joined": 0, "trained": []}
    monkeypatch.setattr(lab.accel.sharding, "initialize_distributed",
                        lambda: calls.__setitem__("joined", calls["joined"] + 1))
    monkeypatch.setattr(lab.accel.sharding, "is_main_process", lambda: main_process)
    monkeypatch.setattr(lab.train, "train",
                        lambda cfg, progress=None: calls["trained"].append(cfg.run.dir)
                        or {"status": "finished"})
    from lab.cli.branch import main

    assert main([str(parent), "--at", "4,8", "--decay-steps", "2"]) == 0
    children = [parent / "branches" / f"step{s}-decay2-1-sqrt" for s in (4, 8)]
    assert calls["joined"] == 1 and calls["trained"] == [str(c) for c in children]
    assert (parent / "branches.json").exists() == main_process
    for child in children:
        assert (child / "config.yaml").exists() == main_process


def test_a_signal_after_a_runs_loop_stops_the_runs_after_it(tmp_path, monkeypatch):
    """SIGTERM that lands after run 1's training loop (during its last save) leaves run 1
    finished; run 2 must not start, as it would if its own start forgot the signal."""
    import signal

    import lab.train
    from lab.config import override
    from lab.run import preemption
    from lab.run.rundir import Status
    from lab.studies.branch import train_runs

    trained = []

    def fake_train(cfg, progress=None):  # a run whose last save is hit by SIGTERM
        with preemption.caught() as caught:  # as lab.train.train holds it
            trained.append(cfg.run.name)
            caught._handle(signal.SIGTERM, None)  # the handler, as the signal would call it
        return {"status": "finished", "steps": cfg.train.steps, "final_eval_loss": 1.0}

    monkeypatch.setattr(lab.train, "train", fake_train)
    base = load_config(TINY)
    runs = [override(base, {"run.dir": str(tmp_path / n), "run.name": n}) for n in ("a", "b")]
    events = []
    statuses = train_runs(runs, lambda event, cfg, summary: events.append((event, cfg.run.name)))
    assert trained == ["a"]
    assert statuses == {"a": Status.FINISHED, "b": Status.PREEMPTED}
    assert ("starting", "b") not in events
    assert preemption.PREEMPTION.depth == 0  # the handlers are given back
