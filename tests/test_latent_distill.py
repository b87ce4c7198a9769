"""The consistency-distilled twin (issue 16): LCM distillation pieces agree with diffusers' LCM conventions, a
tiny run resumes from its checkpoint, and the twin loads in LatentConsistencyModelPipeline and exports as an LCM
pipeline artifact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_boundary_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    from abcd_edge.demo.latent.distill import boundary_scalings

    sched = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        want = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        got = boundary_scalings(torch.tensor(float(t)))
        assert np.allclose([float(g) for g in got], [float(w) for w in want], rtol=1e-6)
    c_skip, c_out = boundary_scalings(torch.tensor(0.0))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0          # f(x, 0) = x: the consistency boundary


def test_guidance_embedding_matches_the_lcm_pipeline_and_the_runtime():
    from diffusers import LatentConsistencyModelPipeline

    from abcd_edge.demo.latent.distill import guidance_embedding
    from abcd_edge.device.pipeline import guidance_scale_embedding

    w = torch.tensor([0.5, 3.0, 7.5])
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    got = guidance_embedding(w, 256)
    assert torch.allclose(got, want, atol=1e-5)
    # float32: numpy's and torch's exp differ by an ulp in a frequency, times arguments up to 7500 -> ~5e-4
    np.testing.assert_allclose(guidance_scale_embedding(w.numpy(), 256), got.numpy(), atol=1e-3)


def test_student_starts_as_the_teacher(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from abcd_edge.demo.latent.distill import student_from

    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()
    student = student_from(teacher, 16).eval()
    assert student.config.time_cond_proj_dim == 16
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)   # no guidance signal: the teacher's function
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    cond = torch.randn(2, 77, 16)
    with torch.no_grad():
        a = teacher(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        b = student(x, t, encoder_hidden_states=cond, timestep_cond=torch.randn(2, 16), return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_tiny_distillation_resumes_and_the_twin_loads_and_exports(tiny_sd_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    from abcd_edge.demo.latent import distill
    from abcd_edge.export import export_model

    args = ["--base", str(tiny_sd_dir), "--out", str(tmp_path / "twin"), "--work", str(tmp_path / "work"),
            "--batch", "4", "--images", "16", "--ckpt-every", "2", "--threads", "1"]
    distill.main(args + ["--steps", "2"])
    first = json.loads((tmp_path / "twin" / "training.json").read_text())
    distill.main(args + ["--steps", "4"])                 # resumes: two more steps, not four
    info = json.loads((tmp_path / "twin" / "training.json").read_text())
    assert first["steps"] == 2 and info["steps"] == 4
    assert "4 steps, batch 4" in (tmp_path / "twin" / "README.md").read_text()
    ckpt = torch.load(tmp_path / "work" / "distill.ckpt.pt", weights_only=False)
    assert len(ckpt["losses"]) == 4 and all(np.isfinite(ckpt["losses"]))
    pipe = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "twin", safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim == 256
    image = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=8.5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    m = export_model(str(tmp_path / "twin"), tmp_path / "art", batches=(1, 2), progress=False, threads=1)
    assert m.model_kind == "text-to-image" and m.pipeline["guidance"]["time_cond_proj_dim"] == 256
    assert m.scheduler_config["_class_name"] == "LCMScheduler"
    assert not Path(tmp_path / "work" / "distill.ckpt.pt.tmp").exists()
