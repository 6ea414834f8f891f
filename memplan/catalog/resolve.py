"""Resolving a model reference: a config.json or local model directory, a preset (id, alias or hub id,
any case), a hub id ``org/name[@revision]`` found offline in the HF cache or else fetched from the Hub
(config.json only); and the "did you mean" error for unknown names."""

from __future__ import annotations

import os
import re
from pathlib import Path

from memplan.catalog.presets import name_index, preset_config, preset_ids, preset_info
from memplan.catalog.spec import ModelSpec, read_config, spec_from_config
from memplan.errors import UserError
from memplan.files import read_text


def _local_config(path: Path) -> Path | None:
    """The config.json a local path names: the file itself, or a model directory's config.json."""
    try:
        if path.is_file():
            return path
        if (path / "config.json").is_file():
            return path / "config.json"
    except OSError:  # a name the file system cannot hold (longer than 255 bytes): no such file, nor a directory
        return None
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # as in _local_config
        return False


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


def _cached_config(repo_id: str, revision: str | None = None) -> Path | None:
    """config.json of ``org/name`` in an offline HF cache. With a revision: the snapshot refs/<revision>
    points at, or snapshots/<revision> for a commit hash. Without: the snapshot refs/main points at, else the
    most recently written snapshot that has one."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        repo = cache / folder
        if not repo.is_dir():
            continue
        ref = repo / "refs" / (revision or "main")
        commits = [read_text(ref, "HF cache reference").strip()] if ref.is_file() else []
        if revision is not None:
            commits.append(revision)
        for commit in commits:
            candidate = repo / "snapshots" / commit / "config.json"
            if commit and "/" not in commit and candidate.is_file():
                return candidate
        if revision is None:
            found = sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
    return None


_HUB_REF = re.compile(r"([^/@\s]+/[^/@\s]+)@(\S+)")


def _hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``(org/name, revision or None)`` for a ref shaped like a hub id, optionally ``@revision`` (a branch,
    tag or commit; a branch may hold slashes, e.g. ``refs/pr/1``); None otherwise."""
    match = _HUB_REF.fullmatch(ref)
    if match:
        return match[1], match[2]
    if ref.count("/") == 1 and not _looks_like_path(ref):
        return ref, None
    return None


def _hub_config(repo_id: str, revision: str | None) -> Path:
    """Fetch only ``config.json`` of ``repo_id`` at ``revision`` with huggingface_hub, which honours HF_TOKEN
    (or the login token), HF_ENDPOINT, HF_HUB_OFFLINE and its cache; each failure is one UserError that says
    what to do. huggingface_hub is imported here only: presets and local files never load it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, logging

    # One small file: no progress bar, and no retry warnings; what went wrong is the one error line below.
    disable_progress_bars()
    logging.set_verbosity_error()
    at = f"{repo_id}@{revision}" if revision else repo_id
    page = f"{constants.ENDPOINT}/{repo_id}"
    try:
        # huggingface_hub retries a failed connection five times (about 23 s) before it reads its cache; a
        # refused connection or an unknown host is answered by the cache at once.
        cache_only = not constants.HF_HUB_OFFLINE and _refused(constants.ENDPOINT)
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=cache_only))
    except GatedRepoError:  # before RepositoryNotFoundError: it subclasses it
        raise UserError(f"{repo_id} is gated: accept the licence on its page ({page}) and set HF_TOKEN "
                        "(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise _unknown(repo_id, f" (no such repository on {constants.ENDPOINT}; a private repository needs "
                                "HF_TOKEN with read access)") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision '{revision}' (give a branch, tag or commit hash after '@'; "
                        f"see {page})") from None
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it subclasses it
        raise _not_reachable(at, constants) from None
    except EntryNotFoundError:
        raise UserError(f"{at} has no config.json, so it is not a transformers model memplan can read "
                        "(pass a config.json path or a local model directory instead)") from None
    except OfflineModeIsEnabled:
        raise _not_reachable(at, constants) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise UserError(f"the Hub ({constants.ENDPOINT}) answered HTTP {status} for {at}'s config.json "
                        "(check HF_TOKEN if set, or try again later)") from None
    except HFValidationError:
        raise UserError(f"'{at}' is not a valid Hugging Face Hub id (org/name[@revision]: letters, digits, "
                        "'-', '_', '.')") from None


def _refused(endpoint: str) -> bool:
    """True when the first hop to ``endpoint`` (the proxy the environment names for it, else its host) refuses
    a TCP connection or its name does not resolve: the Hub cannot answer. Slow or timed-out networks return
    False, so that huggingface_hub's own retries still get their chance."""
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    hop = url
    if url.hostname and not urllib.request.proxy_bypass(url.hostname):
        proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
        if proxy:
            hop = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not hop.hostname:
        return False
    try:
        port = hop.port or (443 if hop.scheme == "https" else 80)
        with socket.create_connection((hop.hostname, port), timeout=5):
            return False
    except (ConnectionRefusedError, socket.gaierror):
        return True
    except (OSError, ValueError):  # a timeout, an unreachable network, a bad port: let huggingface_hub try
        return False


def _not_reachable(at: str, constants) -> UserError:
    """The error for a hub id that is not cached and could not be fetched: offline mode, or no connection."""
    dirs = ", ".join(map(str, hf_cache_dirs()))
    if constants.HF_HUB_OFFLINE:
        return UserError(f"{at} is not in the HF cache ({dirs}) and HF_HUB_OFFLINE is set (`memplan profile` "
                         f"and `memplan train` always run offline): run `memplan estimate --model {at}` once "
                         "online to cache its config.json, or pass a config.json path")
    return UserError(f"could not reach the Hub ({constants.ENDPOINT}) to fetch {at}'s config.json, and it is "
                     f"not in the HF cache ({dirs}): check the network or HF_ENDPOINT, or pass a config.json path")


def _looks_like_path(ref: str) -> bool:
    """True for refs that can only be file paths (a hub id is exactly ``org/name``)."""
    return ref.endswith(".json") or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _unknown(ref: str, where: str | None = None) -> UserError:
    """Unknown-name error with the closest presets (difflib over ids, aliases and hub ids), each model once:
    its id, and the name that matched when that was an alias or hub id."""
    import difflib  # only for the error message

    names: dict[str, tuple[str, str]] = {}  # lower-case name -> (preset id, name as spelled)
    for pid in preset_ids():
        entry = preset_info(pid)
        for name in [pid, *(entry.get("aliases") or []), entry.get("hub_id") or ""]:
            if name:
                names.setdefault(name.lower(), (pid, name))
    matches = difflib.get_close_matches(ref.lower(), list(names), n=len(names), cutoff=0.5)
    # a preset the name extends ("Qwen/Qwen2.5-7B-Instruct": an unlisted -Instruct id of Qwen/Qwen2.5-7B) before
    # names that are merely alike (Qwen/Qwen2.5-VL-7B-Instruct); sorted() keeps difflib's order otherwise
    matches = sorted(matches, key=lambda key: not ref.lower().startswith(key + "-"))
    closest: dict[str, str] = {}
    for key in matches:
        pid, name = names[key]
        closest.setdefault(pid, pid if name == pid else f"{pid} ({name})")
        if len(closest) == 5:
            break
    if where is None and ref.count("/") == 1:
        where = f" (not a preset, and not in the local HF cache: {', '.join(map(str, hf_cache_dirs()))})"
    where = where or ""
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
    ``org/name[@revision]`` found offline in the HF cache (read directly, nothing is fetched), else its
    config.json alone fetched from the Hub."""
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
    if _is_dir(path):
        raise UserError(f"{path} is a directory without a config.json")
    hub = _hub_ref(ref)
    if hub is None:
        if _looks_like_path(ref):
            raise UserError(f"no such file or directory: {ref}")
        raise _unknown(ref)
    repo_id, revision = hub
    cached = _cached_config(repo_id, revision)
    return (cached if cached is not None else _hub_config(repo_id, revision)), ref


def resolve_model(ref: str) -> ModelSpec:
    """The ModelSpec for ``ref``, its config.json found as :func:`config_file` finds it."""
    path, name = config_file(ref)
    return spec_from_config(read_config(path), name, source=path)
