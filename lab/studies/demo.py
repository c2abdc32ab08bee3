"""`lab demo [--out DIR] [--quick] [--optim muon|adamw]`: a whole scaling study on this machine.

The study file (configs/demo.yaml; --quick: configs/demo-quick.yaml) names a base lab config, a
ladder of model sizes and a list of compute budgets, every size at every budget or, with
`sizes_per_budget: k`, a staircase (budget j trains sizes j .. j+k-1). Each size gets one
stable WSD run whose declared branch plan (branch.at_steps, branch.decay_fractions) puts one
branch at each of its budgets; the branches decay from the kept checkpoints
(lab.studies.branch). The
study's `held_out` budget is a whole budget beyond the fitted ones, at sizes of its own, each
trained straight through with the same decay once per seed; analysis.report fits the laws on
the ladder alone, predicts the held-out budget (analysis.heldout) and writes DIR/report.html
and DIR/fit.json.

Every step is an ordinary `lab train` / `lab branch` / `lab fit` command, run in-process, so a
rerun continues where an interrupted one stopped: finished runs are skipped and an unfinished
one resumes from its last checkpoint. One live line shows the run, step, loss and the ETA of the
whole study; what the runs print goes to DIR/demo.log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TextIO

from lab import presets
from lab.config import (
    Config,
    PositiveFloat,
    PositiveInt,
    Range,
    Seed,
    load_config,
    override,
    override_word,
    overrides_between,
)
from lab.errors import EXIT_INTERRUPTED, UserError, shown
from lab.model.accounting import flops_per_token, param_counts, with_vocab
from lab.paths import makedirs, shown_path
from lab.run import preemption, rundir
from lab.run.rundir import Status
from lab.schema import NonEmpty, Words, keys_help, read_file, schema_keys
from lab.studies.sweep import train_command
from lab.yaml_file import read_yaml

STUDY = presets.root() / "demo.yaml"
QUICK_STUDY = presets.root() / "demo-quick.yaml"
INTERRUPTED = "interrupted"  # the study's status after Ctrl-C twice (not a run's Status)


# ----------------------------------------------------------------------------- the study file


@dataclasses.dataclass(frozen=True)
class Study:
    """A study file: the base config, the ladder, the budgets and the analysis settings."""

    path: Path
    base: Path  # a lab config every run starts from
    sizes: tuple[dict, ...]  # model overrides, smallest first
    # training FLOPs of each branch (lab.model.accounting.flops_per_token)
    budgets: tuple[float, ...]
    decay_fraction: float  # decay steps / branch step
    lr: dict  # peak learning rate per optimizer name
    bootstrap: int = 200
    extrapolate: float = 10.0
    overrides: tuple[str, ...] = ()  # key=value words for every run
    # {sizes: [model overrides], budget: FLOPs, seeds: [run.seed, ...]}: one whole budget
    # beyond the ladder, trained straight through once per seed and fitted on nothing
    held_out: dict | None = None
    # None: every size spends every budget. k: a staircase, budget j trains sizes j .. j+k-1,
    # so each budget's sizes sit around its optimum and the small ones stay out of the top
    sizes_per_budget: int | None = None

    def budget_indices(self, size: int) -> tuple[int, ...]:
        """The budgets (indices into `budgets`) that size number `size` spends."""
        k = self.sizes_per_budget
        return tuple(j for j in range(len(self.budgets)) if k is None or j <= size < j + k)


# The study file's schema, read by the config engine (lab.schema) as run configs are: `lab demo
# --help` lists these keys. What relates several keys is checked by load_study.
ModelSizes = Annotated[tuple[dict[str, Any], ...],
                       NonEmpty("give model overrides such as {d_model: 32, n_layers: 1}")]


@dataclasses.dataclass(frozen=True)
class HeldOutKeys:
    """held_out: one whole budget beyond the ladder, trained straight through per seed."""

    sizes: ModelSizes  # model overrides, one run per size and seed
    budget: PositiveFloat  # training FLOPs, beyond every fitted budget
    seeds: Annotated[tuple[Seed, ...], NonEmpty("give run seeds such as [0, 1]")] = (0,)


@dataclasses.dataclass(frozen=True)
class StudyFile:
    base: Annotated[str, NonEmpty("name the lab config every run starts from")]  # relative
    sizes: ModelSizes  # model overrides, smallest first (two or more)
    budgets: Annotated[tuple[PositiveFloat, ...], NonEmpty("give two FLOP budgets or more")]
    decay_fraction: Annotated[float, Range(0, 1, lo_open=True)]  # decay steps / branch step
    lr: dict[str, PositiveFloat]  # peak learning rate per optimizer (muon, adamw)
    # k: budget j trains sizes j .. j+k-1; unset: every size spends every budget
    sizes_per_budget: Annotated[int, Range(2)] | None = None
    held_out: HeldOutKeys | None = None
    bootstrap: PositiveInt = 200  # resamples for the fit's intervals
    extrapolate: PositiveFloat = 10.0  # the prediction budget over the largest budget
    overrides: tuple[str, ...] = ()  # key=value words for every run


STUDY_WORDS = Words(noun="key", top="the study file")


def study_keys_help() -> str:
    """The study file's keys for `lab demo --help`, read from its schema."""
    return keys_help("study file keys", schema_keys(StudyFile, word=override_word))


def load_study(path: str | Path) -> Study:
    """Read and check a study file; relative paths in it are relative to the file."""
    path = Path(path)
    raw = read_yaml(path, "study file") or {}
    typed = read_file(StudyFile, raw, f"study file {path}", STUDY_WORDS)
    sizes, budgets = typed.sizes, typed.budgets
    if len(sizes) < 2 or len(budgets) < 2:
        raise UserError(f"{path} needs two or more sizes and budgets (it has {len(sizes)} and "
                        f"{len(budgets)})")
    if list(budgets) != sorted(set(budgets)):
        raise UserError(f"budgets in {path} must be increasing, got {budgets}")
    per_budget = typed.sizes_per_budget
    if per_budget is not None and len(sizes) != len(budgets) + per_budget - 1:
        raise UserError(f"sizes_per_budget in {path} must be an integer k >= 2 with as many "
                        f"sizes as budgets + k - 1 (budget j trains sizes j .. j+k-1); it is "
                        f"{shown(per_budget)} with {len(sizes)} sizes and {len(budgets)} budgets")
    held_out = None
    if typed.held_out is not None:
        held_out = _held_out(typed.held_out, path, budgets[-1])
    return Study(path=path, base=(path.parent / typed.base).resolve(), sizes=sizes,
                 budgets=budgets, decay_fraction=typed.decay_fraction,
                 lr={str(k): v for k, v in typed.lr.items()}, bootstrap=typed.bootstrap,
                 extrapolate=typed.extrapolate, overrides=typed.overrides,
                 held_out=held_out, sizes_per_budget=per_budget)


def _held_out(keys: HeldOutKeys, path: Path, largest: float) -> dict:
    """The held-out budget as {sizes, budget, seeds}: distinct seeds, its budget beyond every
    fitted one."""
    if len(set(keys.seeds)) != len(keys.seeds):
        raise UserError(f"held_out.seeds in {path} must be a list of distinct run seeds such "
                        f"as [0, 1], got {shown(list(keys.seeds))}")
    if keys.budget <= largest:
        raise UserError(f"the held-out budget in {path} ({keys.budget:g}) must exceed the "
                        f"largest fitted one ({largest:g}): it is an extrapolation")
    return {"sizes": [dict(s) for s in keys.sizes], "budget": keys.budget,
            "seeds": list(keys.seeds)}


# ----------------------------------------------------------------------------- the runs


@dataclasses.dataclass(frozen=True)
class SizeRuns:
    """One size of the ladder: its stable run's config and its branches (or one held-out run)."""

    name: str
    config: Config  # the stable run (or the held-out run)
    words: tuple[str, ...]  # the key=value words that give `config` from the base file
    pairs: tuple[tuple[int, int], ...]  # (branch step, decay steps), one per budget
    budgets: tuple[float, ...]  # the budget each pair stands for
    budget_index: tuple[int, ...]  # and its index in the study (the held-out one: last + 1)
    flops_per_step: int
    non_embedding_params: int
    held_out: bool = False  # one straight WSD run (S + D steps), not a stable run with branches

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.dir)

    @property
    def label(self) -> str:
        return f"{self.name} held out, seed {self.config.run.seed}" if self.held_out \
            else self.name

    def tokens(self) -> list[int]:
        """Tokens of each planned point (a branch, or the held-out run)."""
        per_step = self.config.train.batch_size * self.config.train.seq_len
        return [(s + d) * per_step for s, d in self.pairs]


def _size_name(size: dict) -> str:
    return f"d{size.get('d_model', '')}-l{size.get('n_layers', '')}"


def size_runs(study: Study, out: Path, optim: str, vocab: int) -> list[SizeRuns]:
    """Branch steps per size: a branch at step S decays for round(f S) steps, so it trains
    S (1 + f) steps in all; S is chosen so those steps spend the budget."""
    from lab.run.branch_points import check_branch_points, planned_pairs
    if optim not in study.lr:
        raise UserError(f"the study {study.path} gives no learning rate for {shown(optim)}; add it "
                        "under lr:")
    file_cfg = load_config(study.base)
    common = load_config(study.base, list(study.overrides))
    plans = []
    for i, size in enumerate(study.sizes):
        name = _size_name(size)
        index = study.budget_indices(i)
        budgets = tuple(study.budgets[j] for j in index)
        sized, per_step, model_cfg = _sized(common, size, optim, study, vocab)
        steps = [max(1, round(b / per_step / (1 + study.decay_fraction))) for b in budgets]
        if len(set(steps)) < len(steps) or steps[0] < sized.schedule.warmup_steps:
            raise UserError(f"size {name}: the budgets {budgets} give branch steps "
                            f"{steps}, which must be distinct and at least the warmup "
                            f"({sized.schedule.warmup_steps}); raise the budgets")
        cfg = override(sized, {"run.dir": str(out / "runs" / name), "train.steps": steps[-1],
                               "schedule.decay_steps": 0, "branch.at_steps": steps,
                               "branch.decay_fractions": [study.decay_fraction]})
        pairs = planned_pairs(cfg, param_counts(model_cfg)["params"])
        check_branch_points(cfg, pairs)
        plans.append(SizeRuns(name, cfg, tuple(overrides_between(file_cfg, cfg)), tuple(pairs),
                              budgets, index, per_step,
                              param_counts(model_cfg)["non_embedding_params"]))
    if study.held_out:
        held = [held_out_run(study, out, file_cfg, common, optim, vocab, size, seed)
                for size in study.held_out["sizes"] for seed in study.held_out["seeds"]]
        check_beyond(study, plans, held)
        plans += held
    return plans


def _sized(common: Config, size: dict, optim: str, study: Study,
           vocab: int) -> tuple[Config, int, Any]:
    """The common config at one size with the study's optimizer and learning rate; its FLOPs
    per step and its model with the data's vocabulary."""
    cfg = override(common, {**{f"model.{k}": v for k, v in size.items()},
                            "optim.name": optim, "optim.lr": study.lr[optim]})
    model_cfg = with_vocab(cfg.model, vocab)
    per_step = flops_per_token(model_cfg, cfg.train.seq_len) * cfg.train.batch_size \
        * cfg.train.seq_len
    return cfg, per_step, model_cfg


def held_out_run(study: Study, out: Path, file_cfg: Config, common: Config, optim: str,
                  vocab: int, size: dict, seed: int) -> SizeRuns:
    """One run of the held-out budget: trained straight through for S + D steps
    (D = decay_fraction S, the branches' decay) so that it spends the held-out budget."""
    budget = study.held_out["budget"]
    name = _size_name(size)
    sized, per_step, model_cfg = _sized(common, size, optim, study, vocab)
    step = max(1, round(budget / per_step / (1 + study.decay_fraction)))
    decay = round(study.decay_fraction * step)
    cfg = override(sized, {"run.dir": str(out / "runs" / f"held-out-{name}-seed{seed}"),
                           "run.seed": seed, "train.steps": step + decay,
                           "schedule.decay_steps": decay})
    return SizeRuns(name, cfg, tuple(overrides_between(file_cfg, cfg)), ((step, decay),),
                    (budget,), (len(study.budgets),), per_step,
                    param_counts(model_cfg)["non_embedding_params"], held_out=True)


def check_beyond(study: Study, ladder: list[SizeRuns], held: list[SizeRuns]) -> None:
    """The held-out budget must reach beyond every fitted point in both N and D at one of its
    sizes at least (a staircase makes that possible: see docs/demo.md)."""
    n_max = max(p.non_embedding_params for p in ladder)
    d_max = max(max(p.tokens()) for p in ladder)
    if not any(p.non_embedding_params > n_max and p.tokens()[0] > d_max for p in held):
        raise UserError(f"no held-out size of {study.path} lies beyond the fitted points in "
                        f"both N (> {n_max:,}) and tokens (> {d_max:,}); raise the held-out "
                        "budget, or keep the small sizes out of the top budget "
                        "(sizes_per_budget)")


def describe_study(study: Study, plans: list[SizeRuns], optim: str) -> dict:
    """The plan as JSON: a rerun into the same directory must find the same plan."""
    return {"study": str(study.path), "base": str(study.base), "optim": optim,
            "sizes": [{"name": p.name, "words": list(p.words), "pairs": [list(x) for x in p.pairs],
                       "budgets": list(p.budget_index),
                       **({"held_out": True} if p.held_out else {})} for p in plans]}


def check_same_study(out: Path, plan: dict) -> None:
    path = out / "study.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan:
            raise UserError(f"{out} holds a demo with other settings (see {path}); use the same "
                            "options to continue it, or another --out")
    else:
        makedirs(out)
        path.write_text(json.dumps(plan, indent=2) + "\n")


# ----------------------------------------------------------------------------- the commands


def size_train_command(study: Study, plan: SizeRuns) -> list[str]:
    """The `lab train` command of one size's stable (or held-out) run."""
    words = [f"run.dir={override_word(shown_path(plan.run_dir))}" if w.startswith("run.dir=")
             else w for w in plan.words]
    return train_command(study.base, words)


def size_branch_command(plan: SizeRuns) -> list[str] | None:
    """The `lab branch` command of one size's stable run; None for a held-out run."""
    if plan.held_out:
        return None
    return ["lab", "branch", shown_path(plan.run_dir)]


# ----------------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StudyProgress:
    """One live line for the whole study: which run, its step and loss, and the ETA.

    On a terminal the line is redrawn in place (carriage return); otherwise a line is printed
    at most every `every` seconds. Each run's own display is replaced by this one (train's
    `progress` argument). The ETA is the FLOPs left over the rate measured on the latest run,
    plus a measured overhead (compilation, restore, evaluation) per run left, plus the analysis.
    """

    ANALYSIS_SECONDS = 30.0

    def __init__(self, runs: list[tuple[str, int, int, int]], stream: TextIO,
                 tty: bool | None = None, every: float = 10.0):
        # runs: (label, first step, last step, FLOPs per step) in the order they will train
        self.runs = runs
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self.index = -1
        self.done_flops = 0.0  # runs finished before the current one
        self.rate = 0.0  # FLOPs per second of training, from the latest measurement
        self.overhead = 8.0  # seconds per run outside training steps, measured as runs finish
        self.overheads: list[float] = []
        self.run_started = time.perf_counter()
        self.shows = 0
        self.since = (self.run_started, 0)  # (time, step) the rate is measured from
        self.step = 0
        self.last_print = 0.0
        self.width = 0

    def total_flops(self) -> float:
        return float(sum((last - first) * fps for _, first, last, fps in self.runs))

    def start(self, index: int) -> None:
        self.index = index
        self.run_started = time.perf_counter()
        self.shows = 0
        self.since = (self.run_started, self.runs[index][1])
        self.step = self.runs[index][1]
        self._draw(f"{self._where()} | starting", force=True)

    def finish(self, message: str, trained_steps: int = 0) -> None:
        """The current run is over: a permanent line, and the per-run overhead (its time
        beyond `trained_steps` at the measured rate) folded into the estimate."""
        _, first, last, fps = self.runs[self.index]
        self.done_flops += (last - first) * fps
        if trained_steps and self.rate > 0:
            wall = time.perf_counter() - self.run_started
            self.overheads.append(max(wall - trained_steps * fps / self.rate, 0.0))
            self.overhead = sum(self.overheads) / len(self.overheads)
        self.line(message)

    def show(self, step: int, metrics: dict, seconds_per_step: float) -> None:
        """Called by the training loop at every logged step."""
        _, first, last, fps = self.runs[self.index]
        now = time.perf_counter()
        if self.shows == 0:  # the first interval holds the compilation: measure from here
            self.since = (now, step)
        elif step > self.since[1]:
            self.rate = fps * (step - self.since[1]) / (now - self.since[0])
        self.shows += 1
        self.step = step
        done = self.done_flops + (step - first) * fps
        left_runs = len(self.runs) - self.index - 1
        if self.rate > 0:
            eta = ((self.total_flops() - done) / self.rate + left_runs * self.overhead
                   + self.ANALYSIS_SECONDS)
            eta_text = _clock(eta)
        else:
            eta_text = "?"
        loss = f" | loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        self._draw(f"{self._where()} | step {step}/{last}{loss} | study "
                   f"{done / max(self.total_flops(), 1):.0%} | ETA {eta_text}")

    def line(self, message: str) -> None:
        """A permanent line above the live one."""
        if self.tty:
            self.stream.write("\r" + " " * self.width + "\r")
        self.stream.write(message + "\n")
        self.stream.flush()
        self.width = 0

    def close(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0

    def _where(self) -> str:
        return f"[run {self.index + 1}/{len(self.runs)}] {self.runs[self.index][0]}"

    def _draw(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        elif force or now - self.last_print >= self.every:
            self.stream.write(text + "\n")
        else:
            return
        self.last_print = now
        self.stream.flush()


# ----------------------------------------------------------------------------- running


def _child_configs(plan: SizeRuns) -> list:
    """The branches of a finished stable run, as `lab branch RUN_DIR` makes them."""
    from lab.run.branch_points import child_configs

    return child_configs(load_config(rundir.config_path(plan.run_dir)), plan.run_dir,
                         list(plan.pairs))


def _run_list(plans: list[SizeRuns]) -> list[tuple[str, int, int, int]]:
    runs = []
    for p in plans:
        if p.held_out:
            (s, d), = p.pairs
            runs.append((p.label, 0, s + d, p.flops_per_step))
            continue
        runs.append((f"{p.name} stable", 0, max(s for s, _ in p.pairs), p.flops_per_step))
        runs += [(f"{p.name} branch {s}+{d}", s, s + d, p.flops_per_step) for s, d in p.pairs]
    return runs


def run_study(study: Study, plans: list[SizeRuns], progress: StudyProgress, log: TextIO) -> str:
    """Train every stable run and its branches in order; 'finished' or the status that
    stopped it ('preempted' after Ctrl-C / SIGTERM, 'diverged', ...)."""
    from lab.studies.branch import compute_report, train_runs, write_branch_files

    def report(event: str, cfg, summary) -> None:
        if event != "trained":  # every run, skipped or not, moves the live line on
            progress.start(progress.index + 1)
        label, first = progress.runs[progress.index][:2]
        if event == "skipped":
            progress.finish(f"{label}: finished already (eval loss "
                            f"{summary.final_eval_loss:.4f})")
        elif event == "starting":
            print(f"--- {label}: {cfg.run.dir}", file=log, flush=True)
        elif summary.finished:
            progress.finish(f"{label}: eval loss {summary.final_eval_loss:.4f} "
                            f"({summary.tokens:,} tokens, {summary.train_seconds:.0f} s)",
                            trained_steps=progress.step - first)
        else:
            progress.finish(f"{label}: {summary.status} at step {summary.steps}")

    def stopped(statuses: dict[str, str]) -> str | None:
        return next((s for s in statuses.values() if s != Status.FINISHED), None)

    with contextlib.redirect_stdout(log):  # what the runs print; the live line has its stream
        for plan in plans:
            status = stopped(train_runs([plan.config], report, progress, stop_on_failure=True))
            if status is None and not plan.held_out:  # its children exist only now
                children = _child_configs(plan)
                write_branch_files(str(plan.run_dir), compute_report(
                    load_config(rundir.config_path(plan.run_dir)), list(plan.pairs)), children)
                status = stopped(train_runs(children, report, progress, stop_on_failure=True))
            if status is not None:
                return status
    return Status.FINISHED


# ----------------------------------------------------------------------------- points


def collect_points(plans: list[SizeRuns]) -> list[dict]:
    """One point per branch and held-out run: N (non-embedding parameters), D (tokens),
    C = 6 N D, the lab's own FLOP count, the final eval loss, which budget and size it belongs
    to, whether it is held out, and its seed."""
    points = []
    for plan in plans:
        if plan.held_out:
            points.append(_point(plan, plan.run_dir, *plan.pairs[0], plan.budget_index[0],
                                 plan.budgets[0]))
            continue
        children = _child_configs(plan)
        for (s, d), k, budget, child in zip(plan.pairs, plan.budget_index, plan.budgets,
                                            children, strict=True):
            points.append(_point(plan, Path(child.run.dir), s, d, k, budget))
    return points


def _point(plan: SizeRuns, run_dir: Path, s: int, d: int, k: int, budget: float) -> dict:
    summary = rundir.read_summary(run_dir)
    if summary is None or not summary.finished:
        raise UserError(f"{run_dir} is not finished; run `lab demo` again to finish it")
    n, tokens = summary.non_embedding_params, summary.tokens
    return {"run": str(run_dir), "size": plan.name, "N": n, "D": tokens,
            "C": 6.0 * n * tokens, "flops": summary.flops,
            "loss": summary.final_eval_loss, "budget": k,
            "budget_flops": budget, "params": summary.params,
            "branch_step": s, "decay_steps": d, "held_out": plan.held_out,
            "seed": plan.config.run.seed,
            "train_seconds": summary.train_seconds or 0.0, **task_results(summary.extra)}


def task_results(summary_extra: dict) -> dict:
    """A run's downstream tasks' final accuracy, loss and chance level (eval.tasks)."""
    return {k: v for k, v in summary_extra.items() if k.startswith("task/")
            and k.rsplit("/", 1)[-1] in ("accuracy", "loss", "chance")}


def compute_spent(study: Study, plans: list[SizeRuns]) -> dict:
    """FLOPs of the study with branching against training every point from scratch."""
    from lab.studies.branch import compute_report

    branched = scratch = 0.0
    for plan in plans:
        if plan.held_out:  # trained from scratch either way
            (s, d), = plan.pairs
            branched += (s + d) * plan.flops_per_step
            scratch += (s + d) * plan.flops_per_step
            continue
        report = compute_report(load_config(rundir.config_path(plan.run_dir)), list(plan.pairs))
        branched += report["flops_branched"]
        scratch += report["flops_from_scratch"]
    return {"flops_branched": branched, "flops_from_scratch": scratch,
            "saving": 1 - branched / scratch if scratch else 0.0}


# ----------------------------------------------------------------------------- the command


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_demo(study_file: str | Path | None, quick: bool, out_dir: str | None, optim: str,
             argv: list[str]) -> int:
    """The whole demo: plan the study, run (or continue) its runs, fit and write the report;
    the exit status. `argv` is the command's words, quoted in how to continue a stopped demo."""
    from lab.accel.sharding import initialize_distributed

    initialize_distributed()  # under a multi-host launcher, to see that it is one
    import jax

    if jax.process_count() > 1:
        raise UserError(f"lab demo runs as one process ({jax.process_count()} were launched); "
                        "for several hosts, train with lab sweep or lab train")
    study = load_study(study_file or (QUICK_STUDY if quick else STUDY))
    out = Path(out_dir or ("runs/demo-quick" if quick else "runs/demo"))
    if out.exists() and not out.is_dir():  # before the corpus is prepared or anything run
        raise UserError(f"--out {shown(str(out))} is a file; give a directory")
    started, cpu0 = time.perf_counter(), _cpu_seconds()
    stream = sys.stdout

    from lab import data as labdata

    vocab = labdata.open_dataset(labdata.default_data_path()).vocab_size
    plans = size_runs(study, out, optim, vocab)
    check_same_study(out, describe_study(study, plans, optim))
    ladder = [p for p in plans if not p.held_out]
    held = [p for p in plans if p.held_out]
    print(f"lab demo: {len(ladder)} sizes ({ladder[0].non_embedding_params:,} to "
          f"{ladder[-1].non_embedding_params:,} non-embedding parameters), "
          f"{sum(len(p.pairs) for p in ladder)} branches"
          + (f", a held-out budget of {held[0].budgets[0]:.3g} FLOPs ({len(held)} runs: "
             f"{len({p.name for p in held})} sizes x {len(held) // len({p.name for p in held})}"
             " seeds)" if held else "")
          + f", {optim} + muP; output in {out} (runs log to {out / 'demo.log'})",
          flush=True)

    progress = StudyProgress(_run_list(plans), stream)
    try:
        # SIGTERM / Ctrl-C anywhere in the runs: the running one checkpoints and stops, and no
        # other starts (held across the whole study, so a signal between runs is not lost).
        with preemption.caught(), open(out / "demo.log", "a") as log:
            status = run_study(study, plans, progress, log)
    except KeyboardInterrupt:  # Ctrl-C twice
        status = INTERRUPTED
    finally:
        progress.close()
    if status != Status.FINISHED:
        rerun = shlex.join(["lab", "demo", *argv])
        print(f"the demo stopped ({status}); `{rerun}` continues where it stopped", flush=True)
        return EXIT_INTERRUPTED if status in (Status.PREEMPTED, INTERRUPTED) else 1
    runs_seconds = time.perf_counter() - started

    from analysis.report import analyse_study, banner_lines, loss_table, summary_lines
    from analysis.report_page import write_report

    print("analysis: the fits, the held-out check, figures and the report", flush=True)
    result = analyse_study(collect_points(plans), out, bootstrap=study.bootstrap,
                           extrapolate=study.extrapolate,
                           curves=[str(p.run_dir) for p in plans])
    commands = {"train": [shlex.join(size_train_command(study, p)) for p in plans],
                "branch": [shlex.join(c) for c in map(size_branch_command, plans) if c],
                "logdir": shown_path(out / "runs")}
    compute = compute_spent(study, plans)
    timing = {"total_seconds": time.perf_counter() - started, "runs_seconds": runs_seconds,
              "cpu_seconds": _cpu_seconds() - cpu0,
              "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    smoke_test = study.path.resolve() == QUICK_STUDY.resolve()  # its law means nothing
    write_report(out, result, compute=compute, commands=commands, timing=timing,
                 title=f"lab demo: {study.path.name}, {optim} + muP", smoke_test=smoke_test)
    print("\n".join(banner_lines(result, smoke_test)))
    print(loss_table(result))
    print("\n".join(summary_lines(result, compute, timing)))
    print(f"report: {out / 'report.html'} (fit: {out / 'fit.json'})")
    return 0
