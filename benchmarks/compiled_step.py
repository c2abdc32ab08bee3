"""The benchmark model's CPU train step as XLA compiles it, with the source locations taken out:
two trees that compile the same program run at the same speed, which a busy machine's timings
(benchmarks.against_commit) cannot show within a few percent. Writes the text to OUT; compare
two trees' files with `diff`.

    .venv/bin/python -m benchmarks.compiled_step OUT
    PYTHONPATH=OTHER_TREE .venv/bin/python -m benchmarks.compiled_step OUT2
"""

from __future__ import annotations

import re
import sys

import jax
import numpy as np

from lab.accel import sharding
from lab.config import load_config
from lab.run.checkpoint import abstract_with_shardings
from lab.train import build_trainer

# docs/performance.md's benchmark model, as benchmarks.against_commit builds it.
MODEL = ["model.vocab_size=256", "model.d_model=512", "model.n_layers=8", "model.n_heads=8",
         "model.d_ff=1536", "train.seq_len=512", "train.batch_size=8", "mesh.fsdp=1",
         "model.compute_dtype=float32", "train.steps=1000"]
# Lines and attributes that name source files and lines, not computation.
_SOURCE = re.compile(r"^(\d+ |FileNames|FunctionNames|FileLocations|StackFrames|HloModule)")
_ATTRIBUTES = re.compile(r"(, )?(metadata=\{[^}]*\}|stack_frame_id=\d+)")


def compiled_text() -> str:
    cfg = load_config(None, MODEL)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    batch = sharding.global_batch(np.zeros((8, 513), np.int32), trainer.mesh)
    with jax.set_mesh(trainer.mesh):
        state = abstract_with_shardings(jax.eval_shape(trainer.init_fn),
                                        trainer.state_shardings)
        text = trainer.train_step.lower(state, batch).compile().as_text()
    lines = [_ATTRIBUTES.sub("", line) for line in text.splitlines()
             if not _SOURCE.match(line)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = compiled_text()
    with open(sys.argv[1], "w") as f:
        f.write(text)
    print(f"{len(text.splitlines())} lines of compiled HLO written to {sys.argv[1]}")
