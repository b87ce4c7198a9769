"""Calibration: train the ABCD controller for an artifact and its device profiles.

Stages (each checkpointed, so an interrupted run resumes), one module each over a
:class:`~abcd_edge.calibrate.state.CalibrationState`:

1. ``teacher``  — for fixed training/validation noises, each sampler's own 200-step result (ONNX Runtime);
2. ``weights``  — the weight generator, LD3/AYS-style: the n-step result of the frozen denoiser
                  (torch) is compared with the teacher and the loss is backpropagated through the
                  sampler into the sigmas and so into the density; plus l1 * KL(w || anchor);
3. ``traces``   — x0 at every step for many contexts (ONNX Runtime), with the learned schedules;
4. ``policy``   — the exit policy on the traces with the joint loss (see ``policy.policy_loss``);
5. ``cost``     — the cost predictor on the profiles' raw step samples, pinball loss at q = 0.99;
   ``ays``      — the AYS-like static baseline per (sampler, n);
   ``evaluate`` — learned vs static schedules, exit behaviour, cost predictor error;
6. ``persist``  — controller.safetensors + controller.json + controller.onnx + report.json + curves.png.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from abcd_edge.calibrate import ays, cost, evaluate, persist, policy, teacher, traces, weights
from abcd_edge.calibrate.state import CalibrationConfig, CalibrationState
from abcd_edge.errors import UserError


def _check_out(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {str(out)!r} cannot be created ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {str(out)!r}: {str(out.parent)!r} is not writable")


def run_stages(state: CalibrationState, command: str = "") -> dict:
    """Every stage in order (the order of ``state.rng``'s draws), then the controller folder; the report."""
    t0 = time.monotonic()
    state.data = teacher.teacher(state)
    weights.train_weights(state)
    trace_list = traces.traces(state)
    policy.train_policy(state, trace_list)
    cost.train_cost(state)
    ays_table = ays.train_ays(state)
    report = {
        "command": command, "artifact": str(state.artifact), "manifest_hash": state.manifest_hash,
        "profiles": state.profile_paths, "config": asdict(state.cfg),
        "parameters": state.spec.n_parameters(),
        "final_losses": {k: float(np.mean(v[-20:])) for k, v in state.curves.items()},
        "wg_curve": [round(v, 5) for v in state.curves.get("wg_loss", [])],
        "validation_teacher_mse": evaluate.validate_schedules(state, ays_table),
        "exit_behaviour": evaluate.exit_behaviour(state),
        "cost_predictor": evaluate.cost_error(state),
    }
    report["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
    persist.write(state, report, ays_table)
    shutil.rmtree(state.ckpt, ignore_errors=True)
    return report


def calibrate(artifact: Path, profiles: list[Path], out: Path, config: CalibrationConfig | None = None,
              progress: bool = True, command: str = "", unet=None) -> dict:
    """Calibrate the controller for ``artifact`` on ``profiles`` into ``out``; returns report.json's content.

    ``unet``: the frozen torch UNet, when the caller has it (default: loaded from the manifest's source)."""
    out = Path(out)
    _check_out(out)
    state = CalibrationState.open(artifact, profiles, out, config or CalibrationConfig(), progress=progress,
                                  unet=unet)
    return run_stages(state, command)
