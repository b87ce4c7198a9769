"""The ABCD controller: weight generator, cost predictor and the validated gate.

Two small MLPs (about 19k parameters together) and one table:

* weight generator  (c, log n, z) -> softplus importance density over K bins of log-sigma;
  the n planned steps are placed by inverse CDF (``core.placement.sigmas_from_density``).
  It is fitted to schedules searched against a feature-statistics objective
  (``calibrate.search``), so it places steps where the quality metric rewards them;
* cost predictor    f -> log of the tail (p99) latency of the next step and of finishing,
  f = profile statistics of this backend/batch + the running correction;
* the gate (:class:`Gate`): per sampler and validated step count, which placement the
  runtime uses — the generator's where it beat every static schedule beyond its CI on
  held-out noises in the evaluation network, else the best static one — and that
  placement's validated feature-FID, which the exit rule reads (``Gate.exit_steps``).

The runtime uses the numpy twin (:class:`Controller`, no torch); calibration
trains the torch twin (``abcd_edge.calibrate.torch_model.torch_controller``) and saves both weights
(safetensors) and ``controller.onnx``. The two agree to 1e-5.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abcd_edge.errors import UserError

SCHEMA_VERSION = 2
CONTEXT_DIM = 3          # [log B, log F, rho]
DESCRIPTOR_DIM = 6       # samplers.SAMPLER_DESCRIPTORS
WG_DIM = CONTEXT_DIM + 1 + DESCRIPTOR_DIM   # c, log n, z
BACKEND_NAMES = ("ort-cpu", "ort-cuda", "ort-trt", "trt")
COST_DIM = 5 + len(BACKEND_NAMES) + 1
EPS = 1e-12

# Fixed input standardisation (shift, scale) per MLP, shared by both twins: the raw features
# (log ms, log FLOP/s, log sigma, ...) live on very different scales.
_CONTEXT_NORM = ([5.0, 23.0, 0.5], [1.5, 3.0, 0.3])
INPUT_NORM = {
    "wg": (_CONTEXT_NORM[0] + [2.0] + [0.0] * DESCRIPTOR_DIM, _CONTEXT_NORM[1] + [1.0] + [1.0] * DESCRIPTOR_DIM),
    "cost": ([1.5, 1.5, -1.0, -1.0, 0.5] + [0.0] * len(BACKEND_NAMES) + [0.0],
             [1.5, 1.5, 2.0, 2.0, 1.0] + [1.0] * len(BACKEND_NAMES) + [0.5]),
}


@dataclass
class ControllerSpec:
    k_bins: int = 64
    hidden: int = 64
    log_sigma_min: float = -4.0
    log_sigma_max: float = 4.5
    quantile: float = 0.99     # the tail the cost predictor is trained for

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (in, out) for the two MLPs (two hidden layers each)."""
        h = self.hidden
        out = {}
        for part, (din, dout) in {"wg": (WG_DIM, self.k_bins), "cost": (COST_DIM, 2)}.items():
            out[f"{part}.0"] = (din, h)
            out[f"{part}.1"] = (h, h)
            out[f"{part}.2"] = (h, dout)
        return out

    def n_parameters(self) -> int:
        return sum(i * o + o for i, o in self.shapes().values())


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def wg_features(context, n: int, descriptor) -> np.ndarray:
    """The weight generator's input [c, log n, z] as a float32 row [1, WG_DIM]."""
    return np.asarray([[*context, math.log(max(n, 1)), *descriptor]], np.float32)


def cost_features(step_p50_ms: float, step_p99_ms: float, finish_p50_ms: float, finish_p99_ms: float,
                  batch: int, backend: str, correction: float) -> np.ndarray:
    """Input of the cost predictor as a float32 row [1, COST_DIM]."""
    onehot = [1.0 if backend == b else 0.0 for b in BACKEND_NAMES]
    f = [math.log(step_p50_ms), math.log(step_p99_ms), math.log(finish_p50_ms + 1e-3),
         math.log(finish_p99_ms + 1e-3), math.log(batch), *onehot, math.log(correction)]
    return np.asarray([f], np.float32)


class MLP:
    """x -> (x - shift) / scale -> silu(. W0 + b0) -> silu(. W1 + b1) -> . W2 + b2 (numpy, float32)."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], norm: tuple[list, list]):
        self.layers = [(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)) for w, b in layers]
        self.shift = np.asarray(norm[0], np.float32)
        self.inv_scale = np.float32(1.0) / np.asarray(norm[1], np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = (x - self.shift) * self.inv_scale
        for k, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if k < len(self.layers) - 1:
                x = silu(x)
        return x


EXIT_KAPPA = 0.3   # rho < 1 accepts a feature-FID up to (1 + EXIT_KAPPA (1 - rho)) x the full plan's


@dataclass
class Gate:
    """What calibration validated, per sampler and step count: the placement to use and its feature-FID.

    ``placements[sampler][k]`` is "learned" (the weight generator) or a static kind for ``steps[sampler][k]``;
    ``fid[sampler][k]`` its feature-FID on held-out noises in the evaluation network. A step count
    between validated ones takes the decision of the nearest (in log n; the lower on a tie), one above
    the largest that of the largest.
    """

    steps: dict[str, list[int]]
    placements: dict[str, list[str]]
    fid: dict[str, list[float]]
    exit_kappa: float = EXIT_KAPPA

    def to_json(self) -> dict:
        return {"steps": self.steps, "placements": self.placements, "fid": self.fid, "exit_kappa": self.exit_kappa}

    @classmethod
    def from_json(cls, raw: dict) -> "Gate":
        return cls(steps={k: [int(n) for n in v] for k, v in raw["steps"].items()},
                   placements={k: list(v) for k, v in raw["placements"].items()},
                   fid={k: [float(x) for x in v] for k, v in raw["fid"].items()},
                   exit_kappa=float(raw.get("exit_kappa", EXIT_KAPPA)))

    def placement(self, sampler: str, n: int) -> str | None:
        """The validated placement for n steps of ``sampler`` (None: the sampler was not calibrated)."""
        if sampler not in self.placements:
            return None
        logs = np.log(np.asarray(self.steps[sampler], np.float64))
        nearest = int(np.argmin(np.abs(logs - math.log(max(n, 1))) + 1e-9 * np.arange(len(logs))))
        return self.placements[sampler][nearest]

    def expected_fid(self, sampler: str, n: int) -> float:
        """The validated feature-FID at n steps, log-log interpolated; flat beyond the validated range."""
        logs = np.log(np.asarray(self.steps[sampler], np.float64))
        return float(np.exp(np.interp(math.log(max(n, 1)), logs, np.log(self.fid[sampler]))))

    def exit_steps(self, sampler: str, n_fit: int, rho: float) -> int:
        """The fewest steps whose expected quality is what rho asks: rho = 1 takes all ``n_fit``; below,
        the smallest n <= n_fit whose validated FID is within (1 + kappa (1 - rho)) of n_fit's. Never fewer
        than the smallest validated step count (nothing below it was measured)."""
        if rho >= 1.0 or sampler not in self.fid or n_fit <= self.steps[sampler][0]:
            return n_fit
        allowed = self.expected_fid(sampler, n_fit) * (1 + self.exit_kappa * (1 - rho))
        for n in range(self.steps[sampler][0], n_fit):
            if self.expected_fid(sampler, n) <= allowed:
                return n
        return n_fit


@dataclass
class ControllerMeta:
    schema_version: int
    spec: dict
    manifest_hash: str
    artifact: str
    samplers: list[str]
    profiles: list[str]
    n_parameters: int
    created_utc: str
    notes: dict = field(default_factory=dict)
    # backends of the profiles the cost predictor was trained on: elsewhere its inputs
    # (a one-hot it never saw set) are out of range and the runtime uses the profile's tails
    cost_backends: list[str] = field(default_factory=list)
    gate: dict = field(default_factory=dict)   # Gate.to_json(); empty: no validated placements
    # a pipeline's: what the placements were calibrated and validated under ({"guidance", "decoder",
    # "prompts"}); the runtime uses them for requests with that guidance only
    conditions: dict = field(default_factory=dict)


class Controller:
    """The numpy runtime twin of the trained controller."""

    def __init__(self, spec: ControllerSpec, weights: dict[str, np.ndarray], meta: ControllerMeta | None = None):
        self.spec = spec
        self.meta = meta
        self.weights = weights
        parts = {}
        for part in ("wg", "cost"):
            parts[part] = MLP([(weights[f"{part}.{k}.weight"].T, weights[f"{part}.{k}.bias"]) for k in range(3)],
                              INPUT_NORM[part])
        self.wg, self.cost = parts["wg"], parts["cost"]
        self.gate = Gate.from_json(meta.gate) if meta is not None and meta.gate else None

    @classmethod
    def random_init(cls, spec: ControllerSpec | None = None, seed: int = 0) -> "Controller":
        spec = spec or ControllerSpec()
        rng = np.random.default_rng(seed)
        weights = {}
        for name, (din, dout) in spec.shapes().items():
            weights[f"{name}.weight"] = (rng.standard_normal((dout, din)) / math.sqrt(din)).astype(np.float32)
            weights[f"{name}.bias"] = np.zeros(dout, np.float32)
        return cls(spec, weights)

    def density(self, context, descriptor, n: int) -> np.ndarray:
        """The importance density over the K log-sigma bins for n steps in this context."""
        return softplus(self.wg(wg_features(context, n, descriptor))[0]) + 1e-4

    def plan_sigmas(self, context, descriptor, n: int, sigma_max: float | None = None) -> np.ndarray:
        from abcd_edge.core.placement import sigmas_from_density

        hi = self.spec.log_sigma_max if sigma_max is None else min(self.spec.log_sigma_max, math.log(sigma_max))
        return np.asarray(sigmas_from_density(self.density(context, descriptor, n), n, self.spec.log_sigma_min, hi))

    def predict_cost_ms(self, features: np.ndarray) -> tuple[float, float]:
        """(next step tail ms, finishing tail ms)."""
        out = self.cost(features)[0]
        return math.exp(float(out[0])), math.exp(float(out[1]))

    # persistence --------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, manifest_hash: str | None = None) -> "Controller":
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta_path, weights_path = folder / "controller.json", folder / "controller.safetensors"
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise UserError(f"controller file {str(p)!r} is missing; run `make calibrate`")
        try:
            raw = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{str(meta_path)!r} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{str(meta_path)!r}: schema_version {raw.get('schema_version') if isinstance(raw, dict) else None!r} "
                            f"is not supported (expected {SCHEMA_VERSION})")
        from abcd_edge.formats.schema import from_dict

        meta = from_dict(ControllerMeta, raw, str(meta_path))
        if manifest_hash is not None and meta.manifest_hash != manifest_hash:
            raise UserError(f"controller {str(folder)!r} was calibrated for another artifact "
                            f"(manifest {meta.manifest_hash[:12]}, this artifact {manifest_hash[:12]}); "
                            "recalibrate with `abcd-edge calibrate`")
        try:
            weights = load_file(str(weights_path))
        except Exception as exc:
            raise UserError(f"{str(weights_path)!r} is not a readable safetensors file ({exc})") from None
        spec = ControllerSpec(**meta.spec)
        missing = [f"{n}.{k}" for n in spec.shapes() for k in ("weight", "bias") if f"{n}.{k}" not in weights]
        if missing:
            raise UserError(f"{str(weights_path)!r} lacks tensor {missing[0]!r}")
        return cls(spec, weights, meta)
