"""Resolving a model reference: a config.json or local model directory, a preset (id, alias or hub id,
any case), or a hub id found offline in the HF cache; and the "did you mean" error for unknown names."""

from __future__ import annotations

import os
from pathlib import Path

from memplan.catalog.presets import name_index, preset_config, preset_ids, preset_info
from memplan.catalog.spec import ModelSpec, read_config, spec_from_config
from memplan.errors import UserError
from memplan.files import read_text


def _local_config(path: Path) -> Path | None:
    """The config.json a local path names: the file itself, or a model directory's config.json."""
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    return None


def hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps its cache, in its own order of precedence."""
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _cached_config(repo_id: str) -> Path | None:
    """config.json of ``org/name`` in an offline HF cache: the snapshot refs/main points at,
    else the most recently written snapshot that has one."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        repo = cache / folder
        if not repo.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            candidate = repo / "snapshots" / read_text(ref, "HF cache reference").strip() / "config.json"
            if candidate.is_file():
                return candidate
        found = sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found[0]
    return None


def _looks_like_path(ref: str) -> bool:
    """True for refs that can only be file paths (a hub id is exactly ``org/name``)."""
    return ref.endswith(".json") or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _unknown(ref: str) -> UserError:
    """Unknown-name error with the closest presets (difflib over ids, aliases and hub ids), each model once:
    its id, and the name that matched when that was an alias or hub id."""
    import difflib  # only for the error message

    names: dict[str, tuple[str, str]] = {}  # lower-case name -> (preset id, name as spelled)
    for pid in preset_ids():
        entry = preset_info(pid)
        for name in [pid, *(entry.get("aliases") or []), entry.get("hub_id") or ""]:
            if name:
                names.setdefault(name.lower(), (pid, name))
    closest: dict[str, str] = {}
    for key in difflib.get_close_matches(ref.lower(), list(names), n=len(names), cutoff=0.5):
        pid, name = names[key]
        closest.setdefault(pid, pid if name == pid else f"{pid} ({name})")
        if len(closest) == 5:
            break
    where = ""
    if ref.count("/") == 1:
        where = f" (not a preset, and not in the local HF cache: {', '.join(map(str, hf_cache_dirs()))})"
    hint = f" Closest presets: {', '.join(closest.values())}" if closest else ""
    return UserError(
        f"unknown model '{ref}'{where}.{hint} (run `memplan models` for all; or pass a config.json "
        "or a local model directory)"
    )


def preset_id(ref: str) -> str | None:
    """The preset ``ref`` names by its id, an alias or its hub id, in any case; None when none."""
    return name_index().get(ref.strip().lower())


def config_file(ref: str) -> tuple[Path, str]:
    """The config.json behind ``ref`` and the model's name, tried in this order: a config.json file or a
    local model directory holding one; a preset id, alias or preset hub id (case-insensitive); a hub id
    ``org/name`` found offline in the HF cache (the file is read directly, nothing is fetched)."""
    ref = ref.strip()
    if not ref:
        raise UserError("empty model name (run `memplan models` for the presets)")
    path = Path(ref).expanduser()
    local = _local_config(path)
    if local is not None:
        return local, str(path)
    preset = preset_id(ref)
    if preset is not None:
        return preset_config(preset), preset
    if path.is_dir():
        raise UserError(f"{path} is a directory without a config.json")
    if _looks_like_path(ref):
        raise UserError(f"no such file or directory: {ref}")
    if ref.count("/") == 1:
        cached = _cached_config(ref)
        if cached is not None:
            return cached, ref
    raise _unknown(ref)


def resolve_model(ref: str) -> ModelSpec:
    """The ModelSpec for ``ref``, its config.json found as :func:`config_file` finds it."""
    path, name = config_file(ref)
    return spec_from_config(read_config(path), name)
