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
from lab.metrics import read_metrics

SHORT = ["train.steps=24", "train.log_every=4", "train.eval_every=12", "train.eval_batches=2",
         "schedule.warmup_steps=4", "schedule.decay_steps=8", "model.n_layers=2"]


def test_sharded_run_matches_single_device(tmp_path, small_data):
    common = [str(TINY), f"data.path={small_data}", *SHORT]
    run_lab(["train", *common, f"run.dir={tmp_path / 'one'}", "mesh.fsdp=1"], devices=1)
    run_lab(["train", *common, f"run.dir={tmp_path / 'eight'}", "mesh.fsdp=4", "mesh.tensor=2"],
            devices=8)
    one, eight = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
    assert [m["step"] for m in one] == [4, 8, 12, 16, 20, 24] == [m["step"] for m in eight]
    for a, b in zip(one, eight, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-4, (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
    assert_params_close(checkpoint_params(tmp_path / "one", 24),
                        checkpoint_params(tmp_path / "eight", 24), rtol=1e-3, atol=1e-4)
    assert one[-1]["loss"] < one[0]["loss"] - 0.3  # it learns
    assert [m["step"] for m in one if "eval_loss" in m] == [12, 24]

    run = tmp_path / "eight"
    assert load_config(run / "config.yaml").mesh.tensor == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    for key in ("params", "non_embedding_params", "tokens", "flops", "final_eval_loss"):
        assert key in summary
    assert summary["tokens"] == 24 * 16 * 128 == eight[-1]["tokens"]
    assert summary["flops"] == summary["flops_per_token"] * summary["tokens"]
    assert summary["final_eval_loss"] == pytest.approx(eight[-1]["eval_loss"])
    assert any((run / "tb").iterdir())

    again = run_lab(["train", *common, f"run.dir={run}"], devices=8)
    assert "already finished" in again.stdout
    assert len(read_metrics(run)) == len(eight)


def test_muon_run_split_over_data_replicas_matches_single_device(tmp_path, small_data):
    """Muon under data x fsdp x tensor = 2 x 2 x 2 deals its Newton-Schulz out among the four
    data x fsdp devices (lab.muon.split_newton_schulz); the run's losses equal one device's."""
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


def test_grad_accumulation_equals_one_batch(small_data, tmp_path):
    from lab import data as labdata
    from lab.model import with_vocab
    from lab.sharding import global_batch, make_mesh
    from lab.train import build_trainer

    losses, grad_norms, params = {}, {}, {}
    for accum in (1, 4):
        cfg = load_config(TINY, [f"data.path={small_data}", "model.n_layers=1",
                                 f"train.grad_accum={accum}", "mesh.fsdp=2", "mesh.data=2",
                                 "mesh.tensor=2", "optim.lr=1e-2"])
        dataset = labdata.open_dataset(small_data)
        cfg = cfg.__class__(**{**cfg.__dict__, "model": with_vocab(cfg.model, dataset.vocab_size)})
        mesh = make_mesh(cfg.mesh)
        trainer = build_trainer(cfg, mesh)
        state = trainer.init_state()
        stream = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, 0)
        losses[accum], grad_norms[accum] = [], []
        with jax.set_mesh(mesh):
            for step in range(3):
                state, metrics = trainer.train_step(state, global_batch(stream.batch(step), mesh))
                losses[accum].append(float(metrics["loss"]))
                grad_norms[accum].append(float(metrics["grad_norm"]))
        params[accum] = flat_params(jax.device_get(state["params"]))
    np.testing.assert_allclose(losses[1], losses[4], rtol=2e-5)
    # The accumulated gradient is the mean over micro-batches, not their sum (4x).
    np.testing.assert_allclose(grad_norms[1], grad_norms[4], rtol=1e-4)
    assert_params_close(params[1], params[4], rtol=1e-4, atol=1e-6)
