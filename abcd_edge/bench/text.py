"""A text-to-image bench's requests: request seed s asks for line s mod n of the prompt file, at one guidance.

Every method answers the same prompt for the same seed, each paying its encoding inside its own clock
(the runtime's prompt cache is cleared before each request, ``TierSession.forget_prompt``), so no method
gains from running after another.
"""
from __future__ import annotations

from dataclasses import dataclass

from abcd_edge.errors import UserError


@dataclass(frozen=True)
class BenchText:
    prompts: tuple[str, ...] | None     # None: a pixel artifact or an unconditional latent pipeline
    guidance: float | None

    @classmethod
    def for_spec(cls, spec, manifest) -> "BenchText":
        """Check the grid's prompts and guidance against the artifact (one-line errors), before any work."""
        from abcd_edge.io import read_prompt_lines
        from abcd_edge.runtime.rollout import check_guidance

        comps = (manifest.pipeline or {}).get("components", {})
        given = [f for f, v in (("--prompts", spec.prompts), ("--guidance", spec.guidance)) if v is not None]
        if "text_encoder" not in comps:
            if given:
                kind = ("an unconditional latent pipeline (no text encoder)" if manifest.pipeline is not None
                        else f"a pixel-space {manifest.model_kind} model")
                raise UserError(f"{', '.join(given)}: artifact {spec.artifact!r} is {kind}, which takes no prompts "
                                "or guidance (only text-to-image pipeline artifacts do)")
        elif spec.prompts is None:
            raise UserError(f"artifact {spec.artifact!r} is a text-to-image pipeline: the bench needs --prompts FILE "
                            "(one prompt per line; request seed s gets line s mod the number of lines)")
        if manifest.pipeline is not None and spec.batch != 1:
            raise UserError(f"--batch {spec.batch}: a pipeline artifact answers one image per request; "
                            "bench it with --batch 1")
        check_guidance(spec.guidance)
        if spec.prompts is None:
            return cls(None, None)
        prompts = read_prompt_lines(spec.prompts, "--prompts")
        if not prompts:
            raise UserError(f"--prompts {spec.prompts!r} has no prompt (one per line)")
        return cls(tuple(prompts), spec.guidance)

    def prompt_for(self, seed: int) -> str | None:
        return None if self.prompts is None else self.prompts[seed % len(self.prompts)]

    def prompts_for(self, seeds) -> list[str] | None:
        return None if self.prompts is None else [self.prompt_for(s) for s in seeds]

    def request(self, seed: int) -> dict:
        """``AnytimeRuntime.generate``'s text keywords for request seed ``seed`` (none for a pixel artifact)."""
        if self.prompts is None:
            return {}
        out = {"prompt": self.prompt_for(seed)}
        if self.guidance is not None:
            out["guidance"] = self.guidance
        return out
