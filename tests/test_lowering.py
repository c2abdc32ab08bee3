"""`lab train CONFIG --lower cuda|tpu`: the train step lowered without a device. The bfloat16
presets run every matmul on bfloat16 operands (apart from the named deliberate ones);
save_attention runs cuDNN's attention forward once and dots twice; the FLOPs agree with the
lab's own count; model.remat=auto takes the least recomputation that fits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab.accel import chips
from lab.config import load_config
from lab.model import memory
from lab.model.accounting import flops_per_token
from lab.model.remat import AUTO_ORDER
from lab.train import build_trainer
from lab.train.aot import abstract_mesh, with_known_vocab
from lab.train.lowering import DELIBERATE_F32, lower_step, stablehlo_collectives

ROOT = Path(__file__).resolve().parents[1]
GPU_DEBUG = ROOT / "configs" / "gpu" / "debug.yaml"
# A few-layer model of the debug preset's shape: lowering takes seconds whatever the size.
SMALL = ["model.vocab_size=320", "model.n_layers=2", "train.batch_size=8", "train.seq_len=256"]


def bf16_presets() -> list[Path]:
    """Every preset whose matmuls are bfloat16, found by reading them (new presets join)."""
    found = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        if model.get("compute_dtype") == "bfloat16":
            found.append(path)
    return found


def lab(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_lower_cuda_prints_and_writes_the_facts(tmp_path):
    out = tmp_path / "lowered.json"
    result = lab(["train", str(GPU_DEBUG), *SMALL, "model.remat=save_attention", "--lower",
                  "cuda", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    facts = json.loads(out.read_text())
    assert facts["platform"] == "cuda" and facts["attention"] == "cudnn"
    # Every matmul, forward and backward, on bfloat16 operands: 7 a layer forward (q, k, v, out,
    # gate, up, down), two each backward (dX, dW), scanned once; the head 1 + 2.
    assert facts["dots"] == {"bf16xbf16": 7 * 3 + 3}, facts["dots"]
    cfg = load_config(GPU_DEBUG, SMALL)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    matmul_flops = sum(facts["dot_flops"].values())
    # The lab's count (6 a matmul weight a token) less causal attention's 6 L s d a token, which
    # runs in the cuDNN kernel here.
    attention = 6 * cfg.model.n_layers * cfg.train.seq_len * cfg.model.d_model * tokens
    expected = flops_per_token(cfg.model, cfg.train.seq_len) * tokens - attention
    assert abs(matmul_flops / expected - 1) < 1e-6, (matmul_flops, expected)
    assert facts["custom_calls"] == {"__cudnn$fmhaSoftmax": 1, "__cudnn$fmhaSoftmaxBackward": 1}
    assert facts["bytes"]["params_per_chip"] > 0 and facts["bytes"]["optimizer_per_chip"] > 0
    assert set(facts["bytes"]["saved_activations_by_dtype"]) >= {"bf16", "f32"}
    for word in ("bf16xbf16", "float32 x float32 dots: none", "__cudnn$fmhaSoftmax x1",
                 "saved activations"):
        assert word in result.stdout, result.stdout


def test_the_float32_backward_is_what_it_was_and_dots_recomputes_attention():
    # model.backward_dtype=float32 keeps XLA's own backward pass: every dX and dW is float32 x
    # float32 on a GPU, and the lowering names where they come from. remat=dots runs cuDNN's
    # attention forward twice (once more for the backward pass); save_attention (above) once.
    step = lower_step(load_config(GPU_DEBUG, [*SMALL, "model.backward_dtype=float32",
                                              "model.remat=dots"]), "cuda")
    assert step.dots["bf16xbf16"].count == 8 and step.dots["f32xf32"].count == 16
    assert [(e.where, e.count, e.reason) for e in step.f32_dots] == [
        ("lab/model/kernels/__init__.py:Kernels.dense", 16, "")]
    assert step.custom_calls == {"__cudnn$fmhaSoftmax": 2, "__cudnn$fmhaSoftmaxBackward": 1}


@pytest.mark.slow
def test_muon_float32_newton_schulz_is_named_as_deliberate():
    step = lower_step(load_config(GPU_DEBUG, [*SMALL, "optim.name=muon",
                                              "optim.muon_ns_dtype=float32"]), "cuda")
    assert step.f32_dots and all(e.reason == DELIBERATE_F32["lab/optim/muon.py"]
                                 for e in step.f32_dots), step.f32_dots
    assert all(e.where.startswith("lab/optim/muon.py") for e in step.f32_dots)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bf16_presets_have_no_float32_matmul(platform):
    presets = bf16_presets()
    assert len(presets) >= 2 and any("gpu" in p.parts for p in presets), presets
    for path in presets:
        cfg, _ = with_known_vocab(load_config(path, []))
        if {"cuda": "splash", "tpu": "cudnn"}[platform] == cfg.model.attention:
            continue  # a preset for the other platform: its attention kernel is that platform's
        step = lower_step(cfg, platform)
        assert step.dots.get("bf16xbf16") and step.dots["bf16xbf16"].count >= 7, (path, step.dots)
        assert set(step.dots) <= {"bf16xbf16", "f32xf32"}, (path, step.dots)
        # The only float32 matmuls are deliberate (DELIBERATE_F32): on TPU, splash attention's
        # row sums of dO * O outside its kernels, a reduction of no weight.
        assert all(e.reason for e in step.f32_dots), (path, step.f32_dots)
        assert sum(e.flops for e in step.f32_dots) < 1e-3 * step.dots["bf16xbf16"].flops


def test_collectives_are_read_from_stablehlo():
    text = ('%1 = "stablehlo.all_gather"(%0) ...\n%2 = "stablehlo.all_reduce"(%1) ...\n'
            '%3 = "stablehlo.all_reduce"(%2) ...\n%4 = stablehlo.add %3, %3')
    assert stablehlo_collectives(text) == {"all_gather": 1, "all_reduce": 2}


def test_remat_auto_takes_the_least_recomputation_that_fits():
    # The ~1B model on one H100: at 8 sequences everything fits; at 32 it must recompute.
    big = ["model.d_model=2048", "model.n_layers=16", "model.n_heads=16",
           "model.vocab_size=32768", "train.seq_len=2048", "model.compute_dtype=bfloat16",
           "model.activation_dtype=bfloat16", "model.loss_chunk=1024", "model.remat=auto"]
    h100 = chips.chip_named("H100 SXM")
    room = memory.AUTO_REMAT_FRACTION * h100.memory_bytes
    chosen = {}
    for batch in (8, 32, 64):
        cfg = load_config(GPU_DEBUG, [*big, f"train.batch_size={batch}"])
        trainer = build_trainer(cfg, abstract_mesh(cfg, 1, "gpu", h100.kinds[0]))
        policy = trainer.cfg.model.remat
        chosen[batch] = policy
        assert policy in AUTO_ORDER and f"model.remat=auto: {policy}" in trainer.remat_note
        needed = {p: memory.estimate(trainer, p).total for p in AUTO_ORDER}
        index = AUTO_ORDER.index(policy)
        assert all(needed[p] > room for p in AUTO_ORDER[:index]), (batch, needed)
        assert needed[policy] <= room or policy == "full", (batch, needed)
    assert chosen[8] == "none" and chosen[64] != "none", chosen
