"""The artifact manifest (``manifest.json``): what was exported, from what, and how well it matches.

Torch-free (stdlib + numpy): the runtime loads it on a Jetson. The exporter
(:mod:`abcd_edge.export`) writes it; everything downstream (profiles, calibrated
controllers) is tied to one artifact by :func:`manifest_hash`, its content address (:func:`content_hash`). Whether a TensorRT plan
may load on this machine is :mod:`abcd_edge.device.tensorrt`'s question.

Conventions recorded in every manifest:

- ``flops_per_step`` is per sample (batch 1), FLOPs = 2 x MACs, counted from the
  ONNX graph over Conv, ConvTranspose, MatMul and Gemm nodes (attention is its
  MatMuls); bias adds, norms and activations are not counted.
  ``flops_torch`` is ``torch.utils.flop_counter.FlopCounterMode`` on the torch
  model at batch 1; ``flops_rel_diff = |flops_per_step - flops_torch| / flops_torch``.
- ``parity``: ORT (CPUExecutionProvider) vs torch eager on fixed random inputs;
  ``max_rel = max|ort - torch| / max|torch|`` (over all checked outputs).
- ``files``: sha256 of every portable artifact file (the ONNX models and their
  external data). The TensorRT plan is device-specific and git-ignored, so its
  hash lives in ``trt["plan_sha256"]`` and is checked when the plan is present.
  A pipeline artifact (``pipeline`` set: a latent UNet + VAE decoder [+ text encoder
  and tokenizer], docs/sd-pipeline-spec.md) names its files ``<component>/<file>``
  (one folder level, the component one of :data:`PIPELINE_COMPONENTS`); its TensorRT plans
  (``export --trt``) are ``<component>/model.plan``, recorded in the component's ``trt``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from abcd_edge.errors import UserError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_KINDS = ("unconditional", "class-conditional", "consistency", "text-to-image")
# what `abcd-edge export` accepts (diffusers folders), with one example each (`abcd-edge info`, README)
MODEL_FAMILIES = (
    ("pixel-space UNet2DModel: unconditional, class-conditional, consistency (unet/ + scheduler/)",
     "abcd-edge export --model demo --out export/demo"),
    ("Stable-Diffusion-style text-to-image, SD 1.x / 2.x shapes (model_index.json; text_encoder/ CLIPTextModel, "
     "tokenizer/, unet/ UNet2DConditionModel, vae/ AutoencoderKL [+ AutoencoderTiny], scheduler/)",
     "abcd-edge export --model path/to/sd-folder --out export/sd && abcd-edge run --artifact export/sd "
     "--prompt 'a red circle' --budget 800ms"),
    ("LCM / LCM-distilled SD (the same layout, UNet with time_cond_proj_dim, LCMScheduler): guidance baked in",
     "abcd-edge run --artifact export/lcm --prompt 'a red circle' --guidance 8 --budget 150ms"),
    ("LDM layout: latent UNet2DModel + vae/ (no text)", "abcd-edge export --model path/to/ldm-folder --out export/ldm"),
)
MODEL_FAMILIES_REFUSED = ("transformer backbones (PixArt, SANA, Flux: transformer/), SDXL (text_encoder_2/), "
                          "inpainting UNets, video UNets")
# diffusers names; "consistency" = a consistency-model UNet output F (see TIMESTEP_CONVENTIONS)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "consistency")
TIMESTEP_CONVENTIONS = {
    # t in [0, num_train_timesteps): the discrete DDPM index, non-integer t allowed (continuous).
    "ddpm-index": "timestep = t in [0, num_train_timesteps), fractional allowed; sample fed as is",
    # diffusers CMStochasticIterativeScheduler: the UNet sees c_in * x and t = 250 * ln(sigma + 1e-44);
    # x0 = c_skip * x + c_out * F with sigma_data / sigma_min from scheduler_config.
    "cm-log-sigma": ("timestep = 1000 * 0.25 * ln(sigma + 1e-44); sample fed as x / sqrt(sigma^2 + sigma_data^2); "
                     "x0 = c_skip x + c_out F, c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), "
                     "c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)"),
}
FLOPS_CONVENTION = ("per sample (batch 1); FLOPs = 2 x MACs over Conv, ConvTranspose, MatMul, Gemm "
                    "(attention = its MatMuls); bias, norms, activations not counted")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# a pipeline artifact's component folders (files keys "<component>/<file>") and the file its UNet steps
PIPELINE_COMPONENTS = ("unet", "text_encoder", "vae_decoder", "vae_decoder_tiny", "tokenizer")
PIXEL_DENOISER_FILE = "denoiser.onnx"
PIPELINE_DENOISER_FILE = "unet/model.onnx"
# measured numbers in pipeline["components"][name]: left out of the content hash (see content_hash)
PIPELINE_MEASURED = ("parity", "flops", "flops_torch", "flops_rel_diff", "flops_by_op")
# device-specific in pipeline["components"][name] (a TensorRT plan record: GPU, TensorRT version, plan hash):
# also left out of the content hash, as the pixel artifact's top-level ``trt`` is
PIPELINE_DEVICE_SPECIFIC = ("trt",)


@dataclass
class Manifest:
    """``manifest.json`` of one exported denoiser artifact (schema version :data:`SCHEMA_VERSION`)."""

    schema_version: int
    name: str                               # artifact name (usually the --out folder name)
    source: str                             # "demo", a local folder, or a Hugging Face id
    source_hash: str                        # sha256 of the UNet weights file (see source_weights)
    source_weights: list[str]               # the weights file(s) hashed, relative to the UNet folder
    model_kind: str                         # one of MODEL_KINDS
    num_class_embeds: Optional[int]         # set for class-conditional UNets (input class_labels int64 [B])
    prediction_type: str                    # one of PREDICTION_TYPES
    timestep_convention: str                # a key of TIMESTEP_CONVENTIONS
    scheduler_config: dict                  # the diffusers scheduler config (enough for NoiseSchedule.from_config)
    scheduler_source: str                   # where scheduler_config came from (or "default DDPM ...")
    alphas_cumprod: Optional[list[float]]   # the schedule the model was trained with (None for consistency)
    resolution: int
    channels: int                           # input channels C of sample [B, C, H, W]
    out_channels: int                       # output channels of prediction
    batch_min: int
    batch_max: int
    batches_checked: list[int]              # batch sizes the parity check ran at
    inputs: list[dict]                      # [{"name", "dtype", "shape"}], shape entries int or "batch"
    outputs: list[dict]
    opset: int
    external_data: bool                     # True when denoiser.onnx keeps its weights in denoiser.onnx.data
    files: dict[str, str]                   # artifact file name -> sha256
    params: int                             # number of UNet parameters
    flops_per_step: int                     # per sample, from the ONNX graph (FLOPS_CONVENTION)
    flops_torch: int                        # torch.utils.flop_counter on the torch model, per sample
    flops_rel_diff: float                   # |flops_per_step - flops_torch| / flops_torch
    flops_by_op: dict[str, int]             # ONNX count split by op type (+ "attention" share of MatMul)
    parity: dict                            # {"timesteps", "batches", "max_abs", "max_rel", "tol", "passed"}
    fp16: Optional[dict]                    # {"file", "method", "io_dtype", "drift_max_abs", "drift_max_rel",
                                            #  "bound", "usable"} or None
    trt: Optional[dict]                     # {"plan", "plan_sha256", "tensorrt_version", "gpu_name",
                                            #  "compute_capability", "precision", "batch_min", "batch_opt",
                                            #  "batch_max", "workspace_bytes", "timing_cache", ...} or None
    created_utc: str
    abcd_edge_version: str
    torch_version: str
    onnx_version: str
    onnxruntime_version: str
    diffusers_version: str
    flops_convention: str = FLOPS_CONVENTION
    notes: list[str] = field(default_factory=list)
    # a latent pipeline (text-to-image SD/LCM, or an LDM without text): its components, tokenizer, text,
    # latent, image, guidance and decoders (docs/sd-pipeline-spec.md); None for a pixel denoiser artifact
    pipeline: Optional[dict] = None

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data, where: str = "manifest") -> "Manifest":
        from abcd_edge.formats.schema import from_dict

        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise UserError(f"{where}: field 'schema_version' must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise UserError(f"{where}: schema_version {version} is newer than this abcd-edge reads "
                            f"({SCHEMA_VERSION}); upgrade abcd-edge or re-export")
        if version < SCHEMA_VERSION:
            raise UserError(f"{where}: schema_version {version} is older than this abcd-edge reads "
                            f"({SCHEMA_VERSION}); re-export the artifact (abcd-edge export)")
        m = from_dict(cls, data, where)
        m._validate(where)
        return m

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    def _validate(self, where: str) -> None:
        def bad(name, msg):
            raise UserError(f"{where}: field {name!r} {msg}")

        if self.model_kind not in MODEL_KINDS:
            bad("model_kind", f"is {self.model_kind!r}; accepted: {', '.join(MODEL_KINDS)}")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            bad("num_class_embeds", f"must be >= 1 or null, got {self.num_class_embeds}")
        if self.model_kind == "class-conditional" and self.num_class_embeds is None:
            bad("num_class_embeds", "must be set for a class-conditional model")
        if self.prediction_type not in PREDICTION_TYPES:
            bad("prediction_type", f"is {self.prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            bad("timestep_convention", f"is {self.timestep_convention!r}; accepted: {', '.join(TIMESTEP_CONVENTIONS)}")
        if self.resolution < 1:
            bad("resolution", f"must be >= 1, got {self.resolution}")
        if self.channels < 1 or self.out_channels < 1:
            bad("channels", "channels and out_channels must be >= 1")
        if self.batch_min < 1:
            bad("batch_min", f"must be >= 1, got {self.batch_min}")
        if self.batch_max < self.batch_min:
            bad("batch_max", f"({self.batch_max}) must be >= batch_min ({self.batch_min})")
        if self.opset < 17:
            bad("opset", f"must be >= 17, got {self.opset}")
        if not _HEX64.match(self.source_hash):
            bad("source_hash", "must be a sha256 hex digest")
        if self.model_kind == "text-to-image" and self.pipeline is None:
            bad("pipeline", "must be set for a text-to-image model")
        if self.denoiser_file not in self.files:
            bad("files", f"must list {self.denoiser_file}")
        for fname, digest in self.files.items():
            if not isinstance(digest, str) or not _HEX64.match(digest):
                bad("files", f"entry {fname!r} must be a sha256 hex digest")
            _check_file_key(fname, self.pipeline is not None, bad)
        if self.pipeline is not None:
            _validate_pipeline(self, bad)
        if self.flops_per_step <= 0:
            bad("flops_per_step", f"must be > 0, got {self.flops_per_step}")
        sc = self.scheduler_config
        if "num_train_timesteps" not in sc:
            bad("scheduler_config", "has no num_train_timesteps")
        if self.timestep_convention == "ddpm-index" and not (
                self.alphas_cumprod or sc.get("trained_betas") or "beta_schedule" in sc):
            bad("scheduler_config", "has neither beta_schedule nor trained_betas (and alphas_cumprod is empty)")
        for key in ("max_abs", "max_rel", "tol"):
            if not isinstance(self.parity.get(key), (int, float)) or isinstance(self.parity.get(key), bool):
                bad("parity", f"needs a number {key!r}")
        if self.fp16 is not None:
            for key, tp in (("file", str), ("drift_max_abs", (int, float)), ("bound", (int, float)),
                            ("usable", bool)):
                if not isinstance(self.fp16.get(key), tp):
                    bad("fp16", f"needs {key!r} ({getattr(tp, '__name__', 'number')})")
            if self.fp16["file"] not in self.files:
                bad("fp16", f"file {self.fp16['file']!r} is not listed in files")
        if self.trt is not None:
            for key in ("plan", "plan_sha256", "tensorrt_version", "gpu_name"):
                if not isinstance(self.trt.get(key), str):
                    bad("trt", f"needs a string {key!r}")
            if Path(self.trt["plan"]).name != self.trt["plan"]:
                bad("trt", "plan must be a plain file name inside the artifact")

    # ----------------------------------------------------------------------------- helpers
    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def denoiser_file(self) -> str:
        """The ONNX file the sampler steps: ``denoiser.onnx``, or ``unet/model.onnx`` for a pipeline artifact."""
        return PIPELINE_DENOISER_FILE if self.pipeline is not None else PIXEL_DENOISER_FILE

    @property
    def is_pipeline(self) -> bool:
        return self.pipeline is not None

    def component_file(self, name: str, precision: str = "fp32") -> str:
        """The artifact-relative file of pipeline component ``name`` (UserError naming what there is); at
        ``precision`` "fp16" its fp16 copy where the export marked it usable (``export --fp16``), else fp32."""
        comps = (self.pipeline or {}).get("components", {})
        if name not in comps:
            have = ", ".join(comps) or "none (a pixel denoiser artifact)"
            raise UserError(f"the artifact has no {name!r} component; it has: {have}")
        fp16 = comps[name].get("fp16") or {}
        return fp16["file"] if precision == "fp16" and fp16.get("usable") else comps[name]["file"]

    def check_pipeline_precision(self, precision: str, where: str) -> list[str]:
        """A pipeline artifact at ``precision``: refused in one line when fp16 was asked and its export made no
        fp16 copies; else the notes (components kept in fp32 because their fp16 drift was over the bound)."""
        comps = (self.pipeline or {}).get("components", {})
        if precision != "fp16":
            return []
        if not any("fp16" in c for c in comps.values()):
            raise UserError(f"--precision fp16: artifact {where!r} has no fp16 components; export it with "
                            "`abcd-edge export --fp16`, or use --precision fp32")
        return [f"--precision fp16: {name} stays fp32 (its fp16 drift {c['fp16']['drift_max_rel']:.3g} of the "
                f"output scale was over the export's bound)" for name, c in comps.items()
                if "fp16" in c and not c["fp16"]["usable"]]

    @property
    def fp16_usable(self) -> bool:
        return bool(self.fp16 and self.fp16.get("usable"))


def _check_file_key(fname: str, pipeline: bool, bad) -> None:
    """A files key is a plain name, or (pipeline artifacts) "<component>/<file>" one folder down."""
    parts = fname.split("/")
    plain = len(parts) == 1 and Path(fname).name == fname and fname not in ("", ".", "..") and "\\" not in fname
    nested = (pipeline and len(parts) == 2 and parts[0] in PIPELINE_COMPONENTS and parts[1] not in ("", ".", "..")
              and Path(parts[1]).name == parts[1] and "\\" not in parts[1])
    if not (plain or nested):
        bad("files", f"entry {fname!r} must be a plain file name inside the artifact"
            + (f" or <component>/<file> with the component one of {', '.join(PIPELINE_COMPONENTS)}"
               if pipeline else ""))


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_pipeline(m: "Manifest", bad) -> None:
    """The ``pipeline`` record (docs/sd-pipeline-spec.md): components with files listed in ``files``, the
    latent / image / guidance conventions, and for text-to-image the tokenizer and text encoder."""
    p = m.pipeline
    if not isinstance(p, dict):
        bad("pipeline", "must be an object or null")
    comps = p.get("components")
    if not isinstance(comps, dict) or not comps:
        bad("pipeline", "needs a non-empty object 'components'")
    for name, c in comps.items():
        if name not in PIPELINE_COMPONENTS or name == "tokenizer":
            bad("pipeline", f"component {name!r} is unknown; accepted: unet, text_encoder, vae_decoder, "
                "vae_decoder_tiny")
        if not isinstance(c, dict):
            bad("pipeline", f"component {name!r} must be an object")
        f = c.get("file")
        if not isinstance(f, str) or f not in m.files:
            bad("pipeline", f"component {name!r} file {f!r} is not listed in files")
        if not f.startswith(name + "/"):
            bad("pipeline", f"component {name!r} file {f!r} must be in the {name}/ folder")
        for key in ("inputs", "outputs"):
            io = c.get(key)
            if not isinstance(io, list) or not io or not all(
                    isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("dtype"), str)
                    and isinstance(i.get("shape"), list) for i in io):
                bad("pipeline", f"component {name!r} needs a non-empty list {key!r} of {{name, dtype, shape}}")
        if not _is_int(c.get("flops")) or c["flops"] <= 0:
            bad("pipeline", f"component {name!r} needs an integer 'flops' > 0 (per sample)")
        if not _is_int(c.get("params")) or c["params"] < 0:
            bad("pipeline", f"component {name!r} needs an integer 'params'")
        par = c.get("parity")
        if not isinstance(par, dict) or not all(_is_num(par.get(k)) for k in ("max_abs", "max_rel", "tol")) \
                or not isinstance(par.get("passed"), bool):
            bad("pipeline", f"component {name!r} needs 'parity' with numbers max_abs, max_rel, tol and a bool passed")
        plan = c.get("trt")
        if plan is not None:     # `export --trt`: <name>/<plan>, device-specific, git-ignored, not in files
            if not isinstance(plan, dict) or not all(isinstance(plan.get(k), str) for k in (
                    "plan", "plan_sha256", "tensorrt_version", "gpu_name")):
                bad("pipeline", f"component {name!r} trt needs strings plan, plan_sha256, tensorrt_version, gpu_name")
            if Path(plan["plan"]).name != plan["plan"] or plan["plan"] in ("", ".", ".."):
                bad("pipeline", f"component {name!r} trt plan must be a plain file name inside {name}/")
    for name in ("unet", "vae_decoder"):
        if name not in comps:
            bad("pipeline", f"must list the component {name!r}")
    if comps["unet"]["file"] != PIPELINE_DENOISER_FILE:
        bad("pipeline", f"component 'unet' file must be {PIPELINE_DENOISER_FILE}")
    lat = p.get("latent")
    if not isinstance(lat, dict) or not all(_is_int(lat.get(k)) and lat[k] >= 1
                                            for k in ("channels", "size", "vae_scale_factor")) \
            or not _is_num(lat.get("scaling_factor")) or lat["scaling_factor"] <= 0:
        bad("pipeline", "needs 'latent' {channels, size, vae_scale_factor: int >= 1, scaling_factor: number > 0}")
    if lat["channels"] != m.channels or lat["size"] != m.resolution:
        bad("pipeline", f"latent {lat['channels']} x {lat['size']} does not match channels {m.channels} / "
            f"resolution {m.resolution}")
    img = p.get("image")
    if not isinstance(img, dict) or not _is_int(img.get("resolution")) or img["resolution"] < 1 \
            or img.get("channels") not in (1, 3):
        bad("pipeline", "needs 'image' {resolution: int >= 1, channels: 1 or 3}")
    g = p.get("guidance")
    if not isinstance(g, dict) or not _is_num(g.get("default_scale")) or not (
            g.get("time_cond_proj_dim") is None or (_is_int(g["time_cond_proj_dim"]) and g["time_cond_proj_dim"] > 0)):
        bad("pipeline", "needs 'guidance' {time_cond_proj_dim: int > 0 or null, default_scale: number}")
    dec = p.get("decoders")
    if not isinstance(dec, list) or not dec or dec[0] != "vae_decoder" or not all(d in comps for d in dec) \
            or not all(d in ("vae_decoder", "vae_decoder_tiny") for d in dec):
        bad("pipeline", "needs 'decoders': ['vae_decoder'] or ['vae_decoder', 'vae_decoder_tiny'], each a component")
    tok, text = p.get("tokenizer"), p.get("text")
    if m.model_kind == "text-to-image" or tok is not None or text is not None or "text_encoder" in comps:
        if "text_encoder" not in comps:
            bad("pipeline", "must list the component 'text_encoder' (text-to-image)")
        if not isinstance(tok, dict) or not isinstance(tok.get("file"), str) or tok["file"] not in m.files \
                or not tok["file"].startswith("tokenizer/"):
            bad("pipeline", "needs 'tokenizer' with a 'file' tokenizer/... listed in files")
        for key in ("model_max_length", "pad_token_id", "bos_token_id", "eos_token_id"):
            if not _is_int(tok.get(key)) or tok[key] < 0:
                bad("pipeline", f"tokenizer needs an integer {key!r}")
        if not isinstance(text, dict) or not all(_is_int(text.get(k)) and text[k] >= 1
                                                  for k in ("hidden_size", "max_length")):
            bad("pipeline", "needs 'text' {hidden_size, max_length: int >= 1}")
        if m.model_kind != "text-to-image":
            bad("model_kind", f"is {m.model_kind!r} but the pipeline has a text encoder: must be 'text-to-image'")


def _pipeline_content(pipeline: dict) -> dict:
    """``pipeline`` without what was measured about it (parity, FLOPs) or built for one device (a component's
    TensorRT plan record ``trt``): what the artifact computes."""
    out = dict(pipeline)
    out["components"] = {name: {k: v for k, v in comp.items()
                                if k not in PIPELINE_MEASURED and k not in PIPELINE_DEVICE_SPECIFIC}
                         for name, comp in pipeline.get("components", {}).items()}
    return out


# ---------------------------------------------------------------------------------- files
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# What an artifact computes: its files' bytes and how they are driven. Not when, where or by which
# versions it was made, nor what was measured about it (parity, FLOPs), nor its folder name: re-exporting
# the same model gives the same hash, so profiles and controllers stay tied to it.
CONTENT_FIELDS = ("model_kind", "num_class_embeds", "prediction_type", "timestep_convention", "scheduler_config",
                  "alphas_cumprod", "resolution", "channels", "out_channels", "batch_min", "batch_max", "inputs",
                  "outputs", "files")


def content_hash(manifest: Manifest) -> str:
    """sha256 of the canonical JSON of the manifest's CONTENT_FIELDS (the content address of the artifact).

    A pipeline artifact adds "pipeline" (less its measured parity and FLOPs and its components' TensorRT
    plan records); a pixel artifact's hash is
    what it was before pipelines existed, so committed profiles and controllers keep matching."""
    content = {"content_fields": list(CONTENT_FIELDS),
               **{name: getattr(manifest, name) for name in CONTENT_FIELDS}}
    if manifest.pipeline is not None:
        content["content_fields"].append("pipeline")
        content["pipeline"] = _pipeline_content(manifest.pipeline)
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_hash(artifact_dir: str | os.PathLike) -> str:
    """The artifact's content hash (:func:`content_hash`): profiles and controllers are tied to an artifact by it."""
    return content_hash(load_manifest(artifact_dir, verify_hashes=False))


def load_manifest(artifact_dir: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
    """Read ``<artifact_dir>/manifest.json``; with ``verify_hashes`` check every listed file's sha256.

    A missing or tampered file is a UserError naming it. A TensorRT plan is checked
    when present (it is device-specific and git-ignored, so its absence is not an error).
    """
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise UserError(f"artifact folder {str(artifact_dir)!r} does not exist (make one with `abcd-edge export`)")
    path = artifact_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in {str(artifact_dir)!r}: not an abcd-edge artifact "
                        "(make one with `abcd-edge export`)")
    m = Manifest.from_json(path.read_bytes(), where=str(path))
    for fname in m.files:   # names are checked by the schema; a link could still lead out of the folder
        parts = Path(fname).parts
        for k in range(1, len(parts) + 1):
            f = artifact_dir.joinpath(*parts[:k])
            if f.is_symlink():
                raise UserError(f"artifact file {str(f)!r} is a symbolic link: artifact files must be plain files "
                                "inside the artifact folder")
    if verify_hashes:
        for fname, digest in m.files.items():
            f = artifact_dir / fname
            if not f.is_file():
                raise UserError(f"artifact {str(artifact_dir)!r} is missing {fname} listed in its manifest; "
                                "re-export it")
            if sha256_file(f) != digest:
                raise UserError(f"{f} does not match its sha256 in {MANIFEST_NAME} (modified or corrupt); "
                                "re-export the artifact")
        if m.trt is not None:
            plan = artifact_dir / m.trt["plan"]
            if plan.is_file() and sha256_file(plan) != m.trt["plan_sha256"]:
                raise UserError(f"{plan} does not match its sha256 in {MANIFEST_NAME} (rebuilt elsewhere or "
                                "corrupt); re-export with --trt")
        for name, comp in ((m.pipeline or {}).get("components") or {}).items():
            rec = comp.get("trt")
            plan = artifact_dir / name / rec["plan"] if rec else None
            if plan is not None and plan.is_file() and sha256_file(plan) != rec["plan_sha256"]:
                raise UserError(f"{plan} does not match its sha256 in {MANIFEST_NAME} (rebuilt elsewhere or "
                                "corrupt); re-export with --trt")
    return m
