"""The report of one request: what was asked, what ran, what it cost — schema-versioned JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

REPORT_SCHEMA_VERSION = 2


@dataclass
class RequestReport:
    schema_version: int
    budget: str
    budget_kind: str
    budget_ms: float | None
    budget_mj: float | None
    latency_ms: float
    deadline_met: bool
    steps: int
    planned_steps: int
    fit_steps: int              # the steps that fit the budget; planned_steps < fit_steps where rho asked for less
    replans: int                # times the rest of the schedule was re-placed into fewer steps
    exit_reason: str            # budget | quality | guard | done | best-effort | interrupted (Ctrl-C)
    sampler: str
    schedule: str
    sigmas: list[float]
    rho: float
    seed: int
    batch: int
    predicted_step_ms: list[float]     # the tail the hard rule used (incl. sampler + decision time)
    predicted_median_step_ms: list[float]  # profile p50 x the online correction (denoiser only)
    measured_step_ms: list[float]
    correction: float
    energy_mj: float | None
    avg_power_w: float | None
    power_meter: str
    energy_source: str | None
    clock: str
    artifact: str
    manifest_hash: str
    profile: str
    profile_device: str
    controller: str | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        energy = (f"{self.energy_mj:.1f} mJ ({self.power_meter})" if self.energy_mj is not None
                  else "no power meter")
        limit = f"{self.budget_ms:.1f} ms" if self.budget_ms is not None else f"{self.budget_mj:.0f} mJ"
        met = "met" if self.deadline_met else "MISSED"
        return (f"{self.steps}/{self.planned_steps} steps ({self.sampler}, {self.schedule}), exit: {self.exit_reason}, "
                f"latency {self.latency_ms:.1f} ms vs budget {limit} ({met}), {energy}")
