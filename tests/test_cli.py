"""The CLI as a user runs it: help, info, and one-line errors with exit code 2."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from abcd_edge.cli.main import main


def test_help_lists_verbs():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for verb in ("export", "profile", "calibrate", "run", "bench", "info"):
        assert verb in res.output


def test_info_reports_providers():
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0 and "CPUExecutionProvider" in res.output
    assert "UNet2DConditionModel" in res.output and "time_cond_proj_dim" in res.output   # the families accepted


@pytest.mark.parametrize("args,needle", [
    (["run", "--budget", "150"], "'150'"),
    (["run", "--budget", "-5ms"], "'-5ms'"),
    (["run", "--budget", "150ms", "--quality", "2"], "--quality 2"),
    (["run", "--budget", "150ms", "--batch", "0"], "--batch 0"),
    (["run", "--budget", "150ms", "--requests", "0"], "--requests 0"),
    (["run", "--budget", "150ms", "--artifact", "/nonexistent"], "/nonexistent"),
    (["profile", "--runs", "0"], "--runs 0"),
    (["profile", "--batch", "0"], "--batch '0'"),
    (["profile", "--backend", "tpu", "--runs", "5"], "tpu"),
    (["export", "--out", "x"], "--model"),
])
def test_bad_values_one_line_exit_2(args, needle, tmp_path):
    res = CliRunner().invoke(main, args + (["--out", str(tmp_path / "o.png")] if args[0] == "run" else []))
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output


def test_run_embedded_default_end_to_end(tmp_path):
    """`abcd-edge run --budget 150ms` on the committed artifact writes an image and a report."""
    import json

    out, rep = tmp_path / "run.png", tmp_path / "run.json"
    res = subprocess.run([sys.executable, "-m", "abcd_edge.cli.main", "run", "--budget", "150ms", "--out", str(out),
                          "--report", str(rep)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(rep.read_text())
    for key in ("budget_ms", "latency_ms", "deadline_met", "steps", "exit_reason", "power_meter", "energy_mj"):
        assert key in data
    assert data["steps"] >= 1 and out.stat().st_size > 0
    assert "steps" in res.stdout and "budget" in res.stdout
