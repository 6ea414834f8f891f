"""What `memplan train` writes, how it recognises its own files, and how a checkpoint is complete or absent.
No torch here: memplan.train.preflight uses it before anything heavy is imported.

In OUTPUT_DIR a run writes only these (and temporary `.tmp-NAME` / `.old-NAME` siblings while saving them):
  checkpoints/checkpoint-NNNNNN/   the resumable checkpoints (memplan.train.checkpoint)
  model/ | adapter/, merged/       the final model, adapter, merged model
  metrics.jsonl, training.png, summary.json
  .memplan-output                  this marker: memplan train writes its run files here

Ownership: every directory memplan creates holds MARKER, written first, before anything else goes in, and
OUTPUT_DIR gets one when a run starts. memplan replaces or deletes a directory only when it holds the
marker, and replaces the run files only where OUTPUT_DIR holds it; anything else with one of these names
stops the run before it starts (`existing_lines`). Nothing memplan writes may be, contain or lie inside
one of the run's inputs: the model directory, the data files, the plan file (`overlap_lines`).

Completeness: a checkpoint is written into `.tmp-checkpoint-NNNNNN/`; every file is fsync'ed, then
COMPLETE (each file's size) is written and fsync'ed last, the directory fsync'ed and renamed into place,
and the parent fsync'ed. A checkpoint whose COMPLETE is missing or whose files do not have the sizes it
lists (a power loss before the data reached the disk, a file cut or emptied later) is not intact
(`damage`); --resume takes the newest intact one and says which it skipped.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

#: In every directory memplan creates (and in OUTPUT_DIR once a run started there), written first.
MARKER = ".memplan-output"
#: A checkpoint's completion record: {"files": {relative path: size in bytes}}, written last.
COMPLETE = "complete.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
#: The final outputs: full fine-tuning writes model/, LoRA / QLoRA adapter/ (and merged/ with merge_adapter).
FINAL_DIRS = ("model", "adapter", "merged")
RUN_FILES = ("metrics.jsonl", "training.png", "summary.json")
_TEMP_PREFIXES = (".tmp-", ".old-")
_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")


# ---------------------------------------------------------------- durable writes


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write a small text file through a temporary sibling: fsync'ed, renamed into place, parent fsync'ed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def owned(path: Path) -> bool:
    """A directory memplan created (it holds the marker)."""
    return (path / MARKER).is_file()


def make_owned_dir(path: Path, what: str) -> Path:
    """Create `path` (which must not exist) with the marker in it, before anything else goes in."""
    path.mkdir(parents=True)
    write_durable(path / MARKER, json.dumps({"written_by": "memplan train", "what": what}) + "\n")
    return path


def mark_output_dir(out: Path) -> None:
    """OUTPUT_DIR holds this run's files from now on (metrics.jsonl, training.png, summary.json)."""
    if not (out / MARKER).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_durable(out / MARKER, json.dumps({"written_by": "memplan train", "what": "run files"}) + "\n")


def temp_dir(final: Path, what: str) -> Path:
    """A fresh `.tmp-NAME` beside `final`, marked as memplan's (a stale one of memplan's is removed first)."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        remove_owned(tmp)
    return make_owned_dir(tmp, what)


def remove_owned(path: Path) -> None:
    """Delete a directory memplan created; anything else is refused."""
    if not owned(path):
        from memplan.errors import UserError

        raise UserError(f"{path} was not written by memplan train (it has no {MARKER}); memplan deletes only "
                        "its own files. Hint: move it elsewhere")
    shutil.rmtree(path)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, replacing an earlier version only if memplan wrote it."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            remove_owned(old)
        if not owned(final):
            remove_owned(final)  # raises: not memplan's
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        fsync_path(final.parent)


def remove_stale(out: Path) -> list[Path]:
    """The `.tmp-` / `.old-` directories memplan left in OUTPUT_DIR and its checkpoints/ when a run was
    killed while saving (they can keep a disk full): removed. Returns what was removed."""
    removed = []
    for parent in (out, out / CHECKPOINTS):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(_TEMP_PREFIXES) and p.is_dir() and owned(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ---------------------------------------------------------------- checkpoints: complete or absent


def checkpoint_step(path: Path) -> int | None:
    """The step of a directory named checkpoint-<digits>; None for any other name."""
    m = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path) -> list[Path]:
    """memplan's checkpoint directories in `root` (intact or not), oldest first. Other directories, such as
    a `checkpoint-000004-backup` made by hand, are neither listed nor ever touched."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir() and owned(p)]
    return sorted(found, key=lambda p: checkpoint_step(p))


def fsync_tree(directory: Path) -> dict[str, int]:
    """fsync every file and directory under `directory` (itself last); returns the files' sizes."""
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in filenames:
            p = Path(dirpath) / name
            fsync_path(p)
            sizes[str(p.relative_to(directory))] = p.stat().st_size
        for name in dirnames:
            fsync_path(Path(dirpath) / name)
    fsync_path(directory)
    return sizes


def write_complete(directory: Path) -> None:
    """fsync everything under `directory`, then write COMPLETE with the files' sizes, last."""
    sizes = fsync_tree(directory)
    write_durable(directory / COMPLETE, json.dumps({"files": dict(sorted(sizes.items()))}, indent=1) + "\n")


def damage(directory: Path) -> str | None:
    """Why a checkpoint is not intact, or None when every file COMPLETE lists has its size."""
    try:
        files = json.loads((directory / COMPLETE).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise ValueError
    except FileNotFoundError:
        return f"no {COMPLETE}: its save did not finish"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{COMPLETE} is unreadable"
    for name, size in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        have = p.stat().st_size
        if have != size:
            return f"{name} has {have:,} of its {size:,} bytes"
    return None


def resume_point(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and one line for each newer one that is damaged (skipped)."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(root)):
        why = damage(path)
        if why is None:
            return path, skipped
        skipped.append(f"{path} is damaged ({why})")
    return None, skipped


# ---------------------------------------------------------------- full disks


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, also where a library passes on only the message (safetensors)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(err) for s in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))


def free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full_message(where: Path, what: str, needed: int, free: int, after: str) -> str:
    return (f"disk full at {where}, {needed:,} bytes needed for {what} ({free:,} were free); {after}. "
            "Hint: free some space, then --resume")


# ---------------------------------------------------------------- what the run writes, and its inputs


def final_names(plan) -> list[str]:
    if not plan.trains_adapters:
        return ["model"]
    return ["adapter", "merged"] if plan.hparams.merge_adapter else ["adapter"]


def written_paths(out: Path, plan) -> dict[Path, str]:
    """Every path a run of `plan` writes in `out` (with its temporary siblings) -> how to name it."""
    names = {CHECKPOINTS: f"its {CHECKPOINTS}/", **{n: f"the {n}/ it trains" for n in final_names(plan)},
             **{n: n for n in RUN_FILES}, MARKER: MARKER}
    paths: dict[Path, str] = {}
    for name, label in names.items():
        paths[out / name] = label
        for prefix in _TEMP_PREFIXES:
            paths[out / f"{prefix}{name}"] = f"a temporary copy of {label}"
        paths[out / f"{name}.tmp"] = f"a temporary copy of {label}"
    return paths


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def run_inputs(resolved, model_dir: Path | None) -> dict[str, Path]:
    """What the run reads and must never write: the model directory, the data files, the plan file."""
    plan = resolved.plan
    found: dict[str, Path] = {}
    if model_dir is not None:
        found[f"the model directory (model: {plan.model})"] = model_dir
    for role in ("train", "validation", "replay", "retention"):
        value = getattr(plan.data, role)
        if value:
            found[f"data.{role} ({value})"] = Path(value)
    found[f"the plan file ({resolved.plan_path.name})"] = resolved.plan_path
    return found


def overlap_lines(resolved, model_dir: Path | None) -> list[str]:
    """One line for each input the run would write over, delete, or write into."""
    out = resolved.output_dir
    inputs = {label: _real(p) for label, p in run_inputs(resolved, model_dir).items()}
    lines = []
    real_out = _real(out)
    for label, src in inputs.items():
        if src.is_dir() and _inside(real_out, src):
            lines.append(f"output_dir {out} is {label} or inside it; memplan never writes into its inputs")
            continue
        for path, what in written_paths(out, resolved.plan).items():
            real = _real(path)
            if _inside(src, real):
                lines.append(f"the run would write {what} at {path}, which {'is' if src == real else 'holds'} "
                             f"{label}; memplan never writes over its inputs")
                break
    return [f"{line}. Hint: --set output_dir=NEW_DIR (a directory of its own for the run's outputs)"
            for line in lines]


def existing_lines(resolved, resume: bool) -> list[str]:
    """Paths the run would replace that memplan did not write, or that an earlier run left behind."""
    out = resolved.output_dir
    lines = []
    foreign = [p for p in (out / n for n in FINAL_DIRS) if p.exists() and not owned(p)]
    root = out / CHECKPOINTS
    if root.is_dir():
        foreign += [p for p in root.iterdir() if checkpoint_step(p) is not None and not owned(p)]
    if not (out / MARKER).is_file():
        foreign += [p for p in (out / n for n in RUN_FILES) if p.exists()]
    for p in sorted(foreign):
        lines.append(f"{p} is in the way: memplan train writes {p.name} there, and it was not written by memplan "
                     f"train (no {MARKER}); memplan replaces only its own outputs. Hint: move it elsewhere, or "
                     "--set output_dir=NEW_DIR")
    if not resume and not list_checkpoints(root):
        earlier = [p.name + "/" for p in (out / n for n in FINAL_DIRS) if p.is_dir() and owned(p)]
        if earlier:
            lines.append(f"{out} already holds {', '.join(earlier)} of an earlier run. Hint: --set "
                         "output_dir=NEW_DIR for a new run, or move them elsewhere")
    return lines
