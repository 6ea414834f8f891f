"""The candidates' per-GPU memory as stacked bars by term, against the usable capacity (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from memplan.estimator.phases import TERMS
from memplan.report.units import GiB, format_bytes


def plot_candidates(path: str, entries: list[tuple[str, object]], capacity: int, usable: int, title: str) -> str:
    """entries: (label, Candidate) in display order; bars are each plan's peak phase, by term, plus the
    allocator reserve and the CUDA context on top. Written atomically (temporary file + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(entries) + 3), 5.5))
    _stack_bars(ax, [cand.estimate for _, cand in entries], plt.get_cmap("tab20"))
    ax.axhline(capacity / GiB, color="black", linewidth=1.5, label=f"capacity {format_bytes(capacity, digits=1)}")
    ax.axhline(usable / GiB, color="black", linestyle="--", linewidth=1,
               label=f"usable (headroom) {format_bytes(usable, digits=1)}")
    ax.set_xticks(list(range(len(entries))))
    ax.set_xticklabels([label for label, _ in entries], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("memory per device (GiB)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save_png(fig, Path(path))


def _stack_bars(ax, estimates: list, cmap) -> None:
    """One bar per estimate: its peak phase's terms, then the allocator reserve and the CUDA context."""
    xs = range(len(estimates))
    bottoms = [0.0] * len(estimates)
    for i, term in enumerate(list(TERMS) + ["allocator_reserve", "cuda_context"]):
        if term == "allocator_reserve":
            heights = [(e.reserved - e.peak_allocated) / GiB for e in estimates]
        elif term == "cuda_context":
            heights = [(e.total - e.reserved) / GiB for e in estimates]
        else:
            heights = [e.breakdown.get(term, 0) / GiB for e in estimates]
        if any(heights):
            ax.bar(xs, heights, bottom=bottoms, color=cmap(i), label=term.replace("_", " "), width=0.7)
            bottoms = [b + h for b, h in zip(bottoms, heights)]


def _save_png(fig, out: Path) -> str:
    """The figure as `out`, complete or absent (a temporary file renamed over it); the figure is closed."""
    import os
    import tempfile

    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    except OSError as err:
        plt.close(fig)
        from memplan.errors import UserError

        raise UserError(f"--plot {out}: cannot write there: {err.strerror} ({err.filename})") from None
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


def plot_recommendation(rec, path: str) -> str:
    """The chart of --plot: the recommended plan first, then the runners-up; returns the path written."""
    entries = [("recommended: " + rec.chosen.family(), rec.chosen)]
    entries += [(a.candidate.family() + ("" if a.candidate.fits else " (no fit)"), a.candidate)
                for a in rec.alternatives]
    title = f"{rec.spec.name} on {rec.target.describe()}: memory per device at each plan's peak phase"
    return plot_candidates(path, entries, rec.target.memory_bytes, rec.target.usable_bytes, title)
