"""The config engine: a YAML mapping read into a tree of typed, frozen dataclasses.

Run configs (lab.config), sweep files (lab.studies.sweep) and study files (lab.studies.demo) are
each a
schema of dataclasses, and this module reads all three the same way. A field's type is its
rule: `Literal[...]` lists its choices, `Annotated[int, Range(...)]` bounds a number (a
tuple's item type bounds each item), `X | None` may be left out, `dict[str, X]` is a mapping
whose values are X, a nested dataclass is a section, and a field without a default must be
given. Every mistake raises `UserError` as one line naming the key and the fix; an unknown key
suggests the nearest known one. `schema_keys` lists the keys for `--help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from lab.errors import UserError, shown

INT64_MAX = 2**63 - 1


def _number(x: float) -> str:
    """A bound as a reader checks it: 2**32 and 2**31-1 rather than their ten digits."""
    if isinstance(x, int) and x >= 2**16:
        if x & (x - 1) == 0:
            return f"2**{x.bit_length() - 1}"
        if (x + 1) & x == 0:
            return f"2**{x.bit_length()}-1"
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: lo to hi (None: unbounded), and optionally one value `also`
    outside them that means something (-1: the rest). A message ends with `note` in
    parentheses: what `also` means, or else why the bounds."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: float | None = None
    note: str = ""

    def holds(self, x: float) -> bool:
        if x == self.also:
            return True
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def _interval(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_number(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_number(self.hi)}"
        return (f"in {'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}"
                f"{')' if self.hi_open else ']'}")

    def bounds(self) -> str:
        """As --help shows it: '>= 1', 'in [0, 1)', '> 1 or 0'."""
        return self._interval() + ("" if self.also is None else f" or {_number(self.also)}")

    def describe(self, kind: type) -> str:
        """As a message says it: 'a positive integer', 'a number in [0, 1] or -1 (...)'."""
        noun = "integer" if kind is int else "number"
        positive = (self.lo, self.lo_open) == ((1, False) if kind is int else (0, True))
        if self.hi is None and positive:
            text = f"a positive {noun}"
        elif self.hi is None and (self.lo, self.lo_open) == (0, False):
            text = f"zero or a positive {noun}"
        else:
            text = f"{'an' if kind is int else 'a'} {noun} {self._interval()}"
        if self.also is not None:
            text += f" or {_number(self.also)}"
        return f"{text} ({self.note})" if self.note else text

    def check(self, key: str, value: float, kind: type) -> None:
        if not self.holds(value):
            raise UserError(f"{key} must be {self.describe(kind)}, got {shown(value)}")


@dataclass(frozen=True)
class NonEmpty:
    """A string (or list) that must not be empty; `why` says what it names."""

    why: str

    def bounds(self) -> str:
        return "non-empty"

    def check(self, key: str, value: Any, kind: Any) -> None:
        if not value:
            raise UserError(f"{key} must not be empty: {self.why}")


@dataclass(frozen=True)
class Words:
    """How messages name a schema's keys: 'config key train.steps' in a run config, 'key
    tokens' in a sweep file; `top` names the whole mapping."""

    noun: str = "config key"
    top: str = "the config"


CONFIG_WORDS = Words()


def _optional(hint: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (a section), if it holds one (or one or None)."""
    inner = _optional(hint) or hint
    return inner if dataclasses.is_dataclass(inner) else None


def from_dict(cls: type, raw: Any, prefix: str = "", words: Words = CONFIG_WORDS) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, missing required keys
    and wrong types."""
    section = prefix.rstrip(".") or words.top
    if not isinstance(raw, dict):
        raise UserError(f"{section} must be a mapping of keys, got {shown(raw)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be ints as well
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
        raise UserError(f"unknown {words.noun} {shown(f'{prefix}{unknown[0]}')}{hint}; known "
                        f"keys in {section}: {', '.join(fields)}")
    for name, f in fields.items():
        if name not in raw and f.default is f.default_factory is dataclasses.MISSING:
            raise UserError(f"{section} needs {shown(f'{prefix}{name}')} "
                            f"({describe_type(hints[name])})")
    values = {}
    for name, value in raw.items():
        key, hint = f"{prefix}{name}", hints[name]
        section_type = _section(hint)
        if section_type is not None and not (value is None and _optional(hint)):
            values[name] = from_dict(section_type, value, f"{key}.", words)
        else:
            values[name] = coerce(key, value, hint, words)
    return cls(**values)


def read_file(cls: type, raw: Any, where: str, words: Words) -> Any:
    """from_dict for a whole file (a sweep or study file): each message starts `where: `."""
    try:
        return from_dict(cls, raw, "", words)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def coerce(key: str, value: Any, hint: Any, words: Words = CONFIG_WORDS) -> Any:
    """Check `value` against the key's type and its rule; ints may stand for floats, lists (or
    one item) for tuples."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        kind, *rules = typing.get_args(hint)
        ranges = [rule for rule in rules if isinstance(rule, Range)]
        if ranges and not _kind_fits(value, kind):  # say which numbers, not just which type
            raise UserError(f"{words.noun} {key} must be {ranges[0].describe(kind)}, got "
                            f"{shown(value)}")
        value = coerce(key, value, kind, words)
        for rule in rules:
            rule.check(key, value, kind)
        return value
    if (inner := _optional(hint)) is not None:
        return None if value is None else coerce(key, value, inner, words)
    if origin in (typing.Union, types.UnionType):
        return _first_fitting(key, value, typing.get_args(hint), words)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and isinstance(value, str):
            return value
        raise UserError(f"{key} must be one of {', '.join(map(_choice, choices))}, "
                        f"got {shown(value)}")
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # one item for a list of one
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{words.noun} {key} must be a list, got {shown(value)}")
        return tuple(coerce(f"{key}[{i}]", v, item_type, words) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{words.noun} {key} must be a mapping of key: value, got "
                            f"{shown(value)}")
        item_type = typing.get_args(hint)[1]
        return {k: coerce(f"{key}.{k}", v, item_type, words) for k, v in value.items()}
    return _scalar(key, value, hint, words)


def _first_fitting(key: str, value: Any, options: tuple, words: Words) -> Any:
    """The value as the first of a union's types it fits; else the message for the type it
    fits in kind but not in its rule (a number out of range), or one naming every type."""
    for option in options:
        try:
            return coerce(key, value, option, words)
        except UserError as e:
            if _kind_fits(value, option):
                raise UserError(str(e)) from None
    raise UserError(f"{words.noun} {key} must be {' or '.join(map(describe_type, options))}, "
                    f"got {shown(value)}")


def _kind_fits(value: Any, hint: Any) -> bool:
    """Whether the value is of the hint's kind (a mapping for a dict, a list for a tuple, a
    number for a number), whatever its rules."""
    kind = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
    origin = typing.get_origin(kind) or kind
    if origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if isinstance(value, bool):
        return origin is bool
    if origin is float and isinstance(value, str):
        try:
            float(value)  # YAML reads 1e10 (no dot) as a string
            return True
        except ValueError:
            return False
    return isinstance(value, {float: (int, float), int: int}.get(origin, origin))


def _scalar(key: str, value: Any, hint: Any, words: Words) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64_MAX <= value <= INT64_MAX:
                raise UserError(f"{words.noun} {key} is {value}, beyond a 64-bit integer; give a "
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
                raise UserError(f"{words.noun} {key} must be a finite number, got {shown(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise UserError(f"{words.noun} {key} must be {hint.__name__}, got {shown(value)}")


def _choice(value: str) -> str:
    return value or '""'


def describe_type(hint: Any) -> str:
    """A key's type as --help shows it: 'int >= 1', 'auto|xla|cudnn', 'list[float > 0]'."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        kind, *rules = typing.get_args(hint)
        return " ".join([describe_type(kind), *(rule.bounds() for rule in rules)])
    if (inner := _optional(hint)) is not None:
        return describe_type(inner)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(describe_type, typing.get_args(hint)))
    if origin is Literal:
        return "|".join(map(_choice, typing.get_args(hint)))
    if origin is tuple:
        return f"list[{describe_type(typing.get_args(hint)[0])}]"
    if origin is dict:
        value = typing.get_args(hint)[1]
        return "mapping" if value is Any else f"mapping of {describe_type(value)}"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return "any" if hint is Any else hint.__name__


def schema_keys(cls: type, prefix: str = "",
                word: typing.Callable[[Any], str] = str) -> list[tuple[str, str, str]]:
    """(key, type, default) of every key of a schema, read from its types, for --help; a
    section's keys are dotted (model.moe.experts). `word` shows a default as it is typed; a
    required key shows 'required', one left out by default 'unset'."""
    rows = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        section = _section(hints[f.name])
        if section is not None:
            rows += schema_keys(section, f"{prefix}{f.name}.", word)
            continue
        if f.default is f.default_factory is dataclasses.MISSING:
            default = "required"
        else:
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = "unset" if value is None else '""' if value == "" else word(value)
        rows.append((f"{prefix}{f.name}", describe_type(hints[f.name]), default))
    return rows


def keys_help(title: str, rows: list[tuple[str, str, str]]) -> str:
    """A --help epilog: the title line, then one aligned line per key."""
    key_w, type_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"  {k:<{key_w}}  {t:<{type_w}}  {d}" for k, t, d in rows]
    return f"{title} (key, type with its choices or range, default):\n" + "\n".join(lines)
