"""The on-disk cache of models calibrated by trace (a ``model_type`` without a family module).

One JSON file per model, named by the hash of its config.json, the installed transformers release and this
cache's format: the model's parameter groups and decoder-layer kinds (read from the model built on the meta
device, :mod:`memplan.catalog.traced`) and, per plan class, the fitted activation terms
(:mod:`memplan.estimator.calibrated`). Once a model and a plan class are in it, estimates are arithmetic
again: reading the cache imports neither torch nor transformers.

Where: ``$MEMPLAN_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/memplan``, else ``~/.cache/memplan``; the
files are under ``traced/``. Deleting them is safe: the next run calibrates again. Files are written
atomically (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

FORMAT = 2  # bump when what is cached, or how it is measured, changes: older files are then ignored


def cache_dir() -> Path:
    """The directory of memplan's cache (see the module docstring)."""
    if os.environ.get("MEMPLAN_CACHE_DIR"):
        return Path(os.environ["MEMPLAN_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "memplan"


def transformers_version() -> str:
    """The installed transformers release, read from its metadata (nothing is imported)."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def model_key(config: dict) -> str:
    """The cache key of a config.json: its canonical JSON, the transformers release, the format."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(f"{FORMAT}\n{transformers_version()}\n{text}".encode()).hexdigest()
    return digest[:32]


def _path(key: str) -> Path:
    return cache_dir() / "traced" / f"{key}.json"


# Entries this process has read or written, by file: (its mtime, the entry). A search reads an entry once
# per plan; a cache that cannot be written still holds this process's calibrations.
_MEMO: dict[Path, tuple[float | None, dict]] = {}


def load(key: str) -> dict | None:
    """The cached entry of a model, or None (absent, unreadable, or of another format)."""
    path = _path(key)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = None
    memo = _MEMO.get(path)
    if memo is not None and memo[0] == mtime:
        return memo[1]
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return memo[1] if memo is not None and mtime is None else None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return None
    _MEMO[path] = (mtime, entry)
    return entry


def cached_models() -> list[str]:
    """The transformers model classes with an entry of this format in the cache (sorted, each once)."""
    classes = set()
    for path in sorted((cache_dir() / "traced").glob("*.json")):
        entry = load(path.stem)
        if entry and entry.get("model_class"):
            classes.add(str(entry["model_class"]))
    return sorted(classes)


def save(key: str, entry: dict) -> None:
    """Write a model's entry atomically; a cache that cannot be written only costs a calibration next time."""
    path = _path(key)
    entry = dict(entry, format=FORMAT)
    _MEMO[path] = (None, entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        _MEMO[path] = (path.stat().st_mtime, entry)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
