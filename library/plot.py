"""A small line plot drawn with Pillow (no plotting library needed): efficacy against steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (127, 127, 127),
)
"""Series colours, in order."""


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values in [low, high]: the step is 1, 2 or 5 times a power of ten,
    whichever is closest to an even split into ``count - 1`` intervals."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda candidate: abs(math.log(candidate / raw)))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


@dataclass(frozen=True)
class Frame:
    """Where the data area sits in the image and which data range it shows."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Image coordinates of data point (x, y); y is clamped to the shown range."""
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        y = min(max(y, y0), y1)
        px = self.left + (x - x0) / (x1 - x0 or 1.0) * (self.right - self.left)
        py = self.bottom - (y - y0) / (y1 - y0 or 1.0) * (self.bottom - self.top)
        return px, py


def plot_frame(series: Mapping[str, Sequence[tuple[float, float | None]]], size: tuple[int, int],
               y_range: tuple[float, float]) -> Frame:
    """The frame :func:`line_plot` draws ``series`` in (x from 0 to the largest x)."""
    xs = [x for points in series.values() for x, _ in points] or [1.0]
    width, height = size
    return Frame(left=58, top=34, right=width - 190, bottom=height - 42, x_range=(0.0, max(max(xs), 1.0)), y_range=y_range)


def line_plot(series: Mapping[str, Sequence[tuple[float, float | None]]], title: str, x_label: str, y_label: str,
              y_range: tuple[float, float] = (0.0, 1.0), guides: Sequence[float] = (), size: tuple[int, int] = (760, 420)) -> Image.Image:
    """Draw each named series as a line with point markers; missing values (None) break nothing.

    Args:
        series: ``{name: [(x, y or None), ...]}``, drawn in order with :data:`PALETTE` colours.
        title: text above the plot.
        x_label: text under the x axis.
        y_label: text left of the title (the y unit).
        y_range: shown y range; points outside it are drawn at its edge.
        guides: y values marked with a dashed horizontal line (thresholds).
        size: image (width, height) in pixels.

    Returns:
        An RGB image.
    """
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    frame = plot_frame(series, size, y_range)
    draw.text((frame.left, 8), title, fill=(0, 0, 0))
    draw.text((4, 8), y_label, fill=(80, 80, 80))
    for tick in nice_ticks(*y_range, count=6):
        _, py = frame.to_pixel(0, tick)
        draw.line([(frame.left, py), (frame.right, py)], fill=(232, 232, 232))
        draw.text((6, py - 6), f"{tick:g}", fill=(0, 0, 0))
    for tick in nice_ticks(*frame.x_range, count=8):
        px, _ = frame.to_pixel(tick, y_range[0])
        draw.line([(px, frame.bottom), (px, frame.bottom + 4)], fill=(0, 0, 0))
        draw.text((px - 10, frame.bottom + 7), f"{tick:g}", fill=(0, 0, 0))
    for guide in guides:
        _, py = frame.to_pixel(0, guide)
        for start in range(frame.left, frame.right, 10):
            draw.line([(start, py), (min(start + 5, frame.right), py)], fill=(120, 120, 120))
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline=(0, 0, 0))
    draw.text(((frame.left + frame.right) // 2 - 3 * len(x_label), frame.bottom + 24), x_label, fill=(0, 0, 0))
    for index, (name, points) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        pixels = [frame.to_pixel(x, y) for x, y in points if y is not None]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        legend_y = frame.top + 4 + 18 * index
        draw.line([(frame.right + 12, legend_y + 6), (frame.right + 32, legend_y + 6)], fill=color, width=3)
        draw.text((frame.right + 38, legend_y), name, fill=(0, 0, 0))
    return image
