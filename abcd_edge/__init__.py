"""abcd-edge: anytime, budget-aware diffusion sampling on edge devices.

The runtime part of this package (budget, schedules, samplers, backends,
telemetry, profiler loading, runtime, the numpy controller) imports no torch.
"""
__version__ = "0.1.0"
