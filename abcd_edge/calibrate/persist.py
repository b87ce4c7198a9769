"""Stage 6, write: controller.safetensors + controller.json + controller.onnx + report.json + ays.json +
curves.png, all into the output folder at once (``io.atomic_dir``: an interrupted run leaves the previous
controller as it was). Also the controller ONNX export, which ``abcd-edge export --controller`` reuses."""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.formats.controller import SCHEMA_VERSION, Controller, ControllerMeta
from abcd_edge.io import atomic_dir, atomic_path, write_json_atomic


def write(state: CalibrationState, report: dict, ays: dict) -> None:
    """Write the controller folder; ``report`` (complete but for the ONNX parity, added here) is written once."""
    from safetensors.numpy import save_file

    meta = ControllerMeta(schema_version=SCHEMA_VERSION, spec=asdict(state.spec),
                          manifest_hash=state.manifest_hash, artifact=state.manifest.name,
                          samplers=list(state.cfg.samplers), profiles=state.profile_paths,
                          cost_backends=sorted({p.backend for p in state.profiles}),
                          n_parameters=state.spec.n_parameters(),
                          created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    with atomic_dir(state.out) as tmp:
        save_file(state.model.numpy_weights(), str(tmp / "controller.safetensors"))
        (tmp / "controller.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
        _, err = export_controller_onnx_model(state.model, tmp)
        report["onnx_parity_max_abs"] = err
        write_json_atomic(tmp / "report.json", report)
        write_json_atomic(tmp / "ays.json", {"note": "AYS-like static schedules per (sampler, n), optimised "
                                             "against the 200-step teacher, no budget conditioning",
                                             "manifest_hash": state.manifest_hash, "schedules": ays})
        plot_curves(state, tmp / "curves.png")


def export_controller_onnx_model(model, folder: Path) -> tuple[Path, float]:
    """controller.onnx from the torch module; parity vs the numpy twin on random inputs (<= 1e-5)."""
    import onnxruntime as ort
    import torch

    from abcd_edge.formats.controller import CONTEXT_DIM, COST_DIM, DESCRIPTOR_DIM, POLICY_DIM

    path = Path(folder) / "controller.onnx"
    g = torch.Generator().manual_seed(0)
    cz = torch.randn(4, CONTEXT_DIM + DESCRIPTOR_DIM, generator=g)
    h = torch.randn(4, POLICY_DIM, generator=g)
    f = torch.randn(4, COST_DIM, generator=g)
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (cz, h, f), str(tmp), input_names=["cz", "h", "f"],
                          output_names=["density", "stop_logit", "log_cost"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "n"} for n in ("cz", "h", "f", "density", "stop_logit", "log_cost")})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {"cz": cz.numpy(), "h": h.numpy(), "f": f.numpy()})
    twin = Controller(model.spec, model.numpy_weights())
    numpy_out = [np.concatenate([twin.density(r[:CONTEXT_DIM], r[CONTEXT_DIM:])[None] for r in cz.numpy()]),
                 twin.policy(h.numpy()), twin.cost(f.numpy())]
    err = max(float(np.abs(a - b).max()) for a, b in zip(onnx_out, numpy_out))
    if err > 1e-5:
        raise RuntimeError(f"controller ONNX vs numpy twin differ by {err:.2e} (> 1e-5)")
    return path, err


def export_controller_onnx(calibration_dir: Path, out: Path) -> tuple[Path, float]:
    """`abcd-edge export --controller DIR --out OUT`: load the numpy weights into the torch module and export."""
    import torch

    from abcd_edge.calibrate.torch_model import torch_controller

    ctl = Controller.load(calibration_dir)
    model = torch_controller(ctl.spec)
    model.load_numpy_weights(ctl.weights)
    with torch.no_grad():
        return export_controller_onnx_model(model, out)


def plot_curves(state: CalibrationState, path: Path) -> None:
    """Learned densities for three budgets (per sampler) and the training losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    ctl = state.numpy_controller()
    prof = state.profiles[0]
    spec = state.spec
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.linspace(spec.log_sigma_min, spec.log_sigma_max, spec.k_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for sampler in state.cfg.samplers:
        for budget, style in ((50.0, ":"), (150.0, "--"), (1000.0, "-")):
            d = ctl.density(state.context(budget, prof, 1.0), SAMPLER_DESCRIPTORS[sampler])
            axes[0].plot(centres, d / d.sum(), style, label=f"{sampler} {budget:g} ms")
    anchor = state.anchor()
    axes[0].plot(centres, anchor / anchor.sum(), "k", lw=2, alpha=0.4, label="anchor (uniform-t)")
    axes[0].set(xlabel="log sigma", ylabel="importance density", title=f"learned densities ({prof.name})")
    axes[0].legend(fontsize=6)
    for k, v in state.curves.items():
        axes[1].plot(np.convolve(v, np.ones(10) / 10, mode="valid"), label=k)
    axes[1].set(xlabel="iteration", ylabel="loss (10-iter mean)", title="training losses")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
