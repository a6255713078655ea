"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class TabpError(Exception):
    """An error caused by the user's input, reported as one clear line."""

    exit_code = 2
