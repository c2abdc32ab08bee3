"""The one exception type for a user's mistake, the argument parser that raises it, and how a
message quotes the value it refuses.

`lab` turns a `UserError` into exit status 2 and a single line on stderr (no traceback);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import reprlib
from typing import Any

# The exit statuses of `lab` and its subcommands, defined once (docs/training.md lists them):
EXIT_USER_ERROR = 2  # a UserError: one line on stderr, nothing changed
EXIT_DIVERGED = 3  # the loss or gradient became NaN or Inf; the last checkpoint is intact
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), or a demo stopped before its end

# A quoted value longer than this is cut, with its type and length beside it.
SHOWN_CHARS = 160  # room for a real path (a temporary directory is 80-odd characters)

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


# What the user can do about a file system's refusal, by errno.
FIXES = {
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EROFS: "choose a place on a writable file system",
    errno.EACCES: "choose a place you may write to",
    errno.EPERM: "choose a place you may write to",
    errno.ENOSPC: "free some space or choose another disk",
    errno.EDQUOT: "free some space or choose another disk",
    errno.ENOTDIR: "a file is in the way: move it or choose another path",
    errno.EEXIST: "a file is in the way: move it or choose another path",
}
# A disk that takes no more: full, over quota or read-only.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def file_system_error(err: OSError, doing: str, fix: str = "") -> UserError:
    """A file system's refusal (a name too long, a read-only or full disk, a file in the way)
    as a one-line UserError: what could not be done, to what, why, and what to do."""
    where = f" {shown(str(err.filename))}" if err.filename is not None else ""
    reason = err.strerror or type(err).__name__
    return UserError(f"cannot {doing}{where}: {reason}; {fix or FIXES.get(err.errno, 'check it')}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (exit status 2) instead of two."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")
