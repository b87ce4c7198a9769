"""The exporter's refusal (:class:`ExportError`) and the one-line form of a third-party exception."""
from __future__ import annotations

from abcd_edge.errors import UserError


class ExportError(UserError):
    """The export ran but its result is refused (ONNX export failure, parity over tolerance)."""


def first_line(exc: BaseException) -> str:
    """``"ClassName: first line of the message"``, at most 400 characters (for one-line errors)."""
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}"[:400]
