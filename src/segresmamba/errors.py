"""The error type for bad user input.

``InputError`` is a ``ValueError`` whose message names the file, case or setting at fault. The command-line
entry points (``segresmamba``, the sweep, the robustness benchmark) print such an error as one plain line
and exit non-zero; any other exception is a bug and keeps its traceback. ``SEGRESMAMBA_DEBUG=1`` (or
``--debug``) shows the traceback of input errors too.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from the user: a missing or corrupt file, an unusable case, a bad setting or name."""
