"""Captions of the procedural data (issue 16): made from each example's own labels, parsed back, difficulty
from the drawn geometry, and the latent demo's prompt files (bench prompts never calibration prompts)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from abcd_edge.demo.captions import (DIFFICULTIES, caption, captioned, difficulty, overlaps, parse_caption,
                                     prompt_set, vocabulary)
from abcd_edge.demo.data import COLOUR_NAMES, KINDS, Labels, Shape, make_example, make_images


def test_images_are_unchanged_by_the_shapes_record():
    """Committed feature nets and reference statistics depend on these bytes (sha256 taken before captions)."""
    digest = hashlib.sha256(make_images(777, 50, 32).tobytes()).hexdigest()[:16]
    assert digest == "28d0c68885223b56"


def test_caption_names_every_shape_and_parses_back():
    for i in range(300):
        _, labels, text = captioned(11, i, 32)
        t = parse_caption(text)
        assert t.count == labels.count == len(labels.shapes)
        assert np.array_equal(t.kinds, labels.kinds) and np.array_equal(t.colours, labels.colours)
        assert set(text.replace(",", "").split()) <= set(vocabulary())


def test_caption_groups_and_counts():
    shapes = (Shape("circle", "red", .2, .2, .1), Shape("triangle", "blue", .8, .8, .1),
              Shape("circle", "red", .5, .8, .1))
    labels = Labels(np.zeros(len(KINDS), np.float32), np.zeros(len(COLOUR_NAMES), np.float32), 3, shapes)
    assert caption(labels) == "two red circles and a blue triangle"
    with pytest.raises(ValueError):
        parse_caption("a purple hexagon")
    with pytest.raises(ValueError):
        parse_caption("three red circles and a blue square")       # four shapes: more than any image has


def test_difficulty_from_the_drawn_geometry():
    far = (Shape("circle", "red", .15, .15, .1), Shape("ring", "red", .85, .15, .1), Shape("square", "red", .5, .85, .1))
    near = (Shape("circle", "red", .5, .7, .2), *far[1:])
    z = np.zeros(1, np.float32)
    assert difficulty(Labels(z, z, 1, far[:1])) == "easy"
    assert difficulty(Labels(z, z, 3, far)) == "medium" and not overlaps(Labels(z, z, 3, far))
    assert difficulty(Labels(z, z, 3, near)) == "hard"
    for kind in DIFFICULTIES:
        for index, text in prompt_set(kind, 5, seed=3):
            assert difficulty(make_example(3, index, 32)[1]) == kind and captioned(3, index, 32)[2] == text


def test_prompt_set_exclude_and_unique():
    first = [c for _, c in prompt_set("any", 40, seed=5, unique=True)]
    assert len(set(first)) == 40
    rest = [c for _, c in prompt_set("any", 40, seed=5, exclude=set(first))]
    assert not set(rest) & set(first)


def test_latent_demo_prompt_files_hold_bench_prompts_out_of_calibration():
    from abcd_edge.demo.latent.prompts import EXAMPLE, prompt_files

    files = prompt_files(n_calibration=128, n_bench=64, n_kind=64)
    cal = set(files["calibration.txt"])
    assert len(cal) == 128
    for name in ("bench.txt", "easy.txt", "hard.txt"):
        assert not set(files[name]) & cal, name
        assert len(files[name]) == 64
    assert all(parse_caption(c).count == 1 for c in files["easy.txt"])
    assert all(parse_caption(c).count == 3 for c in files["hard.txt"])
    assert files["example.txt"] == [EXAMPLE] and parse_caption(EXAMPLE).count == 3
