"""The config engine (lab/schema.py) on a schema of its own, and the sweep-file and study-file
schemas built on it: their keys in `lab sweep --help` and `lab demo --help`."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import typing
from typing import Annotated, Any, Literal

import pytest

from lab.errors import UserError
from lab.schema import NonEmpty, Range, Words, from_dict, read_file, schema_keys

WORDS = Words(noun="key", top="the toy file")


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: Annotated[int, Range(1)]  # required
    shape: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class Toy:
    name: Annotated[str, NonEmpty("name it")]
    sizes: tuple[Annotated[float, Range(0, lo_open=True)] | dict[str, Any], ...] = ()
    rates: dict[str, Annotated[float, Range(0, 1)]] = dataclasses.field(default_factory=dict)
    share: Annotated[float, Range(0, 1)] | None = None
    inner: Inner | None = None


def read(raw: dict) -> Toy:
    return read_file(Toy, raw, "toy.yaml", WORDS)


def test_a_schema_reads_unions_mappings_optional_sections_and_defaults():
    toy = read({"name": "x", "sizes": [1, "2e3", {"d_model": 8}], "rates": {"adamw": 0.5},
                "inner": {"steps": 3}})
    assert toy == Toy("x", (1.0, 2000.0, {"d_model": 8}), {"adamw": 0.5}, None, Inner(3, "a"))
    assert isinstance(toy.sizes[0], float)  # the first type of the union that fits
    assert read({"name": "x", "sizes": 5, "inner": None}) == Toy("x", (5.0,))  # one item


@pytest.mark.parametrize("raw, message", [
    ({}, "toy.yaml: the toy file needs 'name' (str non-empty)"),
    ({"name": ""}, "toy.yaml: name must not be empty: name it"),
    ({"name": "x", "sizes": [0]}, "toy.yaml: sizes[0] must be a positive number, got 0.0"),
    ({"name": "x", "sizes": ["big"]},
     "toy.yaml: key sizes[0] must be float > 0 or mapping, got 'big'"),
    ({"name": "x", "rates": {"adamw": 2}}, "toy.yaml: rates.adamw must be a number in [0, 1]"),
    ({"name": "x", "rates": [1]}, "toy.yaml: key rates must be a mapping of key: value"),
    ({"name": "x", "share": "half"}, "toy.yaml: key share must be a number in [0, 1], got 'half'"),
    ({"name": "x", "inner": {}}, "toy.yaml: inner needs 'inner.steps' (int >= 1)"),
    ({"name": "x", "inner": {"steps": 1, "shape": "c"}},
     "toy.yaml: inner.shape must be one of a, b, got 'c'"),
    ({"name": "x", "inner": {"step": 1}},
     "toy.yaml: unknown key 'inner.step' (did you mean inner.steps?); known keys in inner: "
     "steps, shape"),
    ({"name": "x", "colour": 1}, "toy.yaml: unknown key 'colour'; known keys in the toy file:"),
])
def test_each_mistake_is_one_line_naming_the_key(raw, message):
    with pytest.raises(UserError) as e:
        read(raw)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_the_keys_listing_comes_from_the_types():
    assert schema_keys(Toy) == [
        ("name", "str non-empty", "required"),
        ("sizes", "list[float > 0 | mapping]", "()"),
        ("rates", "mapping of float in [0, 1]", "{}"),
        ("share", "float in [0, 1]", "unset"),
        ("inner.steps", "int >= 1", "required"),
        ("inner.shape", "a|b", "a")]


def test_run_configs_keep_their_wording():
    """The config's own words: 'config key', 'the config'."""
    with pytest.raises(UserError, match=r"^unknown config key 'colour'; known keys in the config"):
        from_dict(Toy, {"colour": 1})
    with pytest.raises(UserError, match=r"^config key share must be a number in \[0, 1\]"):
        from_dict(Toy, {"name": "x", "share": "half"})


def help_text(command: str) -> str:
    from lab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command, schema_name", [("sweep", "SweepFile"), ("demo", "StudyFile")])
def test_sweep_and_demo_help_list_their_file_keys(command, schema_name):
    import lab.studies.demo
    import lab.studies.sweep

    schema = getattr(lab.studies.sweep if command == "sweep" else lab.studies.demo, schema_name)
    text = help_text(command)
    rows = schema_keys(schema)
    assert len(rows) >= 10
    for key, kind, _ in rows:
        assert any(line.split()[:1] == [key] and kind in line for line in text.splitlines()), key
    assert "required" in text


def test_the_sweep_files_params_are_the_run_directory_s():
    from lab.run.rundir import PARAM_KEYS
    from lab.studies.sweep import ParamKey

    assert typing.get_args(ParamKey) == tuple(PARAM_KEYS)


def test_the_sweep_files_shape_defaults_are_the_shape_rule_s():
    import inspect

    from lab.model.shapes import shape_for_params
    from lab.studies.sweep import ShapeKeys

    rule = inspect.signature(shape_for_params).parameters
    for f in dataclasses.fields(ShapeKeys):
        if f.name != "tensor":  # unset: the config's mesh.tensor
            assert f.default == rule[f.name].default, f.name
