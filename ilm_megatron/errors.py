"""Errors a user can fix: the command-line tools print them as one line and exit 2.

Their message names the culprit (a config key and its source, a file, a shard, a rank). The
traceback is shown only with ``ILM_DEBUG=1``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or run directory (not a bug in ilm-megatron)."""


class RunError(UserError):
    """A run cannot start or continue as asked (run directory busy or unwritable, checkpoints in
    the way, a resume that does not match the config)."""
