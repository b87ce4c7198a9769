"""Optional dependencies: the verbs that need an extra say so in one line, before any work.

A runtime-only install (``pip install abcd-edge``) has numpy, onnxruntime, click and Pillow;
exporting, calibrating and training the demo need torch, onnx and diffusers
(``pip install 'abcd-edge[export]'``). Each such verb calls :func:`require` first::

    require("export", "export", "torch", "onnx", "diffusers")
    # abcd-edge: error: `export` needs torch, onnx and diffusers (missing here: diffusers): pip install 'abcd-edge[export]'
"""
from __future__ import annotations

import importlib
import sys

from abcd_edge.errors import UserError

# what each verb needs, and the extra that installs it
EXPORT_MODULES = ("torch", "onnx", "diffusers")
CONTROLLER_MODULES = ("torch", "onnx")                       # controller.onnx (`export --controller`)
CALIBRATE_MODULES = (*CONTROLLER_MODULES, "matplotlib")      # + the training curves (curves.png)
TRAIN_MODULES = ("torch", "diffusers")


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (absent, or blocked in sys.modules)."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def _and(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def require(what: str, extra: str, *modules: str) -> None:
    """Raise a one-line UserError when any of ``modules`` is missing: ``what`` needs them, install ``extra``."""
    gone = missing(*modules)
    if gone:
        raise UserError(f"`{what}` needs {_and(modules)} (missing here: {', '.join(gone)}): "
                        f"pip install 'abcd-edge[{extra}]'")


def require_or_exit(what: str, extra: str, *modules: str) -> None:
    """:func:`require` for ``python -m`` entry points: the one line on stderr and exit code 2."""
    try:
        require(what, extra, *modules)
    except UserError as exc:
        print(f"abcd-edge: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
