"""Quality metrics: FID/KID maths, the shipped feature net (ONNX + safetensors), teacher distance."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from abcd_edge import quality
from abcd_edge.demo.data import make_images
from abcd_edge.errors import UserError
from abcd_edge.paths import FEATURENET_DIR
from abcd_edge.quality import (FeatureNet, ReferenceStats, feature_fid, feature_kid, frechet_distance,
                               teacher_distance, x0_change)


def _gauss(n, d, shift=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


# --------------------------------------------------------------------------- FID maths

def test_fid_identical_sets_is_zero():
    a = _gauss(500, 16)
    assert feature_fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fid_symmetric_and_positive_for_shifted_gaussians():
    a, b = _gauss(800, 8, seed=1), _gauss(800, 8, shift=0.5, scale=1.5, seed=2)
    ab, ba = feature_fid(a, b), feature_fid(b, a)
    assert ab == pytest.approx(ba, rel=1e-9)
    # population value: 8 * (0.5^2 + (1.5 - 1)^2) = 4; the sample estimate is close
    assert 3.0 < ab < 5.0


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(3)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_matches_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    d = 20
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d, b @ b.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_stable_for_singular_covariances():
    # rank-deficient (more dims than samples): no NaN, no complex parts, still ~0 against itself
    a = _gauss(10, 32, seed=5)
    assert np.isfinite(feature_fid(a, a)) and feature_fid(a, a) < 1e-6
    assert np.isfinite(feature_fid(a, _gauss(10, 32, shift=1.0, seed=6)))


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        feature_fid(_gauss(10, 4), _gauss(10, 5))
    with pytest.raises(ValueError):
        feature_fid(_gauss(1, 4), _gauss(10, 4))


# --------------------------------------------------------------------------- KID

def test_kid_near_zero_for_same_distribution_positive_for_different():
    a, b = _gauss(600, 16, seed=7), _gauss(600, 16, seed=8)
    c = _gauss(600, 16, shift=0.5, seed=9)
    same = feature_kid(a, b, subsets=20, subset_size=300)
    diff = feature_kid(a, c, subsets=20, subset_size=300)
    assert abs(same.mean) < 0.02
    assert diff.mean > 0.1
    assert diff.mean > 10 * abs(same.mean) + 5 * diff.std / np.sqrt(20)


def test_kid_unbiased_estimator_matches_direct_formula():
    x, y = _gauss(5, 3, seed=10), _gauss(6, 3, shift=0.3, seed=11)
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    want = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            + sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n))
    assert quality._poly_mmd2(x, y) == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------- teacher distance, x0 change

def test_psnr_known_value():
    x = np.zeros((2, 3, 4, 4))
    t = np.full((2, 3, 4, 4), 0.1)
    t[1] = 0.0
    td = teacher_distance(x, t)
    assert td.mse == pytest.approx([0.01, 0.0])
    assert td.psnr[0] == pytest.approx(10 * np.log10(4 / 0.01))  # 26.0206 dB on range 2
    assert td.psnr[0] == pytest.approx(26.0206, abs=1e-4)
    assert np.isinf(td.psnr[1])


def test_x0_change_per_image():
    prev = np.zeros((3, 2, 2, 2))
    cur = prev.copy()
    cur[1] = 0.5
    cur[2, 0, 0, 0] = 2.0
    assert x0_change(prev, cur) == pytest.approx([0.0, 0.25, 4.0 / 8])
    with pytest.raises(ValueError):
        x0_change(prev, cur[:2])


# --------------------------------------------------------------------------- the shipped feature net

@pytest.fixture(scope="module")
def net():
    return FeatureNet(FEATURENET_DIR, threads=1)


def test_shipped_featurenet_config_and_size():
    cfg = json.loads((FEATURENET_DIR / "config.json").read_text())
    assert cfg["input"] == {"name": "images", "dtype": "uint8", "layout": "NCHW", "shape": ["N", 3, 32, 32],
                            "range": [0, 255], "channels": "RGB"}
    assert cfg["parity"]["max_abs_diff"] <= 1e-4
    assert cfg["data"]["seed"] != 1234  # not the diffusion model's training seed
    assert cfg["heldout"]["per_label_accuracy"] > 0.9
    total = sum(p.stat().st_size for p in FEATURENET_DIR.iterdir()
                if p.name in ("config.json", "featurenet.onnx", "featurenet.safetensors"))
    assert total < 2_000_000


def test_featurenet_shapes_and_batching(net):
    imgs = make_images(1234, 10)
    f = net.features(imgs, batch=3)
    assert f.shape == (10, net.dim) and f.dtype == np.float64 and net.dim == 128
    np.testing.assert_allclose(f, net.features(imgs, batch=256), rtol=0, atol=1e-5)
    assert net.features(imgs[:0]).shape == (0, 128)
    from abcd_edge.core.images import to_model_space
    np.testing.assert_allclose(net.features_model_space(to_model_space(imgs)), f, atol=1e-6)


def test_featurenet_refuses_wrong_inputs(net):
    with pytest.raises(UserError, match="uint8"):
        net.features(make_images(1234, 2).astype(np.float32))
    with pytest.raises(UserError, match="32x32"):
        net.features(make_images(1234, 2, resolution=16))


def test_featurenet_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        FeatureNet(tmp_path / "nowhere")
    # truncated ONNX, config hash mismatch
    bad = tmp_path / "bad"
    shutil.copytree(FEATURENET_DIR, bad, ignore=shutil.ignore_patterns("reference_*"))
    data = (bad / "featurenet.onnx").read_bytes()
    (bad / "featurenet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        FeatureNet(bad)
    # garbage ONNX without a config to compare against: ORT refuses, we say so
    (bad / "config.json").unlink()
    (bad / "featurenet.onnx").write_bytes(b"not an onnx model" * 10)
    with pytest.raises(UserError, match="cannot be loaded"):
        FeatureNet(bad)


def test_featurenet_loads_from_safetensors_without_pickle(monkeypatch):
    torch = pytest.importorskip("torch")
    from abcd_edge.demo import featurenet as fn

    def no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    head = (FEATURENET_DIR / "featurenet.safetensors").read_bytes()[:4096]
    n = int.from_bytes(head[:8], "little")
    assert head[8:9] == b"{"  # a safetensors JSON header, not a zip/pickle
    assert n > 0
    model = fn.load_torch(FEATURENET_DIR)
    assert sum(p.numel() for p in model.parameters()) > 10_000


def test_onnx_matches_torch_on_generator_images(net):
    torch = pytest.importorskip("torch")
    from abcd_edge.demo import featurenet as fn

    torch.set_num_threads(1)
    model = fn.load_torch(FEATURENET_DIR)
    imgs = make_images(4321, 8)
    with torch.no_grad():
        want = model.features(fn._to_input(imgs)).double().numpy()
    got = net.features(imgs)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want).max() > 1e-2  # not a trivially-zero network


def test_feature_fid_real_vs_real_small_real_vs_noise_large(net):
    n = 256
    a = net.features(make_images(1234, n))
    b = net.features(make_images(1234, n, start=n))
    noise = np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    c = net.features(noise)
    real_real, real_noise = feature_fid(a, b), feature_fid(a, c)
    assert real_noise > 20 * real_real
    kid_rr = feature_kid(a, b, subsets=10, subset_size=200)
    kid_rn = feature_kid(a, c, subsets=10, subset_size=200)
    assert kid_rn.mean > 20 * max(kid_rr.mean, kid_rr.std)


def test_reference_stats_cached_and_reused(net, tmp_path, monkeypatch):
    s1 = ReferenceStats.load_or_compute(99, 48, net=net, cache_dir=tmp_path, images=make_images)
    path = ReferenceStats.cache_path(99, 48, tmp_path)
    assert path.is_file() and not list(tmp_path.glob("*.tmp*"))
    assert s1.mu.shape == (128,) and s1.sigma.shape == (128, 128) and s1.features.shape == (48, 128)

    import abcd_edge.demo.data as data

    def no_regen(*a, **k):
        raise AssertionError("reference images regenerated despite a valid cache")

    monkeypatch.setattr(data, "make_images", no_regen)
    s2 = ReferenceStats.load_or_compute(99, 48, net=net, cache_dir=tmp_path, images=make_images)
    np.testing.assert_array_equal(s1.mu, s2.mu)
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    assert s2.fid(s1.features) == pytest.approx(0.0, abs=1e-6)
    monkeypatch.undo()

    # a cache from another feature net (hash mismatch) or a corrupt one is recomputed, not trusted
    s1.featurenet_sha256 = "0" * 64
    s1.mu = s1.mu + 1.0
    s1.save(path)
    s3 = ReferenceStats.load_or_compute(99, 48, net=net, cache_dir=tmp_path, images=make_images)
    np.testing.assert_allclose(s3.mu, s2.mu)
    path.write_bytes(b"garbage")
    s4 = ReferenceStats.load_or_compute(99, 48, net=net, cache_dir=tmp_path, images=make_images)
    np.testing.assert_allclose(s4.mu, s2.mu)
