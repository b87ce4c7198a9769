"""Noise -> x0 -> images outside a request, made as the runtime makes them (calibration's rollouts, the
bench's teacher and StepDrop tuning).

A pixel artifact: its denoiser, the x0 as the image. A latent pipeline (text-to-image SD / LCM, or an LDM
without text): the UNet guided as the runtime guides it (``device.pipeline``), one prompt per noise row, the
steps of its diffusers scheduler (``core.samplers.diffusers_options``), and the VAE decode of the x0 latent
as the image. Calibration prompts come in two sets (:class:`PromptSets`): the *training* prompts go with the
search's noises, the *held-out* ones with the gate's, so the gate judges on prompts as well as noises the
search never saw.

A feature network sees images at its own input size: a pipeline's images of another size are fitted by an
integer factor (``core.images.fit_images``), as the reference images are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from abcd_edge.errors import UserError


@dataclass(frozen=True)
class PromptSets:
    """Calibration prompts: every other line of the file is held out for the gate (lines 2, 4, ...)."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    source: str

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptSets":
        from abcd_edge.io import read_prompt_lines

        lines = read_prompt_lines(path, "--prompts")
        if len(lines) < 2:
            raise UserError(f"--prompts {str(path)!r} has {len(lines)} prompt(s); calibration needs at least 2 "
                            "(every other line is held out for the gate)")
        return cls(tuple(lines[0::2]), tuple(lines[1::2]), str(path))

    def rows(self, split: str, n: int) -> list[str]:
        """The prompt of each of ``n`` noise rows of ``split`` ("train" | "heldout"): the set, cycled."""
        prompts = self.train if split == "train" else self.heldout
        return [prompts[i % len(prompts)] for i in range(n)]


def check_guidance(guidance: float | None, flag: str = "--guidance") -> None:
    if guidance is not None and (isinstance(guidance, bool) or not np.isfinite(guidance) or guidance < 1.0):
        raise UserError(f"{flag} {guidance!r} must be a number >= 1 (1: no classifier-free guidance)")


class Rollouts:
    """One artifact's rollouts: ``x0(sampler, sigmas, noises, denoiser)``, ``image_space``, ``features``.

    ``unet`` is the opened denoiser, ``pipeline`` the artifact's LatentPipeline around it (None: a pixel
    artifact); ``guidance`` (a text-to-image pipeline's; default the artifact's) fixes the guidance every
    rollout uses."""

    def __init__(self, manifest, schedule, unet, pipeline=None, guidance: float | None = None):
        self.manifest, self.schedule, self.unet, self.pipeline = manifest, schedule, unet, pipeline
        self.guidance, self.mode = None, "single"
        check_guidance(guidance)
        if pipeline is None or not pipeline.text:
            if guidance is not None:
                raise UserError(f"artifact {manifest.name!r} has no text encoder: it takes no --guidance")
            return
        self.guidance = float(guidance) if guidance is not None else pipeline.default_guidance
        # both guidance branches in one batch-2 call: the same numbers as two calls (tests/test_sd_runtime.py)
        self.mode = "batch2" if pipeline.branches(self.guidance) == 2 else "single"

    @classmethod
    def open(cls, artifact: Path, manifest, schedule, threads: int, guidance: float | None = None) -> "Rollouts":
        """Open the artifact's denoiser (and a pipeline's encoder and decoders) on the CPU."""
        from abcd_edge.device.backends import open_denoiser

        unet = open_denoiser(artifact, threads=threads)
        pipeline = None
        if manifest.pipeline is not None:
            from abcd_edge.device.pipeline import open_pipeline

            pipeline = open_pipeline(artifact, manifest, unet, threads=threads)
        return cls(manifest, schedule, unet, pipeline, guidance)

    @property
    def text(self) -> bool:
        """Whether rollouts take prompts (a text-to-image pipeline)."""
        return self.pipeline is not None and self.pipeline.text

    def denoiser(self, prompts: Sequence[str] | None = None) -> Callable[..., np.ndarray]:
        """The step function over noise rows, row i guided by ``prompts[i]`` (a text-to-image pipeline's; one
        prompt for every row of a batch-1 call is also accepted)."""
        if self.pipeline is None:
            return self.unet
        if not self.text:
            return self.pipeline.denoiser(None, None, 1.0, "single")
        if not prompts:
            raise UserError(f"artifact {self.manifest.name!r} is a text-to-image pipeline: its rollouts need prompts")
        enc = self.pipeline.encoder
        cond = np.concatenate([enc.embed(p)[0] for p in prompts])
        uncond = enc.embed("")[0] if self.mode != "single" else None
        return self.pipeline.denoiser(cond, uncond, self.guidance, self.mode)

    def sampler(self, name: str, sigmas):
        from abcd_edge.core.samplers import diffusers_options, make_sampler

        options = ({} if self.pipeline is None else
                   diffusers_options(name, self.manifest.scheduler_config, self.schedule))
        return make_sampler(name, self.schedule, np.asarray(sigmas, np.float64), self.manifest.prediction_type,
                            **options)

    def x0(self, sampler: str, sigmas, noises: np.ndarray, denoiser: Callable[..., np.ndarray],
           keep_x0: bool = False, rng: np.random.Generator | None = None):
        """The x0 after every step of a fixed schedule (the one loop), from ``noises`` through ``denoiser``;
        with ``keep_x0`` also every step's x0 (a list)."""
        from abcd_edge.core.loop import sample

        x0, hist = sample(denoiser, self.sampler(sampler, sigmas), noises, rng=rng, keep_x0=keep_x0)
        x0 = np.asarray(x0, np.float32)
        return (x0, hist) if keep_x0 else x0

    def image_space(self, x0: np.ndarray) -> np.ndarray:
        """x0 as a float image NCHW in [-1, 1] (a pipeline: its VAE decode, in chunks of 64)."""
        x0 = np.asarray(x0, np.float32)
        if self.pipeline is None:
            return x0
        return np.concatenate([self.pipeline.decode(x0[i:i + 64]) for i in range(0, len(x0), 64)])

    def images(self, x0: np.ndarray) -> np.ndarray:
        """uint8 NHWC images of an x0, as the runtime finishes a request."""
        from abcd_edge.core.images import to_uint8

        return to_uint8(self.image_space(x0))

    def features(self, net, x0: np.ndarray) -> np.ndarray:
        """Feature-network features of the images of ``x0``, fitted to the network's input size."""
        from abcd_edge.core.images import fit_images

        return net.features(fit_images(self.images(x0), net.height, net.width))

    @property
    def image_resolution(self) -> int:
        """The side of the images this artifact makes (a pipeline: latent side x VAE scale factor)."""
        if self.pipeline is None:
            return int(self.manifest.resolution)
        return int(self.manifest.pipeline["image"]["resolution"])

    def conditions(self, prompts: str | None = None) -> dict:
        """What placements calibrated on these rollouts hold for (the runtime uses them only there)."""
        if self.pipeline is None:
            return {}
        return {"guidance": self.guidance, "decoder": "vae", "prompts": prompts}
