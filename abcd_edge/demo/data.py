"""The procedural demo data set: anti-aliased shapes on a gradient background.

Every image is a pure function of (seed, index, resolution), so a data set is
reproducible anywhere without downloads. Labels (which kinds, which colours,
how many shapes) train the feature network that measures quality.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 50, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
MAX_SHAPES = 3
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One drawn shape, in unit image coordinates (centre x, y and radius as shares of the side)."""

    kind: str
    colour: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Labels:
    """Multi-hot kinds and colours present, the shape count (1..MAX_SHAPES), and the shapes in draw order
    (what captions are made from, ``demo.captions``)."""

    kinds: np.ndarray  # [len(KINDS)] float32 0/1
    colours: np.ndarray  # [len(COLOURS)] float32 0/1
    count: int
    shapes: tuple[Shape, ...] = ()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour linear gradient in a random direction (muted tones)."""
    c0, c1 = rng.uniform(60, 200, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return (c0 * (1 - t) + c1 * t).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int], rotation: float) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        w = max(r * 0.35, 1.0)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=int(round(w)))
    else:
        corners = {"square": 4, "triangle": 3, "diamond": 4}[kind]
        offset = rotation if kind != "diamond" else np.pi / 4 + rotation * 0.2
        stretch = (1.0, 1.45) if kind == "diamond" else (1.0, 1.0)
        pts = [(cx + r * stretch[0] * np.cos(offset + 2 * np.pi * k / corners),
                cy + r * stretch[1] * np.sin(offset + 2 * np.pi * k / corners))
               for k in range(corners)]
        draw.polygon(pts, fill=colour)


def make_example(seed: int, index: int, resolution: int = 32) -> tuple[np.ndarray, Labels]:
    """One RGB uint8 image [H, W, 3] and its labels, determined by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    big = resolution * SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, big))
    draw = ImageDraw.Draw(canvas)
    count = int(rng.integers(1, MAX_SHAPES + 1))
    kinds = np.zeros(len(KINDS), np.float32)
    colours = np.zeros(len(COLOURS), np.float32)
    shapes = []
    for _ in range(count):
        k = int(rng.integers(len(KINDS)))
        c = int(rng.integers(len(COLOURS)))
        r = rng.uniform(0.12, 0.26) * big
        cx, cy = rng.uniform(r, big - r, size=2)
        _draw_shape(draw, KINDS[k], cx, cy, r, COLOURS[COLOUR_NAMES[c]], rng.uniform(0, np.pi))
        kinds[k] = 1.0
        colours[c] = 1.0
        shapes.append(Shape(KINDS[k], COLOUR_NAMES[c], float(cx / big), float(cy / big), float(r / big)))
    image = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8), Labels(kinds, colours, count, tuple(shapes))


def make_images(seed: int, n: int, resolution: int = 32, start: int = 0) -> np.ndarray:
    """n images as uint8 [n, H, W, 3]."""
    return np.stack([make_example(seed, start + i, resolution)[0] for i in range(n)])


def make_dataset(seed: int, n: int, resolution: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 [n,H,W,3], kinds [n,K], colours [n,C], counts int64 [n] (1..MAX_SHAPES)."""
    examples = [make_example(seed, i, resolution) for i in range(n)]
    images = np.stack([e[0] for e in examples])
    kinds = np.stack([e[1].kinds for e in examples])
    colours = np.stack([e[1].colours for e in examples])
    counts = np.array([e[1].count for e in examples], np.int64)
    return images, kinds, colours, counts


