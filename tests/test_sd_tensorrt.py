"""TensorRT plans per pipeline component (`abcd-edge export --model <sd folder> --trt`, issue 15), against a stand-in
``tensorrt`` module: TensorRT cannot be installed on this machine, so the builder code runs against a small module
honouring the documented Python API (Builder, OnnxParser, optimisation profiles, timing cache), which records what
it was asked to build. The tiny pipelines come from tests/sd_fixtures.py.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from abcd_edge.cli.main import main
from abcd_edge.device import tensorrt as trt_device
from abcd_edge.errors import UserError
from abcd_edge.export import export_model
from abcd_edge.export.errors import ExportError
from abcd_edge.export.sd_pipeline import PLAN_FILE, TIMING_CACHE_FILE, trt_batch_range
from abcd_edge.formats.manifest import Manifest, content_hash, load_manifest, manifest_hash, sha256_file
from tests.conftest import one_line_error, snapshot
from tests.sd_fixtures import LCM_MAX_LENGTH, SD_MAX_LENGTH, TEXT_HIDDEN, TIME_COND_PROJ_DIM

GPU = {"gpu_name": "Orin", "compute_capability": "8.7", "how": "test"}
SD_COMPONENTS = ("unet", "text_encoder", "vae_decoder")
LCM_COMPONENTS = SD_COMPONENTS + ("vae_decoder_tiny",)


class StandInTensorRT(types.ModuleType):
    """The part of the TensorRT Python API that ``build_trt_plan`` uses, recording one entry per build (one
    Builder per plan): the ONNX file parsed, the profile's (min, opt, max) per input, flags, pool limit, the
    timing cache it was given. A "plan" is ``PLAN <component>``; the timing cache grows by ``|<component>``
    per build, so the order the cache was threaded through the builds shows in its bytes."""

    def __init__(self, version: str = "10.3.0", reject: tuple[str, ...] = ()):
        super().__init__("tensorrt")
        self.__version__ = version
        self.builds: list[dict] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity=None):
                self.severity = severity

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                fake.builds[-1]["shapes"][name] = (tuple(mn), tuple(opt), tuple(mx))

        class Cache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self):
                return memoryview(self.data + b"|" + fake.builds[-1]["component"].encode())

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.builds[-1]["pool"] = (pool, size)

            def set_flag(self, flag):
                fake.builds[-1]["flags"].append(flag)

            def add_optimization_profile(self, profile):
                fake.builds[-1]["profiles"] += 1

            def create_timing_cache(self, data):
                fake.builds[-1]["cache_in"] = bytes(data)
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger):
                fake.builds.append({"component": None, "parsed": None, "shapes": {}, "flags": [], "profiles": 0,
                                    "pool": None, "cache_in": None, "network_flags": None})

            def create_network(self, flags):
                fake.builds[-1]["network_flags"] = flags
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return memoryview(f"PLAN {fake.builds[-1]['component']}".encode())

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse_from_file(self, path):
                path = Path(path)
                assert path.is_file(), path
                fake.builds[-1].update(parsed=path, component=path.parent.name)
                if path.parent.name in reject:
                    self.num_errors = 1
                    return False
                return True

            def get_error(self, i):
                return "In node 3 (parseGraph): UNSUPPORTED_NODE: stand-in rejects this graph"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)

    def build(self, component: str) -> dict:
        found = [b for b in self.builds if b["component"] == component]
        assert len(found) == 1, (component, [b["component"] for b in self.builds])
        return found[0]


@pytest.fixture()
def fake_trt(monkeypatch) -> StandInTensorRT:
    fake = StandInTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_device, "detect_gpu", lambda: dict(GPU))
    return fake


@pytest.fixture(scope="module")
def sd_trt(tiny_sd_dir, tmp_path_factory):
    """tiny_sd_dir exported through the CLI with --trt at batches 1..2, against the stand-in: (out, fake, output)."""
    mp = pytest.MonkeyPatch()
    fake = StandInTensorRT()
    mp.setitem(sys.modules, "tensorrt", fake)
    mp.setattr(trt_device, "detect_gpu", lambda: dict(GPU))
    out = tmp_path_factory.mktemp("sd-trt") / "tiny-sd"
    try:
        res = CliRunner().invoke(main, ["export", "--model", str(tiny_sd_dir), "--out", str(out), "--batch", "1,2",
                                        "--trt"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return out, fake, res.output


# ================================================================================ the plans
def test_cli_trt_export_builds_one_plan_per_component(sd_trt):
    out, fake, output = sd_trt
    assert [b["component"] for b in fake.builds] == ["unet", "text_encoder", "vae_decoder"]
    m = load_manifest(out)                      # ONNX files and (present) plans verified against their sha256
    comps = m.pipeline["components"]
    assert set(comps) == set(SD_COMPONENTS)
    for name in SD_COMPONENTS:
        rec = comps[name]["trt"]
        plan = out / name / PLAN_FILE
        assert rec["plan"] == PLAN_FILE and plan.read_bytes() == f"PLAN {name}".encode()
        assert rec["plan_sha256"] == sha256_file(plan)
        assert rec["tensorrt_version"] == "10.3.0" and rec["gpu_name"] == "Orin"
        assert rec["compute_capability"] == "8.7" and rec["gpu_detected_by"] == "test"
        assert rec["precision"] == "fp16 (builder flag)" and rec["built_from"] == "model.onnx"
        assert "not checked at export" in rec["parity"] and "--backend trt" in rec["parity"]
        build = fake.build(name)
        assert build["parsed"].name == "model.onnx" and build["flags"] == ["FP16"] and build["profiles"] == 1
        assert build["pool"] == ("WORKSPACE", 1 << 30) and build["network_flags"] == 0
        assert f"{name}/{PLAN_FILE}" not in m.files               # device-specific: not a portable file
    assert m.trt is None                                          # the pixel denoiser's top-level record stays unset
    assert "TensorRT plans: unet/model.plan (fp16 (builder flag)), text_encoder/model.plan" in output
    assert "for Orin" in output


def test_profiles_over_the_batch_axis_cfg_doubles_the_unet(sd_trt):
    """Image batches 1..2: the UNet's plan spans 1..4 (classifier-free guidance: one batch-2 call per image),
    tuned at 2; the text encoder 1..4 tuned at 1 (called per text; checked up to 4); the decoder 1..2. Every
    other axis is fixed from the manifest's shapes."""
    _, fake, _ = sd_trt
    L, D = SD_MAX_LENGTH, TEXT_HIDDEN
    assert fake.build("unet")["shapes"] == {
        "sample": ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8)), "timestep": ((1,), (2,), (4,)),
        "encoder_hidden_states": ((1, L, D), (2, L, D), (4, L, D))}
    assert fake.build("text_encoder")["shapes"] == {"input_ids": ((1, L), (1, L), (4, L))}
    assert fake.build("vae_decoder")["shapes"] == {"latent": ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 8))}
    assert trt_batch_range("unet", [1, 2], True) == (1, 2, 4)
    assert trt_batch_range("unet", [2, 3], True) == (2, 4, 6)
    assert trt_batch_range("text_encoder", [1, 2], True) == (1, 1, 4)
    assert trt_batch_range("vae_decoder", [1, 2], True) == (1, 1, 2)
    assert trt_batch_range("unet", [1, 2], False) == (1, 1, 2)


def test_plans_stay_out_of_the_content_hash_and_the_files(sd_trt, tiny_sd_artifact):
    out, _, _ = sd_trt
    m = load_manifest(out)
    plain = load_manifest(tiny_sd_artifact)             # the same folder exported without --trt (batches 1..2)
    assert manifest_hash(out) == manifest_hash(tiny_sd_artifact) == content_hash(m)
    assert m.files == plain.files
    # another device's plan record (other GPU, TensorRT, hash) does not change what the artifact computes
    data = json.loads(m.to_json())
    data["pipeline"]["components"]["unet"]["trt"].update(gpu_name="H100", tensorrt_version="10.9.0",
                                                         plan_sha256="0" * 64)
    assert content_hash(Manifest.from_dict(data)) == content_hash(m)
    # nor does dropping the records (the artifact as committed, plans rebuilt per device)
    for comp in data["pipeline"]["components"].values():
        comp.pop("trt")
    assert content_hash(Manifest.from_dict(data)) == content_hash(m)


def test_plans_are_git_ignored():
    lines = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "export/*/*/model.plan" in lines and "export/*/denoiser.plan" in lines
    assert "export/*/*.timing.cache" in lines                     # covers export/<name>/pipeline.timing.cache


def test_one_timing_cache_is_threaded_through_the_builds_and_reused_on_reexport(sd_trt, tiny_sd_dir, tmp_path,
                                                                              fake_trt):
    out, first, _ = sd_trt
    assert (out / TIMING_CACHE_FILE).read_bytes() == b"|unet|text_encoder|vae_decoder"
    assert [b["cache_in"] for b in first.builds] == [b"", b"|unet", b"|unet|text_encoder"]
    m = load_manifest(out)
    assert all(m.pipeline["components"][n]["trt"]["timing_cache"] == TIMING_CACHE_FILE for n in SD_COMPONENTS)
    # a re-export into the same folder starts from the cache the previous export left
    import shutil

    again = shutil.copytree(out, tmp_path / "again")
    export_model(str(tiny_sd_dir), again, batches=(1, 2), trt=True, progress=False, threads=1)
    assert fake_trt.build("unet")["cache_in"] == b"|unet|text_encoder|vae_decoder"
    assert load_manifest(again).pipeline["components"]["unet"]["trt"]["timing_cache_reused"] is True


def test_lcm_one_branch_unet_and_the_tiny_decoder(tiny_lcm_dir, tiny_lcm_artifact, tmp_path, fake_trt):
    out = tmp_path / "lcm"
    m = export_model(str(tiny_lcm_dir), out, batches=(1, 2), trt=True, progress=False, threads=1)
    assert [b["component"] for b in fake_trt.builds] == list(LCM_COMPONENTS)
    L, D, Tc = LCM_MAX_LENGTH, TEXT_HIDDEN, TIME_COND_PROJ_DIM
    # an LCM UNet runs one branch (guidance enters as timestep_cond): image batches 1..2, no doubling
    assert fake_trt.build("unet")["shapes"] == {
        "sample": ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 8)), "timestep": ((1,), (1,), (2,)),
        "encoder_hidden_states": ((1, L, D), (1, L, D), (2, L, D)), "timestep_cond": ((1, Tc), (1, Tc), (2, Tc))}
    assert fake_trt.build("text_encoder")["shapes"] == {"input_ids": ((1, L), (1, L), (2, L))}
    assert fake_trt.build("vae_decoder_tiny")["shapes"] == {"latent": ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 8))}
    for name in LCM_COMPONENTS:
        assert (out / name / PLAN_FILE).read_bytes() == f"PLAN {name}".encode()
        assert m.pipeline["components"][name]["trt"]["plan_sha256"] == sha256_file(out / name / PLAN_FILE)
    assert manifest_hash(out) == manifest_hash(tiny_lcm_artifact)


# ============================================================================== refusals, checks
def test_trt_not_installed_is_refused_before_any_work(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)        # `import tensorrt` raises ImportError
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier artifact")
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_sd_dir), "--out", str(out), "--trt"])
    one_line_error(res, "TensorRT is not installed here (import tensorrt failed:",
                    "--trt needs a machine with TensorRT (JetPack or pip tensorrt)")
    assert snapshot(out) == {"keep.txt": b"an earlier artifact"}


def test_a_component_tensorrt_rejects_names_it_and_writes_nothing(tiny_sd_dir, tmp_path, monkeypatch):
    fake = StandInTensorRT(reject=("text_encoder",))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_device, "detect_gpu", lambda: dict(GPU))
    out = tmp_path / "a"
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_sd_dir), "--out", str(out), "--trt"])
    one_line_error(res, "TensorRT plan of the text_encoder: TensorRT's ONNX parser rejected model.onnx",
                    "UNSUPPORTED_NODE")
    assert not out.exists() and not list(tmp_path.glob(".a.*"))


def test_a_gpu_that_cannot_be_told_is_refused(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", StandInTensorRT())
    monkeypatch.setattr(trt_device, "detect_gpu", lambda: {"gpu_name": None, "compute_capability": None,
                                                           "how": "none"})
    with pytest.raises(ExportError, match="TensorRT plan of the unet: built a TensorRT plan but cannot tell which GPU"):
        export_model(str(tiny_sd_dir), tmp_path / "a", trt=True, progress=False, threads=1)
    assert not (tmp_path / "a").exists()


def test_fp16_and_trt_together(tiny_sd_dir, tmp_path, fake_trt):
    """--fp16 --trt: every component gets its fp16 ONNX (with its drift) and a plan built by the builder."""
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "a"), "--fp16",
                                    "--trt"])
    assert res.exit_code == 0, res.output
    comps = load_manifest(tmp_path / "a").pipeline["components"]
    for name, rec in comps.items():
        assert rec["fp16"]["usable"] and (tmp_path / "a" / rec["fp16"]["file"]).is_file(), name
        assert rec["trt"]["plan"] == PLAN_FILE, name
    assert len(fake_trt.builds) == len(comps)


def test_a_tampered_plan_is_refused_at_load(sd_trt, tmp_path):
    import shutil

    out = shutil.copytree(sd_trt[0], tmp_path / "copy")
    (out / "vae_decoder" / PLAN_FILE).write_bytes(b"PLAN of another machine")
    with pytest.raises(UserError, match=r"vae_decoder/model.plan does not match its sha256 in manifest.json"):
        load_manifest(out)
    (out / "vae_decoder" / PLAN_FILE).unlink()                 # absent (not committed): fine
    assert load_manifest(out).pipeline["components"]["vae_decoder"]["trt"]["plan"] == PLAN_FILE


@pytest.mark.parametrize("change, message", [
    (dict(plan="../model.plan"), "component 'unet' trt plan must be a plain file name inside unet/"),
    (dict(plan_sha256=None), "component 'unet' trt needs strings plan, plan_sha256, tensorrt_version, gpu_name"),
    (dict(gpu_name=3), "component 'unet' trt needs strings"),
])
def test_manifest_validates_component_plan_records(sd_trt, change, message):
    data = json.loads(load_manifest(sd_trt[0]).to_json())
    data["pipeline"]["components"]["unet"]["trt"].update(change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Manifest.from_dict(data)


@pytest.mark.parametrize("verb", ["run", "profile"])
def test_backend_trt_on_a_pipeline_is_refused_in_one_line(sd_trt, verb, tmp_path):
    """Loading the per-component plans at run time is not implemented: --backend trt says so, with or without
    TensorRT here, before any measuring."""
    out = sd_trt[0]
    args = {"run": ["run", "--artifact", str(out), "--backend", "trt", "--prompt", "a cat", "--budget", "1s",
                    "--out", str(tmp_path / "x.png"), "--report", str(tmp_path / "x.json")],
            "profile": ["profile", "--artifact", str(out), "--backend", "trt", "--out", str(tmp_path / "p.json")]}
    res = CliRunner().invoke(main, args[verb])
    one_line_error(res, "backend 'trt' runs a pixel-space artifact's denoiser.plan",
                    "per-component plans (`export --trt`) is not implemented yet", "ort-cpu, ort-cuda or ort-trt")
    assert not list(tmp_path.iterdir())
