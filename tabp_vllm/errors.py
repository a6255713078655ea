"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""

import functools
import sys


def first_line(exc: BaseException) -> str:
    """An exception's message as one line: its first line, or its class name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TabpError(Exception):
    """An error caused by the user's input, reported as one clear line."""

    exit_code = 2


def user_errors(fn):
    """Report a TabpError as one line on stderr and exit 2 (the CLI contract for bad input)."""
    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TabpError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
