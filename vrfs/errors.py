"""Errors that reach an operator as one line and an exit code, never a traceback."""

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """A mistake in what the operator asked for, or a condition they must fix.

    The command line prints ``vrfs: <message>`` and exits with ``exit_code``.
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
