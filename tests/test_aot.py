"""Compiling for TPU pods from this CPU host, the per-chip memory estimate against the TPU
compiler's own figures, jax.export for TPU and CUDA, and a quiet console without TPU chips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.accel import chips
from lab.config import load_config
from lab.model import memory
from lab.studies.sweep import expand_sweep
from lab.train import build_trainer
from lab.train.aot import CompiledMemory, abstract_mesh, compile_report, export_train_step

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "configs" / "tpu" / "v5e-ladder.yaml"
GPU_DEBUG = ROOT / "configs" / "gpu" / "debug.yaml"
LIBTPU_NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu")


def rung(index: int) -> list[str]:
    """The model overrides of a rung of configs/sweeps/ladder-v5e.yaml."""
    run = expand_sweep(ROOT / "configs" / "sweeps" / "ladder-v5e.yaml").runs[index]
    return [w for w in run.overrides if w.startswith("model.")]


# The smallest rung on 4 chips, 8 sequences per chip as on the preset's 32 (256 in all); the
# loss chunk keeps 256 positions of every row, as the preset's 65,536 tokens do on 32 chips.
SMALL_ON_2X2 = [*rung(0), "train.batch_size=32", "model.loss_chunk=8192"]


def lab(args: list[str], env: dict | None = None, timeout: int = 900):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cpu_train_without_jax_platforms_prints_no_libtpu_warnings(small_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = lab(["train", "configs/tiny.yaml", "train.steps=2", "schedule.warmup_steps=0",
                  "schedule.decay_steps=0", "train.eval_batches=1", f"data.path={small_data}",
                  f"run.dir={tmp_path / 'run'}"], env=env)
    assert result.returncode == 0, result.stderr
    assert "memory: " in result.stdout and "per chip" in result.stdout
    for noise in LIBTPU_NOISE:
        assert noise not in result.stdout + result.stderr


def test_the_library_without_jax_platforms_prints_no_libtpu_warnings(tmp_path):
    """`lab` and `analysis` imported as a library, not run as the `lab` command, start no TPU
    backend on a host without TPU chips, so libtpu prints nothing (TF_CPP_MIN_LOG_LEVEL=0 lets
    its warnings through where they would come)."""
    import importlib.util

    from lab.backend import tpu_chips_present

    if importlib.util.find_spec("libtpu") is None or tpu_chips_present():
        pytest.skip("needs libtpu installed on a host without TPU chips")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import analysis, lab.config, jax; print(jax.devices()[0].platform)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={**env, "TF_CPP_MIN_LOG_LEVEL": "0", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.split() == ["cpu"], result.stderr
    for noise in LIBTPU_NOISE:
        assert noise not in result.stderr, result.stderr


def _printed_gib(stdout: str, label: str) -> float:
    """A figure of --compile-only's report ("  total   1.23 GiB ..."), in GiB."""
    line = next(x for x in stdout.splitlines() if x.strip().startswith(label))
    value, unit = line.split()[1:3]
    return float(value) / (1024 if unit == "MiB" else 1)


def check_compiled_for_2x2(result: subprocess.CompletedProcess) -> None:
    """`lab train --compile-only --topology v5e:2x2` compiled, fits the chip's HBM, and libtpu
    printed nothing."""
    assert result.returncode == 0, result.stderr
    assert "compiled for 4 x v5e" in result.stdout
    assert "of 16.00 GiB HBM" in result.stdout and "spare" in result.stdout
    for noise in LIBTPU_NOISE:
        assert noise not in result.stdout + result.stderr


def test_the_tiny_config_compiles_for_a_v5e_2x2_slice():
    """The whole path (topology, abstract mesh, splash attention, lowering, the TPU compiler,
    its memory analysis against the chip's HBM) on a model small enough to compile in seconds."""
    result = lab(["train", str(ROOT / "configs" / "tiny.yaml"), "--compile-only",
                  "--topology", "v5e:2x2", "model.attention=splash"])
    check_compiled_for_2x2(result)


# In the slow selection (76 s of compiling on CI's 2 cores); by default the tiny config compiles
# for the same slice (above) and the presets' estimates are checked against their chips.
@pytest.mark.slow
def test_smallest_rung_compiles_for_v5e_2x2_and_fits():
    result = lab(["train", str(LADDER), "--compile-only", "--topology", "v5e:2x2",
                  *SMALL_ON_2X2])
    check_compiled_for_2x2(result)
    # lab.model.memory's estimate within 15% of the compiler's figure, both ways (activations and
    # the loss dominate this rung).
    ratio = _printed_gib(result.stdout, "estimate") / _printed_gib(result.stdout, "total")
    assert 0.85 <= ratio <= 1.15, (ratio, result.stdout)


def test_an_oversized_run_is_refused_with_one_line():
    result = lab(["train", str(LADDER), "--compile-only", "--topology", "v5e:2x2",
                  *rung(0), "train.batch_size=512", "model.loss_chunk=0", "model.remat=none"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "per chip on v5e:2x2" in lines[0], lines
    assert "16.00 GiB a v5e chip holds" in lines[0] or "v5e chip holds 16.00 GiB" in lines[0]


def test_a_bad_topology_is_one_line():
    result = lab(["train", str(LADDER), "--compile-only", "--topology", "v5e:3y3"])
    assert result.returncode == 2 and "v5e:16x16" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# Both are in the slow selection (71 s of compiling each on CI's 2 cores, with `make test` at
# 16 minutes); by default the smallest rung and the parameter-heavy rung check the estimate.
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow),
                                   pytest.param("full", marks=pytest.mark.slow)])
def test_the_estimate_is_within_15_percent_of_the_tpu_compiler(remat):
    # The whole float32 logits (no loss chunk) and float32 activations, with and without remat.
    cfg = load_config(LADDER, ["model.d_model=512", "model.n_layers=2", "model.n_heads=4",
                               "train.batch_size=16", "train.seq_len=2048",
                               "model.vocab_size=32768", "model.activation_dtype=float32",
                               "model.loss_chunk=0", f"model.remat={remat}"])
    report = compile_report(cfg, "v5e:2x2")
    assert isinstance(report.compiled, CompiledMemory) and report.chip == "v5e"
    ratio = report.estimate.total / report.compiled.total
    assert 0.85 <= ratio <= 1.15, (ratio, report.lines())


@pytest.mark.slow
def test_the_estimate_is_within_15_percent_where_parameters_and_optimizer_dominate():
    """The middle rung (d1024, 200M) at one sequence per chip: parameters, optimizer state and
    gradients are over a third of the compiler's total, so an error in them shows."""
    cfg = load_config(LADDER, [*rung(2), "train.batch_size=4"])
    report = compile_report(cfg, "v5e:2x2")
    est = report.estimate
    assert est.params + est.opt_state + est.grads >= report.compiled.total / 3, report.lines()
    ratio = est.total / report.compiled.total
    assert 0.85 <= ratio <= 1.15, (ratio, report.lines())


@pytest.mark.slow
def test_the_top_rung_compiled_on_v5e_32_keeps_10_percent_of_hbm():
    cfg = load_config(LADDER, rung(-1))
    report = compile_report(cfg, "v5e:4x8")
    assert report.compiled.total <= 0.9 * report.capacity, report.lines()
    ratio = report.estimate.total / report.compiled.total  # kept activations dominate here
    assert 0.85 <= ratio <= 1.15, (ratio, report.lines())


def test_the_estimate_says_where_it_was_not_checked():
    """Above CHECKED_TPU_CHIPS TPU chips `lab train` prints the caveat under its memory line;
    on the chips it was checked on, and on GPUs, nothing."""
    def printed(n: int, platform: str, kind: str) -> str:
        cfg = load_config(LADDER, [*rung(0), "model.vocab_size=50304", "model.n_layers=1"])
        return memory.preflight(build_trainer(cfg, abstract_mesh(cfg, n, platform, kind)))

    limit = memory.CHECKED_TPU_CHIPS
    assert "note:" not in printed(limit, "tpu", "TPU v5 lite")
    line = printed(2 * limit, "tpu", "TPU v5 lite").splitlines()[-1]
    assert line.startswith("note:") and f"more than {limit} chips" in line
    assert "--compile-only --topology" in line
    assert "note:" not in printed(2 * limit, "gpu", "NVIDIA H100 80GB HBM3")


# The bound behind CHECKED_TPU_CHIPS, from benchmarks/results/aot-ladder-v5e-*.txt: the rung
# the estimate misses most on 64 chips (d1280, 0.88) holds within 15% there, and on 128 chips
# it does not (0.71), so the caveat is still needed. A minute of compiling each.
@pytest.mark.slow
def test_the_estimate_holds_on_64_chips_and_misses_on_128():
    cfg = load_config(LADDER, [*rung(3), "model.vocab_size=50304"])
    on_64 = compile_report(cfg, "v5e:8x8")
    assert 0.85 <= on_64.estimate.total / on_64.compiled.total <= 1.15, on_64.lines()
    on_128 = compile_report(cfg, "v5e:8x16")
    assert on_128.estimate.total / on_128.compiled.total < 0.85, on_128.lines()


@pytest.mark.parametrize(("path", "n", "chip"), [(LADDER, 32, "v5e"), (GPU_DEBUG, 1, "H100 SXM")])
def test_presets_fit_their_chip_with_15_percent_to_spare(path, n, chip):
    from lab.train.aot import with_known_vocab

    for extra in ([rung(i) for i in range(5)] if path == LADDER else [[]]):
        cfg, _ = with_known_vocab(load_config(path, extra))
        target = chips.chip_named(chip)
        platform = "tpu" if chip == "v5e" else "gpu"
        trainer = build_trainer(cfg, abstract_mesh(cfg, n, platform, target.kinds[0]))
        assert memory.estimate(trainer).total <= 0.85 * target.memory_bytes, (path, extra)


def _module(path: Path, overrides: list[str], platform: str, n: int) -> str:
    return export_train_step(load_config(path, overrides), platform, n).mlir_module()


def test_the_train_step_exports_for_tpu_with_splash_and_stays_flat_in_sequence():
    short = _module(LADDER, [*SMALL_ON_2X2, "train.seq_len=2048"], "tpu", 4)
    long = _module(LADDER, [*SMALL_ON_2X2, "train.seq_len=8192"], "tpu", 4)
    for text in (short, long):
        assert "tpu_custom_call" in text  # the splash kernel
        assert "optimization_barrier" not in text
    assert len(long) < 1.10 * len(short), (len(short), len(long))


def test_the_gpu_debug_preset_exports_for_cuda_with_xla_attention():
    text = _module(GPU_DEBUG, ["model.attention=xla", "model.vocab_size=320"], "gpu", 1)
    assert "tpu_custom_call" not in text and "optimization_barrier" not in text
    assert "stablehlo.dot_general" in text
