"""The one error type that reaches users: a clear line and exit code 2."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """Bad input: the message names what was wrong and what is allowed."""

    exit_code = 2


def did_you_mean(word: str, allowed: Iterable[Any]) -> str:
    """"; did you mean 'x'?" for the allowed word closest to a mistyped one (difflib), or ""."""
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, [str(a) for a in allowed], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def shown(value: Any, width: int = 60) -> str:
    """A value as an error message quotes it: its repr, shortened to about `width` characters (a 400-digit
    number, a long or deeply nested list from a file) without building the whole repr first."""
    import reprlib  # only on the error path

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxlong, r.maxother = width, width, width
    return r.repr(value)
