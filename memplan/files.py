"""Reading the files memplan is given: plan files, config.json, JSONL data, launch configs.

One place turns every way such a file can be unusable into one line naming the file: unreadable (missing,
a directory, no permission), not UTF-8 text, malformed JSON or YAML, or nested deeper than any of them
needs. YAML is read with `yaml.safe_load` (plain data: no tags that build Python objects). This module is
on the estimate path: it imports neither torch nor transformers, and PyYAML only when YAML is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memplan.errors import UserError

#: Containers within containers that a file may hold. memplan's own files nest a few levels (a plan's
#: `lora.targets`, a chat record's messages, a config.json's rope_scaling or text_config); 100 leaves room
#: for any real file while everything that walks the data later (pydantic, transformers' config copies,
#: json.dumps) stays far inside Python's recursion limit of 1000 frames.
MAX_DEPTH = 100


def read_text(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped); `what` names it in errors ("plan file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        byte = err.object[err.start:err.start + 1].hex()
        raise UserError(f"cannot read {what} {path}: not UTF-8 text (byte 0x{byte} at offset {err.start}: "
                        f"{err.reason}); a {what} is a UTF-8 text file") from None


def _depth(value: Any) -> int | None:
    """How many containers (dicts, lists) deep `value` goes; None when it contains itself (a YAML alias can
    make it). Iterative, and each shared container is walked once, so neither depth nor YAML aliases
    (one list named a thousand times) make it slow or recursive."""
    done: dict[int, int] = {}
    open_: set[int] = set()  # the containers on the path to the one being walked
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, finished = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        key = id(node)
        children = node.values() if isinstance(node, dict) else node
        if finished:
            open_.discard(key)
            done[key] = 1 + max((done[id(c)] for c in children if isinstance(c, (dict, list))), default=0)
        elif key in open_:
            return None
        elif key not in done:
            open_.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return done.get(id(value), 0)


def _check_depth(value: Any, where: str) -> Any:
    depth = _depth(value)
    if depth is None:
        raise UserError(f"{where}: the data contains itself (a YAML alias inside its own anchor)")
    if depth > MAX_DEPTH:
        raise UserError(f"{where}: nested {depth} levels deep; at most {MAX_DEPTH} are read")
    return value


@contextmanager
def _parsing(where: str, language: str) -> Iterator[None]:
    """What a parser raises besides its own syntax errors, as one line: nesting deeper than Python's
    recursion limit, or a number with more digits than Python converts (4300)."""
    try:
        yield
    except RecursionError:
        raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep; at most {MAX_DEPTH} are read") from None
    except ValueError as err:
        raise UserError(f"{where}: malformed {language} ({str(err).split(';')[0]})") from None


def parse_json(text: str, where: str, line: bool = True) -> Any:
    """JSON text -> data; `where` names it in errors ("config.json", or "train.jsonl:3" with line=False for
    a JSON Lines record, whose line `where` already names)."""
    with _parsing(where, "JSON"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            at = f"line {err.lineno} column {err.colno}" if line else f"column {err.colno}"
            raise UserError(f"{where}: malformed JSON ({err.msg} at {at})") from None
    return _check_depth(value, where)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> plain data (`yaml.safe_load`); `where` names it in errors."""
    import yaml

    with _parsing(where, "YAML"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{where}{line}: malformed YAML: {getattr(err, 'problem', None) or err}") from None
    return _check_depth(value, where)


def read_json(path: str | Path, what: str) -> Any:
    return parse_json(read_text(path, what), str(path))


def read_yaml(path: str | Path, what: str) -> Any:
    return parse_yaml(read_text(path, what), str(path))
