"""Stage 5, write: controller.safetensors + controller.json (with the gate) + controller.onnx + report.json +
gate.md + ays.json + curves.png, all into the output folder at once (``io.atomic_dir``: an interrupted run leaves the
previous controller as it was). Without a new AYS-like table, the folder's previous ays.json is carried over
when it was made for the same artifact. Also the controller ONNX export, which ``abcd-edge export
--controller`` reuses."""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.formats.controller import SCHEMA_VERSION, Controller, ControllerMeta, Gate
from abcd_edge.io import atomic_dir, atomic_path, write_json_atomic


def previous_ays(out: Path, manifest_hash: str) -> dict | None:
    """The AYS-like table already in ``out``/ays.json when it was made for this artifact."""
    try:
        raw = json.loads((Path(out) / "ays.json").read_text())
    except (OSError, ValueError):
        return None
    return raw.get("schedules") if isinstance(raw, dict) and raw.get("manifest_hash") == manifest_hash else None


def write(state: CalibrationState, report: dict, gate: Gate, ays: dict | None) -> None:
    """Write the controller folder; ``report`` (complete but for the ONNX parity, added here) is written once."""
    from safetensors.numpy import save_file

    ays = ays if ays is not None else previous_ays(state.out, state.manifest_hash)
    meta = ControllerMeta(schema_version=SCHEMA_VERSION, spec=asdict(state.spec),
                          manifest_hash=state.manifest_hash, artifact=state.manifest.name,
                          samplers=list(state.cfg.samplers), profiles=state.profile_paths,
                          cost_backends=sorted({p.backend for p in state.profiles}),
                          n_parameters=state.spec.n_parameters(),
                          created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          gate=gate.to_json(), conditions=state.conditions)
    with atomic_dir(state.out) as tmp:
        save_file(state.model.numpy_weights(), str(tmp / "controller.safetensors"))
        (tmp / "controller.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
        _, err = export_controller_onnx_model(state.model, tmp)
        report["onnx_parity_max_abs"] = err
        write_json_atomic(tmp / "report.json", report)
        if ays is not None:
            write_json_atomic(tmp / "ays.json", {"note": "AYS-like static schedules per (sampler, n), optimised "
                                                 "against the 200-step teacher, no budget conditioning",
                                                 "manifest_hash": state.manifest_hash, "schedules": ays})
        (tmp / "gate.md").write_text(gate_markdown(report))
        plot_curves(state, report, tmp / "curves.png")


def export_controller_onnx_model(model, folder: Path) -> tuple[Path, float]:
    """controller.onnx from the torch module; parity vs the numpy twin on random inputs (<= 1e-5)."""
    import onnxruntime as ort
    import torch

    from abcd_edge.formats.controller import COST_DIM, WG_DIM, softplus

    path = Path(folder) / "controller.onnx"
    g = torch.Generator().manual_seed(0)
    cnz = torch.randn(4, WG_DIM, generator=g)
    f = torch.randn(4, COST_DIM, generator=g)
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (cnz, f), str(tmp), input_names=["cnz", "f"],
                          output_names=["density", "log_cost"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "n"} for n in ("cnz", "f", "density", "log_cost")})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {"cnz": cnz.numpy(), "f": f.numpy()})
    twin = Controller(model.spec, model.numpy_weights())
    numpy_out = [softplus(twin.wg(cnz.numpy())) + 1e-4, twin.cost(f.numpy())]
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


def plot_curves(state: CalibrationState, report: dict, path: Path) -> None:
    """Left: per sampler, the searched schedules (dots) and the generator's (lines) as log-sigma against
    step position. Right: the gate's held-out feature-FID vs n, generator and best static."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abcd_edge.calibrate.gate import schedules_for

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, sampler in zip(colours, state.cfg.samplers):
        steps = state.cfg.steps_for(sampler)
        for n in steps[::3]:
            u = np.arange(n) / n
            axes[0].plot(u, np.log(report["search"][sampler][str(n)]["sigmas"]), "o", color=c, ms=3)
            axes[0].plot(u, np.log(schedules_for(state, sampler, n)["learned"]), "-", color=c, lw=1,
                         label=f"{sampler}" if n == steps[0] else None)
        rows = report["gate"][sampler]
        ns = [int(n) for n in rows]
        axes[1].plot(ns, [rows[str(n)]["learned"]["fid"] for n in ns], "-o", color=c, ms=3,
                     label=f"{sampler} generator")
        axes[1].plot(ns, [rows[str(n)][rows[str(n)]["best_static"]]["fid"] for n in ns], "--", color=c,
                     label=f"{sampler} best static")
    axes[0].set(xlabel="step position k / n", ylabel="log sigma",
                title="searched (dots) and generated (lines) schedules")
    axes[0].legend(fontsize=7)
    axes[1].set(xscale="log", yscale="log", xlabel="steps n", ylabel="feature-FID (evaluation net, held-out)",
                title="the gate")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gate_markdown(report: dict) -> str:
    """gate.md: the gate table (held-out noises, evaluation network) and the exit rule's behaviour."""
    from abcd_edge.core.placement import DIFFUSERS_PLACEMENT, STATIC_PLACEMENTS

    titles = {"uniform": "time-uniform", "karras": "Karras", "logsnr": "log-SNR",
              DIFFUSERS_PLACEMENT: "the model's own (diffusers)"}
    rows = [(sampler, n, row) for sampler, table in report["gate"].items() for n, row in table.items()]
    kinds = [k for k in (*STATIC_PLACEMENTS, DIFFUSERS_PLACEMENT) if rows and k in rows[0][2]]
    lines = ["# The gate: feature-FID on held-out noises, evaluation network", "",
             f"{report['config']['gate_noises']} held-out noises (fixed seed), evaluation net sha256 "
             f"{report['feature_nets']['evaluation'][:12]}; the search optimised net "
             f"{report['feature_nets']['calibration'][:12]} on {report['config']['search_noises']} training noises "
             f"(seed {report['config']['seed']}). CI: 95 % paired bootstrap of FID(generator) - FID(best static).",
             "", "| sampler | n | generator | searched | " + " | ".join(titles[k] for k in kinds)
             + " | generator / best static | CI of the difference | used |", "|---" * (7 + len(kinds)) + "|"]
    for sampler, n, row in rows:
        statics = " | ".join(f"{row[k]['fid']:.2f}" for k in kinds)
        ci = row["fid_minus_best_static_ci95"]
        lines.append(f"| {sampler} | {n} | {row['learned']['fid']:.2f} | {row['searched']['fid']:.2f} | {statics} "
                     f"| {row['ratio_to_best_static']:.2f}x | [{ci[0]:.2f}, {ci[1]:.2f}] | {row['decision']} |")
    lines += ["", "## The exit rule (first sampler, held-out noises)", "",
              "| plan that fits | rho | steps | steps / full | feature-FID | FID / full |", "|---|---|---|---|---|---|"]
    for key, row in report["exit_behaviour"].items():
        fit, rho = key.split("/")
        lines.append(f"| {fit.split('=')[1]} | {rho.split('=')[1]} | {row['steps']} | {row['steps_ratio']:.2f} "
                     f"| {row['fid']:.2f} | {row['fid_ratio']:.2f} |")
    return "\n".join(lines) + "\n"
