"""The base of every error caused by the user's input (config, data, model files).

Front ends show these as a plain message (the CLI without a traceback, the tab in its status line);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and where."""
