"""The one exception type for a user's mistake, and the argument parser that raises it.

`lab` turns a `UserError` into exit status 2 and a single line on stderr (no traceback);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A mistake the user can fix: a bad config value, a missing file, an impossible mesh.

    The message is one line that names the problem and the fix.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (exit status 2) instead of two."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")
