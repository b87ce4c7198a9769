"""Option groups the verbs share, declared once: --artifact, --backend, --threads, --power, and list parsing."""
from __future__ import annotations

from typing import Callable

import click

from abcd_edge import paths
from abcd_edge.errors import UserError

BACKEND_HELP = "ort-cpu, ort-cuda, ort-trt or trt."
POWER_HELP = "Power meter: auto, jtop, nvml, rapl or none."


def artifact_option(f: Callable) -> Callable:
    return click.option("--artifact", "--bundle", "artifact", default=str(paths.DEMO_ARTIFACT_DIR), show_default=True,
                        type=click.Path(), help="Exported artifact folder (denoiser.onnx + manifest.json), or a "
                        "bundle: the same with its profiles/ and controller/ inside (`abcd-edge bundle`).")(f)


def backend_option(f: Callable) -> Callable:
    return click.option("--backend", default="ort-cpu", show_default=True, help=BACKEND_HELP)(f)


def threads_option(f: Callable) -> Callable:
    return click.option("--threads", default=2, show_default=True, type=int, callback=_at_least_one,
                        help="Intra-op threads (ORT).")(f)


def power_option(f: Callable) -> Callable:
    return click.option("--power", default="auto", show_default=True, help=POWER_HELP)(f)


def precision_option(f: Callable) -> Callable:
    """--precision fp32|fp16: which of the artifact's denoisers runs (fp16: denoiser.fp16.onnx from
    `export --fp16`). Not in device_options: only the verbs that pass it on take it."""
    return click.option("--precision", default="fp32", show_default=True,
                        help="fp32 (denoiser.onnx) or fp16 (denoiser.fp16.onnx, from `abcd-edge export --fp16`, "
                             "when its measured drift left it usable); fp16 profiles have a device id of their own.")(f)


def session_options(f: Callable) -> Callable:
    """--profile --controller: what a serving session plans with (`run`, `serve`)."""
    f = click.option("--controller", default="auto", show_default=True,
                     help="Calibrated controller folder, 'auto' (the bundle's controller/, else "
                          "calibration/<artifact name>/) or 'none'.")(f)
    return click.option("--profile", default=None, type=click.Path(),
                        help="Device profile JSON; default: the bundle's or the committed one for this device, "
                             "else a quick measurement (cached).")(f)


def device_options(f: Callable) -> Callable:
    """--artifact --backend --threads --power, in that order."""
    return artifact_option(backend_option(threads_option(power_option(f))))


def at_least(minimum: int) -> Callable:
    """A click callback refusing an integer below ``minimum`` with one line (None passes: the default)."""
    def check(ctx, param, value):
        if value is not None and value < minimum:
            raise UserError(f"--{param.name.replace('_', '-')} {value} must be >= {minimum}")
        return value
    return check


_at_least_one = at_least(1)


def check_threads(backend: str, threads: int | None) -> int | None:
    """The --threads to use. On the CPU backend, more threads than the cores this process may use only
    oversubscribe them (and a quick profile measured so would be cached and then refuse budgets): a value
    given on the command line is refused, the default is lowered to the cores there are. On a GPU backend
    the threads are host threads only: allowed."""
    from abcd_edge.device.hardware import cpu_counts

    logical, usable = cpu_counts()
    if backend != "ort-cpu" or threads is None or threads <= usable:
        return threads
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("threads") == click.core.ParameterSource.DEFAULT:
        return usable
    raise UserError(f"--threads {threads} is more than the {usable} CPU cores this process can use "
                    f"(os.cpu_count() {logical}); the ort-cpu backend accepts --threads 1..{usable}")


def int_list(value: str, flag: str) -> tuple[int, ...]:
    """'1,4' -> (1, 4); every value an integer >= 1, else a UserError naming the flag."""
    try:
        items = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a comma-separated list of integers (e.g. 1,4)") from None
    if not items or any(v < 1 for v in items):
        raise UserError(f"{flag} {value!r}: every value must be an integer >= 1")
    return items


# what each verb that takes only pixel-space artifacts says about a pipeline artifact (`pixel_artifact_only`)
PIPELINE_NOT_YET = {
    "bench-runtime": "its bare-loop overhead and step-limit rows are defined for the pixel denoiser's loop; "
                     "pipeline artifacts (encode + steps + decode) are not implemented there yet",
    "bench-schedules": "its fixed-n table scores the pixel denoiser's schedules; a pipeline's are judged by its "
                       "calibration gate (gate.md) and `abcd-edge bench`",
}


def pixel_artifact_only(artifact, verb: str) -> None:
    """Refuse a pipeline artifact (text-to-image or LDM: ``manifest.pipeline`` set) in one line naming what
    ``verb`` supports, before any work. A folder without a readable manifest passes (the verb's own message
    names what is wrong); ``artifact`` None is the verb's default (the pixel-space demo)."""
    from pathlib import Path

    from abcd_edge.formats.manifest import MANIFEST_NAME, load_manifest

    if artifact is None or not (Path(artifact) / MANIFEST_NAME).is_file():
        return
    try:
        manifest = load_manifest(Path(artifact), verify_hashes=False)
    except UserError:
        return
    if manifest.pipeline is None:
        return
    kind = ("text-to-image pipeline" if manifest.model_kind == "text-to-image"
            else f"latent {manifest.model_kind} pipeline (LDM layout)")
    raise UserError(f"{verb}: artifact {str(artifact)!r} is a {kind}; `abcd-edge {verb}` supports pixel-space "
                    f"artifacts (denoiser.onnx) only: {PIPELINE_NOT_YET[verb]} (`abcd-edge profile` and "
                    "`abcd-edge run` take pipeline artifacts)")
