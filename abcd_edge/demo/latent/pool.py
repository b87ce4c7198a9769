"""The latent demo's training images and captions, generated once into the work folder.

``pool(work, n, resolution)`` returns the first ``n`` examples of generator seed ``DATA_SEED`` (uint8 [n, H, W, 3]
and their captions, ``demo.captions.captioned``), cached as ``pool_<seed>_<res>/<start>-<stop>.npz`` files of
:data:`CHUNK` examples (the last one may be shorter), each written atomically: an interrupted generation keeps the
finished files, and a larger ``n`` later generates only what is missing. Both stages share the pool (the UNet
stage's first images are the VAE's).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from abcd_edge.demo.captions import captioned
from abcd_edge.demo.latent.common import DATA_SEED, HELDOUT_START
from abcd_edge.io import atomic_path

CHUNK = 500


def _chunk(seed: int, start: int, stop: int, resolution: int) -> tuple[np.ndarray, list[str]]:
    examples = [captioned(seed, i, resolution) for i in range(start, stop)]
    return np.stack([e[0] for e in examples]), [e[2] for e in examples]


def _existing(folder: Path, start: int) -> tuple[Path, int] | None:
    """The cached file of the chunk starting at ``start`` and its stop index (the last chunk may be partial)."""
    found = sorted(folder.glob(f"{start:08d}-*.npz"))
    if not found:
        return None
    path = max(found, key=lambda f: int(f.stem.split("-")[1]))
    return path, int(path.stem.split("-")[1])


def pool(work: Path, n: int, resolution: int, seed: int = DATA_SEED, progress: bool = True
         ) -> tuple[np.ndarray, list[str]]:
    folder = Path(work) / f"pool_{seed}_{resolution}"
    folder.mkdir(parents=True, exist_ok=True)
    spans = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    todo = [(s, e) for s, e in spans if (_existing(folder, s) or (None, -1))[1] < e]
    bar = None
    if todo and progress:
        from tqdm import tqdm

        total = sum(e - s for s, e in todo)
        print(f"generating {total} of {n} training images at {resolution} px (seed {seed}) ...", flush=True)
        bar = tqdm(total=total, desc="images", unit="img", mininterval=0.1 if sys.stderr.isatty() else 30)
    for s, e in todo:
        old = _existing(folder, s)
        images, caps = _chunk(seed, s, e, resolution)
        with atomic_path(folder / f"{s:08d}-{e:08d}.npz") as p:
            with open(p, "wb") as f:
                np.savez(f, images=images, captions=np.array(caps))
        if old is not None:
            old[0].unlink()
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    images, caps = [], []
    for s, e in spans:
        path, _ = _existing(folder, s)
        with np.load(path) as z:
            images.append(z["images"][:e - s])
            caps.extend(str(c) for c in z["captions"][:e - s])
    return np.concatenate(images), caps


def held_out(n: int, resolution: int, seed: int = DATA_SEED) -> tuple[np.ndarray, list[str]]:
    """``n`` examples no pool holds (indices from ``HELDOUT_START``), for evaluation."""
    return _chunk(seed, HELDOUT_START, HELDOUT_START + n, resolution)
