"""`lab plan`: from a fitted law to the next runs.

    lab plan INPUT... --budget C --out DIR [--base CONFIG] [--bootstrap K]

An INPUT is a fit JSON (`lab fit --json`: an approach3 fit gives the loss law; an hparams fit
gives learning-rate and batch laws; a critical-batch fit gives B_crit(L)) or a run directory
(Approach 3 is fitted on the runs under it first). At the budget C (FLOPs, C = 6 N D as in the
fit) the law's optimum N_opt becomes a shape, and the shape's own N gets D = C / (6 N) tokens,
so the planned run spends the budget (to within one step) even where N differs from N_opt:

- DIR/config.yaml, ready for `lab train`: the shape nearest N_opt (lab.studies.sweep's shape
  search),
  D tokens as a step count, the learning rate and batch from the fitted laws (StepFun's
  form first, then DeepSeek's, then the critical batch at the predicted loss) or else from the
  base config (μP transfer when model.parameterization is mup), and the predicted final loss
  with its interval (widened by what the lr and batch laws' uncertainty may cost, where those
  laws came with bootstrap draws) in the header and in run.predicted_loss, which training
  copies into summary.json so `lab fit` prints prediction against outcome;
- DIR/sweep.yaml, ready for `lab sweep`: the next IsoFLOP sweep, sizes log-spaced across
  ±0.5 decade around the planned N at the planned run's FLOPs, same recipe;
- DIR/plan.json: N, D, C, predicted_loss, interval and the source of every choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import numpy as np
import yaml

from analysis.hparams import LogLinearLaw, excess_log_loss
from analysis.irreducible import loss_law_check, near_e_warning
from analysis.output import warning_banner
from analysis.powerlaw import PowerLaw
from analysis.predict import LossLaw, fit_record
from lab import paths, presets
from lab.config import INT32_MAX, Config, dump_config, load_config, override
from lab.errors import UserError
from lab.run import rundir
from lab.run.rundir import param_count

BATCH_MULTIPLE = 8  # global batches divide by 8, so a plan runs on 1, 2, 4 or 8 devices


# ---------------------------------------------------------------------------------------------
# Reading the inputs.


@dataclasses.dataclass
class Laws:
    """What the inputs give: the loss law and whichever hyperparameter laws were fitted."""

    loss: LossLaw
    loss_source: str
    stepfun: dict | None = None  # {"lr", "batch": LogLinearLaw or None, "params", "curvature"}
    deepseek: dict | None = None  # {"lr", "batch": LogLinearLaw in C or None, "curvature"}
    critical: PowerLaw | None = None  # B_crit(L) in tokens
    noise: PowerLaw | None = None  # B_noise(L) in tokens, from a measured gradient noise scale
    sources: dict = dataclasses.field(default_factory=dict)  # kind -> the input it came from
    run_roots: list = dataclasses.field(default_factory=list)  # run directories behind the fit


def _power_law(d: dict) -> PowerLaw:
    return PowerLaw(coef=d["coef"], exponent=d["exponent"],
                    coef_interval=tuple(d["coef_interval"]),
                    exponent_interval=tuple(d["exponent_interval"]), n=d["n"],
                    level=d.get("level", 0.95))


def _read_json(path: str) -> dict:
    try:
        data = json.loads(paths.read_input(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); give a file `lab fit --json` "
                        "wrote") from None
    if not isinstance(data, dict) or "method" not in data:
        raise UserError(f"{path} is not a fit JSON (no 'method'); give a file `lab fit --json` "
                        "wrote")
    return data


def read_laws(inputs: list[str], bootstrap: int = 0, seed: int = 0, level: float = 0.95) -> Laws:
    """Read fit JSONs and fit Approach 3 on run directories; exactly one loss law."""
    from analysis.inputs import load_inputs

    loss, loss_source, run_dirs, extra, run_roots = None, "", [], {}, []
    for item in inputs:
        if not paths.exists(item):
            raise UserError(f"no such file or directory: {item}; give a fit JSON or run "
                            "directories")
        if paths.is_dir(item):
            run_dirs.append(item)
            continue
        d = _read_json(item)
        method = d["method"]
        if method == "approach3":
            if loss is not None:
                raise UserError(f"two loss laws given ({loss_source} and {item}); give one")
            loss, loss_source = LossLaw.from_dict(d, where=item), item
            run_roots += [p for p in d.get("inputs", []) if paths.is_dir(p)]
        elif method == "hparams":
            if d.get("stepfun"):
                s = d["stepfun"]
                extra["stepfun"] = ({"lr": s.get("lr") and LogLinearLaw.from_dict(s["lr"]),
                                     "batch": s.get("batch_tokens")
                                     and LogLinearLaw.from_dict(s["batch_tokens"]),
                                     "params": s.get("params", "total"),
                                     "curvature": s.get("curvature") or {}}, item)
            if d.get("lr") or d.get("batch_tokens"):
                extra["deepseek"] = ({k: d.get(j) and LogLinearLaw.from_power_law(d[j])
                                      for k, j in (("lr", "lr"), ("batch", "batch_tokens"))}
                                     | {"curvature": d.get("curvature") or {}}, item)
        elif method == "critical-batch":
            if d.get("law"):  # from a batch sweep
                extra["critical"] = (_power_law(d["law"]), item)
            if (d.get("noise_scale") or {}).get("law"):  # from a measured noise scale
                extra["noise"] = (_power_law(d["noise_scale"]["law"]), item)
        else:
            raise UserError(f"{item} is a {method} fit, which gives no loss or hyperparameter "
                            "law to plan with; fit with --method approach3 or hparams")
    if run_dirs:
        if loss is not None:
            raise UserError(f"both a loss law ({loss_source}) and run directories were given; "
                            "give one of them")
        from analysis.approach3 import fit_approach3

        pts = load_inputs(run_dirs).points
        fit = fit_approach3(pts["N"], pts["D"], pts["loss"], bootstrap=bootstrap, seed=seed,
                            level=level)
        from analysis.backtest import calibration_of

        loss = LossLaw.from_dict(fit.to_dict() | fit_record(fit, pts["N"], pts["D"], pts["loss"])
                                 | calibration_of(pts, level))
        loss_source = f"Approach 3 fitted on {len(pts)} runs under {', '.join(run_dirs)}"
        run_roots += run_dirs
    if loss is None:
        raise UserError("no loss law among the inputs; give an approach3 fit JSON "
                        "(`lab fit RUNS --json fit.json`) or run directories")
    laws = Laws(loss=loss, loss_source=loss_source, run_roots=run_roots)
    for kind, (value, item) in extra.items():
        setattr(laws, kind, value)
        laws.sources[kind] = item
    return laws


def _best_run_config(roots: list[str]) -> str | None:
    """The config.yaml of the lowest-loss finished run under the given directories."""
    from analysis.runs import collect_runs

    best = None
    for root in roots:
        try:
            runs = collect_runs(root)
        except UserError:
            continue
        if len(runs):
            row = runs.loc[runs["loss"].idxmin()]
            if best is None or row["loss"] < best[0]:
                best = (row["loss"], rundir.config_path(row["run"]))
    return best[1] if best and paths.exists(best[1]) else None


# ---------------------------------------------------------------------------------------------
# From N and D to a shape, a batch and steps.


def _counts(cfg: Config, shape: dict) -> tuple[dict, int]:
    """(param_counts, FLOPs per token) of the base model with `shape`, counted as lab sweep
    counts (the byte tokenizer's padded vocabulary when the config leaves it to the data)."""
    from lab.model.accounting import flops_per_token, param_counts
    from lab.model.shapes import counting_model

    model = dataclasses.replace(counting_model(cfg.model), **shape)
    return param_counts(model), flops_per_token(model, cfg.train.seq_len)


def shape_for(target: float, cfg: Config, params: str, aspect_ratio: float) -> dict:
    """The shape whose parameter count (total or non-embedding, as the law counts N) is nearest
    `target`. The shape search aims at non-embedding N; for total N the target is corrected by
    the embedding a few times and the closest shape kept."""
    from lab.model.shapes import shape_for_params

    tensor = cfg.mesh.tensor if cfg.mesh.tensor > 0 else 1
    aim, tried = float(target), []
    for _ in range(4):
        try:
            shape = shape_for_params(aim, cfg.model, aspect_ratio=aspect_ratio, tensor=tensor)
        except UserError:
            try:  # near the smallest shapes the widths step coarsely: take the nearest there
                shape = shape_for_params(aim, cfg.model, aspect_ratio=aspect_ratio,
                                         tensor=tensor, tolerance=0.5)
            except UserError as err:
                if tried:
                    break
                raise UserError(f"no model shape for N={target:.3g}: {err}") from None
        n = param_count(_counts(cfg, shape)[0], params)
        tried.append((abs(math.log(n / target)), shape))
        if params != "total" or n == target:
            break
        aim *= target / n
        if aim <= 0:
            break
    return min(tried, key=lambda t: t[0])[1]


def _round_batch(tokens: float, seq_len: int) -> int:
    seqs = tokens / seq_len
    return max(BATCH_MULTIPLE, BATCH_MULTIPLE * round(seqs / BATCH_MULTIPLE))


def _hparam_laws(laws: Laws, n_by: dict, D: float, flops: float) -> tuple:
    """(the hyperparameter laws the plan uses, where they are evaluated, their form's name
    and source), StepFun's form first; None when there are none."""
    if laws.stepfun and laws.stepfun["lr"]:
        n = n_by[laws.stepfun["params"]]
        return laws.stepfun, {"N": n, "D": D}, "StepFun law", laws.sources["stepfun"]
    if laws.deepseek:
        return laws.deepseek, {"C": flops}, "DeepSeek-form law", laws.sources["deepseek"]
    return None, None, None, None


def _law_text(law: LogLinearLaw) -> str:
    return f"{law.coef:.4g}·" + "·".join(f"{v}^{p:.3f}" for v, p in zip(
        law.variables, law.exponents, strict=True))


def choose_hparams(laws: Laws, cfg: Config, n_by: dict, D: float, flops: float) -> tuple:
    """(lr, batch tokens or None, lr source, batch source, warnings) for a run of N parameters
    (n_by: {"total": ..., "non_embedding": ...}) and D tokens costing `flops`."""
    warns = []
    form, x, name, src = _hparam_laws(laws, n_by, D, flops)
    lr = lr_src = batch_tokens = batch_src = None
    if form and form["lr"]:
        lr, lr_src = form["lr"](**x), f"{name} lr = {_law_text(form['lr'])} ({src})"
    if form and form["batch"]:
        xb = {v: x[v] for v in form["batch"].variables}
        batch_tokens = form["batch"](**xb)
        batch_src = f"{name} batch = {_law_text(form['batch'])} tokens ({src})"
    if lr is not None:
        return lr, batch_tokens, lr_src, batch_src, warns
    lr = cfg.optim.lr
    if cfg.model.parameterization == "mup":
        lr_src = "μP transfer: the base config's lr (model.parameterization=mup)"
    else:
        lr_src = "the base config's lr, not transferred (standard parameterization)"
        warns.append("no learning-rate law and the base is not μP: the lr is the base config's "
                     "as it is; fit `lab fit --method hparams` or use model.parameterization=mup")
    return lr, batch_tokens, lr_src, batch_src, warns


def hparam_excess(laws: Laws, n_by: dict, D: float, flops: float, lr: float,
                  batch_tokens: float, level: float) -> dict:
    """What the lr and batch laws' uncertainty may cost the planned run: under each bootstrap
    draw of the laws (a plausible true optimum) the planned (ln lr, ln batch) misses it by d,
    and ln loss rises by 1/2 d' H d, H the curvature of ln loss the hparams fit measured. The
    `level` quantile of that rise widens the interval's upper end (a rise only: a missed
    optimum never lowers the loss). `carried` says whether it could be computed, `note` why
    not or how."""
    form, x, name, _ = _hparam_laws(laws, n_by, D, flops)
    out = {"carried": False, "level_quantile": 0.0, "median": 0.0}
    if form is None:
        return out | {"note": "not carried: no lr or batch law among the inputs (the lr and "
                      "batch are the base config's or the critical batch's)"}
    axes, deltas, missing = [], [], []
    for axis, planned in (("lr", lr), ("batch", batch_tokens)):
        law = form[axis]
        draws = law and law.log_draws(**{v: x[v] for v in law.variables})
        if draws is None or not form["curvature"].get(axis):
            missing.append(axis)
            continue
        axes.append(axis)
        deltas.append(np.log(planned) - draws)
    if not axes:
        return out | {"note": f"not carried: the {name}s have no bootstrap draws or measured "
                      "curvature (refit them with this version of `lab fit --method hparams`)"}
    rise = excess_log_loss(np.stack(deltas, axis=1), form["curvature"], tuple(axes))
    q = float(np.quantile(rise, level))
    left = f"; the {' and '.join(missing)} law's is not (no draws or curvature)" if missing else ""
    return {"carried": True, "axes": axes, "level_quantile": q, "median": float(np.median(rise)),
            "note": f"carried: the {name}s' bootstrap draws through the measured curvature of "
                    f"ln loss raise the upper end by the {level:.0%} quantile of the excess "
                    f"loss, {np.expm1(q):.3%}{left}"}


# ---------------------------------------------------------------------------------------------
# The plan.


def _batch(laws, cfg: Config, L_opt: float, batch_tokens: float | None, batch_src: str,
           warns: list[str], noise_scale: bool = False) -> tuple[int, str]:
    """The planned batch (rows of train.seq_len) and where it came from: with `noise_scale`,
    the measured noise scale's law at the loss the plan expects; else the batch law's, else
    the critical batch there (McCandlish et al.), else the base config's. Warns (into
    `warns`) when it is over twice the critical batch."""
    seq = cfg.train.seq_len
    if noise_scale and laws.noise is None:
        raise UserError("--noise-scale needs a critical-batch fit JSON with a noise-scale law: "
                        "`lab fit RUN --method critical-batch --json F` on a run trained with "
                        "train.noise_scale_every=N")
    if noise_scale:
        batch_tokens = float(laws.noise(L_opt))
        batch_src = (f"gradient noise scale B_noise(L={L_opt:.4g}) = {batch_tokens:.4g} tokens "
                     f"({laws.sources['noise']})")
    elif laws.noise is not None:
        warns.append(f"{laws.sources['noise']} has a noise-scale law that this plan does not "
                     "use; pass --noise-scale to take the batch from it")
    if batch_tokens is None and laws.critical is not None:
        batch_tokens = float(laws.critical(L_opt))
        batch_src = (f"critical batch B_crit(L={L_opt:.4g}) = {batch_tokens:.4g} tokens "
                     f"({laws.sources['critical']})")
    batch = _round_batch(batch_tokens, seq) if batch_tokens else cfg.train.batch_size
    batch_src = batch_src or "the base config's batch"
    if laws.critical is not None:
        b_crit = float(laws.critical(L_opt))
        if batch * seq > 2 * b_crit:
            warns.append(f"the batch ({batch * seq} tokens) is over twice the critical batch at "
                         f"the predicted loss ({b_crit:.3g}): steps buy little there")
    return batch, batch_src


def _schedule_at(cfg: Config, steps: int) -> tuple[dict, dict]:
    """The base config's warmup and decay as fractions of its steps, and those fractions of
    `steps` (warmup + decay kept within the run)."""
    frac = {k: getattr(cfg.schedule, k) / cfg.train.steps for k in ("warmup_steps",
                                                                     "decay_steps")}
    sched = {k: min(steps - 1, round(f * steps)) if f else 0 for k, f in frac.items()}
    if sched["warmup_steps"] + sched["decay_steps"] > steps:
        sched["decay_steps"] = steps - sched["warmup_steps"]
    return frac, sched


def _sweep_points(args: argparse.Namespace, cfg: Config, law, N: int, flops: float,
                  tokens_per_step: int) -> list[dict]:
    """The next IsoFLOP sweep around the planned N, at the planned run's FLOPs: one point
    per distinct shape, with its predicted loss."""
    sizes, seen = [], set()
    for t in N * np.logspace(-args.sweep_span, args.sweep_span, args.sweep_sizes):
        try:
            s = shape_for(float(t), cfg, law.params, args.aspect_ratio)
        except UserError:
            continue  # too small (or large) for any shape near it; the others still bracket
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            sizes.append(s)
    points = []
    for s in sizes:
        c, f = _counts(cfg, s)
        st = max(1, round(flops / (f * tokens_per_step)))
        n, d = param_count(c, law.params), st * tokens_per_step
        p, plo, phi = law.predict(n, d, args.level)
        points.append({"name": f"d{s['d_model']}-l{s['n_layers']}", "shape": s, "N": n,
                       "D": d, "steps": st, "predicted_loss": p, "interval": [plo, phi]})
    return points


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.level < 1:
        raise UserError(f"--level must be between 0 and 1, got {args.level}")
    if args.sweep_sizes < 1:
        raise UserError(f"--sweep-sizes must be at least 1, got {args.sweep_sizes}")
    if paths.exists(rundir.summary_path(args.out)):
        raise UserError(f"{args.out} is a run directory; give --out a directory of its own")


def _write_plan(out: str, planned: Config, header: list[str], sweep: dict,
                sweep_header: list[str], plan: dict) -> None:
    """DIR/config.yaml, DIR/sweep.yaml (checked to expand as lab sweep will) and plan.json."""
    paths.makedirs(out)
    _write(rundir.config_path(out), _comment(header) + dump_config(planned))
    _write(paths.join(out, "sweep.yaml"),
           _comment(sweep_header) + yaml.safe_dump(sweep, sort_keys=False))
    from lab.studies.sweep import expand_sweep

    try:  # the sweep must expand as lab sweep will expand it
        expand_sweep(paths.join(out, "sweep.yaml"))
    except UserError as err:
        raise UserError(f"the planned sweep does not expand: {err}") from None
    _write(paths.join(out, "plan.json"), json.dumps(plan, indent=2) + "\n")


def _planned_config(cfg: Config, shape: dict, steps: int, batch: int, lr: float, sched: dict,
                    name: str, runs_root: str,
                    prediction: tuple[float, float, float]) -> Config:
    """The base config `cfg` with the planned shape, steps, batch, lr and schedule, its run
    directory and its predicted loss with interval."""
    pred, lo, hi = prediction
    overrides = {
        **{f"model.{k}": v for k, v in shape.items()},
        "train.steps": steps,
        "train.batch_size": batch,
        "optim.lr": float(f"{lr:.4g}"),
        **{f"schedule.{k}": v for k, v in sched.items()},
        "run.dir": f"{runs_root}/opt",
        "run.name": f"{name}/opt",
        "run.predicted_loss": round(pred, 6),
        "run.predicted_interval": [round(lo, 6), round(hi, 6)],
    }
    if cfg.train.eval_every > steps:
        overrides["train.eval_every"] = 0
    return override(cfg, overrides)


def _next_sweep(args: argparse.Namespace, name: str, runs_root: str, N: int, flops: float,
                frac: dict, sweep_points: list[dict]) -> tuple[dict, list[str]]:
    """The IsoFLOP sweep around the planned size at its compute, with the planned run's
    recipe, and the header of its file."""
    sweep = {
        "base": rundir.CONFIG,  # the planned run's config, beside the sweep file
        "kind": "isoflop",
        "name": f"{name}-isoflop",
        "out": f"{runs_root}/sweep",
        "budgets": [float(f"{flops:.6g}")],
        "sizes": [{"name": p["name"], **p["shape"]} for p in sweep_points],
        "warmup_fraction": round(frac["warmup_steps"], 6),
        "decay_fraction": round(frac["decay_steps"], 6),
        "flops_tolerance": 0.1,
        "set": {"run.predicted_loss": 0, "run.predicted_interval": []},
    }
    header = [
        f"The next IsoFLOP sweep from `lab plan`: {len(sweep_points)} sizes across "
        f"±{args.sweep_span} decade around N = {N:,},",
        f"each trained for {flops:.4g} FLOPs with the planned run's recipe (config.yaml).",
        f"  lab sweep {paths.join(args.out, 'sweep.yaml')} --dry-run",
    ]
    return sweep, header


def _prediction_warnings(law: LossLaw, pred: float, N: int, D: int, level: float,
                         warns: list[str]) -> dict:
    """Warn (into `warns`) where the interval is not calibrated and where the predicted loss
    nears the irreducible loss (analysis.irreducible); returns the near-E check."""
    if law.interval_method != "calibrated":
        warns.append(f"the {law.interval_method} interval is not calibrated, can be too narrow "
                     "beyond the fitted runs; `lab fit RUNS --backtest --json F` calibrates it")
    check = loss_law_check(law, pred, f"for the planned run (N = {N:,}, D = {D:,})", level)
    warning = near_e_warning([check])
    if warning:
        warns.append(warning)
    return check.to_dict() | {"warning": warning}


def _whole_steps(C: float, N: int, D_target: float, tokens_per_step: int) -> int:
    """The steps that spend the budget, refused (naming the budget) beyond a step counter."""
    steps = max(1, round(D_target / tokens_per_step))
    if steps > INT32_MAX:
        raise UserError(f"--budget {C:.4g} needs {steps:.3g} steps of {tokens_per_step:,} tokens "
                        f"at N = {N:,}, beyond the {INT32_MAX:,} a run's step counter holds; "
                        "give a smaller --budget or a --base with a larger train.batch_size")
    return steps


def make_plan(args: argparse.Namespace) -> dict:
    """Compute the plan and write DIR/config.yaml, DIR/sweep.yaml and DIR/plan.json."""
    _check_args(args)
    laws = read_laws(args.inputs, args.bootstrap, level=args.level)
    base = presets.resolve(args.base) if args.base else _best_run_config(laws.run_roots)
    if base is None:
        raise UserError("no base config: pass --base CONFIG (e.g. configs/tiny.yaml)")
    cfg = load_config(base)
    law, C = laws.loss, float(args.budget)
    N_opt, D_opt, L_opt = law.optimum(C)
    shape = shape_for(N_opt, cfg, law.params, args.aspect_ratio)
    counts, fpt = _counts(cfg, shape)
    n_by = {"total": counts["params"], "non_embedding": counts["non_embedding_params"]}
    seq = cfg.train.seq_len
    N = n_by[law.params]
    D_target = C / (6 * N)  # the shape's own N spends the budget, not N_opt
    lr, batch_tokens, lr_src, batch_src, warns = choose_hparams(laws, cfg, n_by, D_target,
                                                                fpt * D_target)
    batch, batch_src = _batch(laws, cfg, L_opt, batch_tokens, batch_src, warns, args.noise_scale)
    tokens_per_step = batch * seq
    steps = _whole_steps(C, N, D_target, tokens_per_step)
    D = steps * tokens_per_step
    pred, lo, law_hi = law.predict(N, D, args.level)
    excess = hparam_excess(laws, n_by, D_target, fpt * D_target, float(f"{lr:.4g}"),
                           tokens_per_step, args.level)
    hi = law_hi * float(np.exp(excess["level_quantile"]))
    near_e = _prediction_warnings(law, pred, N, D, args.level, warns)
    frac, sched = _schedule_at(cfg, steps)
    name = f"plan-C{C:.3g}".replace("+", "")
    runs_root = (args.runs or f"runs/{name}").rstrip("/")
    planned = _planned_config(cfg, shape, steps, batch, lr, sched, name, runs_root,
                              (pred, lo, hi))
    flops = fpt * D
    header = [
        f"Planned by `lab plan` at a budget of C = {C:.4g} FLOPs (6 N D) from",
        f"  {laws.loss_source}",
        f"N = {N:,} parameters ({law.params}; N_opt = {N_opt:.4g}), D = {D:,} tokens "
        f"= C / (6 N) in whole steps (D_opt = {D_opt:.4g}): 6 N D = {6 * N * D:.4g}; "
        f"{flops:.4g} FLOPs as the lab counts them.",
        f"Predicted final eval loss {pred:.4f}, {args.level:.0%} interval [{lo:.4f}, {hi:.4f}] "
        f"({law.interval_method}); lr and batch laws' uncertainty {excess['note']}.",
        f"lr {lr:.4g}: {lr_src}.",
        f"batch {batch} x {seq} tokens: {batch_src}.",
        f"  lab train {rundir.config_path(args.out)}",
    ]

    sweep_points = _sweep_points(args, cfg, law, N, flops, tokens_per_step)
    sweep, sweep_header = _next_sweep(args, name, runs_root, N, flops, frac, sweep_points)
    plan = {
        "C": C,
        "budget_convention": "C = 6 N D (the fit's): D = C / (6 N) for the planned shape's N, "
                             "rounded to whole steps; flops is the lab's count of the run",
        "N": N,
        "D": D,
        "C_planned": 6 * N * D,
        "N_opt": N_opt,
        "D_opt": D_opt,
        "params": law.params,
        "flops": flops,
        "steps": steps,
        "batch_size": batch,
        "seq_len": seq,
        "lr": float(f"{lr:.4g}"),
        "shape": shape,
        "predicted_loss": pred,
        "interval": [lo, hi],
        "level": args.level,
        "interval_method": law.interval_method,
        "loss_law_interval": [lo, law_hi],
        "hparam_uncertainty": excess,
        "near_irreducible": near_e,
        "sources": {"loss_law": laws.loss_source, "lr": lr_src, "batch": batch_src,
                    "base_config": str(base), "interval": law.interval_method},
        "sweep": sweep_points,
        "warnings": warns,
    }

    _write_plan(args.out, planned, header, sweep, sweep_header, plan)
    return plan


def _comment(lines: list[str]) -> str:
    return "".join(f"# {line}\n" for line in lines)


def _write(path: str, text: str) -> None:
    try:
        paths.write_text(path, text)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}; check --out") from None


def report(plan: dict, out: str) -> str:
    lo, hi = plan["interval"]
    near_e = (plan.get("near_irreducible") or {}).get("warning")
    lines = warning_banner([near_e] if near_e else []) + [
        f"budget C = {plan['C']:.4g} FLOPs: N_opt = {plan['N_opt']:.4g}, D_opt = "
        f"{plan['D_opt']:.4g}",
        f"planned run: N = {plan['N']:,} ({plan['params']}), D = C / (6 N) = {plan['D']:,} "
        f"tokens (6 N D = {plan['C_planned']:.4g}), "
        f"{plan['steps']} steps of {plan['batch_size']} x {plan['seq_len']}, lr {plan['lr']:.4g}",
        f"predicted final eval loss {plan['predicted_loss']:.4f}, {plan['level']:.0%} interval "
        f"[{lo:.4f}, {hi:.4f}] ({plan['interval_method']})",
        f"lr and batch laws' uncertainty: {plan['hparam_uncertainty']['note']}",
        f"lr: {plan['sources']['lr']}",
        f"batch: {plan['sources']['batch']}",
        f"next IsoFLOP sweep: {len(plan['sweep'])} sizes, N from "
        f"{min(p['N'] for p in plan['sweep']):,} to {max(p['N'] for p in plan['sweep']):,}",
    ]
    lines += [f"warning: {w}" for w in plan["warnings"] if w != near_e]  # near E: the banner
    lines += [f"wrote {os.path.join(out, f)}" for f in (rundir.CONFIG, "sweep.yaml", "plan.json")]
    return "\n".join(lines)
