"""Reliability: bad values, corrupted files, interrupted writes, threads, no network, flat memory."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from abcd_edge.core.budget import parse_budget
from abcd_edge.cli.main import main
from abcd_edge.errors import UserError


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=10), st.floats(allow_nan=True).map(str),
                 st.sampled_from(["0ms", "-1s", "inf", "nan", "1e400ms", "5 parsecs", "ms", "", "1,5ms"])))
def test_cli_bad_budget_is_one_line_exit_2(text):
    try:
        parse_budget(text)
        return                        # a valid budget: not this test's business
    except UserError:
        pass
    res = CliRunner().invoke(main, ["run", "--budget", text, "--out", "/nonexistent/x.png"])
    assert res.exit_code == 2
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "budget" in lines[0] and "Traceback" not in res.output


@settings(max_examples=25, deadline=None)
@given(st.one_of(st.integers(max_value=0), st.floats(min_value=1.0001, max_value=1e6), st.floats(max_value=-1e-4)))
def test_cli_bad_numbers_exit_2(value):
    flag = "--batch" if isinstance(value, int) else "--quality"
    res = CliRunner().invoke(main, ["run", "--budget", "150ms", flag, str(value), "--out", "/nonexistent/x.png"])
    assert res.exit_code == 2 and flag in res.output


def _copy_artifact(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_onnx_refused(tiny_artifact, tmp_path):
    from abcd_edge.formats.manifest import load_manifest

    art = _copy_artifact(tiny_artifact, tmp_path / "art")
    data = (art / "denoiser.onnx").read_bytes()
    (art / "denoiser.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="denoiser.onnx"):
        load_manifest(art)
    # even without the hash check, ORT's refusal is a clear UserError, not a crash
    from abcd_edge.device.backends import OrtDenoiser

    with pytest.raises(UserError, match="cannot load"):
        OrtDenoiser(art / "denoiser.onnx")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "abcd_edge.cli.main", *map(str, args)]


def _interrupt(cmd: list[str], after_s: float, sig: signal.Signals, when=lambda: True) -> int:
    """Start ``cmd``; once ``after_s`` has passed and ``when()`` holds, send ``sig`` (it must still be
    running then); return its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after_s)
    while not when() and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, f"{cmd[3]} ended before it could be interrupted"
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _drop_temp_leftovers(parent, name: str) -> None:
    """SIGKILL can leave the writer's temp file or folder beside the target (never the target itself)."""
    for leftover in parent.glob(f".{name}.*.tmp"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def test_interrupted_profile_leaves_previous_good_file(tiny_artifact, tiny_profile, tmp_path):
    from abcd_edge.formats.profile import load_profile

    target = tmp_path / "p.json"
    shutil.copy(tiny_profile, target)
    before = target.read_bytes()
    for sig in (signal.SIGINT, signal.SIGKILL):
        _interrupt(_cli("profile", "--artifact", tiny_artifact, "--threads", "1", "--runs", "10000000",
                        "--batch", "1,2", "--out", target), 4.0, sig)
        assert target.read_bytes() == before
        load_profile(target)
        if sig == signal.SIGINT:
            assert not list(tmp_path.glob(".p.json.*"))          # no temp file left behind after SIGINT
        _drop_temp_leftovers(tmp_path, "p.json")


def test_interrupted_serving_leaves_previous_report(tiny_artifact, tiny_profile, tmp_path):
    """`run --requests N` streams its rows into a temp file: a kill mid-way leaves the last report whole;
    Ctrl-C (SIGINT) writes the rows and summary of the requests answered so far and exits 130."""
    report, image = tmp_path / "r.json", tmp_path / "r.png"
    cmd = _cli("run", "--budget", "20ms", "--artifact", tiny_artifact, "--profile", tiny_profile, "--threads", "1",
               "--controller", "none", "--power", "none", "--out", image, "--report", report)
    subprocess.run(cmd + ["--requests", "3"], check=True, capture_output=True)
    before = report.read_bytes()
    for sig in (signal.SIGKILL, signal.SIGINT):
        code = _interrupt(cmd + ["--requests", "1000000"], 4.0, sig)
        if sig == signal.SIGKILL:
            assert report.read_bytes() == before and json.loads(before)["summary"]["requests"] == 3
        else:
            data = json.loads(report.read_text())
            assert code == 130 and data["summary"]["interrupted"] is True
            assert data["summary"]["requests"] == len(data["requests"]) >= 1
            assert not list(tmp_path.glob(".r.json.*"))
        _drop_temp_leftovers(tmp_path, "r.json")


def test_interrupted_export_leaves_previous_good_artifact(tiny_model_dir, tiny_artifact, tmp_path):
    """Interrupted while it writes the new artifact (its temp folder beside the target exists; for SIGKILL,
    once the ONNX file is in it), an export leaves the previous artifact as it was, loadable. The moment is
    taken from the export's own progress, not from a timing guess that a loaded machine can outrun."""
    from abcd_edge.formats.manifest import load_manifest

    target = _copy_artifact(tiny_artifact, tmp_path / "art")
    before = _snapshot(target)

    def writing(needs_onnx: bool):
        return lambda: any((not needs_onnx or (d / "denoiser.onnx").exists()) for d in tmp_path.glob(".art.*.tmp"))

    for sig, needs_onnx in ((signal.SIGINT, False), (signal.SIGKILL, True)):
        code = _interrupt(_cli("export", "--model", tiny_model_dir, "--out", target), 0.0, sig,
                          when=writing(needs_onnx))
        assert code != 0
        assert _snapshot(target) == before
        load_manifest(target)
        _drop_temp_leftovers(tmp_path, "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_interrupted_calibration_leaves_previous_good_controller(calibrated, tiny_artifact, fixed_profile,
                                                                tiny_feature_nets, tmp_path):
    from abcd_edge.formats.controller import Controller
    from abcd_edge.formats.manifest import manifest_hash

    target = tmp_path / "cal"
    shutil.copytree(calibrated[0], target)
    before = _snapshot(target)
    cmd = _cli("calibrate", "--artifact", tiny_artifact, "--profile", fixed_profile, "--samplers", "ddim",
               "--threads", "1", "--calibration-net", tiny_feature_nets[0], "--evaluation-net", tiny_feature_nets[1],
               "--out", target)
    for sig, after_s in ((signal.SIGINT, 6.0), (signal.SIGKILL, 9.0)):
        assert _interrupt(cmd, after_s, sig) != 0
        assert _snapshot(target) == before
        Controller.load(target, manifest_hash(tiny_artifact))
        _drop_temp_leftovers(tmp_path, "cal")


def test_interrupted_bench_resumes_to_the_complete_grid(tiny_artifact, tiny_profile, tmp_path):
    import csv

    args = ("bench", "--profiles", tiny_profile, "--budgets", "30ms,60ms", "--samplers", "ddim", "--quality", "0.9",
            "--methods", "uniform,karras", "--seeds", "3", "--samples", "24", "--batch", "1", "--artifact",
            tiny_artifact, "--controller", "none", "--teacher-steps", "10")
    subprocess.run(_cli(*args, "--out", tmp_path / "ref"), check=True, capture_output=True)
    out = tmp_path / "run"

    def rows_written(at_least: int):
        path = out / "results.csv"
        return lambda: path.is_file() and path.read_text().count("\n") > at_least

    for sig, at_least in ((signal.SIGKILL, 30), (signal.SIGINT, 70)):    # of 96 served rows + block ends
        assert _interrupt(_cli(*args, "--out", out), 0.0, sig, when=rows_written(at_least)) != 0
        rows = list(csv.DictReader(open(out / "results.csv")))      # parseable after every kill
        assert all(r["status"] for r in rows)
    subprocess.run(_cli(*args, "--out", out), check=True, capture_output=True)

    def served(folder):
        rows = list(csv.DictReader(open(folder / "results.csv")))
        return sorted((r["tier"], r["budget"], r["seed"], r["method"], r["request"]) for r in rows
                      if r["status"] == "ok")

    assert served(out) == served(tmp_path / "ref") and len(served(out)) == 2 * 2 * 24
    assert json.loads((out / "bench.json").read_text())["finished_utc"]


def test_bench_results_cut_short_by_a_kill_are_repaired(tmp_path):
    from abcd_edge.bench import store

    path = tmp_path / "results.csv"
    row = {k: "1" for k in store.CSV_FIELDS} | {"status": "ok"}
    store.write_csv(path, [row, row])
    text = path.read_text()
    path.write_text(text + text.splitlines(keepends=True)[1][:10])   # a kill in the middle of a row
    assert len(store.read_csv(path)) == 2
    assert path.read_text() == text


def test_onnx_external_data_only_from_the_artifact_folder(tiny_artifact, tmp_path):
    """Weights referenced outside the artifact folder (climbing out, absolute, or through a link) never load."""
    import onnx

    from abcd_edge.device.backends import OrtDenoiser
    from abcd_edge.formats.manifest import load_manifest

    art = _copy_artifact(tiny_artifact, tmp_path / "art")
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx.save_model(onnx.load(str(art / "denoiser.onnx")), str(outside / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    model = onnx.load(str(outside / "m.onnx"), load_external_data=False)
    for location in ("../outside/w.data", str(outside / "w.data")):
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        (art / "denoiser.onnx").write_bytes(model.SerializeToString())
        with pytest.raises(UserError, match="cannot load"):          # ONNX Runtime's own path validation
            OrtDenoiser(art / "denoiser.onnx", threads=1)
    manifest = json.loads((art / "manifest.json").read_text())
    for name in ("../outside/w.data", "denoiser.onnx.data"):
        if name == "denoiser.onnx.data":
            (art / name).symlink_to(outside / "w.data")
        files = dict(manifest["files"], **{name: "0" * 64})
        (art / "manifest.json").write_text(json.dumps(dict(manifest, files=files)))
        with pytest.raises(UserError, match="plain file"):
            load_manifest(art, verify_hashes=False)


class _Planted:
    """Unpickling this calls open(path, "w"): what a hostile pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_weights_never_run_code(tiny_model_dir, tmp_path):
    """A model folder with only a pickle .bin: loaded with torch.load(weights_only=True) or refused."""
    import torch

    from abcd_edge.export.model import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "planted"
    torch.save({"conv_in.weight": _Planted(marker)}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load the UNet"):
        load_model(str(model))
    assert not marker.exists()


def test_threads_one_runtime_each_give_independent_correct_results(tiny_artifact, fixed_profile, step_clock):
    from abcd_edge.runtime.session import AnytimeRuntime

    def run(seed):
        rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none",
                            clock=step_clock(1.0))
        try:
            return rt.generate(parse_budget("40ms"), sampler="dpmpp-2m", seed=seed)[0]
        finally:
            rt.close()

    expected = {s: run(s) for s in range(4)}
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, run(s))) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        assert np.array_equal(results[s], expected[s])


def test_two_processes_same_out_path_never_corrupt(tiny_artifact, tiny_profile, tmp_path):
    out, rep = tmp_path / "o.png", tmp_path / "o.json"
    cmd = [sys.executable, "-m", "abcd_edge.cli.main", "run", "--budget", "5s", "--artifact", str(tiny_artifact),
           "--profile", str(tiny_profile), "--threads", "1", "--controller", "none", "--power", "none",
           "--requests", "3", "--out", str(out), "--report", str(rep)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    from PIL import Image

    Image.open(out).verify()
    assert json.loads(rep.read_text())["summary"]["requests"] == 3


def test_runtime_touches_no_network(tiny_artifact, fixed_profile, monkeypatch):
    from abcd_edge.runtime.session import AnytimeRuntime

    def refuse(*a, **k):
        raise AssertionError("the runtime tried to open a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(AssertionError, match="tried to open a socket"):
        socket.create_connection(("127.0.0.1", 9))            # the trap is armed
    with AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none") as rt:
        images, rep = rt.generate(parse_budget("1s"))
    # a whole request (session start, warm-up, 200 steps, finishing) ran without opening a socket
    assert rep.exit_reason == "done" and rep.steps == rep.planned_steps == 200 and rep.deadline_met
    assert images.shape == (1, 8, 8, 3) and images.std() > 0


def test_soak_memory_flat(tiny_artifact, fixed_profile):
    """300 requests on one session: RSS after warm-up grows < 5 % (the README's 10000-request figure is a bench)."""
    from abcd_edge.runtime.session import AnytimeRuntime
    from abcd_edge.runtime.serve import rss_mb

    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none")
    for k in range(300):
        rt.generate(parse_budget("20ms"), seed=k, best_effort=True)
        if k == 49:
            warm = rss_mb()
    end = rss_mb()
    rt.close()
    assert (end - warm) / warm < 0.05


def test_failing_power_meter_still_answers(tiny_artifact, fixed_profile):
    from abcd_edge.device.power import PowerReading
    from abcd_edge.runtime.discover import discover
    from abcd_edge.runtime.session import AnytimeRuntime

    class Broken:
        name = "rapl"

        def start(self):
            pass

        def stop(self):
            return PowerReading(meter="rapl", energy_mj=None, avg_w=None, peak_w=None, duration_s=0.0, n_samples=0,
                                interval_s=0.05, warnings=["rapl: read failed mid-run (PermissionError)"])

        def close(self):
            pass

    parts = discover(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none")
    with AnytimeRuntime(parts.denoiser, parts.manifest, parts.profile, meter=Broken(),
                        manifest_hash=parts.manifest_hash) as rt:          # the meter passed in, not patched
        _, rep = rt.generate(parse_budget("1s"))
    assert rep.power_meter == "rapl" and rep.energy_mj is None and any("read failed" in n for n in rep.notes) and rep.deadline_met
