"""The embedded default: procedural data, the shipped demo model, its artifact, the feature net."""
from __future__ import annotations

import json

import numpy as np
import pytest

from abcd_edge import paths
from abcd_edge.core.images import to_model_space, to_uint8
from abcd_edge.demo.data import KINDS, make_dataset, make_example, make_images


def test_generator_deterministic_and_varied():
    a, la = make_example(7, 3)
    b, lb = make_example(7, 3)
    c, _ = make_example(7, 4)
    assert np.array_equal(a, b) and la.count == lb.count and np.array_equal(la.kinds, lb.kinds)
    assert not np.array_equal(a, c)
    imgs, kinds, colours, counts = make_dataset(0, 64)
    assert imgs.shape == (64, 32, 32, 3) and imgs.dtype == np.uint8
    assert set(counts.tolist()) == {1, 2, 3} and kinds.shape[1] == len(KINDS)
    assert (kinds.sum(0) > 0).all()                         # every kind appears in 64 images
    assert make_images(0, 2, resolution=64).shape == (2, 64, 64, 3)


def test_model_space_roundtrip():
    imgs = make_images(1, 4)
    assert np.array_equal(to_uint8(to_model_space(imgs)), imgs)


@pytest.mark.skipif(not (paths.DEMO_MODEL_DIR / "unet" / "config.json").is_file(), reason="demo model not trained")
def test_shipped_model_loads_from_safetensors_only():
    from diffusers import UNet2DModel

    files = {p.name for p in (paths.DEMO_MODEL_DIR / "unet").iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files)
    unet = UNet2DModel.from_pretrained(paths.DEMO_MODEL_DIR / "unet", use_safetensors=True)
    n = sum(p.numel() for p in unet.parameters())
    assert 1_000_000 <= n <= 3_000_000
    info = json.loads((paths.DEMO_MODEL_DIR / "training.json").read_text())
    assert info["steps"] >= 1000 and info["parameters"] == n


def test_shipped_artifact_samples_through_ort():
    """A short DDIM run through ONNX Runtime on the committed artifact gives a structured image."""
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.manifest import load_manifest
    from abcd_edge.core.samplers import make_sampler
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.core.loop import sample

    manifest = load_manifest(paths.DEMO_ARTIFACT_DIR)
    den = open_denoiser(paths.DEMO_ARTIFACT_DIR, threads=1)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    noise = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    x0, hist = sample(den, make_sampler("ddim", schedule, time_uniform_sigmas(schedule, 10)), noise, keep_x0=True)
    img = to_uint8(x0)
    assert img.shape == (2, 32, 32, 3)
    assert np.abs(x0).max() <= 1.5                    # a data-range image, not noise
    assert float(np.mean((hist[-1] - hist[-2]) ** 2)) < float(np.mean((hist[1] - hist[0]) ** 2))


def test_shipped_featurenet_loads():
    from abcd_edge.quality import FeatureNet

    files = {p.name for p in paths.FEATURENET_DIR.iterdir()}
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    net = FeatureNet()
    f = net.features(make_images(5, 8))
    assert f.shape[0] == 8 and np.isfinite(f).all()


@pytest.mark.skipif(not (paths.DEMO_MODEL_DIR / "unet" / "config.json").is_file(), reason="demo model not trained")
def test_committed_onnx_matches_shipped_weights():
    """The committed artifact was exported from the committed weights (parity, hashes): they cannot drift."""
    import torch
    from diffusers import UNet2DModel

    from abcd_edge.device.backends import OrtDenoiser
    from abcd_edge.formats.manifest import load_manifest, sha256_file

    manifest = load_manifest(paths.DEMO_ARTIFACT_DIR)
    weights = paths.DEMO_MODEL_DIR / "unet" / manifest.source_weights[0]
    assert sha256_file(weights) == manifest.source_hash
    torch.set_num_threads(1)
    unet = UNet2DModel.from_pretrained(paths.DEMO_MODEL_DIR / "unet", use_safetensors=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 37.5])
    with torch.no_grad():
        ref = unet(x, t).sample.numpy()
    out = OrtDenoiser(paths.DEMO_ARTIFACT_DIR / "denoiser.onnx", threads=1)(x.numpy(), t.numpy())
    assert np.abs(out - ref).max() <= 1e-4


def test_demo_quality_ordering_small():
    """Fewer samples than the README's evidence, same ordering: 3 steps worse than 20, noise worst."""
    from abcd_edge.device.backends import OrtDenoiser
    from abcd_edge.demo.evaluate import generate
    from abcd_edge.formats.manifest import load_manifest
    from abcd_edge.quality import FeatureNet, feature_fid

    manifest = load_manifest(paths.DEMO_ARTIFACT_DIR)
    den = OrtDenoiser(paths.DEMO_ARTIFACT_DIR / "denoiser.onnx", threads=2)
    net = FeatureNet(threads=2)
    ref = net.features(make_images(4321, 256))
    fid3 = feature_fid(net.features(generate(den, manifest, 3, 128, seed=0)), ref)
    fid20 = feature_fid(net.features(generate(den, manifest, 20, 128, seed=0)), ref)
    noise = np.clip(np.random.default_rng(1).normal(127.5, 80, (128, 32, 32, 3)), 0, 255).astype(np.uint8)
    fid_noise = feature_fid(net.features(noise), ref)
    assert fid20 < fid3 < fid_noise
