"""Typed changes to a config (lab.config.override) and the key=value words that reproduce a
changed config from its file (overrides_between): how sweeps and studies build their runs."""

import pytest

from lab.config import load_config, override, overrides_between
from lab.errors import UserError

TINY = "configs/tiny.yaml"


def test_override_coerces_like_the_yaml_reader_and_keeps_the_rest():
    base = load_config(TINY)
    cfg = override(base, {"optim.lr": "1e-3", "train.steps": 70, "branch.at_steps": 5,
                          "schedule.decay_steps": 0})
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 70 and cfg.branch.at_steps == (5,)
    assert cfg.model == base.model and cfg.optim.b2 == base.optim.b2
    assert base.train.steps != 70  # the base is untouched (frozen)


@pytest.mark.parametrize("values, message", [
    ({"optim.lr": "fast"}, "optim.lr must be"),
    ({"optim.colour": 1}, "unknown config key 'optim.colour'"),
    ({"colour.x": 1}, "unknown config key 'colour'"),
    ({"steps": 3}, "must be section.key"),
    ({"model.d_model": 100, "model.n_heads": 3}, "divisible by model.n_heads"),  # validated
])
def test_override_refuses_what_the_reader_refuses(values, message):
    with pytest.raises(UserError, match=message):
        override(load_config(TINY), values)


def test_the_words_between_two_configs_give_the_second_back():
    base = load_config(TINY)
    tricky = {"run.name": "1e-3", "run.dir": "a b: #c'd", "optim.lr": 1e-05,
              "optim.eps": 1e20, "data.path": "yes", "model.qk_norm": True,
              "branch.decay_fractions": [0.25, 1e-07], "checkpoint.keep_steps": [3, 9],
              "schedule.decay_steps": 0, "train.steps": 40}
    cfg = override(base, tricky)
    words = overrides_between(base, cfg)
    assert load_config(TINY, words) == cfg
    assert {w.split("=", 1)[0] for w in words} == set(tricky)  # each differs from tiny.yaml
    assert overrides_between(cfg, cfg) == []
