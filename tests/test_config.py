"""Configs: YAML plus dotted overrides into frozen dataclasses; a mistake is one line, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from lab.config import Config, dump_config, load_config
from lab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_tiny_loads_with_overrides():
    cfg = load_config(TINY, ["train.steps=70", "optim.name=muon", "mesh.fsdp=4", "mesh.tensor=2",
                             "optim.lr=1e-3", "checkpoint.keep_steps=[10,20]"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 70 and cfg.optim.name == "muon"
    assert cfg.mesh.fsdp == 4 and cfg.mesh.tensor == 2
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.checkpoint.keep_steps == (10, 20)
    assert cfg.train.batch_size % 8 == 0  # the contract: tiny runs on any mesh of 8


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(TINY, ["model.qk_norm=true", "schedule.decay_shape=cosine"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("overrides, fragment", [
    (["train.stepz=1"], "train.stepz"),
    (["model.d_model=100", "model.n_heads=3"], "divisible"),
    (["train.steps=ten"], "train.steps"),
])
def test_load_config_errors_name_the_key(overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        load_config(TINY, overrides)


# The catalogue of invalid configs, each run through the real command. The ones that need the
# devices (mesh, batch divisibility) run with eight fake CPU devices.
CATALOGUE = [
    ("missing file", ["configs/nope.yaml"], "does not exist"),
    ("unknown section", [str(TINY), "foo.bar=1"], "foo"),
    ("unknown key", [str(TINY), "train.stepz=1"], "train.stepz"),
    ("not key=value", [str(TINY), "train.steps"], "key=value"),
    ("undotted key", [str(TINY), "steps=3"], "dotted"),
    ("wrong type int", [str(TINY), "train.steps=abc"], "train.steps"),
    ("wrong type bool", [str(TINY), "model.qk_norm=maybe"], "model.qk_norm"),
    ("wrong type float", [str(TINY), "optim.lr=fast"], "optim.lr"),
    ("negative size", [str(TINY), "model.d_model=-8"], "model.d_model"),
    ("zero layers", [str(TINY), "model.n_layers=0"], "model.n_layers"),
    ("heads do not divide width", [str(TINY), "model.n_heads=5"], "model.n_heads"),
    ("kv heads do not divide heads", [str(TINY), "model.n_kv_heads=3"], "n_kv_heads"),
    ("unknown optimizer", [str(TINY), "optim.name=sgd"], "optim.name"),
    ("unknown schedule", [str(TINY), "schedule.name=step"], "schedule.name"),
    ("unknown decay shape", [str(TINY), "schedule.decay_shape=exp"], "decay_shape"),
    ("decay longer than run", [str(TINY), "train.steps=50", "schedule.decay_steps=60"],
     "train.steps"),
    ("final ratio above 1", [str(TINY), "schedule.final_ratio=2"], "final_ratio"),
    ("non-positive lr", [str(TINY), "optim.lr=0"], "optim.lr"),
    ("grad accum does not divide batch", [str(TINY), "train.grad_accum=3"], "grad_accum"),
    ("two -1 mesh axes", [str(TINY), "mesh.data=-1", "mesh.fsdp=-1"], "-1"),
    ("unknown dtype", [str(TINY), "model.compute_dtype=float8"], "compute_dtype"),
    ("mesh does not match devices", [str(TINY), "mesh.data=3", "mesh.fsdp=1"], "devices"),
    ("batch not divisible by data parallel", [str(TINY), "train.batch_size=12", "mesh.fsdp=8"],
     "batch_size"),
    ("mesh axis zero", [str(TINY), "mesh.tensor=0"], "mesh.tensor"),
]


@pytest.mark.parametrize("name, args, fragment", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_invalid_config_exits_2_with_one_line(name, args, fragment, tmp_path, small_data):
    env_args = [f"run.dir={tmp_path / 'run'}", f"data.path={small_data}"]
    if args[0].endswith("tiny.yaml"):
        args = args + env_args
    result = subprocess.run(
        [sys.executable, "-m", "lab.cli", "train", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_invalid_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps: 3\n")
    result = subprocess.run([sys.executable, "-m", "lab.cli", "train", str(bad)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "YAML" in result.stderr
