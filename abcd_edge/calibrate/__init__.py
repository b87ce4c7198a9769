"""Calibration, the third offline stage: the ABCD controller for an artifact and its device profiles.

One module per stage over a small state object (``state.py``); ``run.calibrate`` runs them in order.
"""
from abcd_edge.calibrate.persist import export_controller_onnx
from abcd_edge.calibrate.run import calibrate
from abcd_edge.calibrate.state import CalibrationConfig

__all__ = ["CalibrationConfig", "calibrate", "export_controller_onnx"]
