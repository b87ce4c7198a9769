"""Option groups the verbs share, declared once: --artifact, --backend, --threads, --power, and list parsing."""
from __future__ import annotations

from typing import Callable

import click

from abcd_edge import paths
from abcd_edge.errors import UserError

BACKEND_HELP = "ort-cpu, ort-cuda, ort-trt or trt."
POWER_HELP = "Power meter: auto, jtop, nvml, rapl or none."


def artifact_option(f: Callable) -> Callable:
    return click.option("--artifact", default=str(paths.DEMO_ARTIFACT_DIR), show_default=True, type=click.Path(),
                        help="Exported artifact folder (denoiser.onnx + manifest.json).")(f)


def backend_option(f: Callable) -> Callable:
    return click.option("--backend", default="ort-cpu", show_default=True, help=BACKEND_HELP)(f)


def threads_option(f: Callable) -> Callable:
    return click.option("--threads", default=2, show_default=True, type=int, callback=_at_least_one,
                        help="Intra-op threads (ORT).")(f)


def power_option(f: Callable) -> Callable:
    return click.option("--power", default="auto", show_default=True, help=POWER_HELP)(f)


def device_options(f: Callable) -> Callable:
    """--artifact --backend --threads --power, in that order."""
    return artifact_option(backend_option(threads_option(power_option(f))))


def _at_least_one(ctx, param, value):
    if value is not None and value < 1:
        raise UserError(f"--{param.name} {value} must be >= 1")
    return value


def int_list(value: str, flag: str) -> tuple[int, ...]:
    """'1,4' -> (1, 4); every value an integer >= 1, else a UserError naming the flag."""
    try:
        items = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a comma-separated list of integers (e.g. 1,4)") from None
    if not items or any(v < 1 for v in items):
        raise UserError(f"{flag} {value!r}: every value must be an integer >= 1")
    return items
