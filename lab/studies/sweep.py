"""Sweeps: one YAML file expands into many `lab train` runs, which run one after another.

A sweep file names a base config and the axes to vary (docs/launch.md has the full format):

    base: ../tiny.yaml           # relative to the sweep file
    kind: isoflop                # ladder | isoflop | grid | branch
    set: {train.seq_len: 64}     # overrides for every run
    sizes: [2.0e5, {d_model: 128, n_layers: 2, n_heads: 4}]   # target N, or a shape
    budgets: [1.0e10, 3.0e10]    # isoflop: each run's steps give it this many FLOPs
    grid: {optim.lr: [1.0e-3, 3.0e-3]}                       # a product over these keys
    branch: {at: [100, 200], decay_steps: [20, 40], shape: 1-sqrt}

Every run is the product of its sizes, budgets and grid values. N is the non-embedding
parameter count (or the count `params:` or `--params` names: total, or active, what one token
of an MoE uses; lab.run.rundir.PARAM_KEYS), for target sizes, tokens_per_param and the tables,
and D the tokens, counted with `model.vocab_size`, or with the byte tokenizer's
257 padded to 320 when the config leaves it to the data. FLOPs = flops_per_token x steps x
batch_size x seq_len (lab.model.accounting.flops_per_token, attention included).
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from lab.config import (
    INT32_MAX,
    Config,
    DecayShape,
    Fraction,
    PositiveFloat,
    PositiveInt,
    PositiveSteps,
    load_config,
    override,
    override_word,
    overrides_between,
    parse_override,
    value_of,
)
from lab.errors import EXIT_DIVERGED, EXIT_USER_ERROR, UserError, shown
from lab.model.accounting import flops_per_token, param_counts
from lab.model.shapes import counting_model, shape_for_params, shape_name
from lab.paths import safe_name, shown_path
from lab.run.rundir import param_count
from lab.schema import NonEmpty, Words, keys_help, read_file, schema_keys
from lab.yaml_file import read_yaml

Kind = Literal["ladder", "isoflop", "grid", "branch"]
ParamKey = Literal["non_embedding", "total", "active"]  # lab.run.rundir.PARAM_KEYS
PositiveNumbers = Annotated[tuple[PositiveFloat, ...], NonEmpty("give one value or more")]
PositiveStepList = Annotated[tuple[PositiveSteps, ...], NonEmpty("give one step count or more")]


# ----------------------------------------------------------------------------- the sweep file
# Its schema, read by the config engine (lab.schema) as run configs are: `lab sweep --help`
# lists these keys. What relates several keys (a kind's needs) is checked by _check_kind.


@dataclasses.dataclass(frozen=True)
class BranchKeys:
    """branch: each stable run decayed at every step of `at`, over each of `decay_steps`."""

    at: PositiveStepList
    decay_steps: PositiveStepList
    shape: DecayShape = "1-sqrt"


@dataclasses.dataclass(frozen=True)
class ShapeKeys:
    """shape: how a target size becomes a model shape (lab.model.shapes.shape_for_params, whose
    defaults these are)."""

    aspect_ratio: PositiveFloat = 64.0  # d_model / n_layers aimed at
    head_dim: PositiveInt = 64
    min_heads: PositiveInt = 4
    multiple: PositiveInt = 64  # d_model a multiple of this
    tensor: PositiveInt | None = None  # heads divide by this; unset = the config's mesh.tensor
    tolerance: PositiveFloat = 0.2  # how far from the target N a shape may land


@dataclasses.dataclass(frozen=True)
class SweepFile:
    # the config every run starts from, relative to the sweep file
    base: Annotated[str, NonEmpty("name the config every run starts from")]
    kind: Kind
    name: str = ""  # the sweep's name; "" = the file's name
    out: str = ""  # its output directory; "" = runs/sweeps/NAME
    params: ParamKey = "non_embedding"  # which parameter count is N
    set: dict[str, Any] = dataclasses.field(default_factory=dict)  # config keys of every run
    # target parameter counts, or model overrides (with an optional name:)
    sizes: Annotated[tuple[PositiveFloat | dict[str, Any], ...],
                     NonEmpty("give a parameter count or a shape")] = ()
    budgets: PositiveNumbers = ()  # training FLOPs (isoflop)
    # config keys and their values; the runs are their product
    grid: dict[str, Annotated[tuple[Any, ...], NonEmpty("give one value or more")]] = \
        dataclasses.field(default_factory=dict)
    tokens: PositiveNumbers = ()  # training tokens of each run (a list: one more grid axis)
    tokens_per_param: PositiveFloat | None = None  # training tokens per parameter of N
    warmup_fraction: Fraction | None = None  # warmup steps / steps
    decay_fraction: Fraction | None = None  # decay steps / steps
    flops_tolerance: PositiveFloat = 0.05  # how far an isoflop run's FLOPs may miss its budget
    branch: BranchKeys | None = None  # decays of each stable run (lab branch)
    shape: ShapeKeys = dataclasses.field(default_factory=ShapeKeys)


SWEEP_WORDS = Words(noun="key", top="the sweep file")


def sweep_keys_help() -> str:
    """The sweep file's keys for `lab sweep --help`, read from its schema."""
    return keys_help("sweep file keys", schema_keys(SweepFile, word=override_word))


# Short labels for swept keys in run names; other keys use their last component.
LABELS = {"optim.lr": "lr", "train.batch_size": "bs", "optim.weight_decay": "wd",
          "train.seq_len": "seq", "optim.name": "", "run.seed": "seed", "model.moe.experts": "E"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One `lab train` run of a sweep."""

    name: str  # a label (run.name); any characters
    slug: str  # the run directory's name under the sweep's output: safe characters only
    dir: str  # the run directory, out/slug
    config: Config  # what the run trains with: the base config with the sweep's changes
    overrides: tuple[str, ...]  # the key=value words that turn the base file into `config`
    varied: tuple[str, ...]  # the words that differ from the sweep's common config (display)
    N: int  # the parameters Sweep.params names (non-embedding by default)
    D: int  # training tokens
    C: float  # training FLOPs
    steps: int
    budget: float | None = None  # the IsoFLOP budget this run was sized for
    branch: dict | None = None  # {"at": [...], "decay_steps": [...], "shape": ...}


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    kind: str
    base: Path  # the base config file
    out: str  # the sweep's output directory; run i writes to out/runs[i].slug
    runs: tuple[Run, ...]
    params: str = "non_embedding"  # which parameter count is N (lab.run.rundir.PARAM_KEYS)


# ----------------------------------------------------------------------------- expansion


def load_sweep(path: str | Path) -> dict:
    """A sweep file's mapping, every key checked against the schema (SweepFile)."""
    return read_sweep(path)[0]


def read_sweep(path: str | Path) -> tuple[dict, SweepFile]:
    """A sweep file as written (which keys it gives matters) and as typed, checked."""
    path = Path(path)
    spec = read_yaml(path, "sweep file") or {}
    if not isinstance(spec, dict):
        raise UserError(f"sweep file {path} must be a mapping with 'base:' and 'kind:'")
    return spec, read_file(SweepFile, spec, f"sweep file {path}", SWEEP_WORDS)


def expand_sweep(path: str | Path, overrides: list[str] = (), out: str | None = None,
                 params: str | None = None) -> Sweep:
    """Expand a sweep file into its runs, each a Config. `overrides` (key=value) apply to
    every run; `params` (else the file's `params:`, else non_embedding) names what N counts."""
    path = Path(path)
    spec, typed = read_sweep(path)
    where = f"sweep file {path}"
    params, kind = params or typed.params, typed.kind
    base = (path.parent / typed.base).resolve()
    if not base.is_file():
        raise UserError(f"{where}: base config {base} does not exist; 'base:' is relative to "
                        "the sweep file")
    name = typed.name or path.stem
    out = str(out or typed.out or f"runs/sweeps/{name}")

    # Every run's common part: the sweep's `set:`, then the command line's overrides.
    given = dict(parse_override(word) for word in overrides)
    sizes = _sizes(typed.sizes)
    budgets = list(typed.budgets) or [None]
    grid = typed.grid
    branch = None
    if typed.branch is not None:
        b = typed.branch
        branch = {"at": sorted(set(b.at)), "decay_steps": sorted(set(b.decay_steps)),
                  "shape": b.shape}
    _check_kind(kind, spec, where)
    swept = set(grid) | {"model." + k for _, s in sizes for k in
                         (s if isinstance(s, dict) else ("d_model", "n_layers", "n_heads"))}
    for key in given:
        if key in swept or (budgets != [None] and key == "train.steps"):
            raise UserError(f"override {key}={given[key]} sets a key the sweep varies; change "
                            "the sweep file instead")

    file_cfg = load_config(base)
    common = _override(file_cfg, {**typed.set, **given}, where)
    tensor = common.mesh.tensor if common.mesh.tensor > 0 else 1
    shape_opts = {**dataclasses.asdict(typed.shape), "tensor": typed.shape.tensor or tensor}
    spec = {**spec, "params": params}  # what the runs count as N
    tolerance = typed.flops_tolerance

    # `tokens:` may be a list: one more axis of the product (a grid over N and D).
    token_list = spec.get("tokens") if isinstance(spec.get("tokens"), list) else [None]
    runs = []
    for (size_name, size), budget, tokens, values in itertools.product(
            sizes, budgets, token_list, itertools.product(*grid.values())):
        if not isinstance(size, dict):
            size = shape_for_params(float(size), common.model, **shape_opts, params=params)
            size_name = size_name or shape_name(size)
        changes = {**{f"model.{k}": v for k, v in size.items()},
                   **dict(zip(grid, values, strict=True))}
        parts = [f"C{_short(budget)}" if budget else "", size_name,
                 f"T{_short(float(tokens))}" if tokens else ""]
        parts += [f"{LABELS.get(k, k.rsplit('.', 1)[-1])}{_label(v)}"
                  for k, v in zip(grid, values, strict=True)]
        run_name = "-".join(p for p in parts if p) or name
        run_spec = {**spec, "tokens": tokens} if tokens else spec
        cfg, varied = _make_config(common, changes, run_name, budget, branch, run_spec, out,
                                   tolerance)
        runs.append(_make_run(base, file_cfg, cfg, varied, budget, branch, params))
    _check_unique(runs, where)
    return Sweep(name=name, kind=kind, base=base, out=out, runs=tuple(runs), params=params)


def _make_config(common: Config, changes: dict, name: str, budget: float | None,
                 branch: dict | None, spec: dict, out: str,
                 tolerance: float) -> tuple[Config, list[str]]:
    """The run's config: the common one with its size and grid values, its steps and
    schedule derived from the sweep, and its name and directory; and the keys the sweep set
    for it (to show)."""
    where = f"sweep run {name}"
    # A provisional config: its steps are a placeholder until they are derived below.
    sized = _override(common, {**changes, "train.steps": INT32_MAX}, where)
    model = counting_model(sized.model)
    n = param_count(param_counts(model), spec["params"])
    fpt = flops_per_token(model, sized.train.seq_len)
    steps = _steps(sized, spec, n, fpt, budget, branch, where, tolerance)
    steps = steps or _override(common, changes, where).train.steps
    derived = {"train.steps": steps}
    for key, field in (("warmup_fraction", "warmup_steps"), ("decay_fraction", "decay_steps")):
        if key in spec:
            derived[f"schedule.{field}"] = round(float(spec[key]) * steps)
    if branch:
        warmup = derived.get("schedule.warmup_steps", sized.schedule.warmup_steps)
        if min(branch["at"]) <= warmup:
            raise UserError(f"{where}: branch.at steps must come after the warmup ({warmup} "
                            "steps); branch later or warm up less")
        derived.update({"schedule.decay_steps": 0, "checkpoint.keep_steps": branch["at"]})
    run_dir = f"{out.rstrip('/')}/{safe_name(name, extra='=+')}"
    # Every run's config must be valid before any starts.
    cfg = _override(common, {**changes, **derived, "run.name": name, "run.dir": run_dir}, where)
    return cfg, [*changes, *derived]


def _make_run(base: Path, file_cfg: Config, cfg: Config, varied: list[str],
              budget: float | None, branch: dict | None, params: str) -> Run:
    """The run of `cfg`: its N, D and C, and the words that give it from the base file."""
    model = counting_model(cfg.model)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    words = overrides_between(file_cfg, cfg)
    if load_config(base, words) != cfg:  # the `lab train` process must get this very config
        raise AssertionError(f"the overrides {words} do not give back run {cfg.run.name}'s config")
    varied = [f"{key}={override_word(value_of(cfg, key))}" for key in varied]
    return Run(name=cfg.run.name, slug=Path(cfg.run.dir).name, dir=cfg.run.dir, config=cfg,
               overrides=tuple(words), varied=tuple(varied),
               N=param_count(param_counts(model), params), D=tokens,
               C=float(flops_per_token(model, cfg.train.seq_len)) * tokens,
               steps=cfg.train.steps, budget=budget, branch=branch)


def _override(config: Config, values: dict, where: str) -> Config:
    try:
        return override(config, values)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _steps(cfg: Config, spec: dict, n: int, fpt: int, budget: float | None,
           branch: dict | None, where: str, tolerance: float) -> int | None:
    """The run's steps when the sweep derives them; None keeps the config's train.steps."""
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    if budget is not None:
        steps = round(budget / (fpt * tokens_per_step))
        flops = steps * fpt * tokens_per_step
        if steps < 1 or abs(flops / budget - 1) > tolerance:
            raise UserError(
                f"{where}: a budget of {budget:.3g} FLOPs is {budget / (fpt * tokens_per_step):.2f}"
                f" steps of {fpt * tokens_per_step:.3g} FLOPs, which cannot land within "
                f"{tolerance:.0%} of the budget; raise the budget, or use a smaller model or batch")
        return steps
    if "tokens" in spec:
        return max(1, round(float(spec["tokens"]) / tokens_per_step))
    if "tokens_per_param" in spec:
        return max(1, round(float(spec["tokens_per_param"]) * n / tokens_per_step))
    if branch:
        return max(branch["at"])
    return None


def _check_kind(kind: str, spec: dict, where: str) -> None:
    needs = {"ladder": "sizes", "isoflop": "budgets", "grid": "grid", "branch": "branch"}[kind]
    if needs not in spec:
        raise UserError(f"{where}: a {kind} sweep needs '{needs}:'")
    if kind == "isoflop" and "sizes" not in spec:
        raise UserError(f"{where}: an isoflop sweep needs 'sizes:' as well as 'budgets:'")
    derive = [k for k in ("budgets", "tokens", "tokens_per_param", "branch") if k in spec]
    if len(derive) > 1:
        raise UserError(f"{where}: {' and '.join(derive)} both set the steps; keep one")
    if "branch" in spec and "decay_fraction" in spec:
        raise UserError(f"{where}: branch runs are stable (no decay); drop decay_fraction")


def _check_unique(runs: list[Run], where: str) -> None:
    seen: dict[str, str] = {}
    for run in runs:
        if run.slug in seen:
            raise UserError(f"{where}: runs {shown(seen[run.slug])} and {shown(run.name)} would "
                            "share the "
                            f"directory {shown(run.slug)}; give the sizes distinct names or shapes")
        seen[run.slug] = run.name


def _sizes(raw: tuple) -> list[tuple[str, Any]]:
    """(name, target N or a dict of model overrides) for each size; one empty size if none."""
    if not raw:
        return [("", {})]
    sizes = []
    for item in raw:
        if isinstance(item, dict):
            item = dict(item)
            label = str(item.pop("name", "") or "")
            if "d_model" in item and "n_layers" in item and not label:
                label = shape_name(item)
            sizes.append((label, {k.removeprefix("model."): v for k, v in item.items()}))
        else:
            sizes.append(("", item))
    return sizes


def branch_command(run: Run) -> list[str] | None:
    """The `lab branch` command that decays a stable run at each branch point (None if the run
    has no branch plan): one child per (at, decay_steps) pair under RUN_DIR/branches/."""
    if not run.branch:
        return None
    b = run.branch
    return ["lab", "branch", run.dir, "--at", ",".join(map(str, b["at"])),
            "--decay-steps", ",".join(map(str, b["decay_steps"])), "--shape", b["shape"]]


def _short(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _label(value: Any) -> str:
    return _short(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- display


def _count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def describe(sweep: Sweep, columns: dict[str, list[str]] | None = None) -> str:
    """The expanded runs as a table: name, N, D, FLOPs (and FLOPs / budget), steps, any extra
    `columns` (one word per run, such as the memory per chip), overrides."""
    columns = columns or {}
    width = max(len(r.name) for r in sweep.runs)
    widths = {k: max(len(k), *(len(v) for v in vals)) for k, vals in columns.items()}
    lines = [f"sweep {sweep.name} ({sweep.kind}): {len(sweep.runs)} runs from "
             f"{shown_path(sweep.base)}, "
             f"output under {sweep.out}" + ("" if sweep.params == "non_embedding" else
                                            f"; N counts {sweep.params} parameters"),
             f"{'#':>3}  {'name':<{width}}  {'N':>7}  {'D':>7}  {'FLOPs':>9}  {'budget':>9}  "
             f"{'C/budget':>8}  {'steps':>7}  "
             + "".join(f"{k:>{w}}  " for k, w in widths.items()) + "overrides"]
    for i, r in enumerate(sweep.runs, 1):
        budget = f"{r.budget:9.3e}" if r.budget else f"{'-':>9}"
        ratio = f"{r.C / r.budget:8.4f}" if r.budget else f"{'-':>8}"
        lines.append(f"{i:>3}  {r.name:<{width}}  {_count(r.N):>7}  {_count(r.D):>7}  "
                     f"{r.C:9.3e}  {budget}  {ratio}  {r.steps:>7}  "
                     + "".join(f"{columns[k][i - 1]:>{w}}  " for k, w in widths.items())
                     + " ".join(r.varied))
        if r.branch:
            tokens_per_step = r.D // r.steps
            children = ", ".join(f"{a}+{d} ({_count((a + d) * tokens_per_step)} tokens)"
                                 for a in r.branch["at"] for d in r.branch["decay_steps"])
            lines.append(f"{'':>3}  then: {' '.join(branch_command(r))}  -> {children}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def train_command(base: str | Path, overrides: Sequence[str], python: str | None = None
                  ) -> list[str]:
    """One run's `lab train BASE key=value ...` as words (shlex.join shows it as a line); with
    `python`, the same run by that interpreter (`PYTHON -m lab.cli train ...`)."""
    head = [python, "-m", "lab.cli"] if python else ["lab"]
    return [*head, "train", shown_path(base), *overrides]


def run_status(run: Run) -> str | None:
    """The status in the run directory's summary, or None if it has none yet."""
    from lab.run.rundir import read_summary

    summary = read_summary(run.dir)
    return summary.status if summary else None


def run_sweep(sweep: Sweep) -> int:
    """Run every unfinished run, one after another; a finished one is skipped, an unfinished
    one resumes. A user error (exit 2) stops the sweep, since every run would repeat it."""
    from lab import paths
    from lab.run.rundir import Status, write_json_atomic

    paths.makedirs(sweep.out)
    write_json_atomic(paths.join(sweep.out, "sweep.json"), manifest(sweep))
    failed, diverged = [], []
    for i, run in enumerate(sweep.runs, 1):
        head = f"[{i}/{len(sweep.runs)}] {run.name}"
        if run_status(run) == Status.FINISHED:
            print(f"{head}: finished, skipped", flush=True)
            code, signum = 0, None
        else:
            print(f"{head}: N={_count(run.N)} D={_count(run.D)} FLOPs={run.C:.3e} -> "
                  f"{run.dir}", flush=True)
            code, signum = _run_child(train_command(sweep.base, run.overrides, sys.executable))
        branch = branch_command(run)
        if code == 0 and not signum and branch and run_status(run) == Status.FINISHED:
            # The decays of a stable run; `lab branch` skips children already finished.
            code, signum = _run_child([sys.executable, "-m", "lab.cli", *branch[1:]])
        if signum or code < 0:
            signum = signum or -code
            print(f"{head}: stopped by signal {signum}; run the sweep again to resume",
                  file=sys.stderr)
            return 128 + signum
        if code == 0 and run_status(run) == Status.PREEMPTED:
            print(f"{head}: preempted; run the sweep again to resume", file=sys.stderr)
            return 1
        if code == EXIT_USER_ERROR:
            print(f"{head}: stopped the sweep on a configuration error (above)", file=sys.stderr)
            return EXIT_USER_ERROR
        if code == EXIT_DIVERGED:
            diverged.append(run.name)
        elif code != 0:
            failed.append(run.name)
            print(f"{head}: failed with exit status {code}; going on", file=sys.stderr)
    done = len(sweep.runs) - len(failed)
    print(f"sweep {sweep.name}: {done} of {len(sweep.runs)} runs done"
          + (f", {len(diverged)} diverged" if diverged else "")
          + (f"; failed: {', '.join(failed)} (run the sweep again to retry)" if failed else ""))
    return 1 if failed else 0


def _run_child(argv: list[str]) -> tuple[int, int | None]:
    """Run one training process: (exit status, the signal that stopped the sweep, if any).
    SIGTERM to the sweep is passed on (a terminal's Ctrl-C reaches the child by itself), so
    stopping a sweep never leaves a run training behind; the run checkpoints and stops."""
    proc = subprocess.Popen(argv)
    got: list[int] = []

    def forward(signum: int, _frame) -> None:
        got.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait(), (got[0] if got else None)
    except KeyboardInterrupt:
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def manifest(sweep: Sweep) -> dict:
    """The expanded sweep as JSON: what analysis needs to group runs (budgets, N, D, C)."""
    return {"name": sweep.name, "kind": sweep.kind, "base": str(sweep.base),
            "params": sweep.params,
            "runs": [{"name": r.name, "dir": r.dir, "N": r.N, "D": r.D, "C": r.C,
                      "steps": r.steps, "budget": r.budget, "overrides": list(r.overrides),
                      "branch": r.branch} for r in sweep.runs]}
