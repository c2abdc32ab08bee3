"""The train loop through the real command: sharded equals unsharded, the loss falls, the run
directory holds what the contract says; gradient accumulation equals one big batch.

Equal runs are compared on the loss, the gradient norm and the parameters after the last step:
with global-norm clipping, AdamW or Muon, a gradient off by a constant factor leaves the
parameters unchanged, so the loss alone would not catch it, and the grad norm would."""

import json

import jax
import numpy as np
import pytest

from helpers import TINY, assert_params_close, checkpoint_params, flat_params, run_lab
from lab.config import load_config
from lab.run.metrics import read_metrics

SHORT = ["train.steps=24", "train.log_every=4", "train.eval_every=12", "train.eval_batches=2",
         "schedule.warmup_steps=4", "schedule.decay_steps=8", "model.n_layers=2"]


def test_sharded_run_matches_single_device(tmp_path, small_data):
    common = [str(TINY), f"data.path={small_data}", *SHORT, "eval.tasks=[choice:16,exact:16]"]
    run_lab(["train", *common, f"run.dir={tmp_path / 'one'}", "mesh.fsdp=1"], devices=1)
    told = run_lab(["train", *common, f"run.dir={tmp_path / 'eight'}", "mesh.fsdp=4",
                    "mesh.tensor=2"], devices=8).stdout
    one, eight = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
    assert [m["step"] for m in one] == [4, 8, 12, 16, 20, 24] == [m["step"] for m in eight]
    assert f"choice accuracy {eight[-1]['task/choice/accuracy']:.3f}" in told
    for a, b in zip(one, eight, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-4, (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
        for key in [k for k in a if k.startswith("task/")]:  # scored on 1 and on 8 devices
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (key, a, b)
    assert_params_close(checkpoint_params(tmp_path / "one", 24),
                        checkpoint_params(tmp_path / "eight", 24), rtol=1e-3, atol=1e-4)
    assert one[-1]["loss"] < one[0]["loss"] - 0.3  # it learns
    assert [m["step"] for m in one if "eval_loss" in m] == [12, 24]
    tasks = [f"task/{name}/{what}" for name in ("choice", "exact") for what in ("accuracy", "loss")]
    assert [m["step"] for m in one if set(tasks) <= m.keys()] == [12, 24]

    run = tmp_path / "eight"
    assert load_config(run / "config.yaml").mesh.tensor == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    for key in ("params", "non_embedding_params", "tokens", "flops", "final_eval_loss"):
        assert key in summary
    assert summary["tokens"] == 24 * 16 * 128 == eight[-1]["tokens"]
    assert summary["flops"] == summary["flops_per_token"] * summary["tokens"]
    assert summary["final_eval_loss"] == pytest.approx(eight[-1]["eval_loss"])
    for key in tasks:  # the final values, by the metrics' names
        assert summary[key] == eight[-1][key]
    assert summary["task/choice/chance"] == 0.25 and summary["task/exact/examples"] == 16
    assert 0 <= summary["task/choice/accuracy"] <= 1 and summary["task/choice/loss"] > 0
    assert any((run / "tb").iterdir())

    again = run_lab(["train", *common, f"run.dir={run}"], devices=8)
    assert "already finished" in again.stdout
    assert len(read_metrics(run)) == len(eight)


@pytest.mark.slow
def test_muon_run_split_over_data_replicas_matches_single_device(tmp_path, small_data):
    """Muon under data x fsdp x tensor = 2 x 2 x 2 deals its Newton-Schulz out among the four
    data x fsdp devices (lab.optim.muon.split_newton_schulz); the run's losses equal one
    device's."""
    common = [str(TINY), f"data.path={small_data}", *SHORT, "optim.name=muon", "optim.lr=1e-2",
              "train.eval_every=0", "checkpoint.every_steps=24"]
    run_lab(["train", *common, f"run.dir={tmp_path / 'one'}", "mesh.fsdp=1"], devices=1)
    run_lab(["train", *common, f"run.dir={tmp_path / 'eight'}", "mesh.data=2", "mesh.fsdp=2",
             "mesh.tensor=2"], devices=8)
    one, eight = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
    assert len(one) == len(eight) == 6
    for a, b in zip(one, eight, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-4, (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (a, b)
    assert_params_close(checkpoint_params(tmp_path / "one", 24),
                        checkpoint_params(tmp_path / "eight", 24), rtol=1e-3, atol=1e-4)
    assert one[-1]["loss"] < one[0]["loss"] - 0.3


def _accumulated_steps(small_data, accum: int, optimizer: str, devices: int, steps: int = 3):
    """`steps` optimizer steps of the tiny config (1 layer) on batches of 16 sequences, each
    accumulated over `accum` micro-batches, on 1 device or on a data x fsdp x tensor = 2 x 2 x 2
    mesh: the per-step losses and gradient norms, and the parameters after the last step."""
    from lab import data as labdata
    from lab.accel.sharding import global_batch, make_mesh
    from lab.model.accounting import with_vocab
    from lab.train import build_trainer

    mesh_keys = ["mesh.fsdp=2", "mesh.data=2", "mesh.tensor=2"] if devices == 8 else \
        ["mesh.fsdp=1"]
    cfg = load_config(TINY, [f"data.path={small_data}", "model.n_layers=1",
                             f"train.grad_accum={accum}", *mesh_keys, "optim.lr=1e-2",
                             f"optim.name={optimizer}"])
    dataset = labdata.open_dataset(small_data)
    cfg = cfg.__class__(**{**cfg.__dict__, "model": with_vocab(cfg.model, dataset.vocab_size)})
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
    trainer = build_trainer(cfg, mesh)
    state = trainer.init_state()
    stream = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, 0)
    losses, grad_norms = [], []
    with jax.set_mesh(mesh):
        for step in range(steps):
            state, metrics = trainer.train_step(state, global_batch(stream.batch(step), mesh))
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    return losses, grad_norms, flat_params(jax.device_get(state["params"]))


# Muon on the 8-device mesh is the slowest case (22 s on CI's 2 cores): in the slow selection.
@pytest.mark.parametrize("optimizer,devices", [("adamw", 8),
                                               pytest.param("muon", 8, marks=pytest.mark.slow),
                                               ("muon", 1), ("adamw", 1)])
def test_grad_accumulation_equals_one_batch(small_data, optimizer, devices):
    """4 micro-batches of 4 give the step one batch of 16 gives. Only float32 summation order
    differs (a mean of 4 means of 4 x 128 token losses against one mean of 2048, the gradient
    sums likewise). Measured on one device after three steps: losses and gradient norms within
    1.1e-7 relative, parameters within 7.5e-7 (AdamW) and 1.2e-7 (Muon) absolute; the bounds
    leave a margin, while a wrong accumulation (a sum instead of a mean: 4x the gradient norm;
    a micro-batch dropped: another loss) is off by far more."""
    one = _accumulated_steps(small_data, 1, optimizer, devices)
    four = _accumulated_steps(small_data, 4, optimizer, devices)
    np.testing.assert_allclose(one[0], four[0], rtol=2e-5)
    # The accumulated gradient is the mean over micro-batches, not their sum (4x).
    np.testing.assert_allclose(one[1], four[1], rtol=1e-4)
    assert_params_close(one[2], four[2], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the loop, in-process
# run_loop with a scripted step (its loss is a table indexed by the step) and a fake clock that
# advances 1 s per training step (when the loop waits for the step's metrics, as it waits for the
# device), 30 s for the compilation and 50 s per evaluation batch: the time accounting is then
# exact, whatever the machine's speed.


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """The pieces of a Trainer that run_loop uses, around a jitted step with a loss table."""

    def __init__(self, losses, clock, mesh):
        import jax.numpy as jnp

        table = jnp.asarray(losses, jnp.float32)

        def step(state, tokens):
            loss = table[state["step"]]
            metrics = {"loss": loss, "lr": jnp.float32(1e-3), "grad_norm": jnp.float32(1.0),
                       "update_norm": jnp.float32(0.1), "param_norm": state["params"]}
            return {"params": state["params"] + 1.0, "step": state["step"] + 1}, metrics

        self.jitted, self.clock, self.mesh = jax.jit(step), clock, mesh
        self.train_step = self  # .lower(...).compile() gives the jitted step

    def lower(self, *args):
        self.clock.now += 30.0
        return self

    def compile(self):
        return self.jitted

    def eval_step(self, params, tokens):
        self.clock.now += 50.0
        return np.float32(2.0)


def scripted_loop(tmp_path, monkeypatch, losses, overrides=(), stop_after=None,
                  eval_batches=3, register=None):
    """run_loop on the scripted step; `register(loop)` adds hooks to the Loop first."""
    from lab.accel.sharding import make_mesh
    from lab.config import load_config
    from lab.run.metrics import MetricsLogger
    from lab.run.preemption import PREEMPTION, caught
    from lab.train import Progress
    from lab.train.loop import Loop

    cfg = load_config(TINY, ["train.steps=12", "train.log_every=1", "train.eval_every=4",
                             "schedule.warmup_steps=0", "schedule.decay_steps=0",
                             "checkpoint.every_steps=0", *overrides])
    mesh = make_mesh(cfg.mesh)
    clock = FakeClock()
    trainer = Scripted(losses, clock, mesh)
    shape = (cfg.train.batch_size, cfg.train.seq_len + 1)

    def batches():
        for i in range(cfg.train.steps):
            if stop_after is not None and i == stop_after:
                PREEMPTION.requested = True  # SIGTERM while step `stop_after` runs
            yield np.zeros(shape, np.int32)

    device_get = jax.device_get

    def waiting_device_get(tree):
        if isinstance(tree, dict) and "loss" in tree:
            clock.now += 1.0  # the step's time on the device, waited for here
        return device_get(tree)

    monkeypatch.setattr(jax, "device_get", waiting_device_get)

    state = {"params": jax.numpy.zeros(()), "step": jax.numpy.zeros((), jax.numpy.int32)}
    logger = MetricsLogger(tmp_path)
    loop = Loop(cfg, trainer, state, batches(), [None] * eval_batches, logger, None,
                peak_flops=0.0, flops_per_tok=1, keep_steps=(),
                progress=Progress(cfg.train.steps, enabled=False), profiler=None,
                last_checkpoint=None, clock=clock)
    if register is not None:
        register(loop)
    with caught():
        result = loop.run()
    logger.close()
    return result, read_metrics(tmp_path)


def test_evaluation_and_compilation_are_not_training_time(tmp_path, monkeypatch):
    losses = np.linspace(5.0, 3.0, 12)
    result, records = scripted_loop(tmp_path, monkeypatch, losses)
    assert result.status == "finished"
    assert result.train_seconds == 12.0  # one fake second a step, nothing else
    assert result.compile_seconds == 30.0
    assert result.eval_seconds == 3 * 3 * 50.0  # evaluations at 4, 8 and 12, three batches each
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 12]
    tokens_per_step = 16 * 128
    for r in records:  # eval steps and the first (compiling) step included
        assert r["tokens_per_second"] == tokens_per_step, r
        assert r["loss"] == pytest.approx(losses[r["step"] - 1])
        assert "ce" not in r  # no z-loss: ce would repeat the loss


class Recorder:
    """A hook that keeps, in its own lists, the steps it ran at, the loss it saw and the
    parameters of the state it was given (the scripted step adds 1 to them every step)."""

    def __init__(self, needs_state=False):
        self.needs_state = needs_state
        self.steps, self.losses, self.params = [], [], []

    def __call__(self, info):
        self.steps.append(info.step)
        self.losses.append(info.values.get("loss"))
        self.params.append(float(info.state["params"]))

    def report(self, result):
        pass


def test_a_registered_hook_runs_at_its_steps_with_its_own_state(tmp_path, monkeypatch):
    from lab.train import Hook

    class Counted(Hook):  # a hook whose report adds what it counted to the result
        def __init__(self):
            self.calls = 0

        def __call__(self, info):
            self.calls += 1

        def report(self, result):
            result.message = f"{self.calls} calls"

    losses = np.linspace(5.0, 3.0, 12)
    every3, fives, before, current, counted = (Recorder(), Recorder(), Recorder(),
                                               Recorder(needs_state=True), Counted())

    def register(loop):
        assert loop.add_hook(every3, every=3) is every3
        loop.add_hook(fives, every=5, at={7})
        loop.add_hook(before, every=4, when="before_batch")
        loop.add_hook(current, every=6)
        loop.add_hook(counted, every=2)

    (tmp_path / "plain").mkdir()
    (tmp_path / "hooked").mkdir()
    plain, plain_records = scripted_loop(tmp_path / "plain", monkeypatch, losses)
    result, records = scripted_loop(tmp_path / "hooked", monkeypatch, losses, register=register)
    assert every3.steps == [3, 6, 9, 12] and fives.steps == [5, 7, 10]
    assert every3.losses == pytest.approx([losses[s - 1] for s in every3.steps])
    assert fives.losses == pytest.approx([losses[s - 1] for s in fives.steps])
    assert before.steps == [0, 4, 8] and before.losses == [None] * 3  # before the step: no metrics
    # A hook that reads the state gets the state of its own step (and the metrics of that step
    # are fetched at once). One that reads only metrics runs when they arrive: a step late, with
    # the newer state, unless a hook that reads the state is due at its step (6: `current`;
    # 12: the evaluation).
    assert current.params == [6.0, 12.0]
    assert every3.params == [4.0, 6.0, 10.0, 12.0]
    # Each hook's state is its own: the recorders' lists are separate, and hooks that report
    # nothing leave the result and the records as they are without them.
    assert len({id(h.steps) for h in (every3, fives, before, current)}) == 4
    assert result.message == "6 calls" and plain.message == ""
    assert (result.eval_loss, result.eval_seconds, result.step) == (
        plain.eval_loss, plain.eval_seconds, plain.step)
    assert records == plain_records


def test_sigterm_logs_the_pending_step(tmp_path, monkeypatch):
    result, records = scripted_loop(tmp_path, monkeypatch, np.linspace(5.0, 3.0, 12),
                                    stop_after=6)
    assert result.status == "preempted"
    # The flag is set while step 7's batch is read; step 7 runs, and its metrics, still pending
    # when the flag is seen, are logged before the run stops.
    assert result.step == 7
    assert [r["step"] for r in records] == list(range(1, 8))


def test_a_loss_spike_stops_the_run(tmp_path, monkeypatch):
    losses = np.full(12, 3.0)
    losses[:10] = np.linspace(3.5, 3.0, 10)
    losses[10] = 7.0  # step 11: over twice the recent median, yet finite
    result, records = scripted_loop(tmp_path, monkeypatch, losses)
    assert result.status == "diverged" and result.step == 10
    assert "the loss jumped to 7 at step 11, over 2 times the median 3.25" in result.message
    assert "no checkpoint was saved" in result.message
    assert records[-1]["step"] == 11 and records[-1]["loss"] == 7.0


def test_spike_watch_leaves_ordinary_losses_alone():
    from lab.train import SpikeWatch

    watch = SpikeWatch(2.0, 50)
    rng = np.random.default_rng(0)
    falling = 5.6 * np.exp(-np.arange(500) / 80) + 1.5 + rng.normal(0, 0.05, 500)  # + noise
    assert all(watch.spike(float(x)) is None for x in falling)
    assert watch.spike(2 * 1.5 * 1.2) is not None
    assert SpikeWatch(0.0, 50).spike(1e9) is None  # 0 turns it off


def test_progress_is_live_on_a_terminal_and_plain_otherwise():
    import io

    from lab.train import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    metrics = {"loss": 3.0, "lr": 1e-3, "tokens_per_second": 5000.0, "mfu": 0.25}
    plain, live = io.StringIO(), Terminal()
    for stream in (plain, live):
        progress = Progress(100, enabled=True, stream=stream)
        progress.compiling()
        progress.compiled(12.5)
        progress.show(10, dict(metrics), 2.0)
        progress.show(20, {**metrics, "loss": 1.0, "eval_loss": 1.1}, 2.0)
        progress.close()
    lines = plain.getvalue().splitlines()
    assert lines[0] == "compiling the training step… 12.5 s"
    assert lines[1].startswith("step     10/100 | loss 3.0000") and "ETA 0:03:00" in lines[1]
    assert "eval 1.1000" in lines[2] and "ETA 0:02:40" in lines[2]
    shown = live.getvalue()
    assert "\r" in shown and "loss 2.8000" in shown  # smoothed: 0.9 * 3 + 0.1 * 1
    assert "5,000 tok/s | MFU 25.0% | ETA 0:02:40" in shown
    assert "eval 1.1000" in shown


def test_metrics_fetcher_hands_each_step_back_one_step_late():
    import jax.numpy as jnp

    from lab.train import MetricsFetcher

    fetcher = MetricsFetcher()
    assert fetcher.fetch() is None
    assert fetcher.push(1, {"loss": jnp.float32(3.0), "grad_norm": jnp.float32(1.5)}) is None
    late = fetcher.push(2, {"loss": jnp.float32(2.5), "grad_norm": jnp.float32(0.5)})
    assert late.step == 1 and late.values == {"loss": 3.0, "grad_norm": 1.5}
    assert all(type(v) is float for v in late.values.values())  # on the host
    last = fetcher.fetch()
    assert last.step == 2 and last.values == {"loss": 2.5, "grad_norm": 0.5}
    assert fetcher.fetch() is None


def test_running_out_of_device_memory_is_one_line_and_loses_nothing(tmp_path, small_data,
                                                                   monkeypatch, capsys):
    """Where the estimate lets a run start but the device's memory does not hold the step (the
    compiler or the runtime reports RESOURCE_EXHAUSTED), `lab train` exits 2 with one line
    saying so and what to change, and the run directory is left as it was: the same command
    trains it once memory allows (here: once the fault is gone)."""
    from lab.cli import main
    from lab.train.loop import Loop

    args = ["train", str(TINY), f"run.dir={tmp_path / 'run'}", f"data.path={small_data}",
            "train.steps=4", "train.log_every=2", "train.eval_every=0", "train.eval_batches=1",
            "schedule.warmup_steps=1", "schedule.decay_steps=1", "model.n_layers=1",
            "checkpoint.every_steps=2"]

    def exhausted(self, tokens, jitted):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.31GiB.")

    with monkeypatch.context() as patch:
        patch.setattr(Loop, "compile", exhausted)
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: the train step ran out of device memory")
    assert "lower train.batch_size or raise train.grad_accum" in err
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4]
