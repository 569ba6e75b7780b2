"""Small self-contained SVG charts (no plotting library, no external assets): bars and a scatter plot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

ORIGINAL_COLOR = "#7f7f7f"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif"


def row_colors(row_ids: list[str], variants: list[str | None]) -> dict[str, str]:
    """A colour per row: grey for the original, one palette colour per variant (the same on every device)."""
    names = list(dict.fromkeys(v for v in variants if v is not None))
    return {
        rid: ORIGINAL_COLOR if var is None else PALETTE[names.index(var) % len(PALETTE)]
        for rid, var in zip(row_ids, variants, strict=True)
    }


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2g}"


def tick_labels(ticks: list[float]) -> list[str]:
    """Tick labels with just enough decimals to tell neighbouring ticks apart."""
    if len(ticks) < 2:
        return [fmt_num(t) for t in ticks]
    step = min(abs(b - a) for a, b in zip(ticks, ticks[1:], strict=False)) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step * 10**decimals, 6) % 1:  # e.g. a step of 2.5 or 0.25
        decimals += 1
    if decimals > 6 or max(abs(t) for t in ticks) >= 1e5:
        return [f"{t:.3g}" for t in ticks]
    return [f"{t:.{decimals}f}" for t in ticks]


@dataclass
class Bar:
    label: str
    value: float
    color: str
    lo: float | None = None  # spread (e.g. first quartile)
    hi: float | None = None  # spread (e.g. third quartile)
    note: str = ""  # e.g. "3.2× faster"
    text: str = ""  # value as printed at the end of the bar


def bar_chart(title: str, bars: list[Bar], unit: str, width: int = 600, element_id: str = "") -> str:
    """Horizontal bars with value labels, optional spread whiskers and a note (ratio) per bar."""
    label_w, note_w, pad = 150, 118, 10
    row_h, top, bottom = 30, 34, 34
    area = width - label_w - note_w - 2 * pad
    height = top + row_h * len(bars) + bottom
    vmax = max([b.hi if b.hi is not None else b.value for b in bars] + [1e-12])
    ticks = nice_ticks(0.0, vmax * 1.02)
    scale_max = max(ticks[-1], vmax)
    x0 = label_w + pad

    def sx(v: float) -> float:
        return x0 + area * (v / scale_max if scale_max > 0 else 0)

    id_attr = f' id="{escape(element_id)}"' if element_id else ""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"{id_attr} style="{FONT}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{pad}" y="20" font-size="14" font-weight="600" fill="#222">{escape(title)}</text>',
    ]
    axis_y = top + row_h * len(bars) + 4
    for t, label in zip(ticks, tick_labels(ticks), strict=True):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" stroke="#e3e3e3"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{axis_y + 15}" font-size="11" fill="#555" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    parts.append(f'<line x1="{x0}" y1="{axis_y}" x2="{x0 + area}" y2="{axis_y}" stroke="#888"/>')
    parts.append(
        f'<text x="{x0 + area / 2:.1f}" y="{axis_y + 29}" font-size="11" fill="#555" text-anchor="middle">'
        f"{escape(unit)}</text>"
    )
    for i, b in enumerate(bars):
        y = top + i * row_h
        w = max(1.0, sx(b.value) - x0)
        parts.append(
            f'<text x="{label_w}" y="{y + row_h / 2 + 4:.1f}" font-size="12" fill="#222" text-anchor="end">'
            f"{escape(b.label)}</text>"
        )
        parts.append(
            f'<rect class="bar" x="{x0}" y="{y + 5}" width="{w:.1f}" height="{row_h - 10}" fill="{b.color}">'
            f"<title>{escape(b.label)}: {escape(b.text or fmt_num(b.value))}</title></rect>"
        )
        end = sx(b.value)
        if b.lo is not None and b.hi is not None and b.hi > b.lo:
            yc = y + row_h / 2
            parts.append(
                f'<path d="M{sx(b.lo):.1f} {yc:.1f}H{sx(b.hi):.1f}M{sx(b.lo):.1f} {yc - 5:.1f}V{yc + 5:.1f}'
                f'M{sx(b.hi):.1f} {yc - 5:.1f}V{yc + 5:.1f}" stroke="#111" stroke-width="1.2" fill="none"/>'
            )
            end = max(end, sx(b.hi))
        parts.append(
            f'<text x="{end + 4:.1f}" y="{y + row_h / 2 + 4:.1f}" font-size="11" fill="#333">'
            f"{escape(b.text or fmt_num(b.value))}</text>"
        )
        if b.note:
            parts.append(
                f'<text x="{width - pad}" y="{y + row_h / 2 + 4:.1f}" font-size="12" font-weight="600" '
                f'fill="#222" text-anchor="end">{escape(b.note)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class Point:
    label: str
    x: float
    y: float
    color: str


def scatter(
    title: str, points: list[Point], xlabel: str, ylabel: str, width: int = 600, height: int = 340
) -> str:
    """Points with labels on linear axes (e.g. accuracy against speed-up)."""
    left, right, top, bottom = 64, 24, 34, 46
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p.x for p in points], [p.y for p in points]
    xlo, xhi = min(xs + [0.0]), max(xs + [1.0])
    xhi += 0.08 * (xhi - xlo or 1)
    ylo, yhi = min(ys), max(ys)
    span = yhi - ylo
    if span < 1e-9:
        span = max(abs(yhi) * 0.01, 1e-3)
        ylo, yhi = ylo - span, yhi + span
    else:
        ylo, yhi = ylo - 0.15 * span, yhi + 0.15 * span
    xt, yt = nice_ticks(xlo, xhi), nice_ticks(ylo, yhi)
    xlo, xhi = min(xlo, xt[0]), max(xhi, xt[-1])
    ylo, yhi = min(ylo, yt[0]), max(yhi, yt[-1])

    def sx(v: float) -> float:
        return left + pw * (v - xlo) / (xhi - xlo)

    def sy(v: float) -> float:
        return top + ph * (1 - (v - ylo) / (yhi - ylo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" style="{FONT}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="20" font-size="14" font-weight="600" fill="#222">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    for t, label in zip(xt, tick_labels(xt), strict=True):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{top + ph + 15}" font-size="11" fill="#555" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    for t, label in zip(yt, tick_labels(yt), strict=True):
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" fill="#555" text-anchor="end">'
            f"{escape(label)}</text>"
        )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 8}" font-size="12" fill="#333" text-anchor="middle">'
        f"{escape(xlabel)}</text>"
    )
    parts.append(
        f'<text x="14" y="{top + ph / 2:.1f}" font-size="12" fill="#333" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2:.1f})">{escape(ylabel)}</text>'
    )
    for p in points:
        x, y = sx(p.x), sy(p.y)
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="7" fill="{p.color}" stroke="#222" '
            f'stroke-width="0.8"><title>{escape(p.label)}: {fmt_num(p.x)}×, {p.y:.4g}</title></circle>'
        )
        anchor, dx = ("end", -10) if x > left + pw * 0.8 else ("start", 10)
        parts.append(
            f'<text x="{x + dx:.1f}" y="{y - 8:.1f}" font-size="11" fill="#222" text-anchor="{anchor}">'
            f"{escape(p.label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
