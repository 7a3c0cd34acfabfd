"""Server-side SVG charts: line, bar (stacked or grouped) and horizontal bar.

Pure functions from numbers to a self-contained SVG string (marked safe, every text
escaped): no JavaScript, no fonts or files to fetch, so the admin renders them offline and
they print. Hovering a point or bar shows its value through SVG's own <title> tooltips.
Text and axes use `currentColor`, so a chart follows the admin's light or dark theme.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from hashlib import sha1
from xml.sax.saxutils import escape

from django.utils.safestring import SafeString, mark_safe

# Okabe & Ito's palette: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#7F7F7F", "#000000",
           "#B8860B")

Number = float | int | Decimal
Formatter = Callable[[float], str]


@dataclass(frozen=True)
class Series:
    """One named line or bar series; None marks a missing value (a gap in a line)."""

    name: str
    values: Sequence[Number | None]


# --- Value formats ----------------------------------------------------------------------------


def format_number(value: float) -> str:
    """1234 -> 1.2k, 2500000 -> 2.5M; small numbers as they are."""
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.1f}".rstrip("0").rstrip(".") + suffix
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_usd(value: float) -> str:
    """Dollars, with more decimals for the fractions of a cent that model calls cost."""
    if value == 0:
        return "$0"
    if abs(value) >= 100:
        return f"${value:,.0f}"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}".rstrip("0")


def format_ms(value: float) -> str:
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.0f} ms"


def format_percent(value: float) -> str:
    return f"{value * 100:.0f}%"


# --- Geometry ---------------------------------------------------------------------------------


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """Tick values from 0 to at least `maximum` in 1-2-2.5-5 steps (Heckbert's nice numbers)."""
    if not maximum or maximum <= 0 or not math.isfinite(maximum):
        maximum = 1.0
    raw = maximum / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    top = math.ceil(maximum / step - 1e-9) * step
    return [round(i * step, 10) for i in range(round(top / step) + 1)]


@dataclass(frozen=True)
class _Frame:
    width: int
    height: int
    left: int = 64
    right: int = 16
    top: int = 56
    bottom: int = 40

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _chart_id(title: str, *parts: object) -> str:
    return "chart-" + sha1(repr((title, *parts)).encode()).hexdigest()[:10]


def _open(
    frame: _Frame, title: str, chart_id: str, description: str, title_x: int | None = None
) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="kb-chart" role="img" '
        f'viewBox="0 0 {frame.width} {frame.height}" width="100%" '
        f'preserveAspectRatio="xMidYMid meet" aria-labelledby="{chart_id}-t {chart_id}-d" '
        f'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="11">',
        f'<title id="{chart_id}-t">{escape(title)}</title>',
        f'<desc id="{chart_id}-d">{escape(description)}</desc>',
        f'<text x="{frame.left if title_x is None else title_x}" y="18" font-size="14" '
        f'font-weight="600" fill="currentColor">'
        f"{escape(title)}</text>",
    ]


def _legend(frame: _Frame, names: Sequence[str]) -> list[str]:
    parts, x = [], float(frame.left)
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        label = name if len(name) <= 40 else name[:39] + "…"
        parts.append(f'<rect x="{_num(x)}" y="30" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{_num(x + 14)}" y="39" fill="currentColor">{escape(label)}</text>')
        x += 14 + 6.5 * len(label) + 16
    return parts


def _y_axis(frame: _Frame, ticks: Sequence[float], y_label: str, fmt: Formatter) -> list[str]:
    top = ticks[-1] or 1
    parts = []
    for tick in ticks:
        y = frame.top + frame.plot_height * (1 - tick / top)
        parts.append(
            f'<line x1="{frame.left}" x2="{frame.width - frame.right}" '
            f'y1="{_num(y)}" y2="{_num(y)}" '
            f'stroke="currentColor" stroke-opacity="{0.5 if tick == 0 else 0.12}"/>'
        )
        parts.append(
            f'<text x="{frame.left - 6}" y="{_num(y + 4)}" text-anchor="end" fill="currentColor">'
            f"{escape(fmt(tick))}</text>"
        )
    if y_label:
        cy = frame.top + frame.plot_height / 2
        parts.append(
            f'<text x="12" y="{_num(cy)}" text-anchor="middle" fill="currentColor" '
            f'transform="rotate(-90 12 {_num(cy)})">{escape(y_label)}</text>'
        )
    return parts


def _x_labels(frame: _Frame, labels: Sequence[str], centers: Sequence[float]) -> list[str]:
    # Show at most about one label per 60 pixels; the rest stay in the tooltips.
    every = max(1, math.ceil(len(labels) / max(1, frame.plot_width // 60)))
    y = frame.height - frame.bottom + 16
    return [
        f'<text x="{_num(x)}" y="{y}" text-anchor="middle" fill="currentColor">'
        f"{escape(label)}</text>"
        for i, (label, x) in enumerate(zip(labels, centers, strict=True))
        if i % every == 0
    ]


def _empty(frame: _Frame, parts: list[str], message: str) -> SafeString:
    parts.append(
        f'<text x="{frame.width / 2}" y="{frame.top + frame.plot_height / 2}" text-anchor="middle" '
        f'fill="currentColor" fill-opacity="0.6">{escape(message)}</text>'
    )
    parts.append("</svg>")
    return mark_safe("".join(parts))


def _floats(values: Sequence[Number | None]) -> list[float | None]:
    return [None if v is None else float(v) for v in values]


# --- Charts -----------------------------------------------------------------------------------


def line_chart(
    *,
    title: str,
    x_labels: Sequence[str],
    series: Sequence[Series],
    y_label: str = "",
    value_format: Formatter = format_number,
    y_max: float | None = None,
    width: int = 720,
    height: int = 260,
) -> SafeString:
    """Lines over shared x labels; a None value leaves a gap. y starts at 0."""
    frame = _Frame(width, height)
    data = [_floats(s.values) for s in series]
    present = [v for values in data for v in values if v is not None]
    chart_id = _chart_id(title, tuple(x_labels), tuple((s.name, tuple(s.values)) for s in series))
    parts = _open(frame, title, chart_id, f"Line chart of {', '.join(s.name for s in series)} "
                  f"over {len(x_labels)} points.")
    if not x_labels or not present:
        return _empty(frame, parts, "No data for this period")
    ticks = nice_ticks(y_max if y_max is not None else max(present))
    top = ticks[-1]
    step = frame.plot_width / max(1, len(x_labels) - 1) if len(x_labels) > 1 else 0
    xs = [
        frame.left + (i * step if len(x_labels) > 1 else frame.plot_width / 2)
        for i in range(len(x_labels))
    ]
    parts += _legend(frame, [s.name for s in series])
    parts += _y_axis(frame, ticks, y_label, value_format)
    for index, (s, values) in enumerate(zip(series, data, strict=True)):
        color = PALETTE[index % len(PALETTE)]
        segment: list[str] = []
        segments: list[list[str]] = []
        points = []
        for x, label, value in zip(xs, x_labels, values, strict=True):
            if value is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            y = frame.top + frame.plot_height * (1 - value / top)
            segment.append(f"{_num(x)},{_num(y)}")
            points.append(
                f'<circle cx="{_num(x)}" cy="{_num(y)}" r="3" fill="{color}">'
                f"<title>{escape(f'{label} · {s.name}: {value_format(value)}')}</title></circle>"
            )
        if segment:
            segments.append(segment)
        for seg in segments:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                         f'stroke-linejoin="round" points="{" ".join(seg)}"/>')
        parts += points
    parts += _x_labels(frame, x_labels, xs)
    parts.append("</svg>")
    return mark_safe("".join(parts))


def bar_chart(
    *,
    title: str,
    x_labels: Sequence[str],
    series: Sequence[Series],
    stacked: bool = True,
    y_label: str = "",
    value_format: Formatter = format_number,
    width: int = 720,
    height: int = 260,
    zero_note: str = "",
) -> SafeString:
    """Vertical bars per x label: stacked series (a total split by part) or side by side.

    `zero_note` is what to say when there were events but every value is 0 (calls to
    local models cost $0): the axes are drawn with the note, not "No data".
    """
    frame = _Frame(width, height)
    data = [[v or 0.0 for v in _floats(s.values)] for s in series]
    chart_id = _chart_id(title, tuple(x_labels), tuple((s.name, tuple(s.values)) for s in series),
                         stacked, zero_note)
    parts = _open(frame, title, chart_id, f"Bar chart of {', '.join(s.name for s in series)} "
                  f"over {len(x_labels)} points." + (f" {zero_note}." if zero_note else ""))
    if x_labels and data and zero_note and not any(v for values in data for v in values):
        parts += _y_axis(frame, nice_ticks(0), y_label, value_format)
        band = frame.plot_width / len(x_labels)
        centers = [frame.left + band * (i + 0.5) for i in range(len(x_labels))]
        parts += _x_labels(frame, x_labels, centers)
        return _empty(frame, parts, zero_note)
    if not x_labels or not data or not any(v for values in data for v in values):
        return _empty(frame, parts, "No data for this period")
    if stacked:
        peak = max(sum(values[i] for values in data) for i in range(len(x_labels)))
    else:
        peak = max(v for values in data for v in values)
    ticks = nice_ticks(peak)
    top = ticks[-1]
    band = frame.plot_width / len(x_labels)
    bar = band * 0.72
    centers = [frame.left + band * (i + 0.5) for i in range(len(x_labels))]
    if len(series) > 1 or stacked:
        parts += _legend(frame, [s.name for s in series])
    parts += _y_axis(frame, ticks, y_label, value_format)
    for i, (label, center) in enumerate(zip(x_labels, centers, strict=True)):
        base = 0.0
        for index, (s, values) in enumerate(zip(series, data, strict=True)):
            value = values[i]
            color = PALETTE[index % len(PALETTE)]
            if stacked:
                x, w, start = center - bar / 2, bar, base
                base += value
            else:
                w = bar / len(series)
                x, start = center - bar / 2 + w * index, 0.0
            if value <= 0:
                continue
            y_top = frame.top + frame.plot_height * (1 - (start + value) / top)
            h = frame.plot_height * value / top
            parts.append(
                f'<rect x="{_num(x)}" y="{_num(y_top)}" width="{_num(max(w, 1))}" '
                f'height="{_num(max(h, 0.5))}" fill="{color}">'
                f"<title>{escape(f'{label} · {s.name}: {value_format(value)}')}</title></rect>"
            )
    parts += _x_labels(frame, x_labels, centers)
    parts.append("</svg>")
    return mark_safe("".join(parts))


def hbar_chart(
    *,
    title: str,
    labels: Sequence[str],
    values: Sequence[Number],
    value_format: Formatter = format_number,
    width: int = 720,
    bar_height: int = 22,
) -> SafeString:
    """Horizontal bars, one per label, longest first as given: a ranking."""
    label_width = 220
    frame = _Frame(width, 40 + max(1, len(labels)) * (bar_height + 6) + 10, left=label_width,
                   top=34, bottom=10, right=90)
    numbers = [float(v) for v in values]
    chart_id = _chart_id(title, tuple(labels), tuple(numbers))
    parts = _open(frame, title, chart_id, f"Ranking of {len(labels)} items.", title_x=8)
    if not labels or not any(numbers):
        return _empty(frame, parts, "No data for this period")
    top = max(numbers) or 1.0
    for i, (label, value) in enumerate(zip(labels, numbers, strict=True)):
        y = frame.top + i * (bar_height + 6)
        w = frame.plot_width * value / top
        shown = label if len(label) <= 34 else label[:33] + "…"
        parts.append(
            f'<text x="{label_width - 8}" y="{_num(y + bar_height * 0.7)}" text-anchor="end" '
            f'fill="currentColor">{escape(shown)}<title>{escape(label)}</title></text>'
        )
        parts.append(
            f'<rect x="{label_width}" y="{y}" width="{_num(max(w, 1))}" height="{bar_height}" '
            f'fill="{PALETTE[0]}"><title>{escape(f"{label}: {value_format(value)}")}</title></rect>'
        )
        parts.append(
            f'<text x="{_num(label_width + max(w, 1) + 6)}" y="{_num(y + bar_height * 0.7)}" '
            f'fill="currentColor">{escape(value_format(value))}</text>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))
