"""Deployable as users install it: content-addressed artifacts, bundles, results that travel between clones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from abcd_edge import paths
from abcd_edge.cli.main import main
from abcd_edge.formats.manifest import load_manifest, manifest_hash


def test_reexport_gives_the_same_hash(tiny_model_dir, tiny_artifact, tmp_path):
    """Re-exporting the same model (to another folder, at another time) keeps the content hash, so the
    profiles and controllers tied to the first export still match; changing what it computes changes it."""
    from abcd_edge.export import export_model

    again = tmp_path / "again"
    export_model(str(tiny_model_dir), again, batches=(1, 2), progress=False, threads=1)
    first, second = load_manifest(tiny_artifact), load_manifest(again)
    assert (first.name, first.created_utc) != (second.name, second.created_utc)
    assert manifest_hash(again) == manifest_hash(tiny_artifact)

    text = json.loads((again / "manifest.json").read_text())
    text["scheduler_config"]["beta_end"] = 0.03
    (again / "manifest.json").write_text(json.dumps(text))
    assert manifest_hash(again) != manifest_hash(tiny_artifact)


def test_committed_profiles_and_controller_match_the_committed_artifact():
    from abcd_edge.formats.controller import Controller
    from abcd_edge.formats.profile import load_profile

    mhash = manifest_hash(paths.EXPORT_DIR / "demo")
    for name in ("cpu-1t.json", "cpu-2t.json"):
        load_profile(paths.PROFILES_DIR / name, mhash)
    Controller.load(paths.CALIBRATION_DIR / "demo", mhash)


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_bundle_runs_on_its_own(tiny_artifact, fixed_profile, calibrated, tmp_path):
    """`abcd-edge bundle` then `run --bundle`: the profile and controller come from inside the bundle."""
    folder, _ = calibrated
    bundle = tmp_path / "somewhere" / "tiny-bundle"
    res = _run(["bundle", "--artifact", str(tiny_artifact), "--profile", str(fixed_profile), "--controller",
                str(folder), "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (bundle / "profiles").iterdir()) == [fixed_profile.name]
    assert (bundle / "controller" / "controller.json").is_file()
    moved = tmp_path / "copied"                       # as `scp -r` would: the folder alone
    shutil.copytree(bundle, moved)
    report = tmp_path / "r.json"
    res = _run(["run", "--bundle", str(moved), "--budget", "40ms", "--threads", "1", "--out",
                str(tmp_path / "r.png"), "--report", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert Path(rep["profile"]).parent == moved / "profiles"
    assert rep["controller"] == str(moved / "controller")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_bundle_refuses_a_profile_of_another_artifact(tiny_artifact, tmp_path):
    foreign = paths.PROFILES_DIR / "cpu-2t.json"      # measured for the demo artifact
    res = CliRunner().invoke(main, ["bundle", "--artifact", str(tiny_artifact), "--profile", str(foreign),
                                    "--controller", "none", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2
    assert "measured for another artifact" in res.output
    assert not (tmp_path / "b").exists()


def test_bench_configuration_is_the_same_in_any_clone(tmp_path):
    """The bench's saved configuration names files by content and by repository-relative path, so results
    made in one clone resume in another (the key once held absolute paths)."""
    from abcd_edge.bench.grid import parse_grid_args
    from abcd_edge.bench.runner import _config_key
    from abcd_edge.bench.tiers import Tier

    elsewhere = tmp_path / "other-clone" / "profiles"
    elsewhere.mkdir(parents=True)
    shutil.copy(paths.PROFILES_DIR / "cpu-2t.json", elsewhere / "cpu-2t.json")

    def key(profile: Path, artifact: Path) -> str:
        tier = Tier(name="cpu-2t", kind="real", profile_path=paths.portable(profile), device_id="d",
                    backend="ort-cpu", threads=2)
        return _config_key(parse_grid_args("quick", artifact=str(artifact)), [tier], "h", "c")

    here = key(paths.PROFILES_DIR / "cpu-2t.json", paths.EXPORT_DIR / "demo")
    assert paths.portable(paths.PROFILES_DIR / "cpu-2t.json") == "profiles/cpu-2t.json"
    assert key(elsewhere / "cpu-2t.json", tmp_path / "other-clone" / "export" / "demo") == here
    meta = json.loads((paths.REPO_ROOT / "bench" / "quick" / "bench.json").read_text())
    assert str(paths.REPO_ROOT) not in json.dumps(meta)
    assert all(not Path(t["profile_path"]).is_absolute() for t in meta["tiers"])



def test_profile_without_out_writes_into_the_bundle(tiny_artifact, tmp_path):
    """On the device: `abcd-edge profile --bundle X` puts the profile where `run --bundle X` finds it."""
    from abcd_edge.device.hardware import device_id

    bundle = tmp_path / "b"
    assert _run(["bundle", "--artifact", str(tiny_artifact), "--controller", "none", "--out", str(bundle)]).exit_code == 0
    res = _run(["profile", "--bundle", str(bundle), "--threads", "1", "--runs", "20", "--power", "none"])
    assert res.exit_code == 0, res.output
    assert (bundle / "profiles" / f"{device_id('ort-cpu', 1)}.json").is_file()
