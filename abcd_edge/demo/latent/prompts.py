"""The latent demo's prompt files: what calibration, the bench and `make run` ask the model for.

All drawn from generator seeds no model trains on (``demo.captions.prompt_set``), one caption per line:

    calibration.txt  512 distinct captions of any difficulty (calibrate --prompts: odd lines searched, even gated)
    bench.txt        256 distinct captions, none a calibration prompt (bench --prompts)
    easy.txt         256 one-shape captions          } bench --prompts easy=easy.txt,hard=hard.txt: where do
    hard.txt         256 three-overlapping-shapes    } the steps go, and what quality does each keep
    example.txt      the prompt `make run` asks for

    python -m abcd_edge.demo.latent.prompts --out export/demo-latent-prompts
"""
from __future__ import annotations

import argparse
from pathlib import Path

from abcd_edge.demo.captions import PROMPT_SEED, prompt_set
from abcd_edge.io import atomic_dir

CALIBRATION_SEED = PROMPT_SEED + 1     # the calibration prompts: another seed than the bench's
EXAMPLE = "two red circles and a blue triangle"


def bench_only_singles() -> frozenset[str]:
    """Half of the 40 one-shape captions ((kind + colour) index odd), kept out of calibration so that easy.txt
    can hold prompts calibration never saw (there are too few one-shape captions to draw them apart)."""
    from abcd_edge.demo.captions import NUMBERS
    from abcd_edge.demo.data import COLOUR_NAMES, KINDS

    return frozenset(f"{NUMBERS[1]} {c} {k}" for i, k in enumerate(KINDS) for j, c in enumerate(COLOUR_NAMES)
                     if (i + j) % 2)


def prompt_files(n_calibration: int = 512, n_bench: int = 256, n_kind: int = 256) -> dict[str, list[str]]:
    """Every file's lines. Calibration's are distinct; none of the bench's, easy or hard ones is a calibration
    prompt (the bench judges on prompts calibration never saw). The 20 one-shape captions left to the bench
    repeat in easy.txt; the other sets do not repeat."""
    calibration = [c for _, c in prompt_set("any", n_calibration, seed=CALIBRATION_SEED,
                                            exclude=bench_only_singles(), unique=True)]
    held = frozenset(calibration)
    return {
        "calibration.txt": calibration,
        "bench.txt": [c for _, c in prompt_set("any", n_bench, seed=PROMPT_SEED, exclude=held, unique=True)],
        "easy.txt": [c for _, c in prompt_set("easy", n_kind, seed=PROMPT_SEED, exclude=held)],
        "hard.txt": [c for _, c in prompt_set("hard", n_kind, seed=PROMPT_SEED, exclude=held, unique=True)],
        "example.txt": [EXAMPLE],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    with atomic_dir(a.out) as tmp:
        for name, lines in prompt_files().items():
            (tmp / name).write_text("\n".join(lines) + "\n")
    print(f"prompts -> {a.out}")


if __name__ == "__main__":
    main()
