"""`lab fit` through lab.cli.fit.main: every method end to end, and the bad-input catalogue."""

import json

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import TRUTH, law_points, make_run

from analysis.approach3 import law, optimal_allocation
from lab.cli.fit import main
from lab.errors import UserError

N_POINTS = 30  # every Approach 3 run here fits 30 points: one compiled solver for the file


def write_csv(path, **columns):
    pd.DataFrame(columns).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """30 finished runs drawn from TRUTH, plus one still running and one diverged."""
    root = tmp_path_factory.mktemp("ladder")
    N, D, L = law_points(np.random.default_rng(0), N_POINTS)
    for i, (n, d, loss) in enumerate(zip(N, D, L, strict=True)):
        make_run(root, f"run{i:02d}", N=n, D=d, loss=loss)
    make_run(root, "late", N=1e8, D=1e9, loss=None, status="running")
    make_run(root, "blewup", N=1e8, D=1e9, loss=12.0, status="diverged")
    return root


def test_approach3_from_run_directories(ladder, tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main([str(ladder), "--json", str(out), "--budgets", "1e20,1e21"]) == 0
    result = json.loads(out.read_text())
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "n_points", "warnings"):
        assert key in result
    assert result["n_points"] == N_POINTS
    E, A, B, alpha, beta = TRUTH
    assert result["alpha"] == pytest.approx(alpha, abs=0.05)
    assert result["beta"] == pytest.approx(beta, abs=0.05)
    assert result["a"] == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert result["a"] + result["b"] == pytest.approx(1.0)
    n_opt, _, _ = optimal_allocation(1e21, *TRUTH)
    assert result["compute_optimal"][1]["N_opt"] == pytest.approx(n_opt, rel=0.3)
    captured = capsys.readouterr()
    assert "alpha" in captured.out and "Compute-optimal" in captured.out
    assert "late (status running)" in captured.err and "blewup (status diverged)" in captured.err


def test_approach3_reads_the_epoch_layout_and_drops_the_worst(tmp_path):
    rng = np.random.default_rng(1)
    N, D, L = law_points(rng, N_POINTS + 2)
    L[:2] = [5.0, 4.8]  # two outliers, as in the digitised Chinchilla data
    csv = write_csv(
        tmp_path / "epoch.csv", x=np.arange(N_POINTS + 2), **{"Model Size": N},
        **{"Training FLOP": 6 * N * D}, hex_color="#000", loss=L,
    )  # fmt: skip
    out = tmp_path / "fit.json"
    assert main([csv, "--drop-highest-loss", "2", "--json", str(out), "--bootstrap", "50"]) == 0
    result = json.loads(out.read_text())
    assert result["n_points"] == N_POINTS
    assert result["alpha"] == pytest.approx(TRUTH[3], abs=0.05)
    lo, hi = result["intervals"]["alpha"]
    assert lo < result["alpha"] < hi and result["bootstrap_samples"] == 50


@pytest.mark.parametrize("method", ["approach3", "isoflop", "envelope", "hparams"])
def test_every_method_writes_json_and_plots(method, tmp_path):
    rng = np.random.default_rng(2)
    E, A, B, alpha, beta = TRUTH
    if method == "approach3":
        N, D, L = law_points(rng, N_POINTS)
        inputs = [write_csv(tmp_path / "p.csv", N=N, C=6 * N * D, loss=L)]
    elif method == "isoflop":
        rows = []
        for C in (1e18, 1e19, 1e20):
            n_opt, _, _ = optimal_allocation(C, *TRUTH)
            for N in n_opt * np.logspace(-0.6, 0.6, 7):
                rows.append({"N": N, "C": C, "loss": law(N, C / (6 * N), *TRUTH)})
        inputs = [write_csv(tmp_path / "p.csv", **pd.DataFrame(rows).to_dict("list"))]
    elif method == "envelope":
        for k, N in enumerate(np.logspace(6, 8.5, 11)):
            tokens = np.logspace(7, 12, 60)
            loss = law(N, tokens, *TRUTH) * np.exp(rng.normal(0, 0.001, 60))
            curve = [
                {"step": i, "loss": v, "tokens": t}
                for i, (t, v) in enumerate(zip(tokens, loss, strict=True))
            ]
            make_run(tmp_path / "runs", f"s{k}", N=N, D=tokens[-1], loss=loss[-1], curve=curve)
        inputs = [str(tmp_path / "runs")]
    else:
        for C in (1e17, 1e18, 1e19):
            for lr in 0.3118 * C**-0.125 * 2.0 ** np.arange(-2, 3):
                for bs in (4, 8, 16, 32, 64):
                    b_opt = 0.292 * C**0.3271 / 512
                    loss = 3 * (1 + 0.01 * np.log(lr / (0.3118 * C**-0.125)) ** 2)
                    loss *= 1 + 0.005 * np.log(bs / b_opt) ** 2
                    make_run(tmp_path / "runs", f"{C:g}-{lr:.3g}-{bs}", N=1e6, D=C / 6e6,
                             loss=loss, lr=lr, batch_size=bs, seq_len=512)  # fmt: skip
        inputs = [str(tmp_path / "runs")]
    out, plots = tmp_path / "fit.json", tmp_path / "plots"
    argv = [*inputs, "--method", method, "--json", str(out), "--plots", str(plots)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["method"] == method
    assert result["plots"] and all((plots / p.split("/")[-1]).stat().st_size > 1000
                                    for p in result["plots"])  # fmt: skip
    if method == "isoflop":
        assert result["a"] == pytest.approx(beta / (alpha + beta), abs=0.03)
    if method == "envelope":  # 11 sizes over 2.5 decades: a coarse frontier
        assert result["a"] == pytest.approx(beta / (alpha + beta), abs=0.1)
    if method == "hparams":
        assert result["lr"]["exponent"] == pytest.approx(-0.125, abs=0.05)


def test_help_exits_cleanly(capsys):
    assert main(["--help"]) == 0
    assert "lab fit" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The bad-input catalogue: each is a UserError with one line naming the problem.


def good_columns(n=10):
    rng = np.random.default_rng(3)
    N, D, L = law_points(rng, n)
    return {"N": N, "D": D, "loss": L}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {k: v[:4] for k, v in c.items()}, "at least 5 points"),
        (lambda c: c | {"N": np.r_[0.0, c["N"][1:]]}, "N must be positive"),
        (lambda c: c | {"D": np.r_[-1.0, c["D"][1:]]}, "D must be positive"),
        (lambda c: c | {"loss": np.r_[c["loss"][:3], 0.0, c["loss"][4:]]}, "loss must be positive"),
        (lambda c: c | {"loss": np.r_[np.nan, c["loss"][1:]]}, "missing or non-numeric"),
        (lambda c: {k: v for k, v in c.items() if k != "loss"}, "lacks column"),
        (lambda c: {k: v for k, v in c.items() if k != "D"}, "D or C"),
    ],
)
def test_bad_points_are_user_errors(edit, message, tmp_path):
    csv = write_csv(tmp_path / "bad.csv", **edit(good_columns()))
    with pytest.raises(UserError, match=message) as err:
        main([csv])
    assert "\n" not in str(err.value)


def test_isoflop_refuses_a_single_budget(tmp_path):
    N = np.logspace(7, 9, 7)
    csv = write_csv(tmp_path / "one.csv", N=N, C=np.full(7, 1e19), loss=2 + 1 / np.log(N))
    with pytest.raises(UserError, match="two or more compute budgets"):
        main([csv, "--method", "isoflop"])


def test_missing_inputs_and_bad_options(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        main([str(tmp_path / "nowhere.csv")])
    csv = write_csv(tmp_path / "ok.csv", **good_columns())
    with pytest.raises(UserError, match="invalid choice"):
        main([csv, "--method", "approach4"])
    with pytest.raises(UserError, match="--bootstrap"):
        main([csv, "--bootstrap", "-3"])
    with pytest.raises(UserError, match="required"):
        main([])
    (tmp_path / "garbage.csv").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError):
        main([str(tmp_path / "garbage.csv")])


def test_only_unfinished_runs_is_a_user_error(tmp_path):
    make_run(tmp_path, "late", N=1e8, D=1e9, loss=None, status="running")
    with pytest.raises(UserError, match="no finished runs"):
        main([str(tmp_path)])
