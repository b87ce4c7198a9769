"""Finishing: the x0 estimate (model space, float NCHW in [-1, 1]) -> uint8 images -> PNG (or JPEG, WebP).

numpy + Pillow only: the runtime finishes every request with these,
profiling times them, the bench scores their output.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


IMAGE_CHANNELS = (1, 3)   # greyscale or RGB: anything else (latents, RGBA) is not an image of this runtime


def check_image_channels(channels: int, what: str = "the artifact") -> None:
    """Refuse samples that are not an image's 1 or 3 channels (4-channel latents would be written as RGBA)."""
    if channels not in IMAGE_CHANNELS:
        from abcd_edge.errors import UserError

        raise UserError(f"{what} makes {channels}-channel samples, not an image (latents need a VAE decode, not "
                        "supported yet); accepted: pixel-space models with 3 channels (RGB) or 1 (greyscale)")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (clipped), the inverse of :func:`to_model_space`; 1 or 3 channels."""
    check_image_channels(x.shape[1], "the model")
    return np.clip(np.round((x.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the diffusion model's data space)."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 image: rows of ``cols`` images (default: a near-square grid)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    return grid


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """One uint8 HWC image as PNG bytes, upscaled ``scale`` times (nearest) for viewing."""
    return image_bytes(image, "PNG", scale)


def image_bytes(image: np.ndarray, fmt: str, scale: int = 1) -> bytes:
    """One uint8 HWC image encoded by Pillow as ``fmt`` (PNG, JPEG, WEBP), upscaled ``scale`` times (nearest)."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)  # grey: mode L
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": 95}))
    return buf.getvalue()


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_suffixes() -> list[str]:
    """The output suffixes this Pillow can write (.webp only where it was built with WebP)."""
    from PIL import features

    return [s for s, fmt in IMAGE_FORMATS.items() if fmt != "WEBP" or features.check("webp")]


def image_format(path: str | Path, flag: str = "--out") -> str:
    """The Pillow format an image path's suffix names (case-insensitive); a UserError naming the accepted
    suffixes for any other."""
    from abcd_edge.errors import UserError

    suffix = Path(path).suffix.lower()
    accepted = image_suffixes()
    if suffix not in accepted:
        named = f"the suffix {Path(path).suffix!r}" if Path(path).suffix else "no suffix"
        raise UserError(f"{flag} {str(path)!r}: {named} names no image format written here; "
                        f"accepted: {', '.join(accepted)}")
    return IMAGE_FORMATS[suffix]


def save_png(images: np.ndarray, path: str | Path, scale: int = 4, cols: int | None = None) -> None:
    """Write the images (a grid when several, rows of ``cols``) as a PNG, upscaled for viewing, atomically."""
    from abcd_edge.io import write_bytes_atomic

    write_bytes_atomic(path, png_bytes(image_grid(images, cols), scale))


def save_image(images: np.ndarray, path: str | Path, scale: int = 4) -> None:
    """Write the images (a grid when several), upscaled for viewing, atomically, in the format the path's
    suffix names (see :func:`image_format`)."""
    from abcd_edge.io import write_bytes_atomic

    write_bytes_atomic(path, image_bytes(image_grid(images), image_format(path), scale))


def fit_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 NHWC images to ``height`` x ``width`` by an integer factor: box average down, pixel repeat up;
    other ratios are refused (a feature network must not see interpolation artefacts it was not trained on)."""
    n, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    if h % height == 0 and w % width == 0 and h // height == w // width:
        f = h // height
        x = images.reshape(n, height, f, width, f, c).astype(np.float32).mean(axis=(2, 4))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if height % h == 0 and width % w == 0 and height // h == width // w:
        f = height // h
        return images.repeat(f, axis=1).repeat(f, axis=2)
    from abcd_edge.errors import UserError

    raise UserError(f"images of {h}x{w} cannot be fitted to the feature network's {height}x{width} input "
                    "(only integer scale factors are)")
