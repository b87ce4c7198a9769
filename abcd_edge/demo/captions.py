"""Captions for the procedural data set, and prompt sets drawn by difficulty.

Every example's caption is made from its own labels (``data.Labels.shapes``), so it is as deterministic as
the image: "two red circles and a blue triangle". Shapes of one colour and kind are counted together, in the
order they were drawn. ``parse_caption`` reads a caption back into the labels it names (what prompt accuracy
compares the feature network's predictions with).

Difficulty is a property of the caption's example: *easy* = one shape; *hard* = three shapes of which at
least two overlap (their circumscribed circles intersect); everything else *medium*.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from abcd_edge.demo.data import COLOUR_NAMES, KINDS, MAX_SHAPES, Labels, make_example
from abcd_edge.quality import PromptTarget, parse_prompt

NUMBERS = {1: "a", 2: "two", 3: "three"}
DIFFICULTIES = ("easy", "medium", "hard")
PROMPT_SEED = 2024          # generator seed the shipped prompt sets are drawn from (not a training seed)


def plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(labels: Labels) -> str:
    """"two red circles and a blue triangle": each (colour, kind) group with its count, in draw order."""
    groups: dict[tuple[str, str], int] = {}
    for s in labels.shapes:
        groups[(s.colour, s.kind)] = groups.get((s.colour, s.kind), 0) + 1
    if not groups:
        raise ValueError("labels without shapes have no caption (made by an older make_example?)")
    return _join([f"{NUMBERS[n]} {colour} {plural(kind, n)}" for (colour, kind), n in groups.items()])


Target = PromptTarget     # what a caption names (kinds, colours multi-hot in data.KINDS / COLOUR_NAMES order, count)


def parse_caption(text: str) -> PromptTarget:
    """The labels a caption names (inverse of :func:`caption`, the grammar ``quality.parse_prompt`` reads);
    ValueError for text it did not make."""
    target = parse_prompt(text, KINDS, COLOUR_NAMES)
    if not 1 <= target.count <= MAX_SHAPES:
        raise ValueError(f"{text!r} names {target.count} shapes; captions name 1 to {MAX_SHAPES}")
    return target


def overlaps(labels: Labels) -> bool:
    """Whether any two shapes' circumscribed circles intersect."""
    sh = labels.shapes
    return any(np.hypot(a.cx - b.cx, a.cy - b.cy) < a.r + b.r for i, a in enumerate(sh) for b in sh[i + 1:])


def difficulty(labels: Labels) -> str:
    if labels.count == 1:
        return "easy"
    return "hard" if labels.count == MAX_SHAPES and overlaps(labels) else "medium"


def vocabulary() -> list[str]:
    """Every word a caption can contain (the latent demo's tokenizer is built from it)."""
    words = list(dict.fromkeys([*NUMBERS.values(), "and", *COLOUR_NAMES, *KINDS, *(k + "s" for k in KINDS)]))
    return words


def captioned(seed: int, index: int, resolution: int) -> tuple[np.ndarray, Labels, str]:
    """One example with its caption."""
    image, labels = make_example(seed, index, resolution)
    return image, labels, caption(labels)


def prompt_set(kind: str, n: int, seed: int = PROMPT_SEED, resolution: int = 32,
               exclude: frozenset[str] | set[str] = frozenset(), unique: bool = False) -> list[tuple[int, str]]:
    """The first ``n`` examples of generator ``seed`` whose difficulty is ``kind`` ("easy", "medium", "hard"
    or "any") and whose caption is not in ``exclude`` (with ``unique``, each caption once): (index, caption).
    Deterministic; the labels do not depend on ``resolution``."""
    if kind not in (*DIFFICULTIES, "any"):
        raise ValueError(f"prompt set {kind!r}: accepted {', '.join(DIFFICULTIES)} or any")
    out, seen = [], set(exclude)
    for index in _indices():
        _, labels = make_example(seed, index, resolution)
        if kind == "any" or difficulty(labels) == kind:
            text = caption(labels)
            if text in seen:
                continue
            if unique:
                seen.add(text)
            out.append((index, text))
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def _indices() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1
