"""The one exception type for a user's mistake.

`lab` turns a `UserError` into exit status 2 and a single line on stderr (no traceback);
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: a bad config value, a missing file, an impossible mesh.

    The message is one line that names the problem and the fix.
    """
