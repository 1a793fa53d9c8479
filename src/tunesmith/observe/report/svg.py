"""Line charts as inline SVG: no JavaScript, no library, nothing fetched when the page opens.

One chart = several series (x = optimizer step) plus vertical markers (checkpoints, resumes,
stops). Long series are thinned to `MAX_POINTS` by keeping every k-th point and the last one.
Every path carries `data-series="<name>"` and a `<title>`, so browsers show the name on hover
and tests can find each series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

MAX_POINTS = 2000
W, H = 600, 250  # viewBox size; the page scales it to the column width
PAD_L, PAD_R, PAD_T, PAD_B = 64, 14, 12, 34


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str
    dash: str = ""  # SVG stroke-dasharray ("" = solid)
    dots: bool = False  # draw a dot per point (sparse series such as eval)


@dataclass
class Marker:
    x: float
    label: str
    color: str
    kind: str  # checkpoint | resume | stop | error


@dataclass
class Chart:
    id: str
    title: str
    series: list[Series] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    y_label: str = ""


def fmt(v: float) -> str:
    """Short tick/legend label: 65.4k, 3.0e-04, 0.123, 2.1M."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        span = abs(hi) or 1.0
        lo, hi = lo - span / 2, hi + span / 2
        span = hi - lo
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    k = math.ceil(len(points) / MAX_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def render(chart: Chart) -> str:
    """The chart's `<svg>` element (empty series are left out; callers skip empty charts)."""
    series = [s for s in chart.series if s.points]
    xs = [x for s in series for x, _ in s.points] + [m.x for m in chart.markers]
    ys = [y for s in series for _, y in s.points]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return PAD_T + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" id="{escape(chart.id)}" viewBox="0 0 {W} {H}" '
           f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(chart.title)}">']
    out.append(f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" class="plot"/>')
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{fmt(t)}</text>')
    for t in nice_ticks(x0, x1, 6):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{H - PAD_B + 16}" class="tick" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{H - 4}" class="axis" text-anchor="middle">step</text>')
    for m in chart.markers:
        x = sx(m.x)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" stroke="{m.color}" '
                   f'class="marker {m.kind}" data-marker="{escape(m.kind)}"><title>{escape(m.label)}</title></line>')
    for s in series:
        pts = _thin(s.points)
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(f'<path d="{d}" stroke="{s.color}"{dash} class="line" data-series="{escape(s.name)}">'
                   f'<title>{escape(s.name)}</title></path>')
        if s.dots or len(pts) == 1:
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{s.color}">'
                           f'<title>{escape(s.name)} @ {fmt(x)}: {fmt(y)}</title></circle>')
    out.append("</svg>")
    return "".join(out)
