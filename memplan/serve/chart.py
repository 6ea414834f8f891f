"""One plan's memory per device as an inline SVG: a stacked bar per phase (forward, backward, optimizer), one
segment per term, against the device's capacity and the usable line (capacity less the headroom).

The same terms and colours as `recommend --plot` (memplan.recommend.plot, matplotlib's tab20 in TERMS order),
drawn as SVG text so the page needs no plotting library and no asset from the network. Each bar holds the
phase's terms and the CUDA context (there all along); the peak phase's bar also holds the caching allocator's
reserve, so that its top is the plan's total, the figure compared with the capacity.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

from memplan.estimator.phases import PHASES, TERMS
from memplan.report.units import GiB, gib

if TYPE_CHECKING:
    from memplan.estimator import Estimate
    from memplan.recommend.hardware import Target

#: matplotlib's "tab20" colours, in its order: the palette memplan.recommend.plot draws the same terms with.
TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
         "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
         "#17becf", "#9edae5")
SEGMENTS = (*TERMS, "allocator_reserve", "cuda_context")
COLOURS = dict(zip(SEGMENTS, TAB20))

WIDTH, HEIGHT = 660, 330
LEFT, RIGHT, TOP, BOTTOM = 56, 220, 16, 34  # margins: axis labels, legend, headroom for labels, phase names


def segments(e: Estimate) -> dict[str, list[tuple[str, int]]]:
    """Phase -> its stacked segments (name, bytes), zero ones left out: the terms, the allocator reserve on the
    peak phase, the CUDA context (0 for a CPU plan)."""
    context = e.total - e.reserved
    out = {}
    for phase in PHASES:
        parts = [(t, e.phases[phase][t]) for t in TERMS]
        if phase == e.peak_phase:
            parts.append(("allocator_reserve", e.reserved - e.peak_allocated))
        parts.append(("cuda_context", context))
        out[phase] = [(name, b) for name, b in parts if b > 0]
    return out


def _step(top_gib: float) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving four to eight ticks up to `top_gib`."""
    raw = top_gib / 5
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def phase_chart(e: Estimate, target: Target | None, sizes_gib: tuple[int, ...] = ()) -> str:
    """The SVG: bars by phase, the capacity (solid) and usable (dashed) lines of `target`; without a target,
    one line for each common GPU size in `sizes_gib`."""
    bars = segments(e)
    lines = []  # (bytes, label, css class)
    if target is not None:
        what = "per process" if e.plan.device == "cpu" else "per GPU"
        lines.append((target.memory_bytes, f"capacity {gib(target.memory_bytes)} GiB {what}", "capacity"))
        lines.append((target.usable_bytes, f"usable {gib(target.usable_bytes)} GiB "
                                           f"({100 * target.headroom:g} % kept free)", "usable"))
    else:
        lines += [(s * GiB, f"{s} GiB GPU", "size") for s in sizes_gib]
    top = max([sum(b for _, b in parts) for parts in bars.values()] + [b for b, _, _ in lines] + [GiB]) * 1.08
    plot_h, plot_w = HEIGHT - TOP - BOTTOM, WIDTH - LEFT - RIGHT

    def y(n: float) -> float:
        return TOP + plot_h * (1 - n / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="memory per device by phase and term">']
    step = _step(top / GiB)
    for i in range(int(top / GiB / step) + 1):
        v = i * step
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(v * GiB):.1f}" '
                   f'y2="{y(v * GiB):.1f}"/><text class="tick" x="{LEFT - 6}" y="{y(v * GiB) + 4:.1f}" '
                   f'text-anchor="end">{v:g}</text>')
    out.append(f'<text class="axis" x="14" y="{TOP + plot_h / 2:.0f}" transform="rotate(-90 14 '
               f'{TOP + plot_h / 2:.0f})" text-anchor="middle">GiB per device</text>')
    slot = plot_w / len(PHASES)
    for i, phase in enumerate(PHASES):
        x, base, total = LEFT + slot * i + slot * 0.2, 0, 0
        for name, b in bars[phase]:
            out.append(f'<rect class="seg" data-phase="{phase}" data-term="{name}" data-bytes="{b}" x="{x:.1f}" '
                       f'y="{y(base + b):.1f}" width="{slot * 0.6:.1f}" height="{y(base) - y(base + b):.2f}" '
                       f'fill="{COLOURS[name]}"><title>{phase}: {name.replace("_", " ")} {gib(b)} GiB</title></rect>')
            base += b
        total = base
        peak = " (peak)" if phase == e.peak_phase else ""
        out.append(f'<text class="bar-total" data-phase="{phase}" data-bytes="{total}" x="{x + slot * 0.3:.1f}" '
                   f'y="{y(total) - 4:.1f}" text-anchor="middle">{gib(total)}</text>'
                   f'<text class="phase" x="{x + slot * 0.3:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                   f'text-anchor="middle">{phase}{peak}</text>')
    for b, label, css in lines:
        out.append(f'<line class="{css}" data-bytes="{b}" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(b):.1f}" '
                   f'y2="{y(b):.1f}"><title>{escape(label)}</title></line>')
    out.append(_legend(bars, lines, LEFT + plot_w + 14))
    out.append("</svg>")
    return "".join(out)


def _legend(bars: dict[str, list[tuple[str, int]]], lines: list[tuple[int, str, str]], x: float) -> str:
    shown = [s for s in SEGMENTS if any(name == s for parts in bars.values() for name, _ in parts)]
    out, row = [], TOP + 4
    for name in reversed(shown):  # top to bottom, as the bars stack
        out.append(f'<rect x="{x}" y="{row}" width="11" height="11" fill="{COLOURS[name]}"/>'
                   f'<text class="legend" x="{x + 16}" y="{row + 10}">{name.replace("_", " ")}</text>')
        row += 17
    row += 6
    for _, label, css in lines:
        out.append(f'<line class="{css}" x1="{x}" x2="{x + 11}" y1="{row + 5}" y2="{row + 5}"/>'
                   f'<text class="legend" x="{x + 16}" y="{row + 9}">{escape(label)}</text>')
        row += 17
    return "".join(out)
