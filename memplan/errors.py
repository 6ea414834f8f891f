"""The one error type that reaches users: a clear line and exit code 2."""


class UserError(Exception):
    """Bad input: the message names what was wrong and what is allowed."""

    exit_code = 2
