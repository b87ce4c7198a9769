"""abcd-edge: anytime, budget-aware diffusion sampling on edge devices.

The pipeline is export/ -> profiling/ -> calibrate/ -> runtime/ and bench/, over
core/ (budget, noise schedule, placement, samplers, the one step loop, images),
formats/ (what the files mean) and device/ (backends, clocks, telemetry,
hardware). The runtime path (core, formats, device, runtime, profiling, quality,
cli) imports no torch; demo/ is a leaf that trains and evaluates the shipped
models and is never imported by the library.
"""
__version__ = "0.1.0"
