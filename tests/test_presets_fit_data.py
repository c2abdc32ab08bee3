"""Every preset that trains on the default corpus (the stdlib, data.path unset) evaluates on no
more windows than that corpus's validation split holds, with room to spare.

The split is a hashed 1% of the stdlib's files, so its size differs between Python versions:
212 windows of 1025 tokens on Python 3.11 and 155 on Python 3.12 (where configs/gpu/debug.yaml,
then asking for 256, stopped with 'evaluation needs ... windows'). So a preset may ask for at
most two thirds of what this interpreter's split holds."""

from __future__ import annotations

import math

import pytest

from lab import presets
from lab.config import Config, load_config
from lab.data import default_data_path, eval_batches, open_dataset
from lab.studies.sweep import expand_sweep

MARGIN = 1.5


def _configs() -> dict[str, list[Config]]:
    """Each preset's run configs (a sweep's every run) that use the default corpus."""
    found = {}
    for name in presets.names():
        path = presets.find(name)
        if name.startswith("sweeps/"):
            configs = [run.config for run in expand_sweep(path).runs]
        elif name in ("demo", "demo-quick"):  # studies: their runs use demo-base's settings
            continue
        else:
            configs = [load_config(str(path))]
        configs = [cfg for cfg in configs if not cfg.data.path]
        if configs:
            found[name] = configs
    return found


CONFIGS = _configs()


def test_the_default_corpus_presets_are_found():
    assert {"tiny", "gpu/debug", "demo-base", "sweeps/isoflop-tiny"} <= set(CONFIGS)


@pytest.fixture(scope="module")
def default_corpus():
    return open_dataset(default_data_path())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eval_fits_the_default_corpus_with_room(name, default_corpus):
    """The pipeline's own evaluation set, asked for MARGIN times the batches, must be there
    (eval_batches raises the run's 'evaluation needs ... windows' error otherwise)."""
    for cfg in CONFIGS[name]:
        with_room = math.ceil(cfg.train.eval_batches * MARGIN)
        eval_batches(default_corpus, cfg.train.seq_len, cfg.train.batch_size, with_room)
