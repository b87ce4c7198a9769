"""Calibration: train the ABCD controller for an artifact and its device profiles.

Stages (each checkpointed, so an interrupted run resumes), one module each over a
:class:`~abcd_edge.calibrate.state.CalibrationState`:

1. ``search``  — per sampler and step count, the schedule whose images from *training* noises have
                 the smallest feature-FID in the calibration feature network (coordinate search);
2. ``weights`` — the weight generator, fitted to place those schedules in any context;
3. ``gate``    — the generator against every static schedule on *held-out* noises, judged by the
                 *evaluation* network; where it does not win beyond its CI the controller carries the
                 best static placement; plus what rho's exit rule does there;
4. ``cost``    — the cost predictor on the profiles' raw step samples, pinball loss at q = 0.99;
   ``teacher`` + ``ays`` — the AYS-like static baseline per (sampler, n), only with ``cfg.ays``;
5. ``persist`` — controller.safetensors + controller.json + controller.onnx + report.json + curves.png.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from abcd_edge.calibrate import ays, cost, gate, persist, search, teacher, weights
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
    searched = search.search_schedules(state)
    weights.fit_generator(state, searched)
    the_gate, gate_table = gate.run_gate(state, searched)
    cost.train_cost(state)
    ays_table = None
    if state.cfg.ays:
        state.data = teacher.teacher(state)
        ays_table = ays.train_ays(state)
    report = {
        "command": command, "artifact": str(state.artifact), "manifest_hash": state.manifest_hash,
        "profiles": state.profile_paths, "config": asdict(state.cfg),
        "parameters": state.spec.n_parameters(),
        "final_losses": {k: float(np.mean(v[-20:])) for k, v in state.curves.items()},
        "feature_nets": {"calibration": state.calibration_net.sha256, "evaluation": state.evaluation_net.sha256},
        "search": searched,
        "gate": gate_table,
        "exit_behaviour": gate.exit_behaviour(state, the_gate, gate_table),
        "cost_predictor": cost.cost_error(state),
    }
    report["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
    persist.write(state, report, the_gate, ays_table)
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
