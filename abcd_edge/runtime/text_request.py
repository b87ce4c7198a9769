"""A text-to-image request's text side, checked before planning: prompt, negative prompt, guidance, decoder.

``check_text_request`` turns a request's arguments into a :class:`PipelineRequest` (what to encode, the guidance
and how many UNet branches it runs, the decoder), with notes for what it decided; a pixel artifact refuses
them in one line.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from abcd_edge.errors import UserError


@dataclasses.dataclass
class PipelineRequest:
    """A pipeline request's text side, checked: what to encode, the guidance and how it runs, the decoder."""

    prompt: str | None
    negative_prompt: str | None
    guidance: float | None
    branches: int             # 1: one UNet branch; 2: classifier-free guidance
    mode: str                 # single | batch2 | split
    decoder: str              # vae | tiny
    decoder_component: str    # vae_decoder | vae_decoder_tiny
    notes: list[str]


def check_text_request(pl, guidance_mode: str, manifest, where: str, prompt: str | None = None,
                       negative_prompt: str | None = None, guidance: float | None = None,
                       decoder: str | None = None) -> PipelineRequest | None:
    """The checked text side of a request on ``pl`` (a ``device.pipeline.LatentPipeline``; None: a pixel
    artifact, which refuses every text argument); ``guidance_mode`` is the profile's faster guided mode."""
    if pl is None:
        given = [name for name, v in (("prompt", prompt), ("negative prompt", negative_prompt),
                                      ("guidance", guidance), ("decoder", decoder)) if v is not None]
        if given:
            raise UserError(f"artifact {where!r} is a pixel-space {manifest.model_kind} model: it takes no "
                            f"{', '.join(given)} (only text-to-image pipeline artifacts do)")
        return None
    notes: list[str] = []
    if not pl.text and (prompt is not None or negative_prompt is not None):
        raise UserError(f"artifact {where!r} has no text encoder (an "
                        "unconditional latent pipeline): it takes no prompt")
    for name, v in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if v is not None and not isinstance(v, str):
            raise UserError(f"the {name} must be text, got {type(v).__name__}")
    if guidance is not None:
        if not pl.text:
            raise UserError("guidance needs a text encoder; this latent pipeline is unconditional")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not np.isfinite(guidance) \
                or guidance < 1.0:
            raise UserError(f"guidance {guidance!r} must be a number >= 1 (1: no classifier-free guidance)")
    w = float(guidance) if guidance is not None else (pl.default_guidance if pl.text else None)
    if pl.text and prompt is None:
        prompt = ""
        notes.append('no prompt given: the empty prompt "" (unconditional sampling)')
    branches = pl.branches(w) if w is not None else 1
    if negative_prompt is not None and branches == 1:
        notes.append("the negative prompt is not used: " + (
            "an LCM UNet runs one branch (guidance enters as an embedding)" if pl.lcm else
            "guidance 1 runs the conditional branch only"))
    dec = decoder or "vae"
    mode = "single" if branches == 1 else guidance_mode
    return PipelineRequest(prompt=prompt, negative_prompt=negative_prompt, guidance=w, branches=branches,
                           mode=mode, decoder=dec, decoder_component=pl.decoder_component(dec), notes=notes)
