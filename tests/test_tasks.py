"""The downstream tasks: built from the validation split only, deterministic in their seed, the
true continuation among the 4 choices exactly once, their files checked when read, and their
scores equal to a plain model call's in float64, on one device and on eight."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import TINY
from lab.accel import sharding
from lab.config import load_config
from lab.data import open_dataset, prepare
from lab.data.tasks import (
    TaskSet,
    TaskSpec,
    build,
    final_task_metrics,
    load_or_build,
    pack_rows,
    read_task_file,
    task_metrics,
    task_path,
    task_specs,
)
from lab.errors import UserError
from lab.run.metrics import tb_tag

N_DOCS = 26  # document i is written with two letters of its own, so a token names its document


def _letters(i: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[i] + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i]


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> str:
    """26 documents, each of lines of its own two letters drawn from 3 line patterns, so that
    continuations often repeat (the builder must pass over equal distractors)."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("letters-corpus")
    for i in range(N_DOCS):
        a, b = _letters(i)
        lines = ["".join(rng.choice([a, b], size=n)) for n in (4, 6, 9)]
        (src / f"{i:02d}.txt").write_text("\n".join(rng.choice(lines, size=300)) + "\n")
    out = tmp_path_factory.mktemp("letters-data") / "prepared"
    prepare(str(src), str(out), tokenizer="byte", val_fraction=0.3)
    return str(out)


def _spec(name="choice", n=40, seed=0, distractors="random") -> TaskSpec:
    return TaskSpec(name, n, 8, 8, seed, distractors if name == "choice" else "")


def test_a_task_set_is_a_function_of_the_split_its_settings_and_the_seed(letters):
    dataset = open_dataset(letters)
    for name in ("choice", "exact"):
        first = build(dataset, _spec(name))
        assert build(dataset, _spec(name)).checksum() == first.checksum()
        other = build(dataset, _spec(name, seed=1))
        assert other.checksum() != first.checksum()
        assert not np.array_equal(other.source, first.source)  # other examples, not just a label
    assert not np.array_equal(build(dataset, _spec(distractors="document")).source,
                              build(dataset, _spec()).source)


@pytest.mark.parametrize("distractors", ["random", "document"])
def test_examples_come_from_the_validation_split_with_the_truth_once(letters, distractors):
    dataset = open_dataset(letters)
    docs = dataset.documents("val")
    val_letters = {c for i in docs[:, 0] for c in _letters(int(i))}
    train_letters = {c for i in dataset.documents("train")[:, 0] for c in _letters(int(i))}
    assert val_letters and train_letters and not val_letters & train_letters
    val = np.concatenate([np.asarray(s) for s in dataset.shards("val")]).astype(np.int32)
    for spec in (_spec("choice", distractors=distractors), _spec("exact")):
        t = build(dataset, spec)
        N, M, K = t.choices.shape
        assert (N, M, K) == (40, spec.choices, 8) and t.context.shape == (40, 8)
        used = {chr(c) for c in np.unique(np.concatenate([t.context.ravel(), t.choices.ravel()]))}
        assert used <= val_letters | {"\n"}, used - val_letters  # nothing from training
        for i in range(N):
            at = t.source[i, t.answer[i]]
            true = val[at:at + K]
            np.testing.assert_array_equal(t.context[i], val[at - 8:at])
            assert sum(np.array_equal(c, true) for c in t.choices[i]) == 1
            assert len({c.tobytes() for c in t.choices[i]}) == M  # all different
            doc = np.searchsorted(docs[:, 1], at, side="right") - 1
            assert at - 8 >= docs[doc, 1] and at + K < docs[doc, 1] + docs[doc, 2]  # one document
            for m in range(M):
                np.testing.assert_array_equal(t.choices[i, m], val[t.source[i, m]:][:K])
                same = np.searchsorted(docs[:, 1], t.source[i, m], side="right") - 1 == doc
                assert same or distractors == "random"
        if M > 1:  # the true answer's place is drawn, not fixed
            assert len(set(t.answer.tolist())) == M


def test_too_few_examples_in_the_split_is_the_users_to_fix(letters):
    with pytest.raises(UserError, match="eval.tasks, shorten eval.choice_context"):
        build(open_dataset(letters), _spec(n=10**5))


def test_task_files_are_written_once_and_checked_when_read(tmp_path, letters):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(letters, data)
    dataset, spec = open_dataset(str(data)), _spec()
    built = load_or_build(dataset, spec)
    path = task_path(dataset, spec)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["examples"] == 40 and record["sha256"] == built.checksum()
    assert read_task_file(path, spec).checksum() == built.checksum()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.with_suffix(".json").name,
                                                              path.name]  # no temporary left
    # One token changed: the file still reads, its checksum does not match.
    choices = built.choices.copy()
    choices[3, 1, 2] += 1
    np.savez(path, **{**{k: getattr(built, k) for k in ("context", "answer", "source")},
                      "choices": choices})
    with pytest.raises(UserError, match="is damaged"):
        load_or_build(dataset, spec)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="is unreadable"):
        load_or_build(dataset, spec)
    np.savez(path, **{k: getattr(built, k) for k in ("context", "choices", "answer", "source")})
    path.with_suffix(".json").write_text(json.dumps({**record, "examples": 41}))
    with pytest.raises(UserError, match="holds 40 examples, its record says 41"):
        load_or_build(dataset, spec)
    # A record that is JSON but not an object, an array that is not a list of rows.
    path.with_suffix(".json").write_text("[]")
    with pytest.raises(UserError, match="is unreadable"):
        load_or_build(dataset, spec)
    path.with_suffix(".json").write_text(json.dumps(record))
    np.savez(path, **{k: getattr(built, k) for k in ("choices", "answer", "source")},
             context=np.int32(0))
    with pytest.raises(UserError, match="is unreadable"):
        load_or_build(dataset, spec)


def test_config_names_the_tasks_and_their_settings():
    cfg = load_config(TINY, ["eval.tasks=[choice,exact:7]", "eval.choice_distractors=document",
                             "eval.exact_length=2", "eval.seed=3"])
    choice, exact = task_specs(cfg.eval)
    assert choice == TaskSpec("choice", 64, 32, 16, 3, "document")
    assert exact == TaskSpec("exact", 7, 32, 2, 3, "")
    assert task_specs(load_config(TINY).eval) == []  # none unless asked for
    assert tb_tag("task/choice/accuracy") == "task/choice/accuracy"


# ----------------------------------------------------------------------------- scoring

C, V = 6, 64


def _model(*overrides: str):
    """A one-layer model's structure, its parameters (on the host) and a jitted plain call."""
    from lab.model.transformer import Transformer

    cfg = load_config(TINY, ["model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                             f"model.vocab_size={V}", "train.seq_len=16", "train.batch_size=8",
                             *overrides])
    graphdef, state = nnx.split(Transformer(cfg.model, nnx.Rngs(0)))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    plain = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))
    return graphdef, state, params, lambda tokens: np.asarray(plain(params, tokens), np.float64)


@pytest.fixture(scope="module")
def model():
    return _model()


def _task_sets(plain) -> list[TaskSet]:
    """A choice task of random tokens, and an exact task whose even examples continue with the
    model's own greedy decoding (one token at a time, from full plain calls: the model is
    causal, so the zeros after the decoded tokens change nothing) and whose odd ones have the
    last greedy token changed."""
    rng = np.random.default_rng(1)
    choice = TaskSet(TaskSpec("choice", 12, C, 5, 0, "random"),
                     rng.integers(0, V, (12, C)).astype(np.int32),
                     rng.integers(0, V, (12, 4, 5)).astype(np.int32),
                     rng.integers(0, 4, 12), np.zeros((12, 4), np.int64))
    seq = np.zeros((10, C + 3), np.int32)
    seq[:, :C] = rng.integers(0, V, (10, C))
    for j in range(3):
        seq[:, C + j] = plain(seq)[:, C + j - 1].argmax(-1)
    greedy = seq[:, C:].copy()
    greedy[1::2, -1] = (greedy[1::2, -1] + 1) % V
    exact = TaskSet(TaskSpec("exact", 10, C, 3, 0), seq[:, :C], greedy[:, None, :],
                    np.zeros(10, np.int64), np.zeros((10, 1), np.int64))
    return [choice, exact]


def _reference(plain, task_sets) -> dict:
    """The metrics from full float64 log-softmaxes of the plain model call, row by row."""
    tokens_RxW, spans_Rx2 = pack_rows(task_sets)
    logits = plain(tokens_RxW[:, :-1])
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    logprob, correct = [], []
    for r, (start, k) in enumerate(spans_Rx2):
        pos = np.arange(start, start + k)
        targets = tokens_RxW[r, pos + 1]
        logprob.append(logp[r, pos, targets].sum())
        correct.append(bool(np.all(logits[r, pos].argmax(-1) == targets)))
    return task_metrics(task_sets, np.array(logprob), np.array(correct))


def test_sharded_scores_equal_a_plain_model_call(model):
    """The scorer on a 4 x 2 (fsdp x tensor) mesh of 8 devices, parameters sharded, in chunks
    of 8 rows, against the plain call's float64 log-likelihoods and argmaxes."""
    from lab.model.roles import specs_of
    from lab.train.tasks import TaskEval

    graphdef, state, params, plain = model
    task_sets = _task_sets(plain)
    want = _reference(plain, task_sets)
    assert want["task/exact/accuracy"] == 0.5  # greedy decoding, scored in one pass
    assert 0 < want["task/choice/accuracy"] < 1
    mesh = sharding.make_mesh(load_config(None, ["mesh.fsdp=4", "mesh.tensor=2"]).mesh)
    shardings = sharding.param_shardings(params, specs_of(state), mesh)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    got = TaskEval(task_sets, graphdef, shardings, mesh, batch_size=8, batch_tokens=12)(
        jax.device_put(params, shardings))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    summary = final_task_metrics(task_sets, got)
    assert summary["task/choice/chance"] == 0.25 and summary["task/exact/examples"] == 10


def test_a_choice_is_picked_by_its_summed_log_likelihood():
    """task_metrics against hand-made row scores: argmax over the 4 choices, and the loss of
    the true continuation per token."""
    spec = TaskSpec("choice", 2, 3, 4, 0, "random")
    t = TaskSet(spec, np.zeros((2, 3), np.int32), np.zeros((2, 4, 4), np.int32),
                np.array([2, 3]), np.zeros((2, 4), np.int64))
    logprob = np.array([-9.0, -8.0, -4.0, -7.0, -6.0, -2.0, -3.0, -5.0])
    out = task_metrics([t], logprob, np.zeros(8, bool))
    assert out["task/choice/accuracy"] == 0.5  # example 0 picks 2 (right), example 1 picks 1
    assert out["task/choice/loss"] == pytest.approx((4.0 + 5.0) / (2 * 4))
    assert dataclasses.asdict(spec)["distractors"] == "random"


def test_each_task_is_scored_at_its_own_width():
    """A mixture of experts with a capacity is not causal: the later tokens of a sequence
    compete with its earlier ones for the experts, so zeros padded after a short task's rows
    (to a longer task's width) would change its scores. Each task is scored at its own width:
    as a plain call of its own rows, in float64."""
    from lab.model.roles import specs_of
    from lab.train.tasks import TaskEval

    graphdef, state, params, plain = _model("model.moe.experts=4", "model.moe.top_k=2",
                                            "model.moe.capacity_factor=1.0")
    rng = np.random.default_rng(2)
    wide = TaskSet(TaskSpec("choice", 6, C, 9, 0, "random"),
                   rng.integers(0, V, (6, C)).astype(np.int32),
                   rng.integers(0, V, (6, 4, 9)).astype(np.int32),
                   rng.integers(0, 4, 6), np.zeros((6, 4), np.int64))
    narrow = TaskSet(TaskSpec("exact", 8, C, 2, 0), rng.integers(0, V, (8, C)).astype(np.int32),
                     rng.integers(0, V, (8, 1, 2)).astype(np.int32), np.zeros(8, np.int64),
                     np.zeros((8, 1), np.int64))
    # Padded to the wide task's width, the narrow task's rows score differently: the case.
    padded = _reference(plain, [wide, narrow])["task/exact/loss"]
    want = _reference(plain, [wide]) | _reference(plain, [narrow])
    assert abs(padded - want["task/exact/loss"]) > 1e-3
    mesh = sharding.make_mesh(load_config(None, ["mesh.fsdp=4", "mesh.tensor=2"]).mesh)
    shardings = sharding.param_shardings(params, specs_of(state), mesh)
    got = TaskEval([wide, narrow], graphdef, shardings, mesh, batch_size=8, batch_tokens=12)(
        jax.device_put(params, shardings))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
