"""Configs: YAML plus dotted overrides into frozen dataclasses; a mistake is one line, exit 2."""

import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from lab.config import (
    DECAY_SHAPES,
    MUON_SCALINGS,
    OPTIMIZERS,
    SCHEDULES,
    TASK_EXAMPLES_LIMIT,
    BranchConfig,
    Config,
    NonEmpty,
    OptimConfig,
    ScheduleConfig,
    TaskItem,
    coerce,
    config_keys,
    dump_config,
    load_config,
    validate,
)
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


# ----------------------------------------------------------------------------- the schema


def test_a_choice_key_names_its_choices():
    with pytest.raises(UserError) as e:
        load_config(TINY, ["model.attention=flash"])
    assert str(e.value) == ("model.attention must be one of auto, xla, cudnn, splash, blocked, "
                            "got 'flash'")
    with pytest.raises(UserError, match=r"branch.shape must be one of \"\", linear, cosine"):
        load_config(TINY, ["branch.shape=exp"])
    assert load_config(TINY, ["branch.shape=1-sqrt"]).branch.shape == "1-sqrt"


@pytest.mark.parametrize("override, message", [
    ("train.steps=0",
     "train.steps must be an integer in [1, 2**31-1] (what a 32-bit step counter holds), got 0"),
    ("optim.b2=1", "optim.b2 must be a number in [0, 1), got 1.0"),
    ("optim.lr=0", "optim.lr must be a positive number, got 0.0"),
    ("model.d_model=0", "model.d_model must be a positive integer, got 0"),
    ("model.d_ff=-1", "model.d_ff must be zero or a positive integer, got -1"),
    ("optim.grad_clip=-0.5", "optim.grad_clip must be zero or a positive number, got -0.5"),
    ("mesh.tensor=0", "mesh.tensor must be a positive integer or -1 (all remaining devices), "
                      "got 0"),
    ("train.spike_factor=1", "train.spike_factor must be a number > 1 or 0 (off), got 1.0"),
    ("run.seed=4294967296", "run.seed must be an integer in [0, 2**32) (JAX keeps 32 bits of a "
                            "seed), got 4294967296"),
    ("branch.final_ratio=-0.5", "branch.final_ratio must be a number in [0, 1] or -1 (use "
                                "schedule.final_ratio), got -0.5"),
    ("run.dir=", "run.dir must not be empty: name the run's output directory"),
])
def test_a_range_key_names_its_range_and_the_value(override, message):
    with pytest.raises(UserError) as e:
        load_config(TINY, [override])
    assert str(e.value) == message


def test_range_edges_and_special_values_are_accepted():
    cfg = load_config(TINY, ["train.spike_factor=0", "mesh.fsdp=-1", "schedule.final_ratio=1",
                             "branch.final_ratio=-1", "optim.b1=0", "train.steps=2147483647",
                             "run.seed=4294967295", "optim.lr=1e-3", "optim.eps=1"])
    assert (cfg.train.spike_factor, cfg.mesh.fsdp, cfg.schedule.final_ratio) == (0.0, -1, 1.0)
    assert (cfg.branch.final_ratio, cfg.optim.b1, cfg.train.steps) == (-1.0, 0.0, 2**31 - 1)
    assert cfg.run.seed == 2**32 - 1
    # "1e-3" (YAML 1.1 reads it as a string) and the int 1 are floats of a float key.
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1.0 and isinstance(cfg.optim.eps, float)


def test_each_item_of_a_list_key_is_checked():
    with pytest.raises(UserError) as e:
        load_config(TINY, ["branch.at_steps=[10, 0]"])
    assert str(e.value) == "branch.at_steps[1] must be a positive integer, got 0"
    with pytest.raises(UserError, match=r"branch.decay_fractions\[0\] must be a positive number"):
        load_config(TINY, ["branch.decay_fractions=-0.1"])
    with pytest.raises(UserError, match=r"config key branch.at_tokens\[1\] must be a positive "
                                        r"integer, got 'x'"):
        load_config(TINY, ["branch.at_tokens=[5, x]"])
    cfg = load_config(TINY, ["branch.at_steps=7", "branch.decay_fractions=[0.2, 1]"])
    assert cfg.branch.at_steps == (7,) and cfg.branch.decay_fractions == (0.2, 1.0)


def test_choice_constants_are_the_schema_choices_and_each_is_implemented():
    from lab.optim.muon import shape_scale
    from lab.optim.optimizers import lr_schedule
    from lab.optim.schedules import wsd

    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert OPTIMIZERS == choices(OptimConfig, "name") == ("adamw", "muon")
    assert MUON_SCALINGS == choices(OptimConfig, "muon_scaling") == ("moonlight", "shape")
    assert SCHEDULES == choices(ScheduleConfig, "name") == ("wsd", "cosine")
    assert DECAY_SHAPES == choices(ScheduleConfig, "decay_shape") == ("linear", "cosine",
                                                                        "1-sqrt")
    assert choices(BranchConfig, "shape") == ("", *DECAY_SHAPES)
    # Each choice is one its module implements: the schedule ends at final_ratio * peak.
    for name in SCHEDULES:
        lr = lr_schedule(ScheduleConfig(name=name, decay_steps=4, final_ratio=0.1), 2.0, 10)
        assert float(lr(9)) == pytest.approx(0.2), name
    for shape in DECAY_SHAPES:
        assert float(wsd(2.0, 10, 0, 4, shape, 0.1)(9)) == pytest.approx(0.2), shape
    assert shape_scale((4, 16), "moonlight") == pytest.approx(0.8)
    assert shape_scale((4, 16), "shape") == pytest.approx(2.0)


# Keys with no rule beyond their type; any other key must carry one (a Literal or a Range).
FREE_KEYS = {"run.name", "run.peak_tflops", "run.parent", "run.predicted_interval",
             "model.rope_theta", "model.qk_norm", "model.tie_embeddings", "model.norm_eps",
             "model.init_std", "model.scan_layers", "data.path", "optim.muon_nesterov",
             "checkpoint.keep_steps"}


def schema(cls=Config, prefix: str = "") -> list[tuple[str, str, str, typing.Any]]:
    """(key, section, name, type with its rule) of every config key; a nested section's keys
    (model.moe.experts) have the dotted section (model.moe)."""
    rows = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if dataclasses.is_dataclass(hint):
            rows += schema(hint, f"{prefix}{name}.")
        elif prefix:
            rows.append((f"{prefix}{name}", prefix.rstrip("."), name, hint))
    return rows


def with_value(config, section: str, name: str, value):
    """`config` with the key section.name set, a nested section's too (no checks)."""
    head, _, rest = section.partition(".")
    inner = getattr(config, head)
    changed = (with_value(inner, rest, name, value) if rest
               else dataclasses.replace(inner, **{name: value}))
    return dataclasses.replace(config, **{head: changed})


def rule_cases(hint) -> tuple[list, list, str]:
    """(values the rule rejects, values at its edges it accepts, what a rejection says),
    worked out from the rule's fields here rather than by asking the rule."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        bad, good, says = rule_cases(typing.get_args(hint)[0])
        return [(v,) for v in bad], [(v,) for v in good], says
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return ["no-such-choice"], list(choices), "must be one of " + ", ".join(
            c or '""' for c in choices)
    assert typing.get_origin(hint) is typing.Annotated, f"{hint} carries no rule"
    kind, rule = typing.get_args(hint)
    if isinstance(rule, NonEmpty):
        return [""], ["x"], "must not be empty"
    if isinstance(rule, TaskItem):
        return (["hellaswag", "choice:", "choice:0", f"exact:{TASK_EXAMPLES_LIMIT + 1}"],
                ["choice", "exact:1", f"choice:{TASK_EXAMPLES_LIMIT}"],
                "must be NAME or NAME:EXAMPLES")
    outside = [v for v in (rule.lo - 1, rule.lo - 2) if v != rule.also][:1]
    bad = [rule.lo] if rule.lo_open else outside
    good = [] if rule.lo_open else [rule.lo]
    if rule.hi is not None:
        bad.append(rule.hi if rule.hi_open else rule.hi + 1)
        good += [] if rule.hi_open else [rule.hi]
    good += [] if rule.also is None else [rule.also]
    return [kind(v) for v in bad], [kind(v) for v in good], f"must be {rule.describe(kind)}"


def test_every_key_but_the_free_ones_carries_a_rule_that_is_enforced():
    """Driven by the schema: each rule rejects a value outside it, as read from a file or a
    word and in a config made in code, with a message naming the key; its edges pass."""
    ruled = [(key, section, name, hint) for key, section, name, hint in schema()
             if key not in FREE_KEYS]
    assert {key for key, *_ in schema()} >= FREE_KEYS
    assert len(ruled) >= 50
    for key, section, name, hint in ruled:
        bad, good, says = rule_cases(hint)
        assert bad, key
        for value in bad:
            word = f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
            with pytest.raises(UserError, match=rf"^{re.escape(key)}(\[0\])? ") as e:
                load_config(None, [word])
            assert says in str(e.value) and len(str(e.value).splitlines()) == 1, word
            made = with_value(Config(), section, name, value)
            with pytest.raises(UserError, match=rf"^{re.escape(key)}(\[0\])? "):
                validate(made)
        for value in good:
            assert coerce(key, value, hint) == value, (key, value)


def test_defaults_and_every_preset_meet_the_schema():
    validate(Config())
    sections = {f.name for f in dataclasses.fields(Config)}
    runs = [path for path in sorted((ROOT / "configs").rglob("*.yaml"))
            if set(yaml.safe_load(path.read_text())) <= sections]  # not a sweep or a study
    assert TINY in runs and len(runs) >= 3
    for path in runs:
        validate(load_config(path))


def test_help_shows_each_rule():
    shown = {key: kind for key, kind, _ in config_keys()}
    assert shown["model.attention"] == "auto|xla|cudnn|splash|blocked"
    assert shown["train.steps"] == "int in [1, 2**31-1]"
    assert shown["model.d_model"] == "int >= 1"
    assert shown["optim.lr"] == "float > 0"
    assert shown["train.spike_factor"] == "float > 1 or 0"
    assert shown["run.seed"] == "int in [0, 2**32)"
    assert shown["branch.at_steps"] == "list[int >= 1]"
    assert shown["run.dir"] == "str non-empty"
    assert shown["model.qk_norm"] == "bool"
