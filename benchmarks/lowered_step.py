"""What the ~1B GPU step and the v5e ladder's step run, read from the lowered programs on a CPU
host (`lab train --lower`): matmuls by operand dtypes with their FLOPs, the attention kernels'
custom calls and the bytes the backward pass keeps, with the backward of XLA's own transpose
(model.backward_dtype=float32, the lab before) and with compute-dtype operands (the default).
No timing: what a device would make of it is unmeasured here.

    .venv/bin/python -m benchmarks.lowered_step [--out benchmarks/results/lowered-step.txt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, write_report
from benchmarks.device_check import BIG

LADDER = Path(__file__).resolve().parents[1] / "configs" / "tpu" / "v5e-ladder.yaml"
# (name, config file, overrides, platform)
CASES = [
    ("1B cuda, float32 backward, remat dots (before)", None,
     [*BIG, "model.attention=cudnn", "model.backward_dtype=float32"], "cuda"),
    ("1B cuda, bf16 backward, remat dots", None, [*BIG, "model.attention=cudnn"], "cuda"),
    ("1B cuda, bf16 backward, remat save_attention", None,
     [*BIG, "model.attention=cudnn", "model.remat=save_attention"], "cuda"),
    ("v5e ladder base, float32 backward (before)", LADDER,
     ["model.vocab_size=50304", "model.backward_dtype=float32"], "tpu"),
    ("v5e ladder base, bf16 backward", LADDER, ["model.vocab_size=50304"], "tpu"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "lowered-step.txt")
    args = parser.parse_args()

    from lab.backend import choose_platforms
    from lab.config import load_config
    from lab.train.lowering import lower_step, summary_lines

    choose_platforms()  # no TPU backend (nor libtpu's warnings) on a host without TPU chips

    lines, facts = [], {}
    for name, path, overrides, platform in CASES:
        cfg = load_config(path, overrides if path else [*overrides, "train.steps=1000"])
        step = lower_step(cfg, platform)
        facts[name] = {"overrides": overrides, **step.to_json()}
        lines += [f"== {name}", f"   {' '.join(overrides)}", *summary_lines(step), ""]
    args.out.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    return write_report("\n".join(lines), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
