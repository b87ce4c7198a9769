"""One pipeline component as an exportable module (UNet step, text encoder, VAE / tiny decoder) and its export:
torch -> ONNX with a dynamic batch axis, parity on ONNX Runtime CPU against torch, FLOPs from the graph.

:func:`export_and_check` writes ``<tmp>/<name>/model.onnx`` (+ ``model.onnx.data`` when the weights exceed the
threshold) and returns the component's manifest record (docs/sd-pipeline-spec.md). torch, onnx and onnxruntime
are imported inside functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abcd_edge.export.errors import ExportError, first_line

FLOPS_TOL = 0.05
PARITY_TIMESTEPS = (999.0, 500.5, 10.0)
ONNX_FILE = "model.onnx"


# ================================================================================= components
@dataclass
class Component:
    name: str                        # unet, text_encoder, vae_decoder, vae_decoder_tiny
    module: object                   # nn.Module with float32 / int64 I/O
    inputs: list[dict]               # [{"name", "dtype", "shape"}] with "batch" for the batch axis
    outputs: list[dict]
    feeds: "callable"                # feeds(batch) -> list of ORT feed dicts (seeded)
    batches: list[int]
    params: int
    weight_bytes: int
    source: str
    extra: dict = field(default_factory=dict)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding in numpy (float32), for parity inputs."""
    w = np.asarray(w, np.float32) * 1000.0
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def _count(module) -> tuple[int, int]:
    ps = list(module.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps)


def unet_component(unet, latent: int, text: dict | None, batches: list[int]) -> Component:
    import torch

    cfg = unet.config
    c = int(cfg.in_channels)
    tc = cfg.get("time_cond_proj_dim") if hasattr(cfg, "get") else getattr(cfg, "time_cond_proj_dim", None)
    tc = int(tc) if text is not None and tc else None
    cond = text is not None

    class UNetStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None):
            if cond:
                return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                 timestep_cond=timestep_cond, return_dict=False)[0]
            return self.unet(sample, timestep, return_dict=False)[0]

    inputs = [{"name": "sample", "dtype": "float32", "shape": ["batch", c, latent, latent]},
              {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]
    if cond:
        inputs.append({"name": "encoder_hidden_states", "dtype": "float32",
                       "shape": ["batch", text["max_length"], text["hidden_size"]]})
    if tc:
        inputs.append({"name": "timestep_cond", "dtype": "float32", "shape": ["batch", tc]})
    outputs = [{"name": "out_sample", "dtype": "float32", "shape": ["batch", int(cfg.out_channels), latent, latent]}]

    def feeds(batch):
        rng = np.random.default_rng(1000 + batch)
        x = rng.standard_normal((batch, c, latent, latent)).astype(np.float32)
        out = []
        for t in PARITY_TIMESTEPS:
            f = {"sample": x, "timestep": np.full(batch, t, np.float32)}
            if cond:
                f["encoder_hidden_states"] = rng.standard_normal(
                    (batch, text["max_length"], text["hidden_size"])).astype(np.float32)
            if tc:
                f["timestep_cond"] = guidance_embedding(np.linspace(0.5, 14.0, batch) - 1.0, tc)
            out.append(f)
        return out

    params, nbytes = _count(unet)
    return Component("unet", UNetStep().eval(), inputs, outputs, feeds, batches, params, nbytes,
                     f"unet/ {type(unet).__name__}", {"time_cond_proj_dim": tc})


def text_component(text_encoder, tokenizer_ids: np.ndarray, text: dict, batches: list[int]) -> Component:
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids, return_dict=False)[0]

    L, D = text["max_length"], text["hidden_size"]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", L]}]
    outputs = [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", L, D]}]

    def feeds(batch):
        rng = np.random.default_rng(2000 + batch)
        rows = rng.integers(0, len(tokenizer_ids), batch)
        return [{"input_ids": tokenizer_ids[rows].astype(np.int64)}]

    params, nbytes = _count(text_encoder)
    return Component("text_encoder", TextEncoder().eval(), inputs, outputs, feeds, batches, params, nbytes,
                     f"text_encoder/ {type(text_encoder).__name__}")


def decoder_component(name: str, vae, folder: str, channels: int, latent: int, image: int, scaling: float,
                       shift: float | None, batches: list[int]) -> Component:
    import torch

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent_in):
            z = latent_in / scaling
            if shift is not None:
                z = z + shift
            return self.vae.decode(z, return_dict=False)[0]

    inputs = [{"name": "latent", "dtype": "float32", "shape": ["batch", channels, latent, latent]}]
    outputs = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, image, image]}]

    def feeds(batch):
        rng = np.random.default_rng(3000 + batch)
        return [{"latent": rng.standard_normal((batch, channels, latent, latent)).astype(np.float32)}]

    # the decoder's weights only: the encoder is not exported
    dec_params = [p for n, p in vae.named_parameters() if not n.startswith(("encoder.", "quant_conv."))]
    params = sum(p.numel() for p in dec_params)
    nbytes = sum(p.numel() * p.element_size() for p in dec_params)
    return Component(name, Decode().eval(), inputs, outputs, feeds, batches, params, nbytes,
                     f"{folder}/ {type(vae).__name__} (decode of latent / {scaling:g}"
                     + (f" + {shift:g}" if shift is not None else "") + ")",
                     {"scaling_factor": scaling, "shift_factor": shift})


# ==================================================================================== ONNX
def torch_run(module, feed: dict, names: list[str]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(*[torch.from_numpy(feed[n]) for n in names]).numpy()


def _compare(outs, refs) -> tuple[float, float]:
    max_abs = max(float(np.max(np.abs(o.astype(np.float64) - r))) for o, r in zip(outs, refs))
    scale = max(float(np.max(np.abs(r))) for r in refs)
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else 1e30)
    return max_abs, min(rel, 1e30)


def export_and_check(comp: Component, tmp: Path, opset: int, external_bytes: int, threads: int,
                      parity_tol: float, fp16_bound: float | None = None) -> dict:
    """Export ``comp`` to ``tmp/<name>/model.onnx``, check parity and count FLOPs; its manifest record (with
    ``fp16``: the fp16 copy's drift, when ``fp16_bound`` is given, see :func:`export_fp16_component`)."""
    import torch

    from abcd_edge.export.flops import count_flops
    from abcd_edge.export.onnx_export import export_onnx, ort_session, torch_flops

    folder = tmp / comp.name
    folder.mkdir()
    path = folder / ONNX_FILE
    names = [i["name"] for i in comp.inputs]
    trace_feed = comp.feeds(max(2, comp.batches[-1]) if len(comp.batches) > 1 else 2)[0]
    args = tuple(torch.from_numpy(trace_feed[n]) for n in names)
    try:
        with torch.no_grad():
            comp.module(*args)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the {comp.name} does not run in torch at the exported shapes: {first_line(exc)}") from None
    external = comp.weight_bytes > external_bytes
    exporter = export_onnx(comp.module, args, path, [i["name"] for i in comp.inputs], opset, external,
                           output_names=[o["name"] for o in comp.outputs])
    session = ort_session(path, threads)
    outs, refs, worst = [], [], (0.0, None)
    for b in comp.batches:
        for feed in comp.feeds(b):
            try:
                o = session.run(None, feed)[0]
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"ONNX Runtime cannot run the exported {comp.name}: {first_line(exc)}") from None
            r = torch_run(comp.module, feed, names)
            if o.shape != r.shape:
                raise ExportError(f"{comp.name}: ONNX output shape {list(o.shape)} != torch {list(r.shape)} at batch {b}")
            outs.append(o)
            refs.append(r)
            err = float(np.max(np.abs(o.astype(np.float64) - r)))
            if err >= worst[0]:
                worst = (err, b)
    max_abs, max_rel = _compare(outs, refs)
    if not max_rel <= parity_tol:
        raise ExportError(f"parity failed for {comp.name}: ONNX Runtime vs torch max abs error {max_abs:.3g} = "
                          f"{max_rel:.3g} of the output scale > {parity_tol:g} (batch {worst[1]}); nothing written")
    counted = count_flops(path, batch=1)
    one = comp.feeds(1)[0]
    flops_t = torch_flops(comp.module, tuple(torch.from_numpy(one[n]) for n in names))
    rel = abs(counted["total"] - flops_t) / flops_t if flops_t else float("inf")
    files = [f"{comp.name}/{ONNX_FILE}"] + ([f"{comp.name}/{ONNX_FILE}.data"] if external else [])
    rec = {"file": files[0], "inputs": comp.inputs, "outputs": comp.outputs, "params": int(comp.params),
           "flops": int(counted["total"]), "flops_torch": int(flops_t),
           "flops_rel_diff": float(rel) if np.isfinite(rel) else 1e30, "flops_by_op": counted["by_op"],
           "parity": {"max_abs": max_abs, "max_rel": max_rel, "tol": float(parity_tol), "passed": True,
                      "batches": list(comp.batches), "provider": "CPUExecutionProvider",
                      "rel_convention": "max|ort - torch| / max|torch|"},
           "external_data": bool(external), "source": comp.source, "exporter": exporter}
    if rel > FLOPS_TOL:
        rec["flops_note"] = (f"FLOPs from the ONNX graph ({counted['total']:.4g}) and torch.utils.flop_counter "
                             f"({flops_t:.4g}) differ by {rel:.1%} (> {FLOPS_TOL:.0%})")
    if fp16_bound is not None:
        rec["fp16"] = export_fp16_component(comp, folder, args, opset, external, threads, outs, fp16_bound)
    return rec


FP16_FILE = "model.fp16.onnx"


def export_fp16_component(comp: Component, folder: Path, args, opset: int, external: bool, threads: int,
                          fp32_outs: list[np.ndarray], bound: float) -> dict:
    """``<component>/model.fp16.onnx``: the component's weights and activations in fp16 (torch half export),
    float32 in and out (casts inside; the UNet's timestep stays float32: diffusers casts its sinusoid), and its
    drift from the fp32 ONNX on the parity inputs (max abs, and relative to the fp32 output scale). ``usable``
    is False over ``bound`` (relative) or where fp16 overflows (non-finite outputs)."""
    import copy

    import torch

    from abcd_edge.export.onnx_export import export_onnx, ort_session

    inner = copy.deepcopy(comp.module).half()
    names = [i["name"] for i in comp.inputs]

    class HalfIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            xs = [x.half() if x.is_floating_point() and n != "timestep" else x for n, x in zip(names, xs)]
            return self.inner(*xs).float()

    path = folder / FP16_FILE
    try:
        exporter = export_onnx(HalfIO().eval(), args, path, names, opset, external,
                               output_names=[o["name"] for o in comp.outputs])
        session = ort_session(path, threads)
        outs = [session.run(None, feed)[0] for b in comp.batches for feed in comp.feeds(b)]
    except Exception as exc:  # noqa: BLE001  (torch, onnx or ORT: the component has no fp16 form here)
        raise ExportError(f"fp16 export of the {comp.name} failed ({first_line(exc)}); export without --fp16") from None
    finite = all(np.isfinite(o).all() for o in outs)
    max_abs, max_rel = _compare(outs, fp32_outs) if finite else (1e30, 1e30)
    return {"file": f"{comp.name}/{FP16_FILE}", "method": f"torch half export ({exporter}), weights and activations "
            "fp16, float32 I/O", "drift_vs": "fp32 ONNX on ORT CPU, parity inputs", "drift_max_abs": max_abs,
            "drift_max_rel": max_rel, "bound_rel": float(bound), "usable": bool(finite and max_rel <= bound)}


