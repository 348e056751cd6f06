"""The acceptance-rate curve of an OSD run: matplotlib when installed, else a plain SVG."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

Curve = list[tuple[float, float]]  # (requests served, acceptance rate)


def acceptance_curve(rows: list[dict[str, float]]) -> Curve:
    """(requests served, window acceptance rate) of every metrics row after the first."""
    return [(row["step"], row["osd/acceptance_rate"]) for row in rows if row["step"] > 0]


def plot_acceptance(curves: dict[str, Curve], updates: list[int], path: Path, title: str) -> Path:
    """Draw each named curve against requests served, with a tick per landed update; writes
    `path` as PNG with matplotlib, else `path` with an .svg suffix. Returns the file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(curves, updates, path.with_suffix(".svg"), title)
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        axes.plot([x for x, _ in curve], [y for _, y in curve], marker="o", ms=3, label=name)
    for index, served in enumerate(updates):
        axes.axvline(
            served, color="grey", alpha=0.25, lw=0.8, label="update landed" if index == 0 else None
        )
    axes.set(xlabel="requests served", ylabel="token acceptance rate", ylim=(0, 1), title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _svg(curves: dict[str, Curve], updates: list[int], path: Path, title: str) -> Path:
    """A minimal line chart: axes, one polyline per curve, grey update ticks, a legend."""
    width, height, margin = 640, 360, 48
    xs = [x for curve in curves.values() for x, _ in curve] or [1.0]
    x_max = max(max(xs), 1.0)

    def point(x: float, y: float) -> str:
        px = margin + (width - 2 * margin) * x / x_max
        py = height - margin - (height - 2 * margin) * y
        return f"{px:.1f},{py:.1f}"

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
        f'<text x="{width / 2}" y="20" text-anchor="middle">{escape(title)}</text>',
        f'<polyline fill="none" stroke="black" points="{point(0, 1)} {point(0, 0)} {point(x_max, 0)}"/>',
        f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">requests served</text>',
        f'<text x="10" y="{margin}">1.0</text><text x="10" y="{height - margin}">0.0</text>',
    ]
    for served in updates:
        top, bottom = point(served, 1), point(served, 0)
        parts.append(
            f'<line x1="{top.split(",")[0]}" y1="{top.split(",")[1]}" '
            f'x2="{bottom.split(",")[0]}" y2="{bottom.split(",")[1]}" stroke="#ccc"/>'
        )
    for index, (name, curve) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        points = " ".join(point(x, y) for x, y in curve)
        parts.append(f'<polyline fill="none" stroke="{colour}" points="{points}"/>')
        parts.append(
            f'<text x="{width - margin - 150}" y="{height - margin - 12 - 16 * index}" '
            f'fill="{colour}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
