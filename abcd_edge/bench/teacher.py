"""The teacher every image is scored against: a many-step time-uniform DDIM from the request's own noise (a
text-to-image pipeline: with the request's prompt and guidance), kept as an image (a pipeline's decode) in
model space [-1, 1]."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def request_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The initial noise of a request seed, drawn exactly as the runtime draws it."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class TeacherCache:
    """Many-step time-uniform DDIM images per request seed, cached as ``<out>/teacher/<key>_<steps>_<seed>.npy``.

    ``open_rollouts()`` gives the ``runtime.rollout.Rollouts`` that make them as the runtime would (opened
    on the first miss); ``prompt_for`` gives a text-to-image pipeline's prompt of a seed (None: no prompts).
    The key is the artifact's hash, and with prompts also what they and the guidance are."""

    def __init__(self, folder: Path, manifest_hash: str, steps: int, open_rollouts: Callable[[], object],
                 prompt_for: Callable[[int], str | None] | None = None, conditions: dict | None = None):
        self.folder, self.steps, self.open_rollouts = Path(folder), steps, open_rollouts
        self.rollouts = None
        self.prompt_for = prompt_for
        self.hash = manifest_hash if not conditions else hashlib.sha256(
            json.dumps([manifest_hash, conditions], sort_keys=True).encode()).hexdigest()
        self._mem: dict[tuple[int, int], np.ndarray] = {}

    def _path(self, seed: int, batch: int) -> Path:
        return self.folder / f"{self.hash[:12]}_{self.steps}_{batch}_{seed}.npy"

    def get(self, seeds: Sequence[int], batch: int, shape: tuple[int, ...],
            progress: Callable[[int], None] | None = None, chunk: int = 64) -> dict[int, np.ndarray]:
        """Images [batch, 3, H, W] in [-1, 1] per seed; computes the missing ones in chunks of up to ``chunk``."""
        from abcd_edge.core.placement import time_uniform_sigmas

        out, missing = {}, []
        for s in seeds:
            key = (s, batch)
            if key in self._mem:
                out[s] = self._mem[key]
            elif self._path(s, batch).is_file():
                try:
                    out[s] = self._mem[key] = np.load(self._path(s, batch), allow_pickle=False)
                except (OSError, ValueError):
                    missing.append(s)
            else:
                missing.append(s)
        if missing:
            self.rollouts = self.rollouts or self.open_rollouts()
            sigmas = time_uniform_sigmas(self.rollouts.schedule, self.steps)
            per = max(1, chunk // batch)
            for i in range(0, len(missing), per):
                group = missing[i:i + per]
                noise = np.concatenate([request_noise(s, (batch, *shape)) for s in group])
                prompts = None if self.prompt_for is None else [self.prompt_for(s) for s in group for _ in range(batch)]
                x0 = self.rollouts.x0("ddim", sigmas, noise, self.rollouts.denoiser(prompts))
                images = self.rollouts.image_space(x0)
                for j, s in enumerate(group):
                    t = np.asarray(images[j * batch:(j + 1) * batch], np.float32)
                    self.folder.mkdir(parents=True, exist_ok=True)
                    with open(self._path(s, batch), "wb") as f:
                        np.save(f, t)
                    out[s] = self._mem[(s, batch)] = t
                if progress:
                    progress(len(group))
        return out
