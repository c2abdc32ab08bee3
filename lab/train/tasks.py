"""The downstream tasks (lab/data/tasks.py) scored during training: a jitted, sharded scorer of
packed rows, and the hook that runs it at every evaluation.

The rows of each task are packed once (lab.data.tasks.pack_rows) and put on the devices in chunks
of a multiple of train.batch_size rows, each chunk no more tokens than a training batch; an
evaluation dispatches every chunk, then fetches the per-row results together. Each task keeps
its own width: a mixture of experts with a capacity is not causal (a sequence's later tokens
compete with its earlier ones for the experts), so zeros padded after a shorter task's rows
would change its scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lab.accel import sharding
from lab.data.tasks import TaskSet, pack_rows, task_metrics
from lab.train.hooks import Hook, LoopResult, StepInfo
from lab.train.step import Trainer


def make_scorer(graphdef: Any, param_shardings: Any, mesh: jax.sharding.Mesh,
                span: int) -> Callable:
    """jit(params, tokens_BxW, spans_Bx2) -> (logprob_B, correct_B): each row's summed
    log-likelihood of its K = spans[:, 1] tokens after position spans[:, 0], and whether each
    of them is the argmax given the tokens before it. `span` is the largest K; only those
    positions go through the output head."""

    def score(params: dict, tokens_BxW: jax.Array, spans_Bx2: jax.Array):
        model = nnx.merge(graphdef, params)
        inputs_BxL, targets_BxL = tokens_BxW[:, :-1], tokens_BxW[:, 1:]
        hidden_BxLxD = model.hidden(inputs_BxL)
        offsets_S = jnp.arange(span)
        valid_BxS = offsets_S[None, :] < spans_Bx2[:, 1:2]
        pos_BxS = jnp.minimum(spans_Bx2[:, :1] + offsets_S[None, :], inputs_BxL.shape[1] - 1)
        hidden_BxSxD = jnp.take_along_axis(hidden_BxLxD, pos_BxS[..., None], axis=1)
        logits_BxSxV = model.logits(hidden_BxSxD)
        targets_BxS = jnp.take_along_axis(targets_BxL, pos_BxS, axis=1)
        logp_BxSxV = jax.nn.log_softmax(logits_BxSxV, axis=-1)
        target_BxS = jnp.take_along_axis(logp_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
        logprob_B = jnp.sum(jnp.where(valid_BxS, target_BxS, 0.0), axis=1)
        hit_BxS = jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS
        return logprob_B, jnp.all(hit_BxS | ~valid_BxS, axis=1)

    repl, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    with sharding.mesh_context(mesh):
        return jax.jit(score, in_shardings=(param_shardings, rows, rows),
                       out_shardings=(repl, repl))


class TaskEval:
    """The tasks' rows on the devices and their scorer: called with the parameters, the
    metrics task/NAME/accuracy and task/NAME/loss.

    A chunk holds about as many tokens as a batch of `batch_size` rows of `batch_tokens`, in
    whole batches (which divide over the mesh's data-parallel devices)."""

    def __init__(self, task_sets: list[TaskSet], graphdef: Any, param_shardings: Any,
                 mesh: jax.sharding.Mesh, batch_size: int, batch_tokens: int):
        self.task_sets = task_sets
        rows = sharding.batch_sharding(mesh)
        # Per task: its chunks, and how many of their rows are its own (the rest pad a chunk).
        self.chunks, self.n_rows = [], []
        for t in task_sets:
            tokens_RxW, spans_Rx2 = pack_rows([t])
            per_chunk = batch_size * max(1, batch_tokens // tokens_RxW.shape[1])
            self.n_rows.append(len(tokens_RxW))
            pad = -len(tokens_RxW) % per_chunk
            tokens_RxW = np.pad(tokens_RxW, ((0, pad), (0, 0)))
            spans_Rx2 = np.pad(spans_Rx2, ((0, pad), (0, 0)))  # a padding row scores 0 tokens
            # Every process holds every row (the task sets are the same everywhere).
            self.chunks.append([
                tuple(jax.make_array_from_callback(a[i:i + per_chunk].shape, rows,
                                                   lambda index, a=a[i:i + per_chunk]: a[index])
                      for a in (tokens_RxW, spans_Rx2))
                for i in range(0, len(tokens_RxW), per_chunk)])
        span = max(t.choices.shape[2] for t in task_sets)
        self.score = make_scorer(graphdef, param_shardings, mesh, span)
        self.mesh = mesh

    def __call__(self, params: dict) -> dict[str, float]:
        with jax.set_mesh(self.mesh):
            scored = [[self.score(params, tokens, spans) for tokens, spans in chunks]
                      for chunks in self.chunks]
        per_task = [[np.concatenate(x)[:n] for x in zip(*chunks, strict=True)]
                    for chunks, n in zip(jax.device_get(scored), self.n_rows, strict=True)]
        logprob, correct = (np.concatenate(x) for x in zip(*per_task, strict=True))
        return task_metrics(self.task_sets, logprob, correct)


def task_eval(trainer: Trainer, task_sets: list[TaskSet]) -> TaskEval:
    """The tasks scored with a trainer's model on its mesh, in chunks of training batches."""
    tcfg = trainer.cfg.train
    return TaskEval(task_sets, trainer.graphdef, trainer.state_shardings["params"],
                    trainer.mesh, tcfg.batch_size, tcfg.seq_len + 1)


class TaskHook(Hook):
    """The tasks' metrics at every evaluation, added to the step's record (so it is added after
    the evaluation and before logging)."""

    needs_state = True

    def __init__(self, tasks: TaskEval):
        self.tasks = tasks
        self.metrics: dict[str, float] = {}
        self.seconds = 0.0

    def measure(self, params: dict) -> dict[str, float]:
        self.metrics = self.tasks(params)
        return self.metrics

    def __call__(self, info: StepInfo) -> None:
        info.values.update(self.measure(info.state["params"]))
        self.seconds += info.watch.other()

    def report(self, result: LoopResult) -> None:
        result.task_metrics = self.metrics
        result.eval_seconds += self.seconds  # the tasks are part of the evaluation
        result.task_seconds += self.seconds
