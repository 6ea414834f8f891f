"""The one place bytes become text. GiB = 2^30 and MiB = 2^20 bytes (binary units, labelled as such)."""

from __future__ import annotations

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_UNITS = {
    "B": 1,
    "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}  # fmt: skip


def gib(n: float, digits: int = 2) -> str:
    """`n` bytes as a bare number of GiB, for tables whose header names the unit: gib(85899345920) == '80.00'."""
    return f"{n / GiB:.{digits}f}"


def gib_label(n: float) -> str:
    """`n` bytes as the shortest number of GiB, at most two decimals and no unit: '24', '23.99', '1.5'."""
    g = n / GiB
    if g == int(g):
        return str(int(g))
    return f"{g:.2f}".rstrip("0").rstrip(".")


def memory_setting(n: int) -> str:
    """A memory size as a flag or the Plan's target section takes it: whole GiB (80GiB), else whole MiB
    rounded down (23919MiB: never more than there is)."""
    if n % GiB == 0:
        return f"{n // GiB}GiB"
    return f"{max(1, n // MiB)}MiB"


def format_bytes(n: float, unit: str = "GiB", digits: int = 2) -> str:
    """`n` bytes in `unit` with its label: format_bytes(85520809984) == '79.65 GiB'. Binary units (GiB = 2^30)
    and decimal ones (GB = 10^9) as named; B prints whole bytes."""
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r}; one of {', '.join(_UNITS)}")
    if unit == "B":
        return f"{int(n)} B"
    return f"{n / _UNITS[unit]:.{digits}f} {unit}"


def size(n: float | None) -> str:
    """`n` bytes in the largest binary unit it reaches (GiB, MiB, KiB, else B); '-' for None."""
    if n is None:
        return "-"
    for unit in ("GiB", "MiB", "KiB"):
        if abs(n) >= _UNITS[unit]:
            return format_bytes(n, unit)
    return f"{int(n)} B"
