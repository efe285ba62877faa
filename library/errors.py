"""The one exception type for mistakes a user can fix (bad flags, prompt files, model paths)."""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's input. ``main()`` prints its message as one line and exits 2.

    The message names what is wrong (flag, file, entry, key) and what to do about it.
    """


class NonFiniteLoss(Exception):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept, nothing newer is written."""
