"""Typed, frozen run configuration: YAML files plus dotted `key=value` overrides.

A config is a tree of frozen dataclasses, one per concern. `load_config(path, overrides)` reads
the YAML, applies overrides such as `train.steps=200 optim.name=muon`, and checks every key
against its type as it reads it; any mistake raises `UserError` naming the key and the fix.

The types are the schema: a key's rule is written once, in its type. `Literal[...]` lists a
key's choices; `Annotated[int, Range(...)]` bounds a number (a tuple's item type bounds each
item); the engine that reads any such schema (lab.schema, which sweep and study files use too)
checks both, and `config_keys` shows them in `lab train --help`. `validate` holds only the
rules that relate several keys.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from lab import paths
from lab.errors import UserError, shown

# The engine (lab.schema) reads the schema; its names stay importable from here.
from lab.schema import INT64_MAX as INT64_MAX
from lab.schema import NonEmpty, Range, from_dict, schema_keys
from lab.schema import coerce as coerce
from lab.schema import describe_type as describe_type
from lab.yaml_file import read_yaml

# Step counts reach jitted code (optax schedules, the step counter) as int32.
INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**32  # JAX keys keep 32 bits of a seed: larger seeds repeat smaller ones


# ----------------------------------------------------------------------------- the schema's types


def parse_task(item: str) -> tuple[str, int]:
    """`choice:256` -> ("choice", 256), `exact` -> ("exact", its default number of examples);
    ValueError for anything else (TaskItem turns it into the user's message)."""
    name, colon, count = str(item).partition(":")
    if name not in TASK_NAMES or (colon and not count.strip().isdigit()):
        raise ValueError(item)
    return name, int(count) if colon else TASK_DEFAULT_EXAMPLES[name]


@dataclass(frozen=True)
class TaskItem:
    """An entry of eval.tasks: a task's name and, optionally, its number of examples."""

    def bounds(self) -> str:
        return f"{'|'.join(TASK_NAMES)}[:N]"

    def check(self, key: str, value: str, kind: type) -> None:
        try:
            count = parse_task(value)[1]
        except ValueError:
            count = 0
        if not 1 <= count <= TASK_EXAMPLES_LIMIT:
            raise UserError(f"{key} must be NAME or NAME:EXAMPLES, NAME one of "
                            f"{', '.join(TASK_NAMES)} and EXAMPLES in [1, {TASK_EXAMPLES_LIMIT}] "
                            f"(such as choice:256), got {value!r}")


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
_STEP_NOTE = "what a 32-bit step counter holds"
Steps = Annotated[int, Range(0, INT32_MAX, note=_STEP_NOTE)]
PositiveSteps = Annotated[int, Range(1, INT32_MAX, note=_STEP_NOTE)]
PositiveFloat = Annotated[float, Range(0, lo_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
Decay = Annotated[float, Range(0, 1, hi_open=True)]  # a moving average's factor: 1 never forgets
MeshAxis = Annotated[int, Range(1, also=-1, note="all remaining devices")]
Seed = Annotated[int, Range(0, SEED_LIMIT, hi_open=True, note="JAX keeps 32 bits of a seed")]

# The choices of the string-valued keys, written once: the modules that implement them import
# the constants (kept here, free of jax, so that reading a config stays light).
Dtype = Literal["float32", "bfloat16"]
NsDtype = Literal["auto", "float32", "bfloat16"]  # lab.optim.optimizers.newton_schulz_dtype
AttentionKernel = Literal["auto", "xla", "cudnn", "splash", "blocked"]
Remat = Literal["none", "full", "dots", "save_attention", "save_qkv_proj", "save_out_proj",
                "minimal", "auto"]
BackwardDtype = Literal["compute", "float32"]
Parameterization = Literal["sp", "mup"]
Optimizer = Literal["adamw", "muon"]
MuonScaling = Literal["moonlight", "shape"]  # lab.optim.muon.shape_scale
Schedule = Literal["wsd", "cosine"]
Router = Literal["softmax", "sigmoid"]  # lab.model.moe
Dispatch = Literal["auto", "onehot", "ragged"]  # lab.model.moe
DecayShape = Literal["linear", "cosine", "1-sqrt"]  # lab.optim.schedules
OPTIMIZERS = typing.get_args(Optimizer)
MUON_SCALINGS = typing.get_args(MuonScaling)
SCHEDULES = typing.get_args(Schedule)
DECAY_SHAPES = typing.get_args(DecayShape)
Distractors = Literal["random", "document"]  # lab.data.tasks
TASK_NAMES = ("choice", "exact")  # lab.data.tasks: pick 1 of 4 continuations; greedy exact match
# A task named without a size: a choice example is 4 rows to score, an exact one 1 row. Together
# they took 2.2% of configs/tiny.yaml's wall time (benchmarks/results/tasks-cost.txt).
TASK_DEFAULT_EXAMPLES = {"choice": 64, "exact": 128}
TASK_EXAMPLES_LIMIT = 10**6


# ----------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class RunConfig:
    # the run directory (local path or gs://)
    dir: Annotated[str, NonEmpty("name the run's output directory")] = "runs/tiny"
    seed: Seed = 0  # model init and data order
    name: str = ""  # a label for sweeps and reports; defaults to the directory's name
    peak_tflops: float = 0.0  # hardware peak for MFU; 0 = a table (GPU/TPU) or a probe (CPU)
    parent: str = ""  # a branch: the run directory whose checkpoint this run starts from
    parent_step: Steps = 0  # ... and the step of that checkpoint
    # Written by `lab plan`: the final eval loss the fitted law predicts for this run, and its
    # interval (lo, hi); train copies them into summary.json so `lab fit` can score them.
    predicted_loss: NonNegativeFloat = 0.0  # 0 = no prediction
    predicted_interval: tuple[float, ...] = ()

    def prediction(self) -> dict:
        """The summary fields of a planned run's prediction; none for a branch, whose
        schedule the prediction was not made for."""
        if not self.predicted_loss or self.parent:
            return {}
        return {"predicted_loss": self.predicted_loss,
                "predicted_interval": list(self.predicted_interval)}


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP in every block (lab.model.moe); experts = 0 keeps the dense MLP."""

    experts: NonNegativeInt = 0  # routed experts per block; 0 = the dense SwiGLU MLP
    top_k: PositiveInt = 2  # routed experts each token goes through
    shared_experts: NonNegativeInt = 0  # experts every token goes through, besides its top-k
    d_ff: NonNegativeInt = 0  # each expert's SwiGLU width; 0 = the dense MLP's (model.d_ff)
    # softmax: top-k of softmax probabilities, weighted by them (Switch, GShard); sigmoid:
    # top-k of sigmoid scores plus a balancing bias, weighted by the chosen scores normalised
    # to sum to 1 (DeepSeek-V3)
    router: Router = "softmax"
    # The sigmoid router's bias step: after each optimizer step, every expert's bias moves by
    # this much toward balance (up if under-loaded, down if over-loaded); 0 = no bias.
    bias_rate: NonNegativeFloat = 1e-3
    aux_loss: NonNegativeFloat = 0.0  # coefficient of the Switch load-balancing loss; 0 = off
    # Each expert takes at most capacity_factor * top_k * seq_len / experts of a sequence's
    # token choices (first choices first, earlier positions first); the rest are dropped
    # (the residual carries them). 0 = dropless: every choice is computed.
    capacity_factor: NonNegativeFloat = 0.0
    # How tokens reach their experts: onehot = every expert on every token, weighted by the
    # (mostly zero) routing weights (exact, E / top_k times the active FLOPs); ragged = tokens
    # sorted by expert through jax.lax.ragged_dot (grouped matmul); auto = ragged on GPU and
    # TPU, onehot on CPU.
    dispatch: Dispatch = "auto"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: NonNegativeInt = 0  # 0 = the data's vocabulary, rounded up to a multiple of 64
    d_model: PositiveInt = 128
    n_layers: PositiveInt = 4
    n_heads: PositiveInt = 4
    n_kv_heads: NonNegativeInt = 0  # 0 = n_heads (plain multi-head); fewer = grouped-query
    d_ff: NonNegativeInt = 0  # SwiGLU hidden width; 0 = 3 * d_model
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = False
    z_loss: NonNegativeFloat = 0.0  # coefficient of mean(logsumexp(logits)^2)
    norm_eps: float = 1e-6
    init_std: float = 0.02  # embedding init; matrices use 1/sqrt(fan_in)
    compute_dtype: Dtype = "float32"  # matmul operands; params stay float32
    # The residual stream and block outputs; norm and softmax statistics and the loss stay float32.
    activation_dtype: Dtype = "float32"
    # The backward matmuls' operands on GPU and TPU: compute = the compute dtype (bfloat16
    # operands in dX and dW, accumulated in float32), float32 = XLA's transpose of the forward
    # einsum, which promotes bfloat16 operands to float32 (half the bf16 rate on GPUs). The CPU
    # kernels keep their own backward either way.
    backward_dtype: BackwardDtype = "compute"
    # auto = blocked on CPU, cudnn on GPU, splash on TPU (by the mesh's platform); xla = plain
    # einsums on any backend; cudnn = jax.nn.dot_product_attention's cuDNN kernel; splash = the
    # Pallas TPU kernel (interpreted on CPU); blocked = the CPU-tuned blocked attention.
    attention: AttentionKernel = "auto"
    # Tokens per cross-entropy chunk: the (B, L, V) float32 logits and their gradient are never
    # whole, each chunk's logits are recomputed in the backward pass. 0 = one piece.
    loss_chunk: NonNegativeInt = 0
    # What a block keeps for the backward pass (the rest is recomputed):
    #   none = everything (no remat); full = only its input; dots = every matmul output without
    #   batch dimensions (projections and MLP, not attention scores); save_attention = dots and
    #   the attention kernel's outputs (its result and logsumexp: attention is not recomputed);
    #   save_qkv_proj = the q, k, v projections; save_out_proj = the attention output
    #   projection; minimal = the q, k, v and output projections and the MLP's matmul outputs
    #   (gate, up, down); auto = the first of none, save_attention, dots, save_qkv_proj, full
    #   that fits the chip by lab.model.memory's estimate (printed when the run starts).
    remat: Remat = "none"
    scan_layers: bool = True  # one compiled block scanned over layers: compile time flat in depth
    parameterization: Parameterization = "sp"
    mup_base_width: PositiveInt = 128  # the width at which μP equals SP
    moe: MoeConfig = field(default_factory=MoeConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 3 * self.d_model

    @property
    def expert_ff_dim(self) -> int:
        """One expert's SwiGLU width (routed and shared experts alike)."""
        return self.moe.d_ff or self.ff_dim


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a prepared data directory; empty = the stdlib corpus, prepared once and cached


@dataclass(frozen=True)
class TrainConfig:
    steps: PositiveSteps = 100
    batch_size: PositiveInt = 8  # sequences per optimizer step, global
    seq_len: PositiveInt = 128
    grad_accum: PositiveInt = 1  # micro-batches per step; each is batch_size / grad_accum sequences
    log_every: PositiveSteps = 10
    eval_every: Steps = 0  # 0 = evaluate only at the end
    eval_batches: PositiveInt = 4  # validation batches of batch_size sequences per evaluation
    # Stop (diverged) if the loss tops this x its recent median.
    spike_factor: Annotated[float, Range(1, lo_open=True, also=0, note="off")] = 2.0
    spike_window: PositiveInt = 50  # the recent losses that median is taken over
    # Measure the gradient noise scale every N steps (metric noise_scale,
    # lab.optim.noise_scale); 0 = off
    noise_scale_every: Steps = 0


@dataclass(frozen=True)
class EvalConfig:
    """Downstream tasks built from the validation split (lab/data/tasks.py), scored at every
    evaluation (train.eval_every and the last step): metrics task/NAME/accuracy and
    task/NAME/loss. The task settings are part of the examples, which are built once per
    setting and kept beside the prepared data."""

    # NAME or NAME:EXAMPLES; choice = pick the true continuation among 4, exact = greedy
    # completion; none by default (e.g. eval.tasks=[choice,exact])
    tasks: tuple[Annotated[str, TaskItem()], ...] = ()
    seed: Seed = 0  # which examples; the same for every run, so runs are comparable
    choice_context: PositiveInt = 32  # tokens of context before the 4 continuations
    choice_length: PositiveInt = 16  # tokens of each continuation
    # Where the 3 wrong continuations come from: random = anywhere in the split (easier),
    # document = elsewhere in the same document (harder: same names, same style)
    choice_distractors: Distractors = "random"
    exact_context: PositiveInt = 32  # tokens of context before the completion
    exact_length: PositiveInt = 4  # tokens the greedy completion must get all right


@dataclass(frozen=True)
class MeshConfig:
    data: MeshAxis = 1  # pure data parallelism (replicated parameters)
    fsdp: MeshAxis = -1  # data parallelism with parameters sharded; -1 = all remaining devices
    tensor: MeshAxis = 1  # tensor (model) parallelism over heads and MLP width
    # expert parallelism: the routed experts are split over this axis, which outside the MoE
    # layers is data parallel (the batch is split over data x fsdp x expert)
    expert: MeshAxis = 1


@dataclass(frozen=True)
class OptimConfig:
    name: Optimizer = "adamw"
    lr: PositiveFloat = 3e-3  # peak learning rate (AdamW side; Muon side gets lr * muon_lr_ratio)
    weight_decay: NonNegativeFloat = 0.1  # decoupled, both sides
    b1: Decay = 0.9
    b2: Decay = 0.95
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0  # global-norm clip; 0 disables
    muon_momentum: Decay = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: PositiveInt = 5
    # Newton-Schulz matmul operands: float32 (true float32 products), bfloat16 (float32
    # accumulation, as Keller Jordan's reference: Muon's step 2.4x faster on an H200), or auto:
    # bfloat16 on GPU and TPU, float32 on CPU (tiny-config curves, docs/optimization.md)
    muon_ns_dtype: NsDtype = "auto"
    muon_scaling: MuonScaling = "moonlight"
    muon_lr_ratio: PositiveFloat = 1.0
    # QK-clip (MuonClip, Kimi K2): after each update, the query and key weights of every head
    # whose largest attention logit of the step exceeded this τ are scaled down to bring it to
    # τ (lab.optim.qk_clip; either optimizer). 0 = off
    qk_clip: NonNegativeFloat = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    name: Schedule = "wsd"
    warmup_steps: Steps = 0
    decay_steps: Steps = 0  # WSD decay length, ending at train.steps; 0 = a pure stable run
    decay_shape: DecayShape = "linear"
    final_ratio: Fraction = 0.0  # learning rate at the last step over the peak


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: Steps = 0  # 0 = only at the end
    keep_last: PositiveInt = 2
    keep_steps: tuple[int, ...] = ()  # steps never deleted (for example branch points)


@dataclass(frozen=True)
class BranchConfig:
    """The branch plan a stable WSD run declares: its checkpoints at these points are kept,
    and `lab branch RUN_DIR` without --at runs every (point, decay) pair."""

    at_steps: tuple[PositiveInt, ...] = ()
    at_tokens: tuple[PositiveInt, ...] = ()  # converted to the nearest step
    at_tokens_per_param: tuple[PositiveFloat, ...] = ()  # tokens / total parameters, e.g. 20
    decay_steps: tuple[PositiveInt, ...] = ()
    decay_fractions: tuple[PositiveFloat, ...] = ()  # a decay of this fraction of the branch step
    shape: Literal["", DecayShape] = ""  # decay shape of the branches; "" = schedule.decay_shape
    final_ratio: Annotated[float, Range(0, 1, also=-1, note="use schedule.final_ratio")] = -1.0


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)


# ----------------------------------------------------------------------------- reading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        # A run's saved config may be on gs://.
        path = str(path) if paths.is_remote(path) else Path(path)
        raw = read_yaml(path, "config file") or {}
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must be a mapping of sections such as "
                            "'train:' and 'model:'")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config = from_dict(Config, raw, prefix="")  # each key against its type, as it is read
    _check_relations(config)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """`train.steps=200` -> ("train.steps", 200); values are parsed as YAML scalars."""
    if "=" not in item:
        raise UserError(f"override {shown(item)} is not of the form key=value, "
                        "e.g. train.steps=200")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise UserError(f"override {shown(item)} needs a dotted key such as train.steps=200")
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
            raise UserError(f"config key {shown(key)}: {shown(part)} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_keys() -> list[tuple[str, str, str]]:
    """(key, type, default) of every config key, read from the schema, for `lab train --help`;
    a nested section's keys are dotted further (model.moe.experts)."""
    return schema_keys(Config, word=override_word)


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


def validate(config: Config) -> None:
    """Every rule, for a config made in code (dataclasses.replace skips the reading): each key
    against its type, then the rules between keys. The devices are checked by the mesh."""
    from_dict(Config, to_dict(config), prefix="")
    _check_relations(config)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_relations(config: Config) -> None:
    """The rules that relate several keys (or several items of one); a single key's rule is
    in its type."""
    m, t, s, r = config.model, config.train, config.schedule, config.run
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}); "
             "change one of them")
    _require(m.head_dim % 2 == 0, f"model.d_model / model.n_heads = {m.head_dim} must be even "
             "for rotary embeddings; change model.d_model or model.n_heads")
    _require(m.n_heads % m.kv_heads == 0,
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    _require(m.attention != "splash" or t.seq_len % 128 == 0,
             f"model.attention=splash needs train.seq_len divisible by 128, got {t.seq_len}; "
             "change train.seq_len or set model.attention=xla")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum "
             f"({t.grad_accum})")
    _require(s.warmup_steps + s.decay_steps <= t.steps,
             f"schedule.warmup_steps + schedule.decay_steps ({s.warmup_steps} + "
             f"{s.decay_steps}) must not exceed train.steps ({t.steps})")
    mesh = config.mesh
    _require([mesh.data, mesh.fsdp, mesh.expert, mesh.tensor].count(-1) <= 1,
             "only one of mesh.data, mesh.fsdp, mesh.expert, mesh.tensor may be -1")
    _check_moe(m.moe, mesh)
    _check_tasks(config.eval, t)
    _require(not r.predicted_interval or (len(r.predicted_interval) == 2
                                          and r.predicted_interval[0] <= r.predicted_interval[1]),
             "run.predicted_interval must be [lo, hi] with lo <= hi, or empty")


def _check_tasks(e: EvalConfig, t: TrainConfig) -> None:
    """Each task at most once; its examples no longer than a training window, so the model is
    scored at positions it was trained on."""
    names = [parse_task(item)[0] for item in e.tasks]
    for name in names:
        _require(names.count(name) == 1, f"eval.tasks lists {name} twice; give each task once")
        context, length = (e.choice_context, e.choice_length) if name == "choice" else \
            (e.exact_context, e.exact_length)
        _require(context + length <= t.seq_len + 1,
                 f"eval.{name}_context + eval.{name}_length ({context} + {length}) must not "
                 f"exceed train.seq_len + 1 ({t.seq_len + 1}); shorten the task or lengthen "
                 "the window")


def _check_moe(moe: MoeConfig, mesh: MeshConfig) -> None:
    if not moe.experts:
        _require(mesh.expert == 1,
                 f"mesh.expert={mesh.expert} splits experts, but model.moe.experts is 0 (a "
                 "dense MLP); set model.moe.experts or mesh.expert=1")
        return
    _require(moe.top_k <= moe.experts,
             f"model.moe.top_k ({moe.top_k}) must not exceed model.moe.experts "
             f"({moe.experts}); lower top_k or add experts")
    _require(mesh.expert == -1 or moe.experts % mesh.expert == 0,
             f"model.moe.experts ({moe.experts}) must divide by mesh.expert ({mesh.expert}), "
             "which splits them over devices; change one of them")


# ----------------------------------------------------------------------------- typed changes


def override(config: Config, values: dict[str, Any]) -> Config:
    """A copy with dotted keys set, e.g. override(cfg, {"optim.lr": 1e-3}): each value is
    checked against its field's type as if read from YAML, and the result is validated. How
    sweeps and studies derive their runs' configs from a base."""
    raw: dict[str, Any] = {}
    for key, value in values.items():
        if "." not in key:
            raise UserError(f"config key {shown(key)} must be section.key, such as train.steps")
        set_dotted(raw, key, value)
    typed = from_dict(Config, raw, prefix="")
    result = _merge(config, typed, raw)
    validate(result)
    return result


def _merge(base: Any, typed: Any, raw: dict) -> Any:
    """`base` with the fields named in `raw` taken from `typed` (nested sections merged)."""
    changes = {}
    for name, value in raw.items():
        new = getattr(typed, name)
        if dataclasses.is_dataclass(new) and isinstance(value, dict):
            new = _merge(getattr(base, name), new, value)
        changes[name] = new
    return dataclasses.replace(base, **changes)


def overrides_between(base: Config, config: Config) -> list[str]:
    """The `key=value` words that turn `base` into `config`, in schema order:
    load_config(base_file, words) gives `config` back. A sweep's runs are Config objects;
    these words are how they are shown and handed to a `lab train` process."""
    return _words(base, config, "")


def _words(old: Any, new: Any, prefix: str) -> list[str]:
    words = []
    for f in dataclasses.fields(new):
        before, value = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(value):
            words += _words(before, value, f"{prefix}{f.name}.")
        elif before != value:
            words.append(f"{prefix}{f.name}={override_word(value)}")
    return words


def value_of(config: Config, key: str) -> Any:
    """The value of a dotted key, value_of(cfg, "train.steps")."""
    value = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


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
