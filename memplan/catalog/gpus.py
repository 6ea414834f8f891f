"""GPU presets, memory-size parsing and the local-GPU query.

The presets live in ``data/gpus/gpus.yaml`` (see its header for what every field means and where each
figure is from); memplan reads its JSON twin ``gpus.json`` (see :mod:`memplan.catalog.paths`).
``memory_bytes`` is the total the driver reports (NVML / nvidia-smi), not the marketing size: an "80 GB"
H100 reports 81,559 MiB.

This module is on the fast CLI path: it must import neither torch nor transformers, and it imports
``pynvml`` only inside :func:`local_gpus`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from memplan.catalog.paths import data_dir, load_table
from memplan.errors import UserError
from memplan.report.units import GiB, KiB, MiB, TiB, gib_label

#: Memory sizes (GiB) for "which common card sizes does this plan fit".
COMMON_SIZES_GIB = (16, 24, 40, 48, 80)


@dataclass(frozen=True)
class Gpu:
    """One GPU: a preset, a custom memory size, or a device found locally.

    Throughput figures are peak dense (no sparsity) TFLOP/s; bandwidths are GB/s (10^9 bytes/s);
    ``interconnect_gbps`` is GPU-to-GPU, both directions added; ``host_link_gbps`` is per direction.
    Any figure is None where unknown or unsupported (e.g. bf16 on V100/T4).
    """

    id: str
    name: str
    memory_bytes: int
    bf16_tflops: float | None = None
    fp16_tflops: float | None = None
    fp32_tflops: float | None = None
    memory_bandwidth_gbps: float | None = None
    interconnect_gbps: float | None = None
    host_link_gbps: float | None = None
    source: str | None = None
    # Beyond the core figures: what the link numbers measure, where memory_bytes came from
    # ("reported" | "nominal" for presets, "nvml" for local devices, "custom"), and the vendor.
    interconnect: str | None = None
    memory_source: str | None = None
    vendor: str | None = None
    aliases: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

_FLOAT_FIELDS = (
    "bf16_tflops",
    "fp16_tflops",
    "fp32_tflops",
    "memory_bandwidth_gbps",
    "interconnect_gbps",
    "host_link_gbps",
)
_STR_FIELDS = ("source", "interconnect", "memory_source", "vendor")


def gpus_file():
    """The table people edit; memplan reads its JSON twin (same name, .json)."""
    return data_dir() / "gpus" / "gpus.yaml"


def _number(gid: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{gpus_file()}: {gid}.{key} must be a positive number or null, got {value!r}")
    return float(value)


def _build(gid: str, entry: Any) -> tuple[Gpu, tuple[str, ...]]:
    if not isinstance(entry, dict):
        raise ValueError(f"{gpus_file()}: entry {gid!r} must be a mapping")
    memory = entry.get("memory_bytes")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise ValueError(f"{gpus_file()}: {gid}.memory_bytes must be a positive integer, got {memory!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{gpus_file()}: {gid}.name is missing")
    strs = {}
    for key in _STR_FIELDS:
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{gpus_file()}: {gid}.{key} must be a string")
        strs[key] = value
    aliases = tuple(str(a).strip().lower() for a in entry.get("aliases") or ())
    nvml_names = tuple(str(n) for n in entry.get("nvml_names") or ())
    gpu = Gpu(
        id=gid,
        name=name,
        memory_bytes=memory,
        **{key: _number(gid, key, entry.get(key)) for key in _FLOAT_FIELDS},
        **strs,
        aliases=aliases,
    )
    return gpu, nvml_names


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, Gpu], dict[str, str], dict[str, str]]:
    """(presets by id, lower-case id/alias -> id, normalised NVML name -> id), parsed once."""
    path = gpus_file()
    raw = load_table(path.with_suffix(".json")) or {}
    entries = raw.get("gpus") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path}: expected a top-level 'gpus:' mapping of id -> fields")
    presets: dict[str, Gpu] = {}
    names: dict[str, str] = {}
    nvml: dict[str, str] = {}
    for gid, entry in entries.items():
        gid = str(gid)
        if gid != gid.lower() or gid in presets:
            raise ValueError(f"{path}: GPU id {gid!r} must be lower-case and unique")
        gpu, nvml_names = _build(gid, entry)
        presets[gid] = gpu
        for key in (gid, *gpu.aliases):
            if key in names and names[key] != gid:
                raise ValueError(f"{path}: name {key!r} is used by both {names[key]} and {gid}")
            names[key] = gid
        for nvml_name in nvml_names:
            norm = _norm_device_name(nvml_name)
            if norm in nvml and nvml[norm] != gid:
                raise ValueError(f"{path}: NVML name {nvml_name!r} is listed by both {nvml[norm]} and {gid}")
            nvml[norm] = gid
    return presets, names, nvml


def load_gpus() -> dict[str, Gpu]:
    """All presets by id, in file order (parsed once; each call returns a fresh dict)."""
    return dict(_load()[0])


def resolve_gpu(ref: str) -> Gpu:
    """A preset by id or alias, case-insensitive (``h100``, ``A100-80G``, ``4090``)."""
    presets, names, _ = _load()
    key = str(ref).strip().lower()
    if key in names:
        return presets[names[key]]
    import difflib  # only for the error message

    close: list[str] = []
    for match in difflib.get_close_matches(key, list(names), n=8, cutoff=0.5):
        if names[match] not in close:
            close.append(names[match])
    hint = f". Closest: {', '.join(close[:5])}" if close else ""
    raise UserError(f"unknown GPU '{ref}'{hint} (known: {', '.join(presets)})")


# --------------------------------------------------------------------------------------------
# Memory sizes
# --------------------------------------------------------------------------------------------

_UNITS = {
    "": GiB,  # a plain number is GiB
    "b": 1,
    "k": KiB, "kib": KiB, "kb": 10**3,
    "m": MiB, "mib": MiB, "mb": 10**6,
    "g": GiB, "gib": GiB, "gb": 10**9,
    "t": TiB, "tib": TiB, "tb": 10**12,
}  # fmt: skip

# Compiled on first use (re caches it), not at import: most runs parse no memory size.
_MEMORY_PATTERN = r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$"

_MEMORY_FORMS = (
    "a positive size such as 24GiB, 80 GiB, 81559MiB, 24GB (decimal, 10^9 bytes), "
    "24G (read as GiB) or a plain number of GiB such as 24"
)


def parse_memory(text: str) -> int:
    """Bytes from a memory size.

    Accepted, case-insensitive, with or without a space before the unit:

    * binary units ``KiB MiB GiB TiB`` (2**10 ...): ``24GiB``, ``80 GiB``, ``81559MiB``;
    * decimal units ``KB MB GB TB`` (10**3 ...), as vendors write them: ``24GB`` = 24e9 bytes;
    * single letters ``K M G T`` are read as BINARY (``24G`` = 24 GiB), the way nvidia-smi,
      PyTorch and most tools mean them;
    * ``B`` for plain bytes;
    * a bare number is GiB: ``24`` = 24 GiB.

    Fractions are allowed (``1.5GiB``) and rounded to whole bytes.  Zero, negative and
    unparseable sizes raise :class:`~memplan.errors.UserError` naming the forms above.
    """
    if isinstance(text, bool):
        raise UserError(f"bad memory size {text!r}: expected {_MEMORY_FORMS}")
    match = re.match(_MEMORY_PATTERN, str(text), re.IGNORECASE)
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"bad memory size '{text}': expected {_MEMORY_FORMS}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value):  # 1e400GiB: no machine's memory, and inf bytes is no number of bytes
        raise UserError(f"memory size '{text}' is not a finite number of bytes: expected {_MEMORY_FORMS}")
    n = round(value)
    if n <= 0:
        raise UserError(f"memory size '{text}' must be more than zero: expected {_MEMORY_FORMS}")
    return int(n)


def custom_gpu(memory_bytes: int) -> Gpu:
    """A GPU known only by its memory (``custom-24gib``); every throughput figure is None."""
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
        raise UserError(f"GPU memory must be a positive number of bytes, got {memory_bytes!r}")
    label = gib_label(memory_bytes)
    return Gpu(
        id=f"custom-{label}gib",
        name=f"Custom GPU ({label} GiB)",
        memory_bytes=memory_bytes,
        memory_source="custom",
    )


# --------------------------------------------------------------------------------------------
# Local GPUs
# --------------------------------------------------------------------------------------------


def _norm_device_name(name: str) -> str:
    return " ".join(name.split()).lower()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def match_device_name(device_name: str) -> Gpu | None:
    """The preset whose ``nvml_names`` lists this NVML device name (case/space-insensitive), else None."""
    presets, _, nvml = _load()
    gid = nvml.get(_norm_device_name(device_name))
    return presets[gid] if gid else None


def _local_gpu(device_name: str, total_bytes: int) -> Gpu:
    preset = match_device_name(device_name)
    if preset is None:
        return Gpu(id=f"local-{_slug(device_name)}", name=device_name, memory_bytes=total_bytes, memory_source="nvml")
    # The preset's figures, the device's own name and the memory the driver reports for it.
    return dataclasses.replace(preset, name=device_name, memory_bytes=total_bytes, memory_source="nvml")


def _no_nvidia_driver() -> bool:
    """On Linux the NVIDIA kernel driver shows itself in /proc and /dev; without it NVML cannot start,
    so memplan skips importing pynvml (a fifth of the CLI's start-up on a CPU machine)."""
    if not sys.platform.startswith("linux"):
        return False
    return not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl"))


def local_gpus() -> list[Gpu]:
    """The NVIDIA GPUs on this machine, via NVML; ``[]`` when there are none or NVML is unusable.

    ``memory_bytes`` is NVML's total for the device.  Names that a preset lists in ``nvml_names``
    (e.g. "NVIDIA H100 80GB HBM3" -> h100-80gb) borrow that preset's id and throughput figures;
    others get id ``local-<name>`` and no figures.  Never raises: a missing ``pynvml`` module, a
    missing driver library or any NVML error gives ``[]``.  (MIG slices are not listed: a
    MIG-enabled GPU shows its whole memory.)
    """
    if _no_nvidia_driver():
        return []
    try:
        import pynvml  # only here: the import and nvmlInit cost time and need the driver
    except Exception:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    found: list[Gpu] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # nvidia-ml-py < 11.515 returns bytes
                name = name.decode("utf-8", "replace")
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            if total > 0:
                found.append(_local_gpu(str(name).strip(), total))
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return found
