"""The feature net's reference statistics: feature mean, covariance and features of generator images.

The bench and the evaluations measure feature-FID against these; the library
only loads them (it never imports the demo), so they are made here and committed
beside the feature net:

    python -m abcd_edge.demo.reference --seed 4321 --n 2048

Images of another resolution than the net's input (a latent pipeline's) are fitted to it by an integer
factor (``core.images.fit_images``), as calibration fits the pipeline's images; they are cached apart.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from abcd_edge import paths


def main() -> None:
    from abcd_edge.demo.data import make_images
    from abcd_edge.quality import FeatureNet, ReferenceStats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=4321, help="generator seed of the reference images")
    ap.add_argument("--n", type=int, default=2048, help="number of reference images")
    ap.add_argument("--resolution", type=int, default=32, help="side of the images (the artifact's image size)")
    ap.add_argument("--featurenet", type=Path, default=paths.FEATURENET_DIR)
    a = ap.parse_args()
    net = FeatureNet(a.featurenet)
    stats = ReferenceStats.load_or_compute(a.seed, a.n, net, cache_dir=a.featurenet, resolution=a.resolution,
                                           images=make_images)
    tag = None if a.resolution == net.height else a.resolution
    print(f"reference statistics -> {ReferenceStats.cache_path(a.seed, a.n, a.featurenet, tag)} "
          f"({stats.n} images, {stats.mu.shape[0]} features)")


if __name__ == "__main__":
    main()
