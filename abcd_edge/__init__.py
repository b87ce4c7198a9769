"""abcd-edge: anytime, budget-aware diffusion sampling on edge devices.

The pipeline is export/ -> profiling/ -> calibrate/ -> runtime/ and bench/, over
core/ (budget, noise schedule, placement, samplers, the one step loop, images),
formats/ (what the files mean) and device/ (backends, clocks, telemetry,
hardware). The runtime path (core, formats, device, runtime, profiling, quality,
cli) imports no torch; demo/ is a leaf that trains and evaluates the shipped
models and is never imported by the library.

The Python API is the one `abcd-edge run` uses::

    from abcd_edge import AnytimeRuntime, save_image

    with AnytimeRuntime.open() as rt:                 # the demo; or a bundle / artifact folder
        images, report = rt.generate("150ms", rho=1.0, seed=0)
    save_image(images, "out.png")
    print(report.summary_line(), report.latency_ms, report.deadline_met)

Names resolve lazily, so ``import abcd_edge`` stays cheap (setup.py imports it before numpy exists).
"""
__version__ = "0.1.0"

_API = {
    "AnytimeRuntime": "abcd_edge.runtime.session",
    "RequestReport": "abcd_edge.runtime.report",
    "Budget": "abcd_edge.core.budget",
    "parse_budget": "abcd_edge.core.budget",
    "save_image": "abcd_edge.core.images",
    "make_bundle": "abcd_edge.formats.bundle",
    "RequestInterrupted": "abcd_edge.runtime.session",
    "UserError": "abcd_edge.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'abcd_edge' has no attribute {name!r}")
