"""Budgets ("150ms", "0.2s", "2J") and the controller's context vector c = [log B, log F, rho]."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from abcd_edge.errors import UserError

ACCEPTED = "a positive finite number with a unit: us, ms, s (latency) or mJ, J (energy), e.g. 150ms, 0.15s, 500us, 2J, 500mJ"
_UNITS = {"us": ("latency", 1e-3), "ms": ("latency", 1.0), "s": ("latency", 1e3),
          "mj": ("energy", 1.0), "j": ("energy", 1e3)}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s|mJ|J|mj|j)\s*$")


@dataclass(frozen=True)
class Budget:
    """A latency budget in ms or an energy budget in mJ."""

    kind: Literal["latency", "energy"]
    value: float  # ms for latency, mJ for energy

    @property
    def ms(self) -> float:
        if self.kind != "latency":
            raise ValueError("an energy budget has no ms value")
        return self.value

    @property
    def mj(self) -> float:
        if self.kind != "energy":
            raise ValueError("a latency budget has no mJ value")
        return self.value

    def __str__(self) -> str:
        return f"{self.value:g}{'ms' if self.kind == 'latency' else 'mJ'}"


def parse_budget(text: str) -> Budget:
    """Parse '150ms', '0.15s', '500us', '2J', '500mJ'; reject anything else with a UserError."""
    m = _PATTERN.match(text) if isinstance(text, str) else None
    if not m:
        raise UserError(f"budget {text!r} is not understood; expected {ACCEPTED}")
    number, unit = float(m.group(1)), m.group(2)
    kind, scale = _UNITS[unit.lower()]
    value = number * scale
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"budget {text!r} must be positive and finite; expected {ACCEPTED}")
    return Budget(kind, value)


def context_vector(budget_value: float, flops_per_s: float, rho: float) -> list[float]:
    """c = [log B, log F, rho]; B in ms (or mJ), F in FLOP/s measured by the device profile."""
    if not 0.0 <= rho <= 1.0:
        raise UserError(f"quality {rho!r} is outside [0, 1]; 0 is fastest, 1 best")
    return [math.log(budget_value), math.log(flops_per_s), float(rho)]
