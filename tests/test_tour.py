"""The README's tour, as a new user runs it: every command of its block, in order, twice, in a fresh copy of
the repository (tracked files only: no .venv, no caches, no build output). Where a command would take
minutes, the test runs a fast variant of it (fewer runs, noises, requests; a small bench grid written
beside the committed one), listed next to the README line it stands for. The README block and this list
must agree, so a new tour command needs a test here."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import copy_working_tree

ROOT = Path(__file__).resolve().parent.parent
SERVE = "serve"

# README line (comment stripped, spaces collapsed) -> what the test runs (None: the line itself)
TOUR = {
    "abcd-edge export --model demo --out export/demo": None,
    "abcd-edge profile --artifact export/demo --threads 2 --out out/cpu-2t.json":
        "abcd-edge profile --artifact export/demo --threads 2 --out out/cpu-2t.json --runs 30",
    "make calibrate":
        "abcd-edge calibrate --samplers ddim --steps 2,3 --search-noises 8 --gate-noises 16 --iters 30 "
        "--cost-iters 30 --out out/calibration-fast",
    "abcd-edge run --budget 150ms --quality 0.6 --sampler dpmpp-2m --seed 7": None,
    "abcd-edge run --budget 150ms --sampler auto": None,
    "abcd-edge run --budget 150ms --requests 500 --report out/soak.json":
        "abcd-edge run --budget 150ms --requests 20 --report out/soak.json",
    "abcd-edge bench --grid quick --out bench/quick":
        "abcd-edge bench --grid quick --budgets 200ms --quality 1.0 --seeds 1 --samples 4 --methods uniform,abcd "
        "--teacher-steps 8 --out out/bench-fast",
    "abcd-edge bundle --artifact export/demo --out bundles/demo": None,
    "abcd-edge run --bundle bundles/demo --budget 150ms --out out/bundle.jpg": None,
    "abcd-edge serve --bundle bundles/demo --port 8000": SERVE,
    "abcd-edge info": None,
}


def readme_tour() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## A tour of the pipeline", 1)[1].split("```", 2)[1]
    lines = [re.sub(r"\s+", " ", line.split("#", 1)[0]).strip() for line in block.splitlines()]
    return [line for line in lines if line]


def test_the_test_runs_every_tour_line():
    assert readme_tour() == list(TOUR)


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "abcd-edge", command
    return [sys.executable, "-m", "abcd_edge.cli.main", *words[1:]]   # the copy's code: cwd is sys.path[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_once(command: str, cwd: Path, env: dict) -> None:
    """Start the server (on a free port rather than 8000), ask /health and one /generate, stop it."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen(_argv(command.replace("--port 8000", f"--port {port}")), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /health within 120 s"
            time.sleep(0.5)
        res = httpx.post(f"{url}/generate", json={"budget": "150ms", "seed": 0}, timeout=30)
        assert res.status_code == 200, res.text
        assert res.json()["report"]["steps"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_tour_runs_twice_in_a_fresh_copy(tmp_path):
    clone = copy_working_tree(tmp_path / "clone")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    from abcd_edge.formats.manifest import manifest_hash

    committed_hash = manifest_hash(clone / "export" / "demo")
    for round_ in (1, 2):
        for line, fast in TOUR.items():
            command = fast or line
            if fast == SERVE:
                _serve_once(line, clone, env)
                continue
            t0 = time.monotonic()
            res = subprocess.run(_argv(command), cwd=clone, env=env, capture_output=True, text=True, timeout=900)
            print(f"round {round_}: {time.monotonic() - t0:6.1f} s  {command}")
            assert res.returncode == 0, f"round {round_}: `{command}` exited {res.returncode}:\n{res.stderr[-3000:]}"
        # re-exporting kept the content hash, so the committed controller and profiles were used
        assert manifest_hash(clone / "export" / "demo") == committed_hash
        report = json.loads((clone / "out" / "run.json").read_text())     # the bundle's run, last of the runs
        assert report["controller"] == "bundles/demo/controller", report["notes"]       # paths as given
        assert Path(report["profile"]).parent == Path("bundles/demo/profiles")
    # the tour never rewrites what the repository commits
    changed = [p for p in ("profiles/cpu-2t.json", "profiles/cpu-1t.json", "calibration/demo/controller.json",
                           "bench/quick/results.csv") if (clone / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not changed, f"the tour rewrote committed files: {changed}"
