"""Exporter: tiny UNet2DModels built from a config -> ONNX, parity, FLOPs, fp16, manifest, TensorRT paths, bad input.

Each tiny model is exported once (module fixtures) on one thread; the checks share it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("diffusers")
torch.set_num_threads(1)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from diffusers import CMStochasticIterativeScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from abcd_edge.device import tensorrt as trt_device  # noqa: E402
from abcd_edge.device.tensorrt import check_trt_plan  # noqa: E402
from abcd_edge.errors import UserError  # noqa: E402
from abcd_edge.export import ExportError, export_model  # noqa: E402
from abcd_edge.export.flops import count_flops  # noqa: E402
from abcd_edge.export.model import load_model, weights_hash  # noqa: E402
from abcd_edge.export.onnx_export import export_onnx, torch_flops  # noqa: E402
from abcd_edge.export.pipeline import _check_resolution  # noqa: E402
from abcd_edge.export.tensorrt import TRT_WORKSPACE_BYTES, build_trt_plan  # noqa: E402
from abcd_edge.formats.manifest import Manifest, content_hash, load_manifest, manifest_hash, sha256_file  # noqa: E402

TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"))
TINY_ATTN = dict(TINY, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
TINY_CC = dict(TINY, num_class_embeds=5)


def _save(folder: Path, config: dict, scheduler=None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    if scheduler is None:
        unet.save_pretrained(folder)                     # a bare UNet2DModel folder
    else:
        unet.save_pretrained(folder / "unet")            # a pipeline folder
        scheduler.save_pretrained(folder / "scheduler")
    return folder


def _ort(path: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def attn_export(tmp_path_factory):
    """Unconditional UNet with attention, pipeline folder, batch 1..2, with fp16."""
    root = tmp_path_factory.mktemp("attn")
    model = _save(root / "model", TINY_ATTN, DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    out = root / "artifact"
    m = export_model(str(model), out, batches=(1, 2), fp16=True, progress=False, threads=1)
    return model, out, m


@pytest.fixture(scope="module")
def cc_export(tmp_path_factory):
    """Class-conditional UNet, v-prediction, weights forced into external data."""
    root = tmp_path_factory.mktemp("cc")
    model = _save(root / "model", TINY_CC, DDPMScheduler(prediction_type="v_prediction"))
    out = root / "artifact"
    m = export_model(str(model), out, batches=(1,), progress=False, threads=1, external_data=True)
    return model, out, m


@pytest.fixture(scope="module")
def cm_export(tmp_path_factory):
    """Consistency-model pipeline (CMStochasticIterativeScheduler); fp16 with an impossible drift bound."""
    root = tmp_path_factory.mktemp("cm")
    model = _save(root / "model", TINY, CMStochasticIterativeScheduler())
    out = root / "artifact"
    m = export_model(str(model), out, batches=(1,), fp16=True, fp16_bound=1e-9, progress=False, threads=1)
    return model, out, m


@pytest.fixture()
def bare_unet(tmp_path):
    return _save(tmp_path / "bare", TINY)


@pytest.fixture()
def existing_out(tmp_path):
    """An existing artifact folder whose bytes must survive a refused export."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}\n')
    (out / "denoiser.onnx").write_bytes(b"old onnx")
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _no_temp_left(folder: Path) -> None:
    left = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    assert not left, left


# ------------------------------------------------------------------------------------- parity
def test_unconditional_attention_parity_and_artifacts(attn_export):
    model, out, m = attn_export
    assert sorted(p.name for p in out.iterdir()) == ["denoiser.fp16.onnx", "denoiser.onnx", "manifest.json"]
    assert m.model_kind == "unconditional" and m.num_class_embeds is None
    assert m.prediction_type == "epsilon" and m.timestep_convention == "ddpm-index"
    assert m.batch_min == 1 and m.batch_max == 2 and m.parity["batches"] == [1, 2]
    assert m.parity["timesteps"] == [999.0, 500.5, 10.0]
    assert m.parity["passed"] and m.parity["max_abs"] <= 1e-4
    assert m.opset >= 17 and m.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert len(m.alphas_cumprod) == 1000 and m.alphas_cumprod[0] > m.alphas_cumprod[-1]
    assert m.source_hash == sha256_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    proto = onnx.load(str(out / "denoiser.onnx"))
    assert [i.name for i in proto.graph.input] == ["sample", "timestep"]
    assert [o.name for o in proto.graph.output] == ["prediction"]
    assert all(not i.type.tensor_type.shape.dim[0].HasField("dim_value") for i in proto.graph.input)
    # dynamic batch and continuous timesteps: batch 3 (outside the checked list) with mixed fractional t
    unet = UNet2DModel.from_pretrained(str(model / "unet"), low_cpu_mem_usage=False).eval()
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    t = np.array([987.25, 3.5, 421.75], np.float32)
    got = _ort(out / "denoiser.onnx").run(None, {"sample": x, "timestep": t})[0]
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_flops_match_torch_counter(attn_export, cc_export, cm_export):
    for _, _, m in (attn_export, cc_export, cm_export):
        assert m.flops_per_step > 0 and m.flops_torch > 0
        assert abs(m.flops_per_step - m.flops_torch) / m.flops_torch < 0.05, m
        assert m.flops_rel_diff < 0.05
    m = attn_export[2]
    assert m.flops_by_op["attention"] > 0          # QK^T and AV counted
    assert m.flops_by_op["attention"] <= m.flops_by_op["MatMul"]
    assert cc_export[2].flops_by_op["attention"] > 0   # the mid block's attention (add_attention defaults on)


def test_fp16_drift_recorded(attn_export):
    _, out, m = attn_export
    assert m.fp16["file"] == "denoiser.fp16.onnx" and "denoiser.fp16.onnx" in m.files
    assert 0 < m.fp16["drift_max_abs"] <= m.fp16["bound"] and m.fp16["usable"] is True
    assert m.fp16["io_dtype"] == "float32"
    sess = _ort(out / "denoiser.fp16.onnx")
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)", "tensor(float)"]
    inits = onnx.load(str(out / "denoiser.fp16.onnx")).graph.initializer
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits)


def test_fp16_over_bound_is_marked_unusable(cm_export):
    _, out, m = cm_export                            # exported with fp16_bound=1e-9
    assert m.fp16["usable"] is False and m.fp16["drift_max_abs"] > 1e-9 == m.fp16["bound"]
    assert any("unusable" in n for n in m.notes)
    assert "denoiser.fp16.onnx" in m.files and not m.fp16_usable


def test_class_conditional_with_external_data(cc_export):
    model, out, m = cc_export
    assert m.model_kind == "class-conditional" and m.num_class_embeds == 5
    assert m.prediction_type == "v_prediction"
    assert [i["name"] for i in m.inputs] == ["sample", "timestep", "class_labels"]
    assert m.inputs[2]["dtype"] == "int64"
    assert m.external_data and set(m.files) == {"denoiser.onnx", "denoiser.onnx.data"}
    inits = onnx.load(str(out / "denoiser.onnx"), load_external_data=False).graph.initializer
    assert sum(i.data_location == onnx.TensorProto.EXTERNAL for i in inits) > 10
    assert (out / "denoiser.onnx.data").stat().st_size > 100_000
    unet = UNet2DModel.from_pretrained(str(model / "unet"), low_cpu_mem_usage=False).eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    t = np.array([500.5, 10.0], np.float32)
    y = np.array([4, 1], np.int64)
    got = _ort(out / "denoiser.onnx").run(None, {"sample": x, "timestep": t, "class_labels": y})[0]
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
        other = unet(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.tensor([0, 2])).sample.numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref - other).max() > 1e-4         # the labels really reach the graph


def test_consistency_model(cm_export):
    _, _, m = cm_export
    assert m.model_kind == "consistency" and m.prediction_type == "consistency"
    assert m.timestep_convention == "cm-log-sigma" and m.alphas_cumprod is None
    assert m.scheduler_config["_class_name"] == "CMStochasticIterativeScheduler"
    assert m.scheduler_config["sigma_data"] == 0.5 and m.parity["max_abs"] <= 1e-4


def test_bare_unet_folder_uses_ddpm_default(bare_unet):
    loaded = load_model(str(bare_unet))
    assert loaded.scheduler_config["beta_schedule"] == "linear"
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    assert "default DDPM" in loaded.scheduler_source and any("DDPM default" in n for n in loaded.notes)
    assert loaded.model_kind == "unconditional"


# ----------------------------------------------------------------------------------- manifest
def test_manifest_round_trip_and_hash(attn_export):
    _, out, m = attn_export
    on_disk = load_manifest(out)
    assert on_disk == m
    assert Manifest.from_json(m.to_json()) == m
    assert manifest_hash(out) == content_hash(m)      # content-addressed: not the manifest's bytes
    assert content_hash(dataclasses.replace(m, created_utc="x", name="y", parity={})) == content_hash(m)
    assert content_hash(dataclasses.replace(m, files={**m.files, "denoiser.onnx": "0" * 64})) != content_hash(m)
    for name, digest in m.files.items():
        assert sha256_file(out / name) == digest
    assert m.torch_version == torch.__version__ and m.onnxruntime_version == ort.__version__
    assert m.name == "artifact" and m.created_utc.endswith("+00:00")


def test_tampered_file_is_refused_on_load(attn_export, tmp_path):
    _, out, _ = attn_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "denoiser.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="denoiser.onnx does not match its sha256"):
        load_manifest(copy)
    load_manifest(copy, verify_hashes=False)
    shutil.copy2(out / "denoiser.onnx", copy / "denoiser.onnx")
    load_manifest(copy)
    (copy / "denoiser.fp16.onnx").unlink()
    with pytest.raises(UserError, match="missing denoiser.fp16.onnx"):
        load_manifest(copy, verify_hashes=True)


def test_reexport_replaces_atomically(bare_unet, tmp_path):
    target = tmp_path / "art"
    target.mkdir()
    (target / "stale.txt").write_text("from an older export")
    m = export_model(str(bare_unet), target, progress=False, threads=1)
    assert sorted(p.name for p in target.iterdir()) == ["denoiser.onnx", "manifest.json"]
    assert m.fp16 is None and m.trt is None and (target.stat().st_mode & 0o777) != 0o700
    assert "default DDPM" in m.scheduler_source and load_manifest(target) == m
    _no_temp_left(target)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("batches,match", [((0,), "batch sizes must be integers >= 1"),
                                           ((1, -2), "batch sizes must be integers >= 1"),
                                           ((), "at least one batch size")])
def test_bad_batch_leaves_out_untouched(bare_unet, existing_out, batches, match):
    before = _snapshot(existing_out)
    with pytest.raises(UserError, match=match):
        export_model(str(bare_unet), existing_out, batches=batches, progress=False)
    assert _snapshot(existing_out) == before


def test_bad_resolution_leaves_out_untouched(bare_unet, existing_out):
    before = _snapshot(existing_out)
    with pytest.raises(UserError, match="--resolution 17 is not a multiple of 2"):
        export_model(str(bare_unet), existing_out, resolution=17, progress=False)
    with pytest.raises(UserError, match="positive integer"):
        export_model(str(bare_unet), existing_out, resolution=0, progress=False)
    assert _snapshot(existing_out) == before
    _no_temp_left(existing_out)


def test_resolution_multiple_of_downsampling_factor(tmp_path):
    model = _save(tmp_path / "deep", dict(TINY, block_out_channels=(8, 8, 16),
                                          down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3))
    loaded = load_model(str(model))
    with pytest.raises(UserError, match="not a multiple of 4"):
        _check_resolution(loaded.unet, 18)
    assert _check_resolution(loaded.unet, 20) == 20
    assert _check_resolution(loaded.unet, None) == 16


def test_not_a_diffusers_folder(tmp_path, existing_out):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"x")
    before = _snapshot(existing_out)
    with pytest.raises(UserError, match="not a diffusers model folder"):
        export_model(str(folder), existing_out, progress=False)
    other = tmp_path / "sched"
    DDPMScheduler().save_pretrained(other)
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="not a UNet2DModel"):
        export_model(str(other), existing_out, progress=False)
    assert _snapshot(existing_out) == before


def test_unknown_path_and_offline_hub_id(existing_out, monkeypatch):
    with pytest.raises(UserError, match="no such folder"):
        export_model("./no/such/model", existing_out, progress=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline"):
        export_model("nobody-xyz/no-such-model-123", existing_out, progress=False)


def test_unwritable_out(bare_unet, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot write --out"):
        export_model(str(bare_unet), blocker / "sub" / "art", progress=False)
    with pytest.raises(UserError, match="exists and is not a folder"):
        export_model(str(bare_unet), blocker, progress=False)
    with pytest.raises(UserError, match="opset"):
        export_model(str(bare_unet), tmp_path / "x", opset=13, progress=False)


def test_out_overlapping_model_is_refused(bare_unet):
    with pytest.raises(UserError, match="overlaps the model folder"):
        export_model(str(bare_unet), bare_unet, progress=False)


def test_parity_failure_leaves_out_untouched(bare_unet, existing_out):
    before = _snapshot(existing_out)
    with pytest.raises(ExportError, match="parity failed"):
        export_model(str(bare_unet), existing_out, parity_tol=-1.0, progress=False, threads=1)
    assert _snapshot(existing_out) == before
    _no_temp_left(existing_out)


def test_onnx_export_failure_is_a_one_line_error(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator foo_bar, opset 17\nlong traceback ...")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ExportError) as info:
        export_onnx(torch.nn.Identity(), (torch.zeros(1),), tmp_path / "m.onnx", ["sample"], 17, False)
    msg = str(info.value)
    assert "ONNX export failed at opset 17" in msg and "foo_bar" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- FLOPs
def test_onnx_flops_on_a_hand_built_graph():
    from onnx import TensorProto, helper, numpy_helper

    def init(name, shape):
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),                  # 1x8x8x8, k 3x3x4
             helper.make_node("ConvTranspose", ["c1", "w2"], ["c2"], strides=[2, 2]),           # 8x8x8 -> 4x16x16
             helper.make_node("Flatten", ["c2"], ["f"]),                                       # 1 x 1024
             helper.make_node("Gemm", ["f", "w3"], ["g"], transB=1),                            # 1024 -> 10
             helper.make_node("Reshape", ["g", "shape"], ["r"]),                                # B x 2 x 5
             helper.make_node("MatMul", ["r", "w4"], ["y"])]                                    # 2x5 @ 5x3
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [init("w1", (8, 4, 3, 3)), init("w2", (8, 4, 2, 2)), init("w3", (10, 1024)), init("w4", (5, 3)),
         numpy_helper.from_array(np.array([-1, 2, 5], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = count_flops(model, batch=1)
    conv = 8 * 8 * 8 * (4 * 9)
    convt = (8 * 8 * 8) * (4 * 2 * 2)
    gemm = 1024 * 10
    mm = 2 * 5 * 3
    assert got["by_op"] == {"Conv": 2 * conv, "ConvTranspose": 2 * convt, "Gemm": 2 * gemm, "MatMul": 2 * mm,
                            "attention": 0}
    assert got["total"] == 2 * (conv + convt + gemm + mm)
    assert count_flops(model, batch=3)["total"] == 3 * got["total"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_flops_conv_transpose_matches_torch(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1, groups=3), torch.nn.ConvTranspose2d(6, 4, 4, 2, 1),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 7)).eval()
    x = torch.zeros(1, 3, 8, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "n.onnx"), dynamo=False, input_names=["sample"],
                      dynamic_axes={"sample": {0: "batch"}}, opset_version=17)
    assert count_flops(tmp_path / "n.onnx")["total"] == torch_flops(net, (x,))


# ----------------------------------------------------------------------------------- TensorRT
def test_trt_not_installed_is_refused_with_reason(bare_unet, existing_out, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # `import tensorrt` raises ImportError
    before = _snapshot(existing_out)
    with pytest.raises(UserError) as info:
        export_model(str(bare_unet), existing_out, trt=True, progress=False)
    msg = str(info.value)
    assert msg.startswith("TensorRT is not installed here (import tensorrt failed:")
    assert "--trt needs a machine with TensorRT (JetPack or pip tensorrt)" in msg and "\n" not in msg
    assert _snapshot(existing_out) == before


def test_trt_real_build(attn_export, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed here; the plan build runs on a "
                                                 "machine with TensorRT (JetPack or pip tensorrt)")
    model, _, _ = attn_export
    m = export_model(str(model), tmp_path / "a", batches=(1, 2), trt=True, progress=False)
    assert (tmp_path / "a" / "denoiser.plan").is_file() and (tmp_path / "a" / "denoiser.timing.cache").is_file()
    assert m.trt["tensorrt_version"] == trt.__version__
    assert m.trt["plan_sha256"] == sha256_file(tmp_path / "a" / "denoiser.plan")
    assert m.trt["gpu_name"] == trt_device.detect_gpu()["gpu_name"]
    assert check_trt_plan(m) is m.trt                 # this machine's TensorRT and GPU accept the plan just built


class _FakeTrt(types.ModuleType):
    """Just enough of the tensorrt module to drive build_trt_plan's calls (records them)."""

    def __init__(self, version="10.3.0"):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls = []
        fake = self

        class Obj:
            def __init__(self, *a, **k):
                pass

        class Logger(Obj):
            WARNING = 2

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                fake.calls.append(("set_shape", name, mn, opt, mx))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"cache:" + self.data

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, p):
                fake.calls.append(("profile",))

            def create_timing_cache(self, data):
                fake.calls.append(("cache_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Builder(Obj):
            platform_has_fast_fp16 = True

            def create_network(self, flags):
                fake.calls.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN"

        class OnnxParser(Obj):
            num_errors = 0

            def parse_from_file(self, path):
                fake.calls.append(("parse", Path(path).name))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)


def test_trt_build_wiring_with_a_fake_tensorrt(attn_export, tmp_path, monkeypatch):
    """The build path's API calls and the manifest record, against a stand-in module (no GPU here)."""
    _, out, m = attn_export
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_device, "detect_gpu",
                        lambda: {"gpu_name": "Orin", "compute_capability": "8.7", "how": "test"})
    (tmp_path / "old.cache").write_bytes(b"OLD")
    rec = build_trt_plan(out / "denoiser.onnx", tmp_path / "denoiser.plan", shapes={"sample": (3, 16, 16),
                         "timestep": ()}, batch_min=1, batch_opt=1, batch_max=4, timing_cache_in=tmp_path / "old.cache",
                         timing_cache_out=tmp_path / "denoiser.timing.cache")
    assert (tmp_path / "denoiser.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "denoiser.timing.cache").read_bytes() == b"cache:OLD"
    assert ("flag", "FP16") in fake.calls and ("pool", "WORKSPACE", TRT_WORKSPACE_BYTES) in fake.calls
    assert ("set_shape", "sample", (1, 3, 16, 16), (1, 3, 16, 16), (4, 3, 16, 16)) in fake.calls
    assert ("set_shape", "timestep", (1,), (1,), (4,)) in fake.calls
    assert ("network", 0) in fake.calls and ("cache_in", b"OLD") in fake.calls
    assert rec["tensorrt_version"] == "10.3.0" and rec["gpu_name"] == "Orin" and rec["precision"].startswith("fp16")
    assert rec["timing_cache_reused"] is True and rec["batch_max"] == 4
    assert rec["compute_capability"] == "8.7" and rec["gpu_detected_by"] == "test"   # the GPU as detected here
    rec["plan_sha256"] = sha256_file(tmp_path / "denoiser.plan")
    m2 = Manifest.from_dict(dict(m.to_dict(), trt=rec))
    assert check_trt_plan(m2, "10.3.0", "NVIDIA Orin", "8.7") is m2.trt
    with pytest.raises(UserError, match="built with TensorRT 10.3.0 but this machine has TensorRT 10.4.0"):
        check_trt_plan(m2, "10.4.0", "Orin")
    with pytest.raises(UserError, match="built for GPU 'Orin' but this machine has 'NVIDIA H100'"):
        check_trt_plan(m2, "10.3.0", "NVIDIA H100")


def test_trt_11_without_fp16_flag_builds_from_the_fp16_onnx(attn_export, tmp_path, monkeypatch):
    _, out, _ = attn_export
    fake = _FakeTrt("11.1.0")
    fake.BuilderFlag = types.SimpleNamespace()       # weak typing flags removed in TensorRT 11
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_device, "detect_gpu",
                        lambda: {"gpu_name": "Thor", "compute_capability": None, "how": "test"})
    rec = build_trt_plan(out / "denoiser.onnx", tmp_path / "denoiser.plan", shapes={"sample": (3, 16, 16)},
                         batch_min=1, batch_opt=1, batch_max=1, fp16_onnx=out / "denoiser.fp16.onnx")
    assert ("parse", "denoiser.fp16.onnx") in fake.calls and rec["built_from"] == "denoiser.fp16.onnx"
    assert not any(c[0] == "flag" for c in fake.calls) and rec["timing_cache"] is None


def test_trt_plan_without_a_known_gpu_is_refused(attn_export, tmp_path, monkeypatch):
    """A plan must record its GPU: a build on a machine whose GPU cannot be told is refused."""
    _, out, _ = attn_export
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt())
    monkeypatch.setattr(trt_device, "detect_gpu",
                        lambda: {"gpu_name": None, "compute_capability": None, "how": "none"})
    with pytest.raises(ExportError, match="cannot tell which GPU this is"):
        build_trt_plan(out / "denoiser.onnx", tmp_path / "denoiser.plan", shapes={"sample": (3, 16, 16)},
                       batch_min=1, batch_opt=1, batch_max=1)


# ---------------------------------------------------------------------- the committed demo artifact
def test_committed_demo_artifact_matches_shipped_weights():
    from abcd_edge.paths import DEMO_ARTIFACT_DIR, DEMO_MODEL_DIR

    if not (DEMO_ARTIFACT_DIR / "manifest.json").is_file() or not (DEMO_MODEL_DIR / "unet").is_dir():
        pytest.skip("export/demo or export/demo-model is not built yet (make export)")
    m = load_manifest(DEMO_ARTIFACT_DIR)
    unet_dir = DEMO_MODEL_DIR / "unet"
    assert m.source == "demo"
    assert m.source_hash == weights_hash(unet_dir, m.source_weights), \
        "export/demo was exported from other weights than export/demo-model: run `make export`"
    unet = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False).eval()
    x = np.random.default_rng(0).standard_normal((1, m.channels, m.resolution, m.resolution)).astype(np.float32)
    t = np.array([500.5], np.float32)
    got = _ort(DEMO_ARTIFACT_DIR / "denoiser.onnx").run(None, {"sample": x, "timestep": t})[0]
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    assert np.abs(got - ref).max() <= 1e-4
