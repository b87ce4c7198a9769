"""The AYS-like static schedules calibration optimised per step count: reading ``ays.json`` and choosing one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from abcd_edge.errors import UserError

AysTable = dict[str, dict[int, list[float]]]      # sampler (or "*": any) -> n -> sigmas


def load_ays(folder: Path | None, manifest_hash: str | None = None) -> tuple[AysTable | None, str]:
    """``<folder>/ays.json`` -> ({sampler or "*": {n: sigmas}}, where it came from or why unavailable).

    Two layouts: ``{"<n>": [sigmas]}`` (any sampler), or calibration's
    ``{"manifest_hash": ..., "schedules": {"<sampler>": {"<n>": {"sigmas": [...], ...}}}}``."""
    if folder is None:
        return None, "unavailable: no calibration folder (no controller)"
    path = Path(folder) / "ays.json"
    if not path.is_file():
        return None, f"unavailable: {path} does not exist (AYS-like schedules are optimised by calibration)"
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and "schedules" in raw:
            if manifest_hash and raw.get("manifest_hash") not in (None, manifest_hash):
                return None, f"unavailable: {path} was optimised for another artifact"
            table = {str(smp): {int(n): [float(x) for x in (v["sigmas"] if isinstance(v, dict) else v)]
                                for n, v in per.items()} for smp, per in raw["schedules"].items()}
        else:
            table = {"*": {int(k): [float(x) for x in v] for k, v in raw.items()}}
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise UserError(f"{str(path)!r} is not an AYS schedule table ({type(exc).__name__}: {exc})") from None
    for smp, per in table.items():
        for n, sig in per.items():
            if len(sig) != n or any(a <= b for a, b in zip(sig, sig[1:])) or (sig and sig[-1] <= 0):
                raise UserError(f"{str(path)!r}: schedule {smp}/{n} must hold {n} positive, strictly decreasing "
                                "sigmas")
    table = {k: v for k, v in table.items() if v}
    return (table or None), (str(path) if table else f"unavailable: {path} is empty")


def ays_for(table: AysTable | None, sampler: str) -> dict[int, list[float]] | None:
    if not table:
        return None
    return table.get(sampler) or table.get("*")


def nearest_ays_n(available: Iterable[int], k: int) -> int | None:
    """The AYS schedule to use for K steps: K itself, else the largest n < K, else the smallest n."""
    ns = sorted(set(int(n) for n in available))
    if not ns:
        return None
    if k in ns:
        return k
    below = [n for n in ns if n < k]
    return below[-1] if below else ns[0]
