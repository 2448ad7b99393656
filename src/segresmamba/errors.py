"""The error type for bad user input, and how the command-line entry points show it.

``InputError`` is a ``ValueError`` whose message names the file, case or setting at fault. The command-line
entry points (``segresmamba``, the sweep, the robustness benchmark) run through :func:`command_line`, which
prints such an error as one plain line (``error: <message>``) and exits with status 2; any other exception
is a bug and keeps its traceback. ``SEGRESMAMBA_DEBUG=1`` (or ``--debug`` on the command line) shows the
traceback of input errors too.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

__all__ = ["InputError", "InputExit", "DEBUG_ENV", "command_line", "plain_message"]

DEBUG_ENV = "SEGRESMAMBA_DEBUG"


class InputError(ValueError):
    """Bad input from the user: a missing or corrupt file, an unusable case, a bad setting or name."""


class InputExit(SystemExit):
    """Exit status 2 after an input error was printed; ``str()`` is the message, so that a caller running an
    entry point in-process (and catching ``SystemExit``) can still record what went wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    seen: list[BaseException] = []
    while err is not None and not any(err is s for s in seen):
        seen.append(err)
        yield err
        err = err.__cause__ or err.__context__


def _tidy(text: str) -> str:
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"^Expected a (.+?)\. Got value: (.*)$", r"expected \1, got \2", text, flags=re.S)
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def plain_message(err: BaseException) -> str:
    """One line for an error from parsing or building settings: the setting's dotted key and the innermost
    reason, without jsonargparse's "Does not validate against any of the Union subtypes" report and the
    dump of every given value. An :class:`InputError` anywhere in the chain is the message as written."""
    chain = list(_chain(err))
    own = next((e for e in chain if isinstance(e, InputError)), None)
    if own is not None:
        return str(own)
    keys: list[str] = []
    class_path = None
    for link in chain:
        text = str(link)
        key = re.match(r'Parser key "([^"]+)":', text)
        if key and (not keys or keys[-1] != key.group(1)):
            keys.append(key.group(1))
        given = re.search(r"Problem with given class_path '([^']+)'", text)
        class_path = class_path or (given and given.group(1))
    reason = _tidy(re.sub(r'^Parser key "[^"]+":\s*', "", str(chain[-1]).strip()))
    unknown = re.fullmatch(r"Subcommand '(\w+)' does not accept option '(.+)'", reason)
    if unknown:
        reason = f"{unknown.group(2)}: no such setting of {unknown.group(1)}"
    if class_path and class_path not in reason:
        reason = f"{reason} ({class_path})"
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def command_line(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    describe: Callable[[BaseException], str | None] = lambda err: str(err) if isinstance(err, InputError) else None,
) -> int:
    """Run a command-line entry point ``main(argv)`` and return its exit status.

    A user error (``describe(err)`` gives its message; by default an :class:`InputError`) is printed as
    ``error: <message>`` and raises :class:`InputExit` (status 2); Ctrl-C exits with 130 and no traceback.
    ``--debug`` anywhere in ``argv`` (it is removed) or ``SEGRESMAMBA_DEBUG=1`` lets both keep their traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        return main(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        message = describe(err)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise InputExit(message) from None
