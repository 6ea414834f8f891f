"""The one error type that reaches users: a clear line and exit code 2."""

from __future__ import annotations

from typing import Any, Iterable


class UserError(Exception):
    """Bad input: the message names what was wrong and what is allowed."""

    exit_code = 2


def did_you_mean(word: str, allowed: Iterable[Any]) -> str:
    """"; did you mean 'x'?" for the allowed word closest to a mistyped one (difflib), or ""."""
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, [str(a) for a in allowed], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
