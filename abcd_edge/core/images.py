"""Finishing: the x0 estimate (model space, float NCHW in [-1, 1]) -> uint8 images -> PNG.

numpy + Pillow only: the runtime finishes every request with these,
profiling times them, the bench scores their output.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (clipped), the inverse of :func:`to_model_space`."""
    return np.clip(np.round((x.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the diffusion model's data space)."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def image_grid(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 image, near-square grid."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    return grid


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """One uint8 HWC image as PNG bytes, upscaled ``scale`` times (nearest) for viewing."""
    from PIL import Image

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(images: np.ndarray, path: str | Path, scale: int = 4) -> None:
    """Write the images (a grid when several) as a PNG, upscaled for viewing, atomically."""
    from abcd_edge.io import write_bytes_atomic

    write_bytes_atomic(path, png_bytes(image_grid(images), scale))
