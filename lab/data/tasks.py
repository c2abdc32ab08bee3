"""Downstream tasks built from the validation split of the run's own corpus (nothing is
downloaded), and their scores from per-row log-likelihoods.

    choice  given CONTEXT tokens, pick the true continuation of LENGTH tokens among 4: the true
            one and 3 distractors, the continuations of other places in the split (anywhere,
            or in the same document); the model picks the one of highest summed
            log-likelihood (all 4 have LENGTH tokens, so the per-token average picks the same)
    exact   given CONTEXT tokens, greedy decoding must reproduce the next LENGTH tokens exactly;
            scored in one forward pass, since greedy decoding follows the true tokens as long as
            each is the argmax given the ones before it

Examples sit in tiles: each validation document (its end-of-document token left out) is cut
into consecutive windows of CONTEXT + LENGTH tokens, and an example is one tile, so no two
examples overlap and none crosses a document. Which tiles, which distractors and where the
true answer goes are drawn from a generator seeded by (eval.seed, the task): a task set is a
function of the split, its settings and the seed. It is written once, beside the prepared
data (DATA/tasks/), as an .npz with a .json holding its count and checksum, both checked when
it is read back; the prepared shards and metadata are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np

from lab.config import TASK_NAMES, EvalConfig, parse_task
from lab.data.format import TokenDataset
from lab.errors import UserError

TASK_FILE_VERSION = 1
N_CHOICES = 4
TASKS_DIR = "tasks"
_DRAWS = 64  # distractor draws per example before the example is passed over
_ARRAYS = ("context", "choices", "answer", "source")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task's settings: what its examples are a function of (with the split)."""

    name: str  # choice | exact (the metrics' task/<name>/...)
    examples: int
    context: int  # tokens before the continuation
    length: int  # tokens of the continuation
    seed: int
    distractors: str = ""  # choice: random | document

    @property
    def choices(self) -> int:
        return N_CHOICES if self.name == "choice" else 1

    @property
    def chance(self) -> float:
        """Accuracy of a blind guess: 1/4 for choice; 0 for exact (1/V^k, negligible)."""
        return 1.0 / N_CHOICES if self.name == "choice" else 0.0


def task_specs(ecfg: EvalConfig) -> list[TaskSpec]:
    """The tasks eval.tasks names, in its order, with their settings."""
    specs = []
    for item in ecfg.tasks:
        name, n = parse_task(item)
        if name == "choice":
            specs.append(TaskSpec(name, n, ecfg.choice_context, ecfg.choice_length, ecfg.seed,
                                  ecfg.choice_distractors))
        else:
            specs.append(TaskSpec(name, n, ecfg.exact_context, ecfg.exact_length, ecfg.seed))
    return specs


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A task's examples: N of them, M = 4 choices (choice) or 1 (exact), C context tokens,
    K continuation tokens. `source` is where each choice's first token sits in the validation
    split (the context of example i starts at source[i, answer[i]] - C)."""

    spec: TaskSpec
    context: np.ndarray  # int32 (N, C)
    choices: np.ndarray  # int32 (N, M, K)
    answer: np.ndarray  # int64 (N,): the true choice
    source: np.ndarray  # int64 (N, M)

    def checksum(self) -> str:
        """sha256 of the settings and every array's dtype, shape and bytes."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self.spec), sort_keys=True).encode())
        for name in _ARRAYS:
            a = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()


class _SplitReader:
    """Spans of a split, read across its shard files."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [np.asarray(s) for s in shards]
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)

    def read(self, start: int, n: int) -> np.ndarray:
        out, pos = [], start
        while n > 0:
            s = int(np.searchsorted(self.starts, pos, side="right")) - 1
            piece = self.shards[s][pos - self.starts[s]: pos - self.starts[s] + n]
            out.append(piece)
            pos, n = pos + len(piece), n - len(piece)
        return np.concatenate(out).astype(np.int32)


def _tiles(dataset: TokenDataset, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(start of each tile in the val split, its document's row in documents.npy)."""
    docs = dataset.documents("val")
    counts = np.maximum(docs[:, 2] - 1, 0) // width  # the end-of-document token left out
    doc_of = np.repeat(np.arange(len(docs)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    within = np.arange(len(doc_of)) - first[doc_of]
    return docs[doc_of, 1] + within * width, doc_of


def build(dataset: TokenDataset, spec: TaskSpec) -> TaskSet:
    """The task's examples, from the validation split only: a function of the split, the
    settings and the seed."""
    C, K, M = spec.context, spec.length, spec.choices
    starts, doc_of = _tiles(dataset, C + K)
    rng = np.random.default_rng(
        np.random.SeedSequence([spec.seed, TASK_NAMES.index(spec.name), C, K]))
    reader = _SplitReader(dataset.shards("val"))
    same_doc = spec.distractors == "document"
    # A document's tiles, for distractors from the same document.
    doc_first = np.searchsorted(doc_of, np.arange(doc_of.max() + 1 if len(doc_of) else 0))
    doc_tiles = np.bincount(doc_of) if len(doc_of) else np.zeros(0, np.int64)
    eligible = np.arange(len(starts))
    if same_doc:
        eligible = eligible[doc_tiles[doc_of] >= M] if len(starts) else eligible
    context, choices, answer, source = [], [], [], []
    for tile in rng.permutation(eligible):
        if len(answer) == spec.examples:
            break
        true = reader.read(int(starts[tile]) + C, K)
        picked, seen = [int(starts[tile]) + C], {true.tobytes()}
        pool = (int(doc_first[doc_of[tile]]), int(doc_tiles[doc_of[tile]])) if same_doc \
            else (0, len(starts))
        for other in rng.integers(pool[0], pool[0] + pool[1], size=_DRAWS if M > 1 else 0):
            if len(picked) == M:
                break
            cont = reader.read(int(starts[other]) + C, K)
            if other != tile and cont.tobytes() not in seen:  # the true answer only once
                seen.add(cont.tobytes())
                picked.append(int(starts[other]) + C)
        if len(picked) < M:
            continue  # too few distinct continuations to choose from: another example
        where = int(rng.integers(M))
        picked[0], picked[where] = picked[where], picked[0]
        context.append(reader.read(int(starts[tile]), C))
        choices.append(np.stack([reader.read(p, K) for p in picked]))
        answer.append(where)
        source.append(picked)
    if len(answer) < spec.examples:
        raise _too_few(dataset, spec, len(answer))
    return TaskSet(spec, np.stack(context), np.stack(choices), np.array(answer, np.int64),
                   np.array(source, np.int64))


def _too_few(dataset: TokenDataset, spec: TaskSpec, found: int) -> UserError:
    where = " with 4 tiles in one document" if spec.distractors == "document" else ""
    return UserError(
        f"task {spec.name} needs {spec.examples} examples of {spec.context} + {spec.length} "
        f"tokens{where} but the val split of {dataset.path} gives {found}; ask for fewer in "
        f"eval.tasks, shorten eval.{spec.name}_context or eval.{spec.name}_length, or prepare "
        "the data with a larger --val-fraction")


# ----------------------------------------------------------------------------- the files


def task_path(dataset: TokenDataset, spec: TaskSpec) -> Path:
    """DATA/tasks/NAME-HASH.npz: the hash covers the settings and the dataset's identity."""
    key = {"version": TASK_FILE_VERSION, "spec": dataclasses.asdict(spec),
           "source": dataset.meta.get("source", {}).get("sha256"),
           "tokenizer": dataset.meta.get("tokenizer"), "val_tokens": dataset.n_tokens["val"]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(dataset.path) / TASKS_DIR / f"{spec.name}-{digest}.npz"


def read_task_file(path: Path, spec: TaskSpec) -> TaskSet:
    """A task set written by `load_or_build`, its count and checksum checked."""
    fix = "delete it and the .json beside it, and the next run rebuilds them"
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in _ARRAYS}
        tasks = TaskSet(spec, **arrays)
        count, checksum = len(tasks.answer), tasks.checksum()
        lengths = {len(a) for a in arrays.values()}
        examples, recorded = meta.get("examples"), meta.get("sha256")  # a JSON object
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            zipfile.BadZipFile) as e:
        raise UserError(f"task file {path} is unreadable ({type(e).__name__}); {fix}") from None
    if examples != count or lengths != {count}:
        raise UserError(f"task file {path} holds {count} examples, its record says "
                        f"{examples}; {fix}")
    if recorded != checksum:
        raise UserError(f"task file {path} is damaged (its checksum does not match); {fix}")
    return tasks


def load_or_build(dataset: TokenDataset, spec: TaskSpec) -> TaskSet:
    """The task set from its file beside the data, or built and written there once (the .npz
    first, then the .json that marks it complete, each by an atomic rename). Where the data
    directory cannot be written the set is built in memory, the same every time."""
    path = task_path(dataset, spec)
    if path.with_suffix(".json").is_file():
        return read_task_file(path, spec)
    tasks = build(dataset, spec)
    record = {"task": spec.name, "examples": len(tasks.answer), "sha256": tasks.checksum(),
              "spec": dataclasses.asdict(spec), "version": TASK_FILE_VERSION}
    try:
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, lambda f: np.savez(f, **{n: getattr(tasks, n) for n in _ARRAYS}))
        _write_atomic(path.with_suffix(".json"),
                      lambda f: f.write(json.dumps(record, indent=2).encode()))
    except OSError as e:
        print(f"note: cannot keep task {spec.name} in {path.parent} ({e.strerror}); built it "
              "in memory", file=sys.stderr)
    return tasks


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- scoring


def pack_rows(task_sets: list[TaskSet]) -> tuple[np.ndarray, np.ndarray]:
    """Every choice of every example as one row: (tokens_RxW, spans_Rx2). Row r is the
    context then the choice, right-padded with 0 to W = the longest row; span (start, K)
    says that hidden positions start .. start+K-1 predict the choice's K tokens."""
    width = max(t.spec.context + t.spec.length for t in task_sets)
    rows, spans = [], []
    for t in task_sets:
        N, M, K = t.choices.shape
        C = t.spec.context
        tokens = np.zeros((N, M, width), np.int32)
        tokens[:, :, :C] = t.context[:, None, :]
        tokens[:, :, C:C + K] = t.choices
        rows.append(tokens.reshape(N * M, width))
        spans.append(np.tile(np.array([[C - 1, K]], np.int32), (N * M, 1)))
    return np.concatenate(rows), np.concatenate(spans)


def task_metrics(task_sets: list[TaskSet], logprob_R: np.ndarray,
                 correct_R: np.ndarray) -> dict[str, float]:
    """task/NAME/accuracy and task/NAME/loss (the mean per-token loss of the true
    continuation) from each row's summed log-likelihood and whether greedy got it all right,
    rows in pack_rows' order."""
    out, row = {}, 0
    for t in task_sets:
        N, M, K = t.choices.shape
        logprob_NxM = np.asarray(logprob_R[row:row + N * M], np.float64).reshape(N, M)
        correct_NxM = np.asarray(correct_R[row:row + N * M]).reshape(N, M)
        row += N * M
        true_logprob_N = logprob_NxM[np.arange(N), t.answer]
        if t.spec.name == "choice":
            hits = np.argmax(logprob_NxM, axis=1) == t.answer
        else:
            hits = correct_NxM[:, 0]
        out[f"task/{t.spec.name}/accuracy"] = float(np.mean(hits))
        out[f"task/{t.spec.name}/loss"] = float(-np.sum(true_logprob_N) / (N * K))
    return out


def final_task_metrics(task_sets: list[TaskSet], metrics: dict[str, float]) -> dict:
    """What summary.json keeps of the tasks: the last evaluation's task/NAME/accuracy and
    task/NAME/loss, with task/NAME/chance (a blind guess's accuracy) and task/NAME/examples."""
    out = dict(metrics)
    for t in task_sets:
        out[f"task/{t.spec.name}/chance"] = t.spec.chance
        out[f"task/{t.spec.name}/examples"] = len(t.answer)
    return out
