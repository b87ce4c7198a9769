"""A latent pipeline's denoiser and finishing step: classifier-free guidance over the UNet, and the VAE decode.

numpy + onnxruntime only (no torch, no transformers). The pipeline is not a second loop: the one step
loop (core/loop.py) steps a :class:`GuidedDenoiser` (the Denoiser protocol, ``(sample, timestep) ->
prediction``, with the text conditioning and guidance bound), and the request finishes by decoding the
loop's last x0 latent (:meth:`LatentPipeline.decode`), never a noisy latent.

Classifier-free guidance, as diffusers' StableDiffusionPipeline: eps_u + w (eps_c - eps_u), computed by
one batch-2 UNet call ([uncond, cond], mode "batch2") or by two batch-1 calls ("split"); the device
profile measures both and the session uses the faster. w == 1, and any LCM UNet (its config has
``time_cond_proj_dim``: the guidance scale enters as an embedding, ``timestep_cond``), run one branch
("single"), as diffusers does.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from abcd_edge.device.backends import Abandoned
from abcd_edge.errors import UserError

GUIDANCE_MODES = ("batch2", "split")    # how two guidance branches run; "single" is one branch
DECODERS = {"vae": "vae_decoder", "tiny": "vae_decoder_tiny"}


def guidance_scale_embedding(w, dim: int) -> np.ndarray:
    """diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding in numpy float32: the
    sinusoidal embedding [B, dim] of w * 1000 (the pipeline passes w = guidance_scale - 1)."""
    w = np.asarray(w, np.float32).reshape(-1) * np.float32(1000.0)
    half = dim // 2
    scale = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -scale)
    emb = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


class GuidedDenoiser:
    """The UNet with one request's conditioning bound: ``(sample [B,C,h,w], timestep [B]) -> prediction``.

    ``mode``: "single" (cond only: w == 1 or an LCM UNet), "batch2" or "split" (classifier-free guidance).
    ``abandon()`` reaches the call in flight; between the two calls of "split" it stops the second.
    """

    def __init__(self, unet, cond: np.ndarray | None, uncond: np.ndarray | None = None, guidance: float = 1.0,
                 mode: str = "single", timestep_cond: np.ndarray | None = None):
        if mode not in ("single", *GUIDANCE_MODES):
            raise ValueError(f"guidance mode {mode!r} is not one of single, batch2, split")
        if mode != "single" and uncond is None:
            raise ValueError(f"guidance mode {mode!r} needs the unconditional embedding")
        self.unet, self.cond, self.uncond = unet, cond, uncond
        self.guidance, self.mode = float(guidance), mode
        self.timestep_cond = timestep_cond
        self.backend = getattr(unet, "backend", "ort-cpu")
        self._abandoned = threading.Event()
        self._lock = threading.Lock()

    @property
    def branches(self) -> int:
        return 1 if self.mode == "single" else 2

    def _call(self, sample: np.ndarray, timestep: np.ndarray, emb: np.ndarray | None, tcond: np.ndarray | None):
        with self._lock:
            if self._abandoned.is_set():
                raise Abandoned("denoiser call abandoned by the deadline guard")
        extra = {}
        if emb is not None:
            extra["encoder_hidden_states"] = emb
        if tcond is not None:
            extra["timestep_cond"] = tcond
        return self.unet(sample, timestep, **extra)

    @staticmethod
    def _rows(emb: np.ndarray | None, b: int) -> np.ndarray | None:
        return emb if emb is None or len(emb) == b else np.repeat(emb, b // len(emb), axis=0)

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        self._abandoned.clear()
        b = sample.shape[0]
        tcond = self._rows(self.timestep_cond, b)
        cond = self._rows(self.cond, b)
        if self.mode == "single":
            out = self._call(sample, timestep, cond, tcond)
        else:
            uncond = self._rows(self.uncond, b)
            if self.mode == "batch2":
                both = self._call(np.concatenate([sample, sample]), np.concatenate([timestep, timestep]),
                                  np.concatenate([uncond, cond]),
                                  None if tcond is None else np.concatenate([tcond, tcond]))
                eps_u, eps_c = both[:b], both[b:]
            else:
                eps_u = self._call(sample, timestep, uncond, tcond)
                eps_c = self._call(sample, timestep, cond, tcond)
            out = eps_u + np.float32(self.guidance) * (eps_c - eps_u)
        if self._abandoned.is_set():   # the guard fired between or after the calls: the step is over time
            raise Abandoned("denoiser call abandoned by the deadline guard")
        return out

    def abandon(self) -> None:
        with self._lock:
            self._abandoned.set()
        self.unet.abandon()


class LatentPipeline:
    """What a session holds for a latent pipeline artifact: its UNet, prompt encoder (None without a text
    encoder: a latent UNet2DModel with a VAE), and decoders ("vae", and "tiny" when exported)."""

    def __init__(self, manifest, unet, encoder=None, decoders: dict | None = None):
        self.manifest = manifest
        p = manifest.pipeline
        self.unet, self.encoder = unet, encoder
        self.decoders = dict(decoders or {})
        g = p.get("guidance") or {}
        self.time_cond_proj_dim = g.get("time_cond_proj_dim")
        self.default_guidance = float(g.get("default_scale", 7.5 if encoder is not None else 1.0))
        self.latent = p["latent"]

    @property
    def lcm(self) -> bool:
        """An LCM UNet (guidance as an embedding, ``timestep_cond``): always one branch."""
        return self.time_cond_proj_dim is not None

    @property
    def text(self) -> bool:
        return self.encoder is not None

    def decoder_component(self, decoder: str) -> str:
        """--decoder vae|tiny -> the component name; refused when the artifact has no such decoder."""
        name = DECODERS.get(decoder)
        if name is None:
            raise UserError(f"decoder {decoder!r} is unknown; accepted: {', '.join(DECODERS)}")
        if name not in self.decoders:
            raise UserError(f"decoder {decoder!r}: the artifact has no {name} (it has "
                            f"{', '.join(k for k, v in DECODERS.items() if v in self.decoders)}); export a "
                            "folder with a tiny autoencoder (AutoencoderTiny layout) to use it")
        return name

    def branches(self, guidance: float) -> int:
        """Guidance branches a request runs: 1 at w == 1, for an LCM UNet, or without a text encoder."""
        return 1 if (self.lcm or not self.text or guidance == 1.0) else 2

    def denoiser(self, cond: np.ndarray | None, uncond: np.ndarray | None, guidance: float,
                 mode: str) -> GuidedDenoiser:
        """The step function of one request (``mode`` is the profile's faster guided mode)."""
        tcond = None
        if self.lcm:
            tcond = guidance_scale_embedding([guidance - 1.0], int(self.time_cond_proj_dim))
        if self.branches(guidance) == 1:
            return GuidedDenoiser(self.unet, cond, None, guidance, "single", tcond)
        return GuidedDenoiser(self.unet, cond, uncond, guidance, mode, tcond)

    def dummy_embedding(self, batch: int = 1) -> np.ndarray | None:
        """Zeros shaped like the text encoder's output (warm-up and profiling)."""
        if not self.text:
            return None
        t = self.manifest.pipeline["text"]
        return np.zeros((batch, int(t["max_length"]), int(t["hidden_size"])), np.float32)

    def decode(self, x0: np.ndarray, decoder: str = "vae") -> np.ndarray:
        """The x0 latent (as the UNet steps it, i.e. scaled) -> float image NCHW in [-1, 1]: the ONNX decoder
        divides by scaling_factor itself (spec)."""
        model = self.decoders[self.decoder_component(decoder)]
        return model.run({model.input_names[0]: np.ascontiguousarray(x0, np.float32)})


def open_pipeline(artifact_dir: str | Path, manifest, unet, backend: str = "ort-cpu",
                  threads: int | None = None, precision: str = "fp32") -> LatentPipeline:
    """The prompt encoder and decoders of a pipeline artifact, on ``backend``, around an opened ``unet``
    (``precision`` "fp16": each component's fp16 copy where its export marked it usable)."""
    from abcd_edge.device.backends import OrtComponent
    from abcd_edge.device.prompt import PromptEncoder

    artifact_dir = Path(artifact_dir)
    comps = manifest.pipeline["components"]
    encoder = (PromptEncoder(artifact_dir, manifest, backend=backend, threads=threads, precision=precision)
               if "text_encoder" in comps else None)
    decoders = {name: OrtComponent(artifact_dir / manifest.component_file(name, precision), backend=backend,
                                   threads=threads, spinning=False)
                for name in manifest.pipeline.get("decoders", ["vae_decoder"]) if name in comps}
    return LatentPipeline(manifest, unet, encoder, decoders)
