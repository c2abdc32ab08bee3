"""Model shapes for a parameter count: the rule that turns a target number of non-embedding
parameters into d_model, n_layers and n_heads (a sweep's numeric `sizes:`, and `lab plan`).

Widths d_model run over multiples of `multiple`; the head size is `head_dim`, or
d_model / min_heads for models too narrow to have min_heads heads of that size; n_heads (and
the MLP width) must divide by the mesh's tensor axis. For each width the depth that brings N
nearest the target is tried (rounded down and up). Among the shapes within `tolerance` of the
target, the one whose aspect ratio d_model / n_layers is nearest to `aspect_ratio` (in log)
wins. N is counted exactly (lab.model.accounting.param_counts) with the other fields of the base
model (vocabulary, tied head, grouped-query ratio, d_ff ratio) kept.
"""

from __future__ import annotations

import dataclasses
import math

from lab.config import ModelConfig
from lab.errors import UserError
from lab.model.accounting import param_counts, with_vocab
from lab.run.rundir import param_count

BYTE_VOCAB = 257  # the byte tokenizer: 256 bytes and an end-of-document token
WIDEST = 1 << 17  # the search stops here whatever the target


def counting_model(model: ModelConfig) -> ModelConfig:
    """The model as counted before the data is known: the byte tokenizer's padded vocabulary
    when model.vocab_size is 0 (lab.model.accounting.padded_vocab(257) = 320)."""
    return with_vocab(model, BYTE_VOCAB)


def shape_name(shape: dict) -> str:
    return f"d{shape['d_model']}-l{shape['n_layers']}"


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """Which (d_model, n_layers) are shapes at all, given the base model's ratios."""

    base: ModelConfig  # counted as counting_model gives it
    head_dim: int = 64
    min_heads: int = 4
    multiple: int = 64
    tensor: int = 1
    params: str = "non_embedding"  # which count N is (lab.run.rundir.PARAM_KEYS)

    def shape(self, d: int, layers: int) -> dict | None:
        """The model overrides of width d and this depth, or None if the rule forbids it."""
        hd = min(self.head_dim, d // self.min_heads)
        if hd < 2 or hd % 2 or d % hd:
            return None
        heads = d // hd
        out = {"d_model": d, "n_layers": layers, "n_heads": heads}
        base = self.base
        if base.n_kv_heads:  # keep the grouped-query ratio
            group = base.n_heads // base.kv_heads
            if heads % group:
                return None
            out["n_kv_heads"] = heads // group
        if base.d_ff:  # keep the MLP's ratio to the width
            ff = round(base.d_ff / base.d_model * d / self.multiple) * self.multiple
            out["d_ff"] = max(self.multiple, ff)
        if heads % self.tensor or out.get("d_ff", 3 * d) % self.tensor:
            return None
        return out

    def count(self, shape: dict) -> int:
        return param_count(param_counts(dataclasses.replace(self.base, **shape)), self.params)

    def candidates(self, target: float, tolerance: float) -> list[tuple[dict, int]]:
        """(shape, N) at each allowed width, at the depths nearest the target; widths grow
        until a single layer overshoots the target by more than the tolerance."""
        found = []
        for d in range(self.multiple, WIDEST + 1, self.multiple):
            one = self.shape(d, 1)
            if one is None:
                continue
            n1, n2 = self.count(one), self.count({**one, "n_layers": 2})
            per_layer, fixed = n2 - n1, n1 - (n2 - n1)
            depth = (target - fixed) / per_layer
            for layers in {max(1, math.floor(depth)), max(1, math.ceil(depth))}:
                shape = {**one, "n_layers": layers}
                found.append((shape, self.count(shape)))
            if n1 > target * (1 + tolerance):
                break
        return found


def shape_for_params(target: float, base: ModelConfig | None = None, *,
                     aspect_ratio: float = 64.0, head_dim: int = 64, min_heads: int = 4,
                     multiple: int = 64, tensor: int = 1, tolerance: float = 0.2,
                     params: str = "non_embedding") -> dict:
    """Model overrides giving about `target` parameters (the module's rule), counted as
    `params` names them (non-embedding by default; lab.run.rundir.PARAM_KEYS)."""
    if target <= 0:
        raise UserError(f"target parameter count must be positive, got {target}")
    rule = ShapeRule(counting_model(base or ModelConfig()), head_dim, min_heads, multiple,
                     tensor, params)
    candidates = rule.candidates(target, tolerance)

    def off(n: int) -> float:
        return abs(math.log(n / target))

    near = [(s, n) for s, n in candidates if abs(n / target - 1) <= tolerance]
    if not near:
        closest = min(candidates, key=lambda c: off(c[1]), default=None)
        hint = f"; the closest is {shape_name(closest[0])} with N={closest[1]:,}" if closest \
            else ""
        raise UserError(f"no model shape has N within {tolerance:.0%} of {target:,.0f}{hint}; "
                        "change the target, lower shape.multiple, or give the shape explicitly")
    best, _ = min(near, key=lambda c: (abs(math.log(c[0]["d_model"] / c[0]["n_layers"]
                                                    / aspect_ratio)), off(c[1])))
    return best
