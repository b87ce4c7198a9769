"""The runtime-only install, as a Jetson gets it: `pip install <clone>` with no extras, then a run outside
any checkout. Slow (a venv and a pip install: ~1 min), so marked slow; it still runs in `make test`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import copy_working_tree


@pytest.mark.slow
def test_runtime_only_install_runs_the_demo_outside_any_checkout(tmp_path):
    clone = copy_working_tree(tmp_path / "clone")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(clone)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]

    python, cli = venv / "bin" / "python", venv / "bin" / "abcd-edge"
    heavy = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "print(','.join(m for m in ('torch', 'diffusers', 'onnx', 'transformers', 'matplotlib') "
                            "if u.find_spec(m)))"], capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "", f"the core install pulled in {heavy.stdout.strip()}"

    elsewhere = tmp_path / "elsewhere"          # no export/, profiles/ or calibration/ anywhere near
    elsewhere.mkdir()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH="")
    res = subprocess.run([str(cli), "run", "--budget", "150ms"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((elsewhere / "out" / "run.json").read_text())
    assert "embedded" in report["artifact"] and report["controller"] is not None
    assert report["steps"] >= 1
    with Image.open(elsewhere / "out" / "run.png") as img:
        assert img.format == "PNG" and img.size[0] >= 32

    res = subprocess.run([str(cli), "export", "--model", "demo", "--out", "x"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "pip install 'abcd-edge[export]'" in res.stderr, res.stderr
    assert not (elsewhere / "x").exists()
