"""Typed, frozen run configuration: YAML files plus dotted `key=value` overrides.

A config is a tree of frozen dataclasses, one per concern. `load_config(path, overrides)` reads
the YAML, applies overrides such as `train.steps=200 optim.name=muon`, checks every key and type,
and validates values; any mistake raises `UserError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab import paths
from lab.errors import UserError


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/tiny"  # the run directory (local path or gs://)
    seed: int = 0  # model init and data order
    name: str = ""  # a label for sweeps and reports; defaults to the directory's name
    peak_tflops: float = 0.0  # hardware peak for MFU; 0 = a table (GPU/TPU) or a probe (CPU)
    parent: str = ""  # a branch: the run directory whose checkpoint this run starts from
    parent_step: int = 0  # ... and the step of that checkpoint
    # Written by `lab plan`: the final eval loss the fitted law predicts for this run, and its
    # interval (lo, hi); train copies them into summary.json so `lab fit` can score them.
    predicted_loss: float = 0.0  # 0 = no prediction
    predicted_interval: tuple[float, ...] = ()

    def prediction(self) -> dict:
        """The summary fields of a planned run's prediction; none for a branch, whose
        schedule the prediction was not made for."""
        if not self.predicted_loss or self.parent:
            return {}
        return {"predicted_loss": self.predicted_loss,
                "predicted_interval": list(self.predicted_interval)}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0 = the data's vocabulary, rounded up to a multiple of 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (plain multi-head); fewer = grouped-query attention
    d_ff: int = 0  # SwiGLU hidden width; 0 = 3 * d_model
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = False
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2)
    norm_eps: float = 1e-6
    init_std: float = 0.02  # embedding init; matrices use 1/sqrt(fan_in)
    compute_dtype: str = "float32"  # float32 | bfloat16 (matmul operands; params stay float32)
    # The residual stream and block outputs; norm and softmax statistics and the loss stay float32.
    activation_dtype: str = "float32"  # float32 | bfloat16
    # auto = blocked on CPU, cudnn on GPU, splash on TPU (by the mesh's platform); xla = plain
    # einsums on any backend; cudnn = jax.nn.dot_product_attention's cuDNN kernel; splash = the
    # Pallas TPU kernel (interpreted on CPU); blocked = the CPU-tuned blocked attention.
    attention: str = "auto"  # auto | xla | cudnn | splash | blocked
    # Tokens per cross-entropy chunk: the (B, L, V) float32 logits and their gradient are never
    # whole, each chunk's logits are recomputed in the backward pass. 0 = one piece.
    loss_chunk: int = 0
    # What a block keeps for the backward pass (the rest is recomputed):
    #   none = everything (no remat); full = only its input; dots = every matmul output without
    #   batch dimensions (projections and MLP, not attention scores); save_qkv_proj = the q, k, v
    #   projections; save_out_proj = the attention output projection; minimal = the q, k, v and
    #   output projections and the MLP's matmul outputs (gate, up, down).
    remat: str = "none"  # none | full | dots | save_qkv_proj | save_out_proj | minimal
    scan_layers: bool = True  # one compiled block scanned over layers: compile time flat in depth
    parameterization: str = "sp"  # sp | mup
    mup_base_width: int = 128  # the width at which μP equals SP

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 3 * self.d_model


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a prepared data directory; empty = the stdlib corpus, prepared once and cached


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step, global
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step; each is batch_size / grad_accum sequences
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate only at the end
    eval_batches: int = 4  # validation batches of batch_size sequences per evaluation
    spike_factor: float = 2.0  # stop (diverged) if the loss tops this x its recent median; 0 = off
    spike_window: int = 50  # the recent losses that median is taken over


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # pure data parallelism (replicated parameters)
    fsdp: int = -1  # data parallelism with parameters sharded; -1 = all remaining devices
    tensor: int = 1  # tensor (model) parallelism over heads and MLP width


# The choices of the string-valued keys, written once: the modules that implement them import
# these (kept here, free of jax, so that reading a config stays light).
OPTIMIZERS = ("adamw", "muon")
MUON_SCALINGS = ("moonlight", "shape")  # lab.muon.shape_scale
SCHEDULES = ("wsd", "cosine")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")  # lab.schedules


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | muon
    lr: float = 3e-3  # peak learning rate (AdamW side; Muon side gets lr * muon_lr_ratio)
    weight_decay: float = 0.1  # decoupled, both sides
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_scaling: str = "moonlight"  # moonlight | shape
    muon_lr_ratio: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "wsd"  # wsd | cosine
    warmup_steps: int = 0
    decay_steps: int = 0  # WSD decay length, ending at train.steps; 0 = a pure stable run
    decay_shape: str = "linear"  # linear | cosine | 1-sqrt
    final_ratio: float = 0.0  # learning rate at the last step over the peak


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at the end
    keep_last: int = 2
    keep_steps: tuple[int, ...] = ()  # steps never deleted (for example branch points)


@dataclass(frozen=True)
class BranchConfig:
    """The branch plan a stable WSD run declares: its checkpoints at these points are kept,
    and `lab branch RUN_DIR` without --at runs every (point, decay) pair."""

    at_steps: tuple[int, ...] = ()
    at_tokens: tuple[int, ...] = ()  # converted to the nearest step
    at_tokens_per_param: tuple[float, ...] = ()  # tokens / total parameters, e.g. 20
    decay_steps: tuple[int, ...] = ()
    decay_fractions: tuple[float, ...] = ()  # a decay of this fraction of the branch step
    shape: str = ""  # decay shape of the branches; "" = schedule.decay_shape
    final_ratio: float = -1.0  # -1 = schedule.final_ratio


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)


# ----------------------------------------------------------------------------- reading

INT64_MAX = 2**63 - 1
# Step counts reach jitted code (optax schedules, the step counter) as int32.
INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**32  # JAX keys keep 32 bits of a seed: larger seeds repeat smaller ones


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        # A run's saved config may be on gs://.
        path = str(path) if paths.is_remote(path) else Path(path)
        if not paths.is_file(path):
            raise UserError(f"config file {path} does not exist; pass a YAML file such as "
                            "configs/tiny.yaml")
        try:
            raw = yaml.safe_load(paths.read_text(path)) or {}
        except UnicodeDecodeError as e:
            raise UserError(f"config file {path} is not UTF-8 text (byte {e.start} cannot be "
                            "decoded); save it as UTF-8") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            message = f"config file {path} is not valid YAML{where}; fix its syntax"
            raise UserError(message) from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must be a mapping of sections such as "
                            "'train:' and 'model:'")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config = from_dict(Config, raw, prefix="")
    validate(config)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """`train.steps=200` -> ("train.steps", 200); values are parsed as YAML scalars."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key=value, e.g. train.steps=200")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise UserError(f"override {item!r} needs a dotted key such as train.steps=200")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    section = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise UserError(f"{section} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be ints as well
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}'; known keys in {section}: "
                        f"{', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, prefix=f"{key}.")
        else:
            values[name] = coerce(key, value, hint)
    return cls(**values)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field type; ints may stand for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return coerce(key, value, options[0])
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key} must be a list, got {value!r}")
        return tuple(coerce(key, v, item_type) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64_MAX <= value <= INT64_MAX:
                raise UserError(f"config key {key} is {value}, beyond a 64-bit integer; give a "
                                "smaller number")
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads "1e-3" (no dot) as a string
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"config key {key} must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise UserError(f"config key {key} must be {hint.__name__}, got {value!r}")


def to_dict(config: Any) -> dict:
    """The config as plain nested dicts (tuples become lists), ready for YAML."""
    def plain(x: Any) -> Any:
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(config))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def replace(config: Config, **sections: dict) -> Config:
    """A copy with some fields changed: replace(cfg, train={"steps": 10})."""
    changes = {name: dataclasses.replace(getattr(config, name), **values)
               for name, values in sections.items()}
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    _require(value in options, f"{key} must be one of {', '.join(options)}, got {value!r}")


def validate(config: Config) -> None:
    """Reject values that cannot work, independent of the devices (the mesh checks those)."""
    _validate_counts(config)
    _validate_model(config.model, config.train)
    _validate_optim(config.optim)
    _validate_schedule(config.schedule, config.train)
    _validate_mesh_and_run(config)
    _validate_branch(config.branch)


def _validate_counts(config: Config) -> None:
    """Sizes, step counts and the seed: in range for what they count."""
    m, t, s = config.model, config.train, config.schedule
    for key, value in [("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                       ("model.n_heads", m.n_heads), ("train.steps", t.steps),
                       ("train.batch_size", t.batch_size), ("train.seq_len", t.seq_len),
                       ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every),
                       ("train.eval_batches", t.eval_batches)]:
        _require(value > 0, f"{key} must be a positive integer, got {value}")
    for key, value in [("model.vocab_size", m.vocab_size), ("model.n_kv_heads", m.n_kv_heads),
                       ("model.d_ff", m.d_ff), ("train.eval_every", t.eval_every),
                       ("schedule.warmup_steps", s.warmup_steps),
                       ("schedule.decay_steps", s.decay_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps)]:
        _require(value >= 0, f"{key} must be zero or positive, got {value}")
    _require(t.spike_factor == 0 or t.spike_factor > 1,
             f"train.spike_factor must be 0 (off) or above 1, got {t.spike_factor}")
    _require(t.spike_window >= 1, f"train.spike_window must be positive, got {t.spike_window}")
    for key, value in [("train.steps", t.steps), ("train.eval_every", t.eval_every),
                       ("train.log_every", t.log_every), ("schedule.warmup_steps", s.warmup_steps),
                       ("schedule.decay_steps", s.decay_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("run.parent_step", config.run.parent_step)]:
        _require(value <= INT32_MAX, f"{key} is {value}, more steps than a 32-bit step counter "
                 f"holds; give at most {INT32_MAX}")
    _require(0 <= config.run.seed < SEED_LIMIT,
             f"run.seed must lie in [0, 2**32) (JAX keeps 32 bits of it), got {config.run.seed}")
    _require(config.checkpoint.keep_last >= 1,
             f"checkpoint.keep_last must be at least 1, got {config.checkpoint.keep_last}")


def _validate_model(m: ModelConfig, t: TrainConfig) -> None:
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}); "
             "change one of them")
    _require(m.head_dim % 2 == 0, f"model.d_model / model.n_heads = {m.head_dim} must be even "
             "for rotary embeddings; change model.d_model or model.n_heads")
    _require(m.n_heads % m.kv_heads == 0,
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    _choice("model.compute_dtype", m.compute_dtype, ("float32", "bfloat16"))
    _choice("model.activation_dtype", m.activation_dtype, ("float32", "bfloat16"))
    _choice("model.attention", m.attention, ("auto", "xla", "cudnn", "splash", "blocked"))
    _choice("model.remat", m.remat,
            ("none", "full", "dots", "save_qkv_proj", "save_out_proj", "minimal"))
    _require(m.attention != "splash" or t.seq_len % 128 == 0,
             f"model.attention=splash needs train.seq_len divisible by 128, got {t.seq_len}; "
             "change train.seq_len or set model.attention=xla")
    _require(m.loss_chunk >= 0, f"model.loss_chunk must be zero (no chunking) or a positive "
             f"number of tokens, got {m.loss_chunk}")
    _choice("model.parameterization", m.parameterization, ("sp", "mup"))
    _require(m.mup_base_width > 0, "model.mup_base_width must be positive")
    _require(m.z_loss >= 0, f"model.z_loss must be zero or positive, got {m.z_loss}")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum "
             f"({t.grad_accum})")


def _validate_optim(o: OptimConfig) -> None:
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("optim.muon_scaling", o.muon_scaling, MUON_SCALINGS)
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be zero or positive, got "
             f"{o.weight_decay}")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1 and optim.b2 must lie in [0, 1)")
    _require(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    _require(o.grad_clip >= 0, "optim.grad_clip must be zero (off) or positive")
    _require(0 <= o.muon_momentum < 1, f"optim.muon_momentum must lie in [0, 1), got "
             f"{o.muon_momentum}")
    _require(o.muon_ns_steps > 0, "optim.muon_ns_steps must be positive")
    _require(o.muon_lr_ratio > 0, f"optim.muon_lr_ratio must be positive, got {o.muon_lr_ratio}")


def _validate_schedule(s: ScheduleConfig, t: TrainConfig) -> None:
    _choice("schedule.name", s.name, SCHEDULES)
    _choice("schedule.decay_shape", s.decay_shape, DECAY_SHAPES)
    _require(0 <= s.final_ratio <= 1,
             f"schedule.final_ratio must lie in [0, 1], got {s.final_ratio}")
    _require(s.warmup_steps + s.decay_steps <= t.steps,
             f"schedule.warmup_steps + schedule.decay_steps ({s.warmup_steps} + "
             f"{s.decay_steps}) must not exceed train.steps ({t.steps})")


def _validate_mesh_and_run(config: Config) -> None:
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, axis)
        _require(size == -1 or size >= 1,
                 f"mesh.{axis} must be a positive device count or -1 (the rest), got {size}")
    _require([config.mesh.data, config.mesh.fsdp, config.mesh.tensor].count(-1) <= 1,
             "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    _require(bool(config.run.dir), "run.dir must name the run's output directory")
    _require(config.run.parent_step >= 0, "run.parent_step must be zero or positive")
    r = config.run
    _require(r.predicted_loss >= 0, "run.predicted_loss must be positive (or 0: none)")
    _require(not r.predicted_interval or (len(r.predicted_interval) == 2
                                          and r.predicted_interval[0] <= r.predicted_interval[1]),
             "run.predicted_interval must be [lo, hi] with lo <= hi, or empty")


def _validate_branch(b: BranchConfig) -> None:
    if b.shape:
        _choice("branch.shape", b.shape, DECAY_SHAPES)
    _require(b.final_ratio == -1.0 or 0 <= b.final_ratio <= 1,
             "branch.final_ratio must lie in [0, 1] (or -1: schedule.final_ratio)")
    for key, values in [("branch.at_steps", b.at_steps), ("branch.at_tokens", b.at_tokens),
                        ("branch.at_tokens_per_param", b.at_tokens_per_param),
                        ("branch.decay_steps", b.decay_steps),
                        ("branch.decay_fractions", b.decay_fractions)]:
        _require(all(v > 0 for v in values), f"{key} must hold positive numbers, got {values}")


# ----------------------------------------------------------------------------- typed changes


def override(config: Config, values: dict[str, Any]) -> Config:
    """A copy with dotted keys set, e.g. override(cfg, {"optim.lr": 1e-3}): each value is
    checked against its field's type as if read from YAML, and the result is validated. How
    sweeps and studies derive their runs' configs from a base."""
    by_section: dict[str, dict] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise UserError(f"config key {key!r} must be section.key, such as train.steps")
        by_section.setdefault(section, {})[name] = value
    changes = {}
    for section, fields in by_section.items():
        typed = getattr(from_dict(Config, {section: fields}, prefix=""), section)
        changes[section] = {name: getattr(typed, name) for name in fields}
    result = replace(config, **changes)
    validate(result)
    return result


def overrides_between(base: Config, config: Config) -> list[str]:
    """The `key=value` words that turn `base` into `config`, in schema order:
    load_config(base_file, words) gives `config` back. A sweep's runs are Config objects;
    these words are how they are shown and handed to a `lab train` process."""
    words = []
    for section in dataclasses.fields(config):
        old, new = getattr(base, section.name), getattr(config, section.name)
        for f in dataclasses.fields(new):
            value = getattr(new, f.name)
            if getattr(old, f.name) != value:
                words.append(f"{section.name}.{f.name}={override_word(value)}")
    return words


def value_of(config: Config, key: str) -> Any:
    """The value of a dotted key, value_of(cfg, "train.steps")."""
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def override_word(value: Any) -> str:
    """A value as the text after `key=`, read back as the same value (lists in YAML flow
    style, strings quoted where YAML would read them as something else)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_word(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(text)
        except yaml.YAMLError:
            plain = None
        if plain != text:
            return "'" + text.replace("'", "''") + "'"  # YAML single quotes: read verbatim
    return text
