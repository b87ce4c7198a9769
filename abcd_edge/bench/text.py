"""A text-to-image bench's requests: which prompt each request seed asks for, at one guidance.

``--prompts FILE``: request seed s asks for line s mod n. ``--prompts easy=FILE,hard=FILE`` (labelled sets, e.g.
prompts of different difficulty): seed s asks from set s mod k, line (s div k) mod n_set, so every block splits
its requests evenly between the sets and the summary can compare them (steps taken, prompt accuracy kept).

Every method answers the same prompt for the same seed, each paying its encoding inside its own clock
(the runtime's prompt cache is cleared before each request, ``TierSession.forget_prompt``), so no method
gains from running after another.
"""
from __future__ import annotations

from dataclasses import dataclass

from abcd_edge.errors import UserError


def parse_prompt_sets(spec: str) -> list[tuple[str, str]]:
    """"FILE" -> [("", FILE)]; "easy=A,hard=B" -> [("easy", A), ("hard", B)] (labels unique, non-empty)."""
    items = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not items:
        raise UserError(f"--prompts {spec!r} names no file")
    if len(items) == 1 and "=" not in items[0]:
        return [("", items[0])]
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise UserError(f"--prompts {spec!r}: {item!r} is not label=FILE (give one FILE, or label=FILE pairs)")
        out.append((label.strip(), path.strip()))
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"--prompts {spec!r}: labels repeat ({', '.join(labels)})")
    return out


@dataclass(frozen=True)
class BenchText:
    prompts: tuple[str, ...] | None     # every prompt (the sets concatenated); None: no text encoder
    guidance: float | None
    sets: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (label, prompts) per set; one unlabelled set: ("", ...)

    def __post_init__(self):
        if self.prompts is not None and not self.sets:      # prompts alone: one unlabelled set
            object.__setattr__(self, "sets", (("", tuple(self.prompts)),))

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
        sets = []
        for label, path in parse_prompt_sets(spec.prompts):
            lines = read_prompt_lines(path, "--prompts")
            if not lines:
                raise UserError(f"--prompts {path!r} has no prompt (one per line)")
            sets.append((label, tuple(lines)))
        return cls(tuple(p for _, lines in sets for p in lines), spec.guidance, tuple(sets))

    def set_of(self, seed: int) -> int:
        """The index of the prompt set request seed ``seed`` asks from."""
        return seed % max(1, len(self.sets))

    def prompt_for(self, seed: int) -> str | None:
        if self.prompts is None:
            return None
        k = max(1, len(self.sets))
        lines = self.sets[seed % k][1]
        return lines[(seed // k) % len(lines)]

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
