"""The one base of every user mistake: a message of one line that names what to change. The CLI and `doctor` catch
`UserError`; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a config value, a file, a cluster too small, a server away), told in one line."""
