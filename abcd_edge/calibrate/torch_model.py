"""The trainable torch twin of the controller (imports torch; calibration only).

Same layers, input standardisation and weight layout as the numpy twin
(:class:`abcd_edge.formats.controller.Controller`), which the runtime uses; the
two agree to 1e-5 (tests/test_calibrate.py).
"""
from __future__ import annotations

import numpy as np

from abcd_edge.formats.controller import COST_DIM, INPUT_NORM, WG_DIM, ControllerSpec


def torch_controller(spec: ControllerSpec):
    """The trainable torch twin (imports torch; calibration only)."""
    import torch
    from torch import nn

    class NormMLP(nn.Module):
        def __init__(self, part: str, din: int, dout: int):
            super().__init__()
            h = spec.hidden
            self.layers = nn.ModuleList([nn.Linear(din, h), nn.Linear(h, h), nn.Linear(h, dout)])
            shift, scale = INPUT_NORM[part]
            self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32), persistent=False)
            self.register_buffer("inv_scale", 1.0 / torch.tensor(scale, dtype=torch.float32), persistent=False)

        def forward(self, x):
            x = (x - self.shift) * self.inv_scale
            for k, layer in enumerate(self.layers):
                x = layer(x)
                if k < len(self.layers) - 1:
                    x = nn.functional.silu(x)
            return x

    class TorchController(nn.Module):
        def __init__(self):
            super().__init__()
            self.spec = spec
            self.wg = NormMLP("wg", WG_DIM, spec.k_bins)
            self.cost = NormMLP("cost", COST_DIM, 2)

        def normalised_density(self, cnz: torch.Tensor) -> torch.Tensor:
            """softplus importance density over the K log-sigma bins (+ a floor so every bin has mass);
            ``cnz`` rows are the generator's input [c, log n, z] (``formats.controller.wg_features``)."""
            return nn.functional.softplus(self.wg(cnz)) + 1e-4

        def cost_log(self, f: torch.Tensor) -> torch.Tensor:
            return self.cost(f)

        def forward(self, cnz: torch.Tensor, f: torch.Tensor):
            """(density [N,K], log tail costs [N,2]) — the ONNX graph."""
            return self.normalised_density(cnz), self.cost(f)

        def numpy_weights(self) -> dict[str, np.ndarray]:
            """``{part}.{k}.weight|bias`` float32 arrays, the layout Controller and safetensors use."""
            out = {}
            for name, tensor in self.state_dict().items():
                part, _, idx, kind = name.split(".")
                out[f"{part}.{idx}.{kind}"] = tensor.detach().cpu().numpy().astype(np.float32)
            return out

        def load_numpy_weights(self, weights: dict[str, np.ndarray]) -> None:
            state = {f"{n.split('.')[0]}.layers.{n.split('.')[1]}.{n.split('.')[2]}": torch.from_numpy(np.array(v))
                     for n, v in weights.items()}
            self.load_state_dict(state)

    return TorchController()
