"""One error type for everything a user can cause; the CLI turns it into a one-line message."""

from __future__ import annotations

# Exit codes (documented in the README). 1 is left for unexpected internal errors.
EXIT_USAGE = 2  # bad option values, impossible sizes, unknown recipe keys
EXIT_INPUT = 3  # missing, corrupt or wrong-kind input files and data
EXIT_OUTPUT = 4  # output exists without --force, unwritable destination, disk full
EXIT_INTERRUPTED = 130


class WeitError(Exception):
    """A problem the user can fix: `message` says what is wrong, `hint` what to do next."""

    def __init__(self, message: str, hint: str = "", exit_code: int = EXIT_USAGE):
        message, hint = one_line(message), one_line(hint)
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def one_line(text: str) -> str:
    """Control characters escaped (a newline in a file name, a recipe key or an override), so that
    every error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class InputError(WeitError):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint, EXIT_INPUT)


class OutputError(WeitError):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint, EXIT_OUTPUT)
