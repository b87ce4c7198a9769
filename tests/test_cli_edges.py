"""Edges of the CLI a user meets following the README: bad seeds and output paths, --strict, Ctrl-C, --threads,
image formats, bench plots without matplotlib, and a profile --out that would lose measured batches."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abcd_edge.cli.main import main

NO_ARTIFACT = "/nonexistent-artifact"     # a check that names its own flag ran before the artifact was looked at


def _one_line_exit_2(res, needle: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("abcd-edge: error: ") and needle in lines[0], lines[0]
    return lines[0]


def _run_args(tmp_path, *extra: str, artifact=NO_ARTIFACT) -> list[str]:
    return ["run", "--budget", "150ms", "--artifact", str(artifact), "--threads", "1", "--out",
            str(tmp_path / "o.png"), "--report", str(tmp_path / "o.json"), *extra]


def _tiny_run(tiny_artifact, tiny_profile, tmp_path, *extra: str) -> list[str]:
    return ["run", "--artifact", str(tiny_artifact), "--profile", str(tiny_profile), "--threads", "1",
            "--controller", "none", "--power", "none", "--report", str(tmp_path / "r.json"), *extra]


@pytest.fixture()
def unwritable_dir(tmp_path) -> Path:
    """A folder this process cannot create files in (chmod 555; as root, where that does not bind, /sys)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            yield candidate
            break
        os.close(fd)
        os.unlink(probe)
    else:
        pytest.skip("no folder here refuses this process's writes")
    folder.chmod(0o755)


# -- 1. seeds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,requests", [("-1", "1"), (str(2**63), "1"), (str(2**63 - 1), "2")])
def test_run_bad_seed_one_line_exit_2(tmp_path, seed, requests):
    res = CliRunner().invoke(main, _run_args(tmp_path, "--seed", seed, "--requests", requests))
    _one_line_exit_2(res, f"--seed {seed}")


# -- 2. output paths checked before any work ----------------------------------------------------------------
def test_run_out_or_report_a_folder_is_refused_up_front(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    for flag in ("--out", "--report"):
        args = _run_args(tmp_path)
        args[args.index(flag) + 1] = str(folder)
        assert "is a folder" in _one_line_exit_2(CliRunner().invoke(main, args), f"{flag} {str(folder)!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any(folder.iterdir())


def test_run_outputs_in_unwritable_folder_refused_up_front(tmp_path, unwritable_dir):
    for flag, name in (("--out", "o.png"), ("--report", "o.json")):
        args = _run_args(tmp_path)
        args[args.index(flag) + 1] = str(unwritable_dir / "sub" / name)
        _one_line_exit_2(CliRunner().invoke(main, args), f"{flag} {str(unwritable_dir / 'sub' / name)!r}")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = _run_args(tmp_path)
    args[args.index("--out") + 1] = str(a_file / "o.png")         # a parent that is a file
    _one_line_exit_2(CliRunner().invoke(main, args), f"--out {str(a_file / 'o.png')!r}")


def test_run_same_path_for_image_and_report_refused(tmp_path):
    args = _run_args(tmp_path)
    args[args.index("--report") + 1] = str(tmp_path / "o.png")
    _one_line_exit_2(CliRunner().invoke(main, args), f"--report {str(tmp_path / 'o.png')!r}")


def test_profile_out_unwritable_or_folder_refused_before_measuring(tmp_path, unwritable_dir):
    for target in (tmp_path, unwritable_dir / "p.json"):
        res = CliRunner().invoke(main, ["profile", "--artifact", NO_ARTIFACT, "--threads", "1", "--out", str(target)])
        _one_line_exit_2(res, f"--out {str(target)!r}")


# -- 3. --strict ----------------------------------------------------------------------------------------
def test_run_strict_exit_3_on_missed_deadline(tiny_artifact, tiny_profile, tmp_path):
    from abcd_edge.cli.main import EXIT_DEADLINE_MISSED

    assert EXIT_DEADLINE_MISSED == 3
    late = _tiny_run(tiny_artifact, tiny_profile, tmp_path, "--budget", "1us", "--best-effort",
                     "--out", str(tmp_path / "late.png"))
    res = CliRunner().invoke(main, late)
    assert res.exit_code == 0, res.output                         # without --strict a late answer is exit 0
    res = CliRunner().invoke(main, late + ["--strict"])
    assert res.exit_code == 3, res.output
    assert json.loads((tmp_path / "r.json").read_text())["deadline_met"] is False
    assert (tmp_path / "late.png").is_file()                    # the answer is still written
    # on time, with --strict: exit 0 (and a .jpg written as JPEG, item 6)
    res = CliRunner().invoke(main, _tiny_run(tiny_artifact, tiny_profile, tmp_path, "--budget", "2s", "--strict",
                                             "--out", str(tmp_path / "ok.jpg")))
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(tmp_path / "ok.jpg") as im:
        assert im.format == "JPEG"


def test_run_help_documents_exit_codes():
    res = CliRunner().invoke(main, ["run", "--help"])
    assert res.exit_code == 0 and "--strict" in res.output and "3" in res.output and "130" in res.output


# -- 4. Ctrl-C keeps the anytime promise --------------------------------------------------------------------
SLOW_CLI = """\
import pathlib, sys, time
import abcd_edge.runtime.session as session

MARK = pathlib.Path(sys.argv.pop(1))
FIRST_CALL_S = float(sys.argv.pop(1))
_run_steps = session.run_steps
requests = [0]


def slow_run_steps(denoiser, *args, **kwargs):
    requests[0] += 1
    calls = [0]

    def slow(sample, t, **kw):
        calls[0] += 1
        MARK.write_text(f"{requests[0]} {calls[0]}")     # request k, call n in progress
        time.sleep(FIRST_CALL_S if calls[0] == 1 else 0.05)
        return denoiser(sample, t, **kw)
    return _run_steps(slow, *args, **kwargs)


session.run_steps = slow_run_steps
from abcd_edge.cli.main import main
main(prog_name="abcd-edge")
"""


def _interrupt_run(tmp_path, args: list[str], at: str, first_call_s: float = 0.05):
    """Run the CLI with a denoiser slowed to 50 ms a call; SIGINT once the mark reads ``at``
    ('<request> <call in progress>'); return (exit code, stderr)."""
    script, mark = tmp_path / "slow_cli.py", tmp_path / "mark"
    script.write_text(SLOW_CLI)
    proc = subprocess.Popen([sys.executable, str(script), str(mark), str(first_call_s), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_end = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < t_end:
        if mark.is_file() and mark.read_text() == at:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"ended before the interrupt: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _no_temp_files(folder: Path) -> None:
    assert not list(folder.glob(".*.tmp")), list(folder.iterdir())


def test_ctrl_c_mid_request_writes_the_last_x0_and_exits_130(tiny_artifact, tiny_profile, tmp_path):
    from PIL import Image

    out, rep = tmp_path / "i.png", tmp_path / "r.json"
    code, err = _interrupt_run(tmp_path, _tiny_run(tiny_artifact, tiny_profile, tmp_path, "--budget", "2s",
                                                   "--out", str(out)), at="1 4")
    assert code == 130, err
    assert "Traceback" not in err and "Aborted" not in err
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG"
    data = json.loads(rep.read_text())
    assert data["exit_reason"] == "interrupted" and data["steps"] >= 3
    assert len(data["measured_step_ms"]) == data["steps"] == len(data["predicted_step_ms"])
    assert data["schema_version"] >= 2 and "deadline_met" in data
    _no_temp_files(tmp_path)


def test_ctrl_c_before_any_step_writes_nothing_and_exits_130(tiny_artifact, tiny_profile, tmp_path):
    out, rep = tmp_path / "i.png", tmp_path / "r.json"
    code, err = _interrupt_run(tmp_path, _tiny_run(tiny_artifact, tiny_profile, tmp_path, "--budget", "2s",
                                                   "--out", str(out)), at="1 1", first_call_s=30)
    assert code == 130, err
    lines = [l for l in err.splitlines() if l.strip() and "warm-up" not in l]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not rep.exists()
    _no_temp_files(tmp_path)


def test_ctrl_c_during_requests_writes_the_summary_so_far(tiny_artifact, tiny_profile, tmp_path):
    from PIL import Image

    out, rep = tmp_path / "i.png", tmp_path / "r.json"
    code, err = _interrupt_run(tmp_path, _tiny_run(tiny_artifact, tiny_profile, tmp_path, "--budget", "2s",
                                                   "--requests", "5", "--out", str(out)), at="2 4")
    assert code == 130, err
    data = json.loads(rep.read_text())
    assert len(data["requests"]) == 2 and data["summary"]["requests"] == 2
    assert data["requests"][0]["exit_reason"] != "interrupted"
    assert data["requests"][1]["exit_reason"] == "interrupted"
    assert data["summary"]["exit_reasons"].get("interrupted") == 1 and data["summary"]["interrupted"] is True
    with Image.open(out) as im:
        im.load()
    _no_temp_files(tmp_path)


# -- 5. --threads beyond this machine's cores ---------------------------------------------------------------
def test_cpu_threads_beyond_cores_refused(tmp_path):
    too_many = (os.cpu_count() or 1) + 1
    res = CliRunner().invoke(main, _run_args(tmp_path, "--threads", str(too_many)))
    line = _one_line_exit_2(res, f"--threads {too_many}")
    assert str(os.cpu_count()) in line
    res = CliRunner().invoke(main, ["profile", "--artifact", NO_ARTIFACT, "--threads", str(too_many),
                                    "--out", str(tmp_path / "p.json")])
    _one_line_exit_2(res, f"--threads {too_many}")
    # a GPU backend's --threads are host threads only: not this check's business
    res = CliRunner().invoke(main, _run_args(tmp_path, "--threads", str(too_many), "--backend", "ort-cuda"))
    assert "--threads" not in res.output


def test_default_threads_lowered_on_a_one_core_machine(tmp_path, monkeypatch):
    """Only a --threads given on the command line is refused; the default (2) follows the cores there are."""
    from abcd_edge.device import hardware

    monkeypatch.setattr(hardware, "cpu_counts", lambda: (1, 1))
    args = [a for a in _run_args(tmp_path) if a not in ("--threads", "1")]
    _one_line_exit_2(CliRunner().invoke(main, args), NO_ARTIFACT)          # past the thread check
    _one_line_exit_2(CliRunner().invoke(main, args + ["--threads", "2"]), "--threads 2")


def test_quick_profile_cache_is_per_thread_count(tiny_artifact, tmp_path, monkeypatch):
    """A quick profile cached for one --threads is never the one found for another."""
    from abcd_edge import paths
    from abcd_edge.device import hardware
    from abcd_edge.formats.manifest import manifest_hash
    from abcd_edge.profiling import measure
    from abcd_edge.runtime import discover

    measured = []

    class Measured:
        def __init__(self, threads):
            self.device_id = hardware.device_id("ort-cpu", threads)

        def save(self, path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps({"manifest_hash": mhash, "device_id": self.device_id}))

    def fake_measure(artifact_dir, backend, threads, **kw):
        measured.append(threads)
        return Measured(threads)

    monkeypatch.setattr(measure, "measure_profile", fake_measure)
    monkeypatch.setattr(paths, "user_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(paths, "PROFILES_DIR", tmp_path / "none")
    mhash = manifest_hash(tiny_artifact)
    found = {}
    for threads in (1, 2, 1):
        found.setdefault(threads, set()).add(discover.find_or_measure_profile(
            tiny_artifact, mhash, hardware.device_id("ort-cpu", threads), "ort-cpu", threads, "none", 5))
    assert measured == [1, 2] and len(found[1]) == 1 and found[1] != found[2]


# -- 6. image formats by suffix ----------------------------------------------------------------------------
def test_save_image_writes_the_format_its_suffix_names(tmp_path):
    from PIL import Image, features

    from abcd_edge.core.images import save_image

    images = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    wanted = {"a.png": "PNG", "b.jpg": "JPEG", "c.JPEG": "JPEG"}
    if features.check("webp"):
        wanted["d.webp"] = "WEBP"
    for name, fmt in wanted.items():
        save_image(images, tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (4 * 16, 4 * 8)
    _no_temp_files(tmp_path)


def test_run_unknown_image_suffix_refused_up_front(tmp_path):
    args = _run_args(tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "x.gif")
    line = _one_line_exit_2(CliRunner().invoke(main, args), ".gif")
    assert ".png" in line and ".jpg" in line


# -- 7. bench plots without matplotlib ---------------------------------------------------------------------
def test_bench_without_matplotlib_lists_only_plots_written(tiny_artifact, tiny_profile, tmp_path, monkeypatch):
    from abcd_edge.bench import grid, runner
    from abcd_edge.bench.metrics import Quality

    def feats(images):
        x = images.astype(np.float64) / 255.0
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], 1)

    q = Quality(feats, lambda f: float(np.abs(f.mean(0)).sum()), "fake")
    spec = grid.parse_grid_args(profiles=str(tiny_profile), budgets="2s", samplers="ddim", quality="0.9",
                                methods="uniform", seeds=1, samples=2, batch=1, artifact=str(tiny_artifact),
                                controller="none", teacher_steps=4)
    out = tmp_path / "micro"
    logged: list[str] = []
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # `import matplotlib` fails
    runner.run_grid(spec, out, quality=q, progress=False, log=logged.append)
    written = {p.name for p in out.glob("*.png")}
    summary_md = (out / "summary.md").read_text()
    for plot in ("success_vs_budget_", "fid_vs_budget_", "latency_hist_", "utilisation.png", "examples.png"):
        assert plot not in summary_md or any(w.startswith(plot) for w in written), plot
    assert json.loads((out / "summary.json").read_text())["plots"] == sorted(written) == []
    notes = [s for s in logged if "matplotlib is not installed" in s]
    assert len(notes) == 1 and "pip install matplotlib" in notes[0], logged
    assert "pip install matplotlib" in summary_md


# -- 8. profile --out holding a profile of more batches ------------------------------------------------------
def test_profile_out_refuses_to_drop_measured_batches(tiny_artifact, tiny_profile, tmp_path):
    from abcd_edge.formats.profile import load_profile

    target = tmp_path / "p.json"
    shutil.copy(tiny_profile, target)                             # batches 1, 2
    before = target.read_bytes()
    cmd = ["profile", "--artifact", str(tiny_artifact), "--threads", "1", "--power", "none", "--runs", "5",
           "--batch", "1", "--out", str(target)]
    line = _one_line_exit_2(CliRunner().invoke(main, cmd), "--force")
    assert "batch" in line and str(target) in line
    assert target.read_bytes() == before
    # another artifact's profile at --out: refused too
    foreign = json.loads(before)
    foreign["manifest_hash"] = "0" * 64
    target.write_text(json.dumps(foreign))
    _one_line_exit_2(CliRunner().invoke(main, cmd[:-4] + ["--batch", "1,2", "--out", str(target)]), "--force")
    # --force replaces it
    res = CliRunner().invoke(main, cmd + ["--force"])
    assert res.exit_code == 0, res.output
    assert [bp.batch for bp in load_profile(target).batches] == [1]
