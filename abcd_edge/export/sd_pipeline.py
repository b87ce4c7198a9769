"""Export of a latent diffusion pipeline folder: Stable-Diffusion-style text-to-image (SD 1.x / 2.x shapes, LCM,
Turbo) and the LDM layout (a latent UNet2DModel + vae/), one ONNX file per component plus one manifest.

    <out>/unet/model.onnx              sample [B,C,h,w], timestep [B] f32, encoder_hidden_states [B,L,D]
                                       (+ timestep_cond [B,Tc] for an LCM UNet) -> out_sample [B,C,h,w]
    <out>/text_encoder/model.onnx      input_ids [B,L] int64 -> last_hidden_state [B,L,D]
    <out>/vae_decoder/model.onnx       latent [B,C,h,w] (scaled, as the UNet steps it) -> image [B,3,H,W] in [-1,1]
    <out>/vae_decoder_tiny/model.onnx  the same for an AutoencoderTiny in vae_tiny/ (or taesd/), when present
    <out>/tokenizer/tokenizer.json     (:mod:`abcd_edge.export.tokenizer`), checked against CLIPTokenizer
    <out>/manifest.json                ``pipeline`` record: components (files, I/O, FLOPs, parity, params),
                                       tokenizer, text, latent, image, guidance, decoders (docs/sd-pipeline-spec.md)
    <out>/<component>/model.plan       with ``trt=True`` (on the target device): one TensorRT plan per component,
                                       recorded in its component's ``trt`` (:func:`build_component_plans`);
                                       device-specific: not in ``files`` nor in the content hash, git-ignored

:func:`latent_pipeline_kind` says which folder this module takes ("text-to-image", "ldm") or None (the pixel
UNet2DModel path of :mod:`abcd_edge.export.model`), refusing, in one line naming the class found and what is
accepted, transformer backbones, SDXL's second text encoder, inpainting / upscaler / SDXL UNets, a missing or
mismatched component. :func:`export_latent_pipeline` does the work, atomically (a refusal leaves ``out`` as it was).
Each component: traced at fp32, dynamic batch axis, checked on ONNX Runtime CPU against torch at several batch
sizes (max |ort - torch| / max |torch| <= ``parity_tol``), FLOPs counted from the graph and cross-checked with
``torch.utils.flop_counter``; weights over ``external_bytes`` go to ``model.onnx.data`` (protobuf's 2 GB limit).
Parts: :mod:`~abcd_edge.export.sd_layout` (which folder, refusals), :mod:`~abcd_edge.export.sd_components`
(the component modules, ONNX export and checks), :mod:`~abcd_edge.export.tokenizer` (tokenizer.json).
torch, diffusers, transformers, onnx and onnxruntime are imported inside functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.export.errors import ExportError, first_line
from abcd_edge.export.sd_components import (ONNX_FILE, PARITY_TIMESTEPS, Component, decoder_component,
                                            export_and_check, text_component, torch_run, unet_component)
from abcd_edge.export.sd_layout import ACCEPTED, class_of, latent_pipeline_kind, read_json, tiny_vae_folder
from abcd_edge.formats.manifest import (MANIFEST_NAME, PIPELINE_DENOISER_FILE, PREDICTION_TYPES, SCHEMA_VERSION,
                                        Manifest, sha256_file)

__all__ = ["export_latent_pipeline", "latent_pipeline_kind", "PIPELINE_PARITY_TOL", "EXTERNAL_DATA_BYTES",
           "PLAN_FILE", "TIMING_CACHE_FILE", "trt_batch_range", "build_component_plans"]

PIPELINE_PARITY_TOL = 1e-4          # fp32 ORT vs torch, max abs error relative to max |torch output|
EXTERNAL_DATA_BYTES = 1_800_000_000  # a component's weights above this go to model.onnx.data (protobuf: 2 GB)
FP16_COMPONENT_BOUND = 2e-2         # fp16 ORT vs fp32 ORT, max abs relative to the fp32 output scale; over it: unused
SD_GUIDANCE, LCM_GUIDANCE = 7.5, 8.5   # StableDiffusionPipeline's and LatentConsistencyModelPipeline's defaults
PLAN_FILE = "model.plan"                 # `--trt`: <component>/model.plan (device-specific, git-ignored)
TIMING_CACHE_FILE = "pipeline.timing.cache"   # one TensorRT timing cache shared by the components' builds
TRT_PARITY_NOTE = ("not checked at export (needs the GPU runtime); the runtime does not load pipeline plans yet "
                   "(--backend trt is refused for pipeline artifacts)")


# ==================================================================================== loading
def _weights(folder: Path) -> list[str]:
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(f.name for f in folder.glob(pattern)
                       if ".fp16." not in f.name and "non_ema" not in f.name and f.is_file())
        if found:
            return found
    raise UserError(f"{folder} has a config.json but no weights (*.safetensors or *.bin)")


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and diffusers' warnings and progress bars off (a refusal stays one line), then restored."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (tlog, dlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, level, bar in saved:
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def _load(cls, folder: Path, what: str, **kw):
    try:
        with quiet_libraries():
            if cls.__module__.startswith("diffusers"):
                kw.setdefault("low_cpu_mem_usage", False)    # no "accelerate was not found" warning
            return cls.from_pretrained(str(folder), **kw).eval().float()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the {what} from {folder}: {first_line(exc)}") from None


def _scheduler(root: Path, where: str) -> tuple[dict, str]:
    from abcd_edge.core.noise import NoiseSchedule

    path = root / "scheduler" / "scheduler_config.json"
    sc = {k: v for k, v in read_json(path).items() if k != "_diffusers_version"}
    sc.setdefault("num_train_timesteps", 1000)
    sc.setdefault("prediction_type", "epsilon")
    if sc["prediction_type"] not in PREDICTION_TYPES or sc["prediction_type"] == "consistency":
        raise UserError(f"{where}: scheduler prediction_type {sc['prediction_type']!r} is not supported; accepted: "
                        "epsilon, v_prediction, sample")
    try:
        NoiseSchedule.from_config(sc)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: scheduler/{path.name} ({sc.get('_class_name')}): {exc}") from None
    return sc, f"scheduler/{path.name} of the model folder ({sc.get('_class_name', 'unnamed')})"


def _source_hash(root: Path, rels: list[str]) -> str:
    lines = "".join(f"{r} {sha256_file(root / r)}\n" for r in rels)
    return hashlib.sha256(lines.encode()).hexdigest()


def _check_batches_sd(batch_list: list[int], cfg_doubles: bool) -> tuple[list[int], list[int]]:
    """(UNet / text encoder batches to check, decoder batches to check)."""
    bmin, bmax = batch_list[0], batch_list[-1]
    dec = sorted({bmin, bmax})
    unet = sorted({bmin, bmax} | ({2 * bmax} if cfg_doubles else set()))
    return unet, dec


# =================================================================================== TensorRT
def trt_batch_range(name: str, batch_list: list[int], cfg_doubles: bool) -> tuple[int, int, int]:
    """(min, opt, max) of the optimisation profile over the batch axis of component ``name``'s plan.

    The image batch range is ``batch_list``'s min..max. With classifier-free guidance (``cfg_doubles``: a
    text-to-image UNet without an LCM guidance embedding) the UNet runs one batch-2 call per image at the
    default guidance (two batch-1 calls, or one branch, otherwise): min..2 x max, tuned at 2 x min; the text
    encoder is called per text but was checked up to 2 x max too, so its plan spans the same range, tuned at
    min. Decoders and one-branch UNets: min..max, tuned at min (as the pixel denoiser's plan)."""
    bmin, bmax = batch_list[0], batch_list[-1]
    if cfg_doubles and name == "unet":
        return bmin, 2 * bmin, 2 * bmax
    if cfg_doubles and name == "text_encoder":
        return bmin, bmin, 2 * bmax
    return bmin, bmin, bmax


def build_component_plans(records: dict, tmp: Path, old_out: Path, batch_list: list[int], cfg_doubles: bool) -> None:
    """One TensorRT plan per exported component, ``tmp/<name>/model.plan``, with the pixel denoiser's builder
    (:func:`abcd_edge.export.tensorrt.build_trt_plan`: fp16 by the builder flag where TensorRT has one); each
    record gains ``trt`` (plan file inside the component folder, sha256, TensorRT version, GPU, compute
    capability, precision, batch range). Every input's non-batch shape is fixed from the record. One timing
    cache is threaded through the builds (``old_out``'s, when a previous export left one, is read first)."""
    from abcd_edge.export.tensorrt import build_trt_plan

    cache_in = old_out / TIMING_CACHE_FILE if (old_out / TIMING_CACHE_FILE).is_file() else None
    for name, rec in records.items():
        shapes = {}
        for spec in rec["inputs"]:
            shape = list(spec["shape"])
            if not shape or shape[0] != "batch" or not all(isinstance(d, int) for d in shape[1:]):
                raise ExportError(f"{name}: input {spec['name']} has shape {shape}; a TensorRT plan needs the batch "
                                  "axis first and every other axis fixed")
            shapes[spec["name"]] = tuple(shape[1:])
        bmin, bopt, bmax = trt_batch_range(name, batch_list, cfg_doubles)
        folder = tmp / name
        try:
            plan = build_trt_plan(folder / ONNX_FILE, folder / PLAN_FILE, shapes=shapes, batch_min=bmin,
                                  batch_opt=bopt, batch_max=bmax, fp16=True, fp16_onnx=None,
                                  timing_cache_in=cache_in, timing_cache_out=tmp / TIMING_CACHE_FILE)
        except ExportError as exc:
            raise ExportError(f"TensorRT plan of the {name}: {exc}") from None
        cache_in = tmp / TIMING_CACHE_FILE
        plan["plan_sha256"] = sha256_file(folder / PLAN_FILE)
        plan["parity"] = TRT_PARITY_NOTE
        rec["trt"] = plan


# ===================================================================================== export
def export_latent_pipeline(kind: str, root: Path, source: str, out: Path, batch_list: list[int], *, opset: int,
                           bar, name: str | None, threads: int | None, resolution: int | None = None,
                           parity_tol: float = PIPELINE_PARITY_TOL, external_bytes: int = EXTERNAL_DATA_BYTES,
                           fp16: bool = False, trt: bool = False) -> Manifest:
    """Export the pipeline folder ``root`` (``kind`` from :func:`latent_pipeline_kind`) to ``out`` atomically."""
    import torch

    from abcd_edge.export.model import alphas_cumprod
    from abcd_edge.export.pipeline import _versions
    from abcd_edge.io import atomic_dir

    where = f"--model {source!r}"
    threads = threads or torch.get_num_threads()
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel, UNet2DModel, VQModel

    text = text_encoder = tok_folder = None
    vae_folder = root / ("vae" if kind == "text-to-image" or (root / "vae").is_dir() else "vqvae")
    tiny_folder = tiny_vae_folder(root) if kind == "text-to-image" else None
    # every weights file first (a folder without weights is refused before minutes of loading)
    rels = [f"unet/{f}" for f in _weights(root / "unet")] + [f"{vae_folder.name}/{f}" for f in _weights(vae_folder)]
    if kind == "text-to-image":
        rels += [f"text_encoder/{f}" for f in _weights(root / "text_encoder")]
        rels += [f"tokenizer/{f.name}" for f in sorted((root / "tokenizer").iterdir()) if f.is_file()]
    if tiny_folder is not None:
        rels += [f"{tiny_folder.name}/{f}" for f in _weights(tiny_folder)]
    sc, sched_source = _scheduler(root, where)
    if kind == "text-to-image":
        from transformers import CLIPTextModel

        unet = _load(UNet2DConditionModel, root / "unet", "UNet")
        vae = _load(AutoencoderKL, vae_folder, "VAE")
        text_encoder = _load(CLIPTextModel, root / "text_encoder", "text encoder", attn_implementation="eager")
        tok_folder = root / "tokenizer"
    else:
        unet = _load(UNet2DModel, root / "unet", "UNet")
        vae = _load(AutoencoderKL if class_of(vae_folder) == "AutoencoderKL" else VQModel, vae_folder, "VAE")
        if unet.config.num_class_embeds or unet.class_embedding is not None:
            raise UserError(f"{where}: a class-conditional latent UNet2DModel is not supported yet; {ACCEPTED}")
    ucfg, vcfg = unet.config, vae.config
    latent_c = int(vcfg.latent_channels)
    if int(ucfg.in_channels) != latent_c or int(ucfg.out_channels) != latent_c:
        raise UserError(f"{where}: the UNet steps {ucfg.in_channels}-channel latents but {vae_folder.name}/ has "
                        f"{latent_c} latent channels (a component of another pipeline?)")
    vsf = 2 ** (len(vcfg.block_out_channels) - 1)
    down = 2 ** (len(ucfg.block_out_channels) - 1)
    ss = ucfg.sample_size[0] if isinstance(ucfg.sample_size, (list, tuple)) else ucfg.sample_size
    notes = []
    if resolution is None:
        latent = int(ss)
    else:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1 \
                or resolution % (vsf * down):
            raise UserError(f"--resolution {resolution!r}: for this pipeline the image resolution must be a positive "
                            f"multiple of {vsf * down} (VAE scale factor {vsf} x UNet downsampling {down})")
        latent = resolution // vsf
        if latent != ss:
            notes.append(f"exported at image resolution {resolution} (latent {latent}); the UNet was trained at "
                         f"sample_size {ss} (image {ss * vsf})")
    if latent % down:
        raise UserError(f"{where}: latent size {latent} is not a multiple of the UNet's downsampling {down}")
    scaling = float(vcfg.get("scaling_factor", 0.18215) if hasattr(vcfg, "get") else vcfg.scaling_factor)
    shift = vcfg.get("shift_factor", None) if hasattr(vcfg, "get") else None
    if kind == "ldm" and class_of(vae_folder) == "VQModel":
        scaling, shift = 1.0, None     # LDMPipeline decodes the UNet's latents as they are
        notes.append("VQModel decoder: latents decoded unscaled (as diffusers' LDMPipeline), quantized inside decode")
    if shift is not None:
        shift = float(shift)
    tc = getattr(ucfg, "time_cond_proj_dim", None) if kind == "text-to-image" else None
    lcm_sched = sc.get("_class_name") == "LCMScheduler"
    if tc:
        default_scale, scale_src = LCM_GUIDANCE, "LatentConsistencyModelPipeline's default (w embedding of w - 1)"
    elif lcm_sched:
        default_scale, scale_src = 1.0, "LCMScheduler without time_cond_proj_dim (LCM-LoRA merged): no CFG"
    else:
        default_scale, scale_src = SD_GUIDANCE, "StableDiffusionPipeline's default (Turbo models: use 1, no CFG)"
    unet_batches, dec_batches = _check_batches_sd(batch_list, kind == "text-to-image" and not tc)
    out_name = name or out.resolve().name

    with atomic_dir(out) as tmp, quiet_libraries():
        bar.stage("trace")
        tok_rec = None
        comps: list[Component] = []
        if kind == "text-to-image":
            from abcd_edge.export.tokenizer import CHECK_PROMPTS, export_tokenizer, reference_tokenizer

            tcfg = text_encoder.config
            if int(tcfg.hidden_size) != int(ucfg.cross_attention_dim if not isinstance(
                    ucfg.cross_attention_dim, (list, tuple)) else ucfg.cross_attention_dim[0]):
                raise UserError(f"{where}: text_encoder/ gives {tcfg.hidden_size}-wide states but the UNet's "
                                f"cross_attention_dim is {ucfg.cross_attention_dim} (a component of another pipeline?)")
            tok_rec = export_tokenizer(tok_folder, tmp / "tokenizer", max_positions=int(tcfg.max_position_embeddings),
                                       vocab_size=int(tcfg.vocab_size))
            text = {"hidden_size": int(tcfg.hidden_size), "max_length": int(tok_rec["model_max_length"])}
            reference, _ = reference_tokenizer(tok_folder)
            ids = np.asarray([reference(p, padding="max_length", truncation=True, max_length=text["max_length"])
                              .input_ids for p in CHECK_PROMPTS], np.int64)
            comps.append(text_component(text_encoder, ids, text, unet_batches))
        comps.insert(0, unet_component(unet, latent, text, unet_batches))
        comps.append(decoder_component("vae_decoder", vae, vae_folder.name, latent_c, latent, latent * vsf, scaling,
                                        shift, dec_batches))
        if tiny_folder is not None:
            tiny = _load(AutoencoderTiny, tiny_folder, "tiny VAE")
            tcfg_ = tiny.config
            if int(tcfg_.latent_channels) != latent_c:
                raise UserError(f"{where}: {tiny_folder.name}/ AutoencoderTiny has {tcfg_.latent_channels} latent "
                                f"channels, the UNet {latent_c}")
            comps.append(decoder_component("vae_decoder_tiny", tiny, tiny_folder.name, latent_c, latent,
                                            latent * vsf, float(tcfg_.scaling_factor), None, dec_batches))
        bar.stage("export")
        records = {}
        for comp in comps:
            records[comp.name] = export_and_check(comp, tmp, opset, external_bytes, threads, parity_tol,
                                                  FP16_COMPONENT_BOUND if fp16 else None)
        bar.stage("check")
        if tiny_folder is not None:
            shp = records["vae_decoder_tiny"]["outputs"][0]["shape"]
            feed = comps[-1].feeds(1)[0]
            got = list(torch_run(comps[-1].module, feed, ["latent"]).shape)
            if got[1:] != shp[1:]:
                raise UserError(f"{where}: {tiny_folder.name}/ decodes to {got[1:]}, the VAE to {shp[1:]} (another "
                                "scale factor?)")
        if trt:
            bar.stage("trt")
            build_component_plans(records, tmp, out, batch_list, kind == "text-to-image" and not tc)
        bar.stage("write")
        files = {}
        for rec in records.values():
            for f in (rec["file"], rec["file"] + ".data", *((rec["fp16"]["file"], rec["fp16"]["file"] + ".data")
                                                             if "fp16" in rec else ())):
                if (tmp / f).is_file():
                    files[f] = sha256_file(tmp / f)
            if rec.get("fp16") and not rec["fp16"]["usable"]:
                notes.append(f"{rec['file'].split('/')[0]}: fp16 drift {rec['fp16']['drift_max_rel']:.3g} of the "
                             f"output scale exceeds {FP16_COMPONENT_BOUND:g}: --precision fp16 keeps it in fp32")
        if tok_rec is not None:
            files[tok_rec["file"]] = sha256_file(tmp / tok_rec["file"])
        u = records["unet"]
        pipeline = {
            "kind": "stable-diffusion" if kind == "text-to-image" else "ldm",
            "components": records, "tokenizer": tok_rec, "text": text,
            "latent": {"channels": latent_c, "size": latent, "vae_scale_factor": vsf, "scaling_factor": scaling,
                       "shift_factor": shift},
            "image": {"resolution": latent * vsf, "channels": 3},
            "guidance": {"time_cond_proj_dim": int(tc) if tc else None, "default_scale": default_scale,
                         "default_scale_source": scale_src,
                         "embedding": ("LatentConsistencyModelPipeline.get_guidance_scale_embedding(w - 1, "
                                       "time_cond_proj_dim)") if tc else None},
            "decoders": ["vae_decoder"] + (["vae_decoder_tiny"] if "vae_decoder_tiny" in records else []),
            "source_pipeline": read_json(root / "model_index.json").get("_class_name")
            if (root / "model_index.json").is_file() else None,
        }
        if kind == "ldm":
            model_kind = "unconditional"
        else:
            model_kind = "text-to-image"
        for rec in records.values():
            if "flops_note" in rec:
                notes.append(f"{rec['file'].split('/')[0]}: {rec['flops_note']}")
        import tokenizers
        import transformers

        parity_top = {"timesteps": list(PARITY_TIMESTEPS), "batches": u["parity"]["batches"],
                      "max_abs": max(r["parity"]["max_abs"] for r in records.values()),
                      "max_rel": max(r["parity"]["max_rel"] for r in records.values()), "tol": float(parity_tol),
                      "passed": True, "provider": "CPUExecutionProvider", "seed": 0,
                      "rel_convention": "max|ort - torch| / max|torch|, the worst over all components",
                      "components": {k: r["parity"]["max_rel"] for k, r in records.items()}}
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, name=out_name, source=source, source_hash=_source_hash(root, rels),
            source_weights=rels, model_kind=model_kind, num_class_embeds=None,
            prediction_type=str(sc["prediction_type"]), timestep_convention="ddpm-index", scheduler_config=sc,
            scheduler_source=sched_source, alphas_cumprod=alphas_cumprod(sc), resolution=latent, channels=latent_c,
            out_channels=latent_c, batch_min=batch_list[0], batch_max=batch_list[-1],
            batches_checked=u["parity"]["batches"], inputs=u["inputs"], outputs=u["outputs"], opset=opset,
            external_data=any(r["external_data"] for r in records.values()), files=files, params=u["params"],
            flops_per_step=u["flops"], flops_torch=u["flops_torch"], flops_rel_diff=u["flops_rel_diff"],
            flops_by_op=u["flops_by_op"], parity=parity_top, fp16=None, trt=None,
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            notes=notes + [f"pipeline export: one ONNX per component; transformers {transformers.__version__}, "
                           f"tokenizers {tokenizers.__version__}; batch_min/batch_max are image batches, the UNet and "
                           "text encoder were checked at up to twice batch_max (classifier-free guidance)"
                           if kind == "text-to-image" and not tc else
                           f"pipeline export: one ONNX per component; transformers {transformers.__version__}"],
            pipeline=pipeline, **_versions())
        manifest = Manifest.from_json(manifest.to_json(), where="new manifest")
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        umask = os.umask(0o022)
        os.umask(umask)
        for d in [tmp] + [p for p in tmp.iterdir() if p.is_dir()]:
            os.chmod(d, 0o777 & ~umask)
    bar.finish()
    assert PIPELINE_DENOISER_FILE in manifest.files
    return manifest
