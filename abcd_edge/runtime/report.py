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
    # a latent pipeline artifact (text-to-image): the prompt, guidance and the finishing decode; None otherwise
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None
    guidance_mode: str | None = None        # single (one UNet branch) | batch2 | split (two batch-1 calls)
    decoder: str | None = None              # vae | tiny
    prompt_tokens: int | None = None        # with BOS and EOS, before truncation
    prompt_truncated: bool | None = None    # longer than the tokenizer's limit: truncated (see notes)
    encode_ms: float | None = None          # prompt encoding, inside the request clock (0 when cached)
    reserved_encode_ms: float | None = None  # the encoding's profiled tail taken off the budget before planning
    decode_ms: float | None = None          # the finishing decode of the last x0 latent + uint8, inside the clock

    def to_json(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        energy = (f"{self.energy_mj:.1f} mJ ({self.power_meter})" if self.energy_mj is not None
                  else "no power meter")
        limit = f"{self.budget_ms:.1f} ms" if self.budget_ms is not None else f"{self.budget_mj:.0f} mJ"
        met = "met" if self.deadline_met else "MISSED"
        steps = f"{self.steps}/{self.planned_steps} steps ({self.sampler}, {self.schedule})"
        if self.decode_ms is not None:      # a pipeline: encode + steps + decode
            encode = "" if self.encode_ms is None else f"encode {self.encode_ms:.1f} ms, "
            total = sum(self.measured_step_ms)
            steps = f"{encode}{steps} {total:.1f} ms, decode {self.decode_ms:.1f} ms"
        return (f"{steps}, exit: {self.exit_reason}, "
                f"latency {self.latency_ms:.1f} ms vs budget {limit} ({met}), {energy}")
