"""The ABCD controller: weight generator, exit policy and cost predictor.

Three small MLPs (about 17k parameters together):

* weight generator  (c, z)  -> softplus importance density over K bins of log-sigma;
  n steps are placed by inverse CDF (``core.placement.sigmas_from_density``);
* exit policy       h_t     -> p_stop, h_t = [log sigma_t, log ||x0_t - x0_{t-1}||^2,
  t/n, elapsed/B, c, z]; thresholded at run time (Gumbel-sigmoid in training);
* cost predictor    f       -> log of the tail (p99) latency of the next step and of
  finishing, f = profile statistics of this backend/batch + the running correction.

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

SCHEMA_VERSION = 1
CONTEXT_DIM = 3          # [log B, log F, rho]
DESCRIPTOR_DIM = 6       # samplers.SAMPLER_DESCRIPTORS
POLICY_DIM = 4 + CONTEXT_DIM + DESCRIPTOR_DIM
BACKEND_NAMES = ("ort-cpu", "ort-cuda", "ort-trt", "trt")
COST_DIM = 5 + len(BACKEND_NAMES) + 1
EPS = 1e-12

# Fixed input standardisation (shift, scale) per MLP, shared by both twins: the raw features
# (log ms, log FLOP/s, log sigma, ...) live on very different scales.
_CONTEXT_NORM = ([5.0, 23.0, 0.5], [1.5, 3.0, 0.3])
INPUT_NORM = {
    "wg": (_CONTEXT_NORM[0] + [0.0] * DESCRIPTOR_DIM, _CONTEXT_NORM[1] + [1.0] * DESCRIPTOR_DIM),
    "policy": ([0.0, -8.0, 0.5, 0.5] + _CONTEXT_NORM[0] + [0.0] * DESCRIPTOR_DIM,
               [3.0, 4.0, 0.3, 0.3] + _CONTEXT_NORM[1] + [1.0] * DESCRIPTOR_DIM),
    "cost": ([1.5, 1.5, -1.0, -1.0, 0.5] + [0.0] * len(BACKEND_NAMES) + [0.0],
             [1.5, 1.5, 2.0, 2.0, 1.0] + [1.0] * len(BACKEND_NAMES) + [0.5]),
}


@dataclass
class ControllerSpec:
    k_bins: int = 32
    hidden: int = 48
    log_sigma_min: float = -4.0
    log_sigma_max: float = 4.5
    threshold: float = 0.5     # p_stop above which the policy exits
    quantile: float = 0.99     # the tail the cost predictor is trained for

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (in, out) for the three MLPs (two hidden layers each)."""
        h = self.hidden
        out = {}
        for part, (din, dout) in {"wg": (CONTEXT_DIM + DESCRIPTOR_DIM, self.k_bins),
                                  "policy": (POLICY_DIM, 1), "cost": (COST_DIM, 2)}.items():
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


def decision_features(sigma: float, x0_change: float, progress: float, elapsed_frac: float,
                      context, descriptor) -> np.ndarray:
    """h_t of the exit policy as a float32 row [1, POLICY_DIM]."""
    h = [math.log(max(sigma, EPS)), math.log(x0_change + 1e-8), progress, elapsed_frac, *context, *descriptor]
    return np.asarray([h], np.float32)


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


class Controller:
    """The numpy runtime twin of the trained controller."""

    def __init__(self, spec: ControllerSpec, weights: dict[str, np.ndarray], meta: ControllerMeta | None = None):
        self.spec = spec
        self.meta = meta
        self.weights = weights
        parts = {}
        for part in ("wg", "policy", "cost"):
            parts[part] = MLP([(weights[f"{part}.{k}.weight"].T, weights[f"{part}.{k}.bias"]) for k in range(3)],
                              INPUT_NORM[part])
        self.wg, self.policy, self.cost = parts["wg"], parts["policy"], parts["cost"]

    @classmethod
    def random_init(cls, spec: ControllerSpec | None = None, seed: int = 0) -> "Controller":
        spec = spec or ControllerSpec()
        rng = np.random.default_rng(seed)
        weights = {}
        for name, (din, dout) in spec.shapes().items():
            weights[f"{name}.weight"] = (rng.standard_normal((dout, din)) / math.sqrt(din)).astype(np.float32)
            weights[f"{name}.bias"] = np.zeros(dout, np.float32)
        return cls(spec, weights)

    def density(self, context, descriptor) -> np.ndarray:
        x = np.asarray([[*context, *descriptor]], np.float32)
        return softplus(self.wg(x)[0]) + 1e-4

    def plan_sigmas(self, context, descriptor, n: int, sigma_max: float | None = None) -> np.ndarray:
        from abcd_edge.core.placement import sigmas_from_density

        hi = self.spec.log_sigma_max if sigma_max is None else min(self.spec.log_sigma_max, math.log(sigma_max))
        return np.asarray(sigmas_from_density(self.density(context, descriptor), n, self.spec.log_sigma_min, hi))

    def p_stop(self, features: np.ndarray) -> float:
        z = float(self.policy(features)[0, 0])
        return 1.0 / (1.0 + math.exp(-z))

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
