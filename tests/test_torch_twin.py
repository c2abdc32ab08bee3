"""The PyTorch twin of the benchmark model (benchmarks/torch_twin.py) has the lab's shapes, so
benchmarks.against_torch compares the same work. torch is the optional `bench` extra: without
it these skip, saying so."""

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the `bench` extra)")


def _lab_shapes() -> list[tuple[int, ...]]:
    """Every parameter's shape in the lab's benchmark model, one per layer for the blocks."""
    import jax
    from flax import nnx

    from benchmarks.bench_train import bench_config
    from lab.model.transformer import Transformer

    cfg = bench_config().model
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), "cpu"))
    shapes = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        if "blocks" in jax.tree_util.keystr(path):  # scanned: a leading layer axis
            shapes += [tuple(leaf.shape[1:])] * cfg.n_layers
        else:
            shapes.append(tuple(leaf.shape))
    return shapes


def test_the_twin_has_the_lab_models_parameters():
    from benchmarks.torch_twin import build

    model, _ = build()
    # torch's Linear stores (out, in); the lab's matrices are (in, out).
    twin = [tuple(p.shape) if p.ndim != 2 or p is model.embed.weight else tuple(p.shape)[::-1]
            for p in model.parameters()]
    assert sorted(twin) == sorted(_lab_shapes())


def test_the_twin_is_causal():
    from benchmarks.torch_twin import SEQ, build

    model, _ = build()
    tokens = torch.randint(0, 256, (1, SEQ))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[0, :-1], b[0, :-1]) and not torch.equal(a[0, -1], b[0, -1])
