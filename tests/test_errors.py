"""How an error message quotes a value (lab.errors.shown): short values whole, long ones cut
to a prefix with their type and length, in bounded time whatever their nesting."""

from __future__ import annotations

import time

import pytest
import yaml

from lab.errors import SHOWN_CHARS, shown


@pytest.mark.parametrize("value", ["train", 12, 1.5, None, [1, 2], {"a": 1}, b"ab", ""])
def test_a_short_value_is_quoted_as_its_repr(value):
    assert shown(value) == repr(value)


def test_a_long_string_is_cut_with_its_type_and_length():
    text = "a" * 5000
    quoted = shown(text)
    assert quoted == repr("a" * SHOWN_CHARS) + "… (str of 5000 characters)"
    assert shown(b"b" * 500).endswith("… (bytes of 500 bytes)")
    assert shown("a" * SHOWN_CHARS) == repr("a" * SHOWN_CHARS)  # the limit itself is kept whole


def test_a_long_list_is_cut_with_its_type_and_length():
    quoted = shown(list(range(1000)))
    assert quoted.startswith("[0, 1, 2, 3")
    assert quoted.endswith("… (list of 1000 items)")
    assert len(quoted) < 2 * SHOWN_CHARS


def test_a_nested_alias_structure_is_quoted_at_once():
    """Ten levels of ten YAML aliases: 10**10 leaves from 0.6 kB of YAML. Its full repr would
    be tens of gigabytes; the quote is a few dozen characters, at once."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    value = yaml.safe_load(f"[{', '.join(items)}]")
    start = time.perf_counter()
    quoted = shown(value)
    assert time.perf_counter() - start < 0.1
    assert quoted.endswith("… (list of 10 items)") and len(quoted) < 2 * SHOWN_CHARS
