"""The bad-input catalogue: every user mistake exits 2 with ONE line on stderr, no traceback,
and leaves every file it was given as it was.

Each row is (name, a function of the row's Setting giving the `lab` arguments, a fragment of the
one-line message). The rows run `lab.cli.main` in this process (fast); a row's setup writes its
inputs under tmp_path, and every file under tmp_path (its bytes' hash) and every directory there
before the command is compared after it: a refused command changes nothing and leaves no debris.

The run-directory rows work on copies of two small runs made once for the module: one finished,
one stopped half-way (at its last checkpoint, its summary still 'running', as after SIGKILL).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.approach3 import law
from lab.cli import main
from lab.run.rundir import LOCK, SUMMARY, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TRUTH = (1.82, 482.0, 2085.0, 0.348, 0.366)  # E, A, B, alpha, beta
# An approach3 fit as `lab fit --json` writes it: TRUTH, with residuals of a few hundredths.
FIT = {"method": "approach3", **dict(zip(("E", "A", "B", "alpha", "beta"), TRUTH, strict=True)),
       "residuals": [0.01, -0.01, 0.0, 0.02, -0.02, 0.0, 0.01, -0.01]}
# The run-directory rows' model and run: 4 steps, a checkpoint every 2 (8 devices, batch 8).
SMALL = ("model.d_model=32", "model.n_layers=1", "model.n_heads=2", "train.steps=4",
         "train.batch_size=8", "train.seq_len=32", "train.log_every=1", "train.eval_every=0",
         "train.eval_batches=1", "schedule.warmup_steps=1", "schedule.decay_steps=0",
         "checkpoint.every_steps=2")


def quiet_main(argv: list[str]) -> tuple[int, str, str]:
    """`lab ARGV` in this process: (exit status, stderr, stdout)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help path; never expected here
            code = e.code
    return code, err.getvalue(), out.getvalue()


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, small_data) -> dict[str, Path]:
    """A finished 4-step run, and a copy of it stopped half-way: resumed with train.steps=8 it
    goes on from its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("small-runs")
    finished, half = root / "finished", root / "half"
    code, err, out = quiet_main(["train", TINY, f"run.dir={finished}", f"data.path={small_data}",
                                 *SMALL])
    assert code == 0 and "finished" in out, err + out[-2000:]
    shutil.copytree(finished, half)
    summary = json.loads((half / SUMMARY).read_text())
    (half / SUMMARY).write_text(json.dumps({**summary, "status": "running"}))
    return {"finished": finished, "half": half}


@dataclass
class Setting:
    tmp: Path
    data: str  # a small prepared byte-level dataset (shared, read-only)
    request: pytest.FixtureRequest  # to make the module's small runs only for rows that use them

    def write(self, name: str, text: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return str(path)

    def train(self, *overrides: str) -> list[str]:
        return ["train", TINY, f"run.dir={self.tmp / 'run'}", f"data.path={self.data}",
                *overrides]

    def small(self, *overrides: str) -> list[str]:
        """`lab train` of the small run in tmp/run (absent unless a row copied a run there)."""
        return self.train(*SMALL, *overrides)

    def resume(self, *overrides: str) -> list[str]:
        """Go on with a copy of the half-finished run, to step 8."""
        self.copy_run("half")
        return self.small("train.steps=8", *overrides)

    def rerun(self, *overrides: str) -> list[str]:
        """Run a copy of the finished run again."""
        self.copy_run("finished")
        return self.small(*overrides)

    def copy_run(self, which: str) -> Path:
        run_dir = self.tmp / "run"
        shutil.copytree(self.request.getfixturevalue("small_runs")[which], run_dir)
        return run_dir

    def locked(self) -> list[str]:
        """The half-finished run, locked by a live process on this host (this one)."""
        run_dir = self.copy_run("half")
        (run_dir / LOCK).write_text(json.dumps(RunLock(str(run_dir)).me))
        return self.small("train.steps=8")

    def env(self, name: str, value: str) -> None:
        """Set an environment variable for this row only."""
        self.request.getfixturevalue("monkeypatch").setenv(name, value)

    def read_only(self, folder: Path) -> Path:
        """Refuse every directory made under `folder` as a read-only file system does (tests
        run as root here, for whom chmod refuses nothing)."""
        mkdir = Path.mkdir

        def refused(path: Path, *args, **kwargs) -> None:
            if path.is_relative_to(folder):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            mkdir(path, *args, **kwargs)

        self.request.getfixturevalue("monkeypatch").setattr(Path, "mkdir", refused)
        return folder

    def metadata(self, edit) -> list[str]:
        """`lab data info` on a copy of the dataset's metadata.json changed by `edit`."""
        meta = json.loads((Path(self.data) / "metadata.json").read_text())
        edit(meta)
        self.write("data/metadata.json", json.dumps(meta))
        return ["data", "info", str(self.tmp / "data")]

    def sweep(self, body: str, *more: str) -> list[str]:
        text = f"base: {TINY}\nkind: ladder\nsizes: [1.3e+5]\n{body}\n"
        return ["sweep", self.write("sweep.yaml", text), "--dry-run", *more]

    def study(self, old: str, new: str) -> list[str]:
        """`lab demo --study` on the quick study file with `old` replaced by `new`."""
        text = (ROOT / "configs" / "demo-quick.yaml").read_text()
        assert old in text, old
        return ["demo", "--study", self.write("study.yaml", text.replace(old, new)), "--out",
                str(self.tmp / "out")]

    def points(self, N, D) -> str:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        frame = pd.DataFrame({"N": N, "D": D, "loss": law(N, D, *TRUTH)})
        path = self.tmp / "points.csv"
        frame.to_csv(path, index=False)
        return str(path)

    def budgets(self, labels: list[int]) -> str:
        """good_points with a `budget` column: the budgets the backtest cuts at."""
        frame = pd.read_csv(self.good_points()).assign(budget=labels)
        frame.to_csv(self.tmp / "points.csv", index=False)
        return str(self.tmp / "points.csv")

    def task_points(self, n: int = 8, drop: str | None = None, **columns) -> str:
        """A downstream CSV (N, D, task_loss, accuracy) of n runs; `columns` replace columns,
        `drop` leaves one out."""
        N, D = np.logspace(4, 5.5, n), np.logspace(7, 6, n)
        frame = pd.DataFrame({"N": N, "D": D, "task_loss": law(N, D, *TRUTH) / 2,
                              "accuracy": np.linspace(0.3, 0.7, n)} | columns)
        path = self.tmp / "tasks.csv"
        frame.drop(columns=[drop] if drop else []).to_csv(path, index=False)
        return str(path)

    def downstream(self, *more: str, csv: str | None = None) -> list[str]:
        return ["fit", csv or self.task_points(), "--method", "downstream", *more]

    def corpus(self) -> str:
        """A folder of one small text file, for lab data prep."""
        return str(Path(self.write("corpus/a.txt", "some text\n")).parent)

    def edited_points(self, edit) -> str:
        """good_points' CSV with its lines (the header first) changed in place by `edit`."""
        lines = Path(self.good_points()).read_text().splitlines()
        edit(lines)
        return self.write("points.csv", "\n".join(lines) + "\n")

    def moe(self, *extra: str, N=None, E=None, loss=None, drop: str = "") -> list[str]:
        """`lab fit --method moe` on a CSV of 3 sizes x 3 expert counts (or the given N, E,
        loss), less the column `drop`."""
        N = np.repeat([1e6, 1e7, 1e8], 3) if N is None else np.asarray(N, dtype=float)
        E = np.tile([1.0, 4.0, 8.0], 3) if E is None else np.asarray(E, dtype=float)
        if loss is None:
            loss = 3.0 * np.maximum(N, 1) ** -0.05 * (1 + 0.1 / np.maximum(E, 1))
        frame = pd.DataFrame({"N": N, "E": E, "loss": loss}).drop(columns=[drop] if drop else [])
        frame.to_csv(self.tmp / "moe.csv", index=False)
        return ["fit", str(self.tmp / "moe.csv"), "--method", "moe", *extra]

    def good_points(self) -> str:
        rng = np.random.default_rng(0)
        return self.points(np.exp(rng.uniform(16, 20, 12)), np.exp(rng.uniform(18, 24, 12)))


def word_level_tokenizer(s: Setting) -> list[str]:
    """A valid tokenizer.json that loads but cannot encode: WordLevel without [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1}))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(s.tmp / "wordlevel.json"))
    s.write("corpus/a.txt", "hello world and more\n")
    return ["data", "prep", "--source", str(s.tmp / "corpus"), "--out", str(s.tmp / "out"),
            "--tokenizer", str(s.tmp / "wordlevel.json")]


def damaged_task_file(s: Setting) -> list[str]:
    """A copy of the data whose task file for the command's task has one token changed."""
    from lab.config import load_config
    from lab.data import open_dataset
    from lab.data.tasks import load_or_build, task_path, task_specs

    data = s.tmp / "data"
    shutil.copytree(s.data, data)
    words = [*SMALL, "eval.tasks=[exact:8]", "eval.exact_context=8", f"data.path={data}"]
    (spec,) = task_specs(load_config(TINY, words).eval)
    dataset = open_dataset(str(data))
    tasks = load_or_build(dataset, spec)
    choices = tasks.choices.copy()
    choices[0, 0, 0] += 1
    np.savez(task_path(dataset, spec), context=tasks.context, choices=choices,
             answer=tasks.answer, source=tasks.source)
    return s.train(*words)


def nested_aliases(s: Setting) -> list[str]:
    """run.dir as ten levels of ten YAML aliases: 10**10 leaves from 0.6 kB of YAML, whose
    full repr in the message once made a 2.1 GB line."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return ["train", s.write("aliases.yaml", f"run:\n  dir: [{', '.join(items)}]\n")]


def drop(key):
    return lambda meta: meta.pop(key)


CATALOGUE = [
    # Configs.
    ("config not UTF-8",
     lambda s: ["train", s.write("latin.yaml", b"train:\n  steps: 5  # caf\xe9\n")],
     "not UTF-8"),
    ("config: run.dir a nested alias structure", nested_aliases,
     "run.dir must be str, got [['x', 'x', 'x', 'x', ...], [[...]"),
    # The file system: a refusal is one line naming the path, and leaves nothing behind.
    ("run.dir a name of 5,000 characters",
     lambda s: s.train(f"run.dir={s.tmp / 'a' / 'b' / ('x' * 5000)}"), "File name too long"),
    ("run.dir on a read-only file system",
     lambda s: s.train(f"run.dir={s.read_only(s.tmp / 'ro') / 'run'}"),
     "Read-only file system; choose a place on a writable file system"),
    ("LAB_CACHE_DIR a file",
     lambda s: [s.env("LAB_CACHE_DIR", s.write("cache", "a file")), *s.train()][1:],
     "it is a file; set LAB_CACHE_DIR to a directory you can write to"),
    ("LAB_CACHE_DIR where nothing can be made",
     lambda s: [s.env("LAB_CACHE_DIR", s.write("f", "a file") + "/cache"), *s.train()][1:],
     "it is a file; set LAB_CACHE_DIR"),
    ("config a directory", lambda s: ["train", str(s.tmp)], "is a directory; give a YAML file"),
    ("config with a Python tag",
     lambda s: ["train", s.write("tag.yaml", "train: !!python/object:os.system {}\n")],
     "uses the tag '!!python/object:os.system', which the lab does not read"),
    ("config with a key twice",
     lambda s: ["train", s.write("twice.yaml", "train:\n  steps: 5\n  steps: 7\n")],
     "gives the key 'steps' twice in one mapping (lines 2 and 3)"),
    ("sweep with a key twice", lambda s: s.sweep("tokens: 1e6\ntokens: 2e6"),
     "gives the key 'tokens' twice"),
    ("study with a Python tag",
     lambda s: ["demo", "--study", s.write("study.yaml", "base: !!python/name:os.system ''\n"),
                "--out", str(s.tmp / "out")], "uses the tag '!!python/name:os.system'"),
    ("config with int and str keys",
     lambda s: ["train", s.write("mixed.yaml", "train:\n  1: 2\n  foo: 3\n")],
     "unknown config key 'train.1'"),
    # lab train --lower: refused before anything is traced.
    ("compile-only: an unknown topology",
     lambda s: [*s.train(), "--compile-only", "--topology", "v9z:2x2"],
     "--topology 'v9z:2x2' is not a TPU topology"),
    ("compile-only: an empty topology", lambda s: [*s.train(), "--compile-only", "--topology", ""],
     "--topology '' is not a TPU topology"),
    ("sweep: an empty topology", lambda s: s.sweep("tokens: 1e6", "--topology", ""),
     "--topology '' is not a TPU topology"),
    ("lower: unknown platform", lambda s: [*s.train(), "--lower", "rocm"],
     "use --lower cuda or --lower tpu"),
    ("lower: a topology for cuda", lambda s: [*s.train(), "--lower", "cuda", "--topology",
                                             "v5e:2x2"], "use it with --lower tpu"),
    ("lower: json into a missing folder",
     lambda s: [*s.train(), "--lower", "cuda", "--json", str(s.tmp / "no" / "such.json")],
     "cannot write a file there"),
    ("lower: json without --lower", lambda s: [*s.train(), "--json", str(s.tmp / "x.json")],
     "--json needs --lower"),
    ("steps beyond int64", lambda s: s.train("train.steps=99999999999999999999"),
     "beyond a 64-bit integer"),
    ("steps beyond int32", lambda s: s.train("train.steps=3000000000"), "32-bit step counter"),
    ("warmup beyond int32",
     lambda s: s.train("train.steps=2147483647", "schedule.warmup_steps=2147483648"),
     "schedule.warmup_steps"),
    ("negative seed", lambda s: s.train("run.seed=-1"),
     "run.seed must be an integer in [0, 2**32)"),
    ("seed beyond 32 bits", lambda s: s.train("run.seed=4294967296"), "run.seed"),
    ("infinite lr", lambda s: s.train("optim.lr=.inf"), "optim.lr must be a finite number"),
    ("NaN weight decay", lambda s: s.train("optim.weight_decay=.nan"), "optim.weight_decay"),
    # Downstream tasks (eval.*): the config, then the data they are built from.
    ("eval.tasks: an unknown task", lambda s: s.train("eval.tasks=[hellaswag]"),
     "eval.tasks[0] must be NAME or NAME:EXAMPLES, NAME one of choice, exact"),
    ("eval.tasks: no examples", lambda s: s.train("eval.tasks=[choice:0]"),
     "EXAMPLES in [1, 1000000] (such as choice:256), got 'choice:0'"),
    ("eval.tasks: a task twice", lambda s: s.train("eval.tasks=[exact,exact:5]"),
     "eval.tasks lists exact twice"),
    ("eval task longer than the window",
     lambda s: s.train("eval.tasks=[choice]", "eval.choice_context=120"),
     "must not exceed train.seq_len + 1 (129)"),
    ("eval.choice_distractors: near", lambda s: s.train("eval.choice_distractors=near"),
     "eval.choice_distractors must be one of random, document"),
    ("eval.tasks: more examples than the val split",
     lambda s: s.small("eval.tasks=[exact:100000]", "eval.exact_context=8"),
     "task exact needs 100000 examples of 8 + 4 tokens but the val split"),
    ("a damaged task file", damaged_task_file, "is damaged (its checksum does not match)"),
    ("negative QK-clip threshold", lambda s: s.train("optim.qk_clip=-5"),
     "optim.qk_clip must be zero or a positive number, got -5.0"),
    ("infinite QK-clip threshold", lambda s: s.train("optim.qk_clip=.inf"),
     "optim.qk_clip must be a finite number"),
    ("QK-clip threshold not a number", lambda s: s.train("optim.qk_clip=high"),
     "optim.qk_clip must be zero or a positive number, got 'high'"),
    # Data.
    ("data prep --out a name of 300 characters",
     lambda s: ["data", "prep", "--source", s.corpus(), "--out",
                str(s.tmp / ("y" * 300) / "out")], "File name too long; choose a shorter name"),
    ("data prep --out under a file",
     lambda s: ["data", "prep", "--source", s.corpus(), "--out",
                s.write("a-file", "not a folder") + "/out"], "it is a file"),
    ("demo --out a file", lambda s: ["demo", "--quick", "--out", s.write("demo-out", "a file")],
     "demo-out' is a file; give a directory"),
    ("tokenizer that cannot encode", word_level_tokenizer, "cannot encode this corpus"),
    ("metadata without dtype", lambda s: s.metadata(drop("dtype")), "dtype is None"),
    ("metadata with a text vocab_size",
     lambda s: s.metadata(lambda m: m.update(vocab_size="257")), "vocab_size is '257'"),
    ("metadata without splits", lambda s: s.metadata(drop("splits")), "splits.train is missing"),
    ("metadata with a bad shard list",
     lambda s: s.metadata(lambda m: m["splits"]["val"].update(shards=[{"file": 3}])),
     "splits.val.shards"),
    ("metadata whose dtype cannot hold the vocabulary",
     lambda s: s.metadata(lambda m: m.update(vocab_size=70000)), "cannot hold 70000"),
    ("negative noise_scale_every", lambda s: s.train("train.noise_scale_every=-1"),
     "train.noise_scale_every"),
    ("noise scale: a batch that cannot split in two halves over the devices",
     lambda s: s.small("train.noise_scale_every=2"), "splits the batch in two halves"),
    ("eval windows: too many batches", lambda s: s.train("train.eval_batches=100000"),
     "train.eval_batches x train.batch_size"),
    ("eval windows: not one batch",
     lambda s: s.train("train.batch_size=4096", "train.eval_batches=1", "model.d_model=32",
                       "model.n_layers=1", "model.n_heads=2", "train.seq_len=64"),
     "lower train.batch_size to"),
    # Run directories: a refused start leaves a new run.dir absent, and an existing one as it
    # was (resuming, a mesh or batch a run may change is checked; a seed, batch or window that
    # would make it another run is refused as such, before anything is written).
    ("run.dir is an existing file",
     lambda s: [*s.small(), f"run.dir={s.write('a-file', 'not a run')}"], "is an existing file"),
    ("mesh that does not match the devices", lambda s: s.small("mesh.data=3"),
     "8 devices do not divide by the fixed axes' product 3"),
    ("batch the mesh does not divide", lambda s: s.small("train.batch_size=12"),
     "train.batch_size (12)"),
    ("batch the mesh times grad_accum does not divide",
     lambda s: s.small("train.grad_accum=2"),
     "train.batch_size (8) must divide by the data-parallel size (mesh.data x mesh.fsdp x "
     "mesh.expert = 8) times train.grad_accum (2)"),
    ("moe: top_k above the experts",
     lambda s: s.small("model.moe.experts=4", "model.moe.top_k=5"),
     "model.moe.top_k (5) must not exceed model.moe.experts (4)"),
    ("moe: experts the expert axis does not divide",
     lambda s: s.small("model.moe.experts=6", "mesh.expert=4"),
     "model.moe.experts (6) must divide by mesh.expert (4)"),
    ("moe: an expert axis without experts", lambda s: s.small("mesh.expert=2"),
     "mesh.expert=2 splits experts, but model.moe.experts is 0"),
    ("moe: experts the resolved expert axis does not divide",
     lambda s: s.small("model.moe.experts=6", "mesh.fsdp=1", "mesh.expert=-1"),
     "its 'expert' dimension (6) does not divide by the mesh axis it is split over "
     "(mesh.expert=8)"),
    ("dataset shorter than one window", lambda s: s.small("train.seq_len=100000000"),
     "shorter than one window of 100000001 tokens; lower train.seq_len"),
    ("val split shorter than one window", lambda s: s.small("train.seq_len=10000"),
     "not even one window fits: lower train.seq_len to"),
    ("resume: too many eval batches", lambda s: s.resume("train.eval_batches=100000"),
     "train.eval_batches x train.batch_size"),
    ("resume: mesh that does not match the devices",
     lambda s: s.resume("mesh.data=2", "mesh.fsdp=2"), "needs 4 devices but 8 are available"),
    ("resume: another batch", lambda s: s.resume("train.batch_size=12"),
     "train.batch_size is 12 but the run in"),
    ("resume: negative seed", lambda s: s.resume("run.seed=-1"), "run.seed must be an integer in"),
    ("resume: another window", lambda s: s.resume("train.seq_len=100000000"),
     "train.seq_len is 100000000 but the run in"),
    ("resume: a locked run", lambda s: s.locked(),
     f"in use by process {os.getpid()} on host {socket.gethostname()}"),
    ("finished run: more steps", lambda s: s.rerun("train.steps=8"),
     "finished at 4 steps; use the same value"),
    ("finished run: another lr", lambda s: s.rerun("optim.lr=1e-3"),
     "optim.lr is 0.001 but the finished run in"),
    # Sweeps.
    ("sweep tokens: abc", lambda s: s.sweep("tokens: abc"),
     "sweep.yaml: key tokens[0] must be a positive number, got 'abc'"),
    ("sweep warmup_fraction: lots", lambda s: s.sweep("warmup_fraction: lots"),
     "warmup_fraction must be a number in [0, 1]"),
    ("sweep flops_tolerance: loose",
     lambda s: s.sweep("flops_tolerance: loose"),
     "key flops_tolerance must be a positive number, got 'loose'"),
    ("sweep .inf size",
     lambda s: ["sweep", s.write("inf.yaml", f"base: {TINY}\nkind: ladder\nsizes: [.inf]\n"),
                "--dry-run"], "key sizes[0] must be a finite number, got inf"),
    ("sweep .inf budget",
     lambda s: ["sweep", s.write("b.yaml", f"base: {TINY}\nkind: isoflop\nsizes: [1.3e+5]\n"
                                           "budgets: [1.0e+12, .inf]\n"), "--dry-run"],
     "key budgets[1] must be a finite number, got inf"),
    ("sweep aspect_ratio: wide", lambda s: s.sweep("shape: {aspect_ratio: wide}"),
     "shape.aspect_ratio must be a positive number, got 'wide'"),
    ("sweep head_dim: 2.5", lambda s: s.sweep("shape: {head_dim: 2.5}"),
     "shape.head_dim must be a positive integer"),
    # Sweep and study files: the schema's errors (lab.schema); more in SWEEP_BODIES, STUDY_EDITS.
    ("sweep kind: a list", lambda s: ["sweep", s.write("k.yaml", f"base: {TINY}\nkind: [ladder]\n"),
                                      "--dry-run"],
     "kind must be one of ladder, isoflop, grid, branch, got ['ladder']"),
    ("sweep without kind", lambda s: ["sweep", s.write("k.yaml", f"base: {TINY}\n"), "--dry-run"],
     "the sweep file needs 'kind' (ladder|isoflop|grid|branch)"),
    # Fits.
    ("fit --plots at a file",
     lambda s: ["fit", s.good_points(), "--plots", s.write("plots", "not a folder")],
     "is a file, not a directory"),
    ("fit --json into a missing folder",
     lambda s: ["fit", s.good_points(), "--json", str(s.tmp / "nowhere" / "fit.json")],
     "does not exist"),
    ("fit a Markdown file", lambda s: ["fit", s.write("notes.md", "# Points\n\nN is 1e6, D 2e7."
                                                      "\nthen, two, commas\n")],
     "is not a readable CSV"),
    ("fit a CSV with N beyond float64's range",
     lambda s: ["fit", s.edited_points(lambda lines: lines.__setitem__(6, "1e400,1e9,3.0"))],
     "N in row 5 (line 7) is inf, not a finite number"),
    ("fit a CSV with text for a loss",
     lambda s: ["fit", s.edited_points(lambda lines: lines.__setitem__(3, "1e7,1e9,low"))],
     "loss in row 2 (line 4) is 'low', not a finite number"),
    ("fit a CSV with a column twice",
     lambda s: ["fit", s.edited_points(lambda lines: lines.__setitem__(
         slice(None), [line + ("," + line.split(",")[-1]) for line in lines]))],
     "has the column 'loss' twice; keep one"),
    ("fit 100,000 points with Approach 3",
     lambda s: ["fit", s.points(*np.exp(np.random.default_rng(0).uniform(16, 24, (2, 100_000))))],
     "100,000 points would take many minutes; fit at most 4,444 points"),
    ("fit one N", lambda s: ["fit", s.points([1e7] * 8, np.logspace(8, 10, 8))],
     "at least 2 distinct N"),
    ("fit one D", lambda s: ["fit", s.points(np.logspace(6, 8, 8), [1e9] * 8)],
     "at least 2 distinct D"),
    ("fit a collinear design (D = 20 N)",
     lambda s: ["fit", s.points(np.logspace(6, 8, 8), 20 * np.logspace(6, 8, 8))],
     "cannot separate N from D"),
    ("fit --backtest --folds 0", lambda s: ["fit", s.good_points(), "--backtest", "--folds", "0"],
     "--folds must be at least 1"),
    ("fit --folds without --backtest", lambda s: ["fit", s.good_points(), "--folds", "3"],
     "--folds needs --backtest"),
    ("fit --backtest of a method that predicts no loss",
     lambda s: ["fit", s.good_points(), "--method", "isoflop", "--backtest"],
     "needs a method that predicts a loss"),
    ("fit --backtest with 7 points",
     lambda s: ["fit", s.points(np.logspace(6, 8, 7), [1e9, 1e8, 1e10] * 2 + [1e9]),
                "--backtest"],
     "the backtest needs at least 8 points"),
    ("fit --backtest at one budget", lambda s: ["fit", s.budgets([0] * 12), "--backtest"],
     "needs points at 2 or more compute budgets"),
    ("fit --backtest with no fold to fit",
     lambda s: ["fit", s.budgets([0] * 6 + [1] * 6), "--backtest"],
     "no fold of the backtest could be fitted"),
    ("fit --method schedule --backtest on a run with no branches",
     lambda s: ["fit", str(s.copy_run("finished")), "--method", "schedule", "--backtest"],
     "the annealing term is unidentified"),
    ("fit --method schedule without --backtest",
     lambda s: ["fit", str(s.copy_run("finished")), "--method", "schedule"],
     "--method schedule only backtests here"),
    ("fit --method moe without an E column", lambda s: s.moe(drop="E"), "needs column(s) E"),
    ("fit --method moe without a loss column", lambda s: s.moe(drop="loss"),
     "lacks column(s) loss; a points CSV needs N and loss"),
    ("fit --method moe with E = 0", lambda s: s.moe(E=[0.0, 4, 8] * 3),
     "E must be a number of experts, at least 1 (1 = dense)"),
    ("fit --method moe with N = 0", lambda s: s.moe(N=[0.0] * 3 + [1e7] * 3 + [1e8] * 3),
     "N must be positive, row 0 has 0"),
    ("fit --method moe with a negative loss", lambda s: s.moe(loss=[-1.0] + [2.0] * 8),
     "loss must be positive, row 0 has -1"),
    ("fit --method moe with one expert count", lambda s: s.moe(E=[8.0] * 9),
     "needs 2 or more expert counts and 2 or more sizes N, got 1 and 3"),
    ("fit --method moe at one size (N differing by the routers alone)",
     lambda s: s.moe(N=1e6 * (1 + 0.001 * np.tile([1.0, 4, 8], 3)) + np.repeat([0, 1, 2], 3)),
     "needs 2 or more expert counts and 2 or more sizes N, got 3 and 1"),
    ("fit --method moe with 4 points",
     lambda s: s.moe(N=[1e6, 1e6, 1e7, 1e7], E=[1.0, 4, 1, 4], loss=[3.0, 2.9, 2.8, 2.7]),
     "has 4 parameters and needs at least 5 points, got 4"),
    ("fit --method moe --at without E", lambda s: s.moe("--at", "1e9"), "not a list of N:E pairs"),
    ("fit --at without --method moe", lambda s: ["fit", s.good_points(), "--at", "1e9:8"],
     "--at and --moe-transform belong to --method moe"),
    ("fit --method moe --moe-transform unknown", lambda s: s.moe("--moe-transform", "log"),
     "invalid choice: 'log'"),
    ("fit --method moe --backtest with too few points at the smaller sizes",
     lambda s: s.moe("--backtest"), "no fold of the MoE backtest could be fitted"),
    ("fit --method multipower --backtest on a CSV of points",
     lambda s: ["fit", s.good_points(), "--method", "multipower", "--backtest"],
     "is not a run directory"),
    # The downstream law.
    ("fit --method downstream without --chance", lambda s: s.downstream(),
     "--method downstream needs --chance P"),
    ("fit --method downstream --chance 1", lambda s: s.downstream("--chance", "1"),
     "--chance must be in [0, 1)"),
    ("fit --method downstream --chance -0.25", lambda s: s.downstream("--chance=-0.25"),
     "--chance must be in [0, 1)"),
    ("fit --method downstream on a CSV without task_loss",
     lambda s: s.downstream("--chance", "0.25", csv=s.task_points(drop="task_loss")),
     "lacks column(s) task_loss"),
    ("fit --method downstream on accuracies in percent",
     lambda s: s.downstream("--chance", "0.25", csv=s.task_points(accuracy=np.full(8, 43.0))),
     "accuracy must be a fraction in [0, 1]"),
    ("fit --method downstream on a negative accuracy",
     lambda s: s.downstream("--chance", "0.25", csv=s.task_points(accuracy=np.full(8, -0.1))),
     "accuracy must be a fraction in [0, 1]"),
    ("fit --method downstream with 5 runs",
     lambda s: s.downstream("--chance", "0.25", csv=s.task_points(n=5)),
     "needs at least 6 points and got 5"),
    ("fit --method downstream on runs without task results",
     lambda s: s.downstream("--chance", "0.25", csv=str(s.copy_run("finished"))),
     "has task results in its summary.json"),
    ("fit --predict that is not N:D",
     lambda s: s.downstream("--chance", "0.25", "--predict", "1e6"), "not N:D"),
    ("fit --chance without --method downstream",
     lambda s: ["fit", s.good_points(), "--chance", "0.25"],
     "belong(s) to --method downstream"),
    # Plans.
    ("plan --out a file",
     lambda s: ["plan", s.write("fit.json", json.dumps(FIT)), "--budget", "1e14", "--out",
                s.write("plan-file", "a file"), "--base", TINY],
     "plan-file': it is a file; a file is in the way"),
    ("plan --out on a read-only file system",
     lambda s: ["plan", s.write("fit.json", json.dumps(FIT)), "--budget", "1e14", "--out",
                str(s.read_only(s.tmp / "ro") / "plan"), "--base", TINY],
     "Read-only file system"),
    ("plan --budget 1e40", lambda s: ["plan", s.write("fit.json", json.dumps(FIT)), "--budget",
                                      "1e40", "--out", str(s.tmp / "plan"), "--base", TINY],
     "--budget 1e+40 needs 5.33e+16 steps"),
    ("plan from a degenerate loss law (A = B = alpha = beta = 0)",
     lambda s: ["plan", s.write("flat.json", json.dumps(
         {"method": "approach3", "E": 2, "A": 0, "B": 0, "alpha": 0, "beta": 0,
          "residuals": [0.0] * 8})), "--budget", "1e14", "--out", str(s.tmp / "plan"),
         "--base", TINY],
     "no compute-optimal allocation"),
    ("plan --noise-scale without a noise-scale law",
     lambda s: ["plan", s.write("fit.json", json.dumps(
         {"method": "approach3", "E": 2, "A": 400, "B": 400, "alpha": 0.34, "beta": 0.28,
          "residuals": [0.01, -0.01] * 4})), "--budget", "1e14", "--out", str(s.tmp / "plan"),
         "--base", TINY, "--noise-scale"],
     "--noise-scale needs a critical-batch fit JSON"),
]

# Sweep files (Setting.sweep: a one-size ladder with more lines): (name, the lines, the fragment).
SWEEP_BODIES = [
    ("budgets of words", "budgets: [lots]", "key budgets[0] must be a positive number, got 'lots'"),
    ("decay_fraction 1.5", "decay_fraction: 1.5",
     "decay_fraction must be a number in [0, 1], got 1.5"),
    ("branch at step 0", "branch: {at: [0], decay_steps: [5]}",
     "branch.at[0] must be an integer in [1, 2**31-1]"),
    ("branch without decay_steps", "branch: {at: [10]}", "branch needs 'branch.decay_steps'"),
    ("a misspelt key", "toknes: 1e6",
     "unknown key 'toknes' (did you mean tokens?); known keys in the sweep file: base, kind"),
    ("a misspelt shape key", "shape: {head_dims: 64}",
     "unknown key 'shape.head_dims' (did you mean shape.head_dim?)"),
    ("set: a list", "set: [optim.lr=1]",
     "key set must be a mapping of key: value, got ['optim.lr=1']"),
]
CATALOGUE += [(f"sweep {name}", lambda s, body=body: s.sweep(body), fragment)
              for name, body, fragment in SWEEP_BODIES]

# Study files (the quick study with one edit): (name, its text, the edit, the message's fragment).
STUDY_EDITS = [
    ("bootstrap: many", "bootstrap: 50", "bootstrap: many",
     "study.yaml: key bootstrap must be a positive integer, got 'many'"),
    ("decay_fraction 0", "decay_fraction: 0.25", "decay_fraction: 0",
     "study.yaml: decay_fraction must be a number in (0, 1], got 0.0"),
    ("a negative lr", "muon: 3.0e-2", "muon: -3.0e-2",
     "lr.muon must be a positive number, got -0.03"),
    ("a negative seed", "seeds: [0, 1]", "seeds: [-1, 1]",
     "held_out.seeds[0] must be an integer in [0, 2**32)"),
    ("held_out without budget", "  budget: 1.6e+11\n", "",
     "held_out needs 'held_out.budget' (float > 0)"),
    ("a misspelt key", "bootstrap: 50", "boostrap: 50",
     "unknown key 'boostrap' (did you mean bootstrap?); known keys in the study file"),
    ("lr: a list", "lr:\n  muon: 3.0e-2\n  adamw: 1.0e-2", "lr: [0.03]",
     "key lr must be a mapping of key: value, got [0.03]"),
]
CATALOGUE += [(f"study {name}", lambda s, old=old, new=new: s.study(old, new), fragment)
              for name, old, new, fragment in STUDY_EDITS]


def snapshot(root: Path) -> dict[str, str]:
    """Every file's content hash and every directory under root, by path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "directory" for p in root.rglob("*")}


@pytest.mark.parametrize("name, argv_of, fragment", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_exits_2_with_one_line(name, argv_of, fragment, tmp_path, small_data,
                                         request):
    argv = argv_of(Setting(tmp_path, small_data, request))
    before = snapshot(tmp_path)
    code, text, out = quiet_main(argv)
    assert code == 2, f"{name}: exit {code}\n{text}\n{out[-2000:]}"
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) < 400, f"{name}: a line of {len(lines[0])} characters"
    after = snapshot(tmp_path)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"{name} changed, added or removed {changed}"


@pytest.mark.parametrize("seq_len, batch_size", [(100000, 8), (32, 200)])
def test_the_window_length_suggested_fits_one_batch(small_data, seq_len, batch_size):
    """A val split too short for one evaluation batch (no window at all; some windows): the
    train.seq_len the message suggests gives one batch, and one token more does not."""
    import re

    from lab.data import eval_batches, open_dataset
    from lab.errors import UserError

    dataset = open_dataset(small_data)
    with pytest.raises(UserError, match=r"train\.seq_len to \d+ or less") as refused:
        eval_batches(dataset, seq_len, batch_size, 1)
    longest = int(re.search(r"train.seq_len to (\d+) or less", str(refused.value)).group(1))
    (tokens_BxL,) = eval_batches(dataset, longest, batch_size, 1)
    assert tokens_BxL.shape == (batch_size, longest + 1)
    with pytest.raises(UserError, match="not even one"):
        eval_batches(dataset, longest + 1, batch_size, 1)


def test_every_catalogue_row_is_distinct():
    assert len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


def full_disk_then_space_again(tmp_path, small_data, small_runs, monkeypatch, fill) -> str:
    """The half-finished run trained to 8 steps with `fill(run_dir)` patching orbax so that
    the disk is full at step 6: one line, exit 2, naming step 4 as the last complete
    checkpoint; with space again (the patches undone) the same command resumes from step 4
    and finishes. Returns the error line."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_runs["half"], run_dir)
    argv = ["train", TINY, f"run.dir={run_dir}", f"data.path={small_data}", *SMALL,
            "train.steps=8"]
    fill(run_dir)
    code, err, out = quiet_main(argv)
    assert code == 2, err + out[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device; the last complete checkpoint is step 4" in lines[0]
    monkeypatch.undo()
    code, err, out = quiet_main(argv)
    assert code == 0 and "resuming at step 4" in out, err + out[-2000:]
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "finished"
    return lines[0]


def test_a_full_disk_at_a_checkpoint_names_the_last_complete_one(tmp_path, small_data,
                                                                 small_runs, monkeypatch):
    """The disk fills while the half-finished run writes its step-6 checkpoint (orbax's save
    refused with ENOSPC)."""
    import orbax.checkpoint as ocp

    save = ocp.CheckpointManager.save

    def fill(run_dir: Path) -> None:
        def full_at_6(manager, step, *args, **kwargs):
            if step == 6:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                              str(run_dir / "checkpoints"))
            return save(manager, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_6)

    line = full_disk_then_space_again(tmp_path, small_data, small_runs, monkeypatch, fill)
    assert "cannot write the checkpoint of step 6" in line


def test_a_full_disk_in_a_background_write_names_the_last_complete_checkpoint(
        tmp_path, small_data, small_runs, monkeypatch):
    """Saves are asynchronous: the disk fills while step 6's arrays are written in the
    background, and orbax raises it when it next waits for that write (at the next save, or at
    the end)."""
    import orbax.checkpoint as ocp

    save, wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    failed = []

    def fill(run_dir: Path) -> None:
        def write_fails_at_6(manager, step, *args, **kwargs):
            if step == 6:  # accepted, then lost in the background: nothing complete is written
                failed.append(step)
                return True
            return save(manager, step, *args, **kwargs)

        def waits_for_the_failed_write(manager):
            if failed:
                raise RuntimeError("async commit failed") from OSError(
                    errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "checkpoints" / "6"))
            return wait(manager)

        monkeypatch.setattr(ocp.CheckpointManager, "save", write_fails_at_6)
        monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                            waits_for_the_failed_write)

    full_disk_then_space_again(tmp_path, small_data, small_runs, monkeypatch, fill)
    assert failed == [6]
