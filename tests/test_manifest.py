"""The artifact manifest: schema, validation messages, hashes, TensorRT plan refusal (torch-free)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from abcd_edge.device import tensorrt as trt_device
from abcd_edge.device.tensorrt import check_trt_plan, load_trt_plan_meta
from abcd_edge.errors import UserError
from abcd_edge.formats.manifest import SCHEMA_VERSION, Manifest, content_hash, load_manifest, manifest_hash


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_dict(files: dict | None = None, **over) -> dict:
    d = dict(
        schema_version=SCHEMA_VERSION, name="tiny", source="demo", source_hash="a" * 64,
        source_weights=["diffusion_pytorch_model.safetensors"], model_kind="unconditional", num_class_embeds=None,
        prediction_type="epsilon", timestep_convention="ddpm-index",
        scheduler_config={"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                          "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"},
        scheduler_source="scheduler/scheduler_config.json of the model folder", alphas_cumprod=[0.9999, 0.5, 0.01],
        resolution=32, channels=3, out_channels=3, batch_min=1, batch_max=4, batches_checked=[1, 2, 3, 4],
        inputs=[{"name": "sample", "dtype": "float32", "shape": ["batch", 3, 32, 32]},
                {"name": "timestep", "dtype": "float32", "shape": ["batch"]}],
        outputs=[{"name": "prediction", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
        opset=17, external_data=False, files=files or {"denoiser.onnx": _sha(b"onnx")}, params=1234,
        flops_per_step=1_000_000, flops_torch=1_000_000, flops_rel_diff=0.0,
        flops_by_op={"Conv": 900_000, "ConvTranspose": 0, "MatMul": 100_000, "Gemm": 0, "attention": 50_000},
        parity={"timesteps": [999.0, 500.5, 10.0], "batches": [1, 2, 3, 4], "max_abs": 2e-6, "max_rel": 1e-6,
                "tol": 1e-4, "passed": True},
        fp16=None, trt=None, created_utc="2026-01-01T00:00:00+00:00", abcd_edge_version="0.1.0",
        torch_version="2.13.0", onnx_version="1.23.2", onnxruntime_version="1.32.0", diffusers_version="0.42.1",
        notes=[])
    d.update(over)
    return d


def write_artifact(folder: Path, **over) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "denoiser.onnx").write_bytes(b"onnx")
    files = {"denoiser.onnx": _sha(b"onnx")}
    if over.get("fp16"):
        (folder / "denoiser.fp16.onnx").write_bytes(b"half")
        files["denoiser.fp16.onnx"] = _sha(b"half")
    m = Manifest.from_dict(sample_dict(files=files, **over))
    (folder / "manifest.json").write_text(m.to_json())
    return m


TRT = {"plan": "denoiser.plan", "plan_sha256": _sha(b"PLAN"), "tensorrt_version": "10.3.0",
       "gpu_name": "Orin (nvgpu)", "compute_capability": "8.7", "precision": "fp16 (builder flag)"}


def test_round_trip_is_exact():
    m = Manifest.from_dict(sample_dict())
    assert Manifest.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["schema_version"] == SCHEMA_VERSION
    assert m.input_names == ["sample", "timestep"] and not m.fp16_usable


@pytest.mark.parametrize("over,match", [
    (dict(schema_version=SCHEMA_VERSION + 1), "newer than this abcd-edge reads"),
    (dict(schema_version=0), "older than this abcd-edge reads"),
    (dict(schema_version="1"), "'schema_version' must be an integer"),
    (dict(resolution="32"), r"manifest\.resolution: expected an integer"),
    (dict(flops_per_step=1.5), r"manifest\.flops_per_step: expected an integer"),
    (dict(flops_rel_diff="small"), r"manifest\.flops_rel_diff: expected a finite number"),
    (dict(model_kind="video"), "field 'model_kind' is 'video'; accepted"),
    (dict(model_kind="text-to-image"), "field 'pipeline' must be set for a text-to-image model"),
    (dict(prediction_type="noise"), "field 'prediction_type'"),
    (dict(batch_min=0), "field 'batch_min' must be >= 1"),
    (dict(batch_min=4, batch_max=2), "field 'batch_max'"),
    (dict(opset=13), "field 'opset' must be >= 17"),
    (dict(model_kind="class-conditional"), "field 'num_class_embeds' must be set"),
    (dict(files={"denoiser.onnx": "nothex"}), "field 'files' entry 'denoiser.onnx'"),
    (dict(files={"denoiser.onnx": "a" * 64, "../evil": "b" * 64}), "plain file name"),
    (dict(scheduler_config={"beta_start": 1}), "no num_train_timesteps"),
    (dict(parity={"max_abs": 0.0}), "field 'parity' needs a number 'max_rel'"),
    (dict(fp16={"file": "denoiser.fp16.onnx"}), "field 'fp16' needs 'drift_max_abs'"),
    (dict(trt={"plan": "denoiser.plan"}), "field 'trt' needs a string 'plan_sha256'"),
    (dict(inputs="sample"), r"manifest\.inputs: expected a list"),
])
def test_bad_field_is_named(over, match):
    with pytest.raises(UserError, match=match):
        Manifest.from_dict(sample_dict(**over))


def test_missing_field_is_named():
    d = sample_dict()
    del d["scheduler_config"]
    with pytest.raises(UserError, match="missing field 'scheduler_config'"):
        Manifest.from_dict(d)
    with pytest.raises(UserError, match="not valid JSON"):
        Manifest.from_json("{nope")
    with pytest.raises(UserError, match="expected a JSON object"):
        Manifest.from_json("[1, 2]")


def test_load_verifies_every_hash(tmp_path):
    m = write_artifact(tmp_path / "a", fp16={"file": "denoiser.fp16.onnx", "drift_max_abs": 1e-3, "bound": 5e-2,
                                             "usable": True})
    assert load_manifest(tmp_path / "a") == m and m.fp16_usable
    (tmp_path / "a" / "denoiser.fp16.onnx").write_bytes(b"hal!")
    with pytest.raises(UserError, match=r"denoiser\.fp16\.onnx does not match its sha256"):
        load_manifest(tmp_path / "a")
    assert load_manifest(tmp_path / "a", verify_hashes=False) == m
    (tmp_path / "a" / "denoiser.onnx").unlink()
    with pytest.raises(UserError, match="missing denoiser.onnx"):
        load_manifest(tmp_path / "a")


def test_load_errors_are_one_liners(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        load_manifest(tmp_path / "empty")
    with pytest.raises(UserError, match="no manifest.json"):
        manifest_hash(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps(sample_dict(schema_version=99)))
    with pytest.raises(UserError, match=r"manifest\.json: schema_version 99 is newer"):
        load_manifest(tmp_path / "empty")


def test_manifest_hash_is_the_content_hash(tmp_path):
    """What the artifact computes, not the manifest's bytes: its name and creation time do not count,
    a scheduler setting does."""
    write_artifact(tmp_path / "a")
    path = tmp_path / "a" / "manifest.json"
    raw = path.read_bytes()
    first = manifest_hash(tmp_path / "a")
    assert first == content_hash(load_manifest(tmp_path / "a")) != hashlib.sha256(raw).hexdigest()
    data = json.loads(raw)
    path.write_text(json.dumps(dict(data, name="renamed", created_utc="2030-01-01T00:00:00+00:00"), indent=4))
    assert manifest_hash(tmp_path / "a") == first
    data["scheduler_config"]["num_train_timesteps"] = 999
    path.write_text(json.dumps(data))
    assert manifest_hash(tmp_path / "a") != first


# --------------------------------------------------------------------------------- TensorRT
def test_check_trt_plan_accepts_the_same_device():
    m = Manifest.from_dict(sample_dict(trt=TRT))
    assert check_trt_plan(m, "10.3.0", "Orin (nvgpu)") is m.trt
    assert check_trt_plan(m, "10.3.0", "NVIDIA  orin (nvgpu)", "8.7") is m.trt   # case, spacing, NVIDIA prefix


@pytest.mark.parametrize("args,match", [
    (("10.4.0", "Orin (nvgpu)"), "built with TensorRT 10.3.0 but this machine has TensorRT 10.4.0; rebuild it here"),
    (("10.3.0", "NVIDIA GeForce RTX 4090"), "built for GPU 'Orin \\(nvgpu\\)' but this machine has 'NVIDIA GeForce"),
    (("10.3.0", "Orin (nvgpu)", "7.2"), "built for compute capability 8.7 but this GPU has 7.2"),
])
def test_check_trt_plan_refuses_another_device(args, match):
    m = Manifest.from_dict(sample_dict(trt=TRT))
    with pytest.raises(UserError, match=match):
        check_trt_plan(m, *args)


def test_check_trt_plan_without_a_plan():
    m = Manifest.from_dict(sample_dict())
    with pytest.raises(UserError, match="has no TensorRT plan; build one on the target device"):
        check_trt_plan(m, "10.3.0", "Orin")


def test_check_trt_plan_detects_missing_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    m = Manifest.from_dict(sample_dict(trt=TRT))
    with pytest.raises(UserError, match=r"TensorRT is not installed here \(import tensorrt failed"):
        check_trt_plan(m)


def test_check_trt_plan_asks_this_machine_when_not_told(monkeypatch):
    """TensorRT version from ``import tensorrt``, GPU and compute capability from detect_gpu."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    m = Manifest.from_dict(sample_dict(trt=TRT))
    monkeypatch.setattr(trt_device, "detect_gpu",
                        lambda: {"gpu_name": "NVIDIA Orin (nvgpu)", "compute_capability": "8.7", "how": "nvml"})
    assert check_trt_plan(m) is m.trt
    monkeypatch.setattr(trt_device, "detect_gpu",
                        lambda: {"gpu_name": "Orin (nvgpu)", "compute_capability": "7.2", "how": "nvml"})
    with pytest.raises(UserError, match="built for compute capability 8.7 but this GPU has 7.2"):
        check_trt_plan(m)
    monkeypatch.setattr(trt_device, "detect_gpu",
                        lambda: {"gpu_name": None, "compute_capability": None, "how": "none"})
    with pytest.raises(UserError, match="cannot tell which GPU this is .* built for 'Orin \\(nvgpu\\)'"):
        check_trt_plan(m)


def test_load_trt_plan_meta(tmp_path):
    write_artifact(tmp_path / "a", trt=TRT)
    with pytest.raises(UserError, match="listed in the manifest but missing"):
        load_trt_plan_meta(tmp_path / "a")
    load_manifest(tmp_path / "a")                          # an absent plan is not an artifact error
    (tmp_path / "a" / "denoiser.plan").write_bytes(b"PLAN")
    meta = load_trt_plan_meta(tmp_path / "a")
    assert meta["plan_path"] == str(tmp_path / "a" / "denoiser.plan") and meta["gpu_name"] == "Orin (nvgpu)"
    (tmp_path / "a" / "denoiser.plan").write_bytes(b"PLAN2")
    with pytest.raises(UserError, match="does not match its sha256"):
        load_manifest(tmp_path / "a")
    write_artifact(tmp_path / "b")
    with pytest.raises(UserError, match="has no TensorRT plan"):
        load_trt_plan_meta(tmp_path / "b")


def test_manifest_module_is_torch_free():
    """The manifest reader, the TensorRT plan checks and every exporter module import without torch & co."""
    code = ("import sys, abcd_edge.formats.manifest, abcd_edge.device.tensorrt, abcd_edge.export, "
            "abcd_edge.export.model, abcd_edge.export.onnx_export, abcd_edge.export.flops, "
            "abcd_edge.export.tensorrt, abcd_edge.export.pipeline, abcd_edge.export.compare; "
            "bad = [m for m in ('torch', 'onnx', 'diffusers', 'onnxruntime', 'tensorrt') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr
