"""Export: a diffusers UNet -> a deployable artifact folder (ONNX [+ fp16] [+ TensorRT plan] + manifest.json).

    model.py        which model: "demo", a local diffusers folder, a hub id -> LoadedModel; weights hash
    onnx_export.py  torch -> ONNX (external data), parity against torch, fp16 with its drift
    flops.py        FLOPs per step counted from the ONNX graph
    tensorrt.py     ONNX -> denoiser.plan (on the target device)
    pipeline.py     export_model: the stages above, written atomically, with the manifest
    sd_pipeline.py  latent pipeline folders (Stable Diffusion / LCM text-to-image, LDM): one ONNX per component
    sd_layout.py    which pipeline folder it is, refusals;  sd_components.py  per-component export and checks
    tokenizer.py    tokenizer/tokenizer.json for the runtime, checked against transformers' CLIPTokenizer
    compare.py      export_bench / format_bench: ORT CPU vs torch eager step latency

Importing this package does not import torch, onnx, onnxruntime or diffusers.
"""
from abcd_edge.export.compare import export_bench, format_bench
from abcd_edge.export.errors import ExportError
from abcd_edge.export.pipeline import export_model

__all__ = ["ExportError", "export_bench", "export_model", "format_bench"]
