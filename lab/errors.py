"""The one exception type for a user's mistake, the argument parser that raises it, and how a
message quotes the value it refuses.

`lab` turns a `UserError` into exit status 2 and a single line on stderr (no traceback);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import reprlib
from typing import Any

# A quoted value longer than this is cut, with its type and length beside it.
SHOWN_CHARS = 60

# repr bounded in time and size whatever the value: a YAML alias structure nested ten deep
# (a billion leaves, a few kilobytes of YAML) has a full repr of gigabytes.
_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel, _BOUNDED.maxstring, _BOUNDED.maxother = 2, SHOWN_CHARS, SHOWN_CHARS
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = 4


class UserError(Exception):
    """A mistake the user can fix: a bad config value, a missing file, an impossible mesh.

    The message is one line that names the problem and the fix.
    """


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`value` as a message quotes it: its repr when that is short, otherwise a prefix of it
    with its type and length, e.g. `'aaaa…' (str of 5000 characters)`."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}… ({type(value).__name__} of {len(value)} {unit})"
    text = _BOUNDED.repr(value)
    if len(text) <= limit and "..." not in text:
        return text
    try:
        size = f" of {len(value)} items"
    except TypeError:
        size = ""
    return f"{text[:limit]}… ({type(value).__name__}{size})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (exit status 2) instead of two."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")
