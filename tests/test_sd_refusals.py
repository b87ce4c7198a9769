"""The verbs that take only pixel-space artifacts refuse a pipeline artifact (issue 15): `bench-runtime` and
`bench-schedules` each say in one line what they support, exit 2, before any work (the library entry points they
would call are replaced by tripwires here, and nothing is written). `calibrate` and `bench` take pipeline artifacts
(tests/test_sd_calibrate_bench.py)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from abcd_edge import paths
from abcd_edge.cli.main import main
from abcd_edge.cli.options import PIPELINE_NOT_YET, pixel_artifact_only


def _tripwire(*args, **kwargs):
    raise AssertionError("the verb started work on a pipeline artifact")


VERBS = {
    "bench-runtime": (["--out", "{tmp}/runtime", "--budgets", "1s", "--requests", "1"],
                      "abcd_edge.bench.runtime_bench.run_runtime_bench"),
    "bench-schedules": (["--out", "{tmp}/schedule_fid.json", "--samples", "4"],
                        "abcd_edge.bench.schedule_fid.schedule_fid_table"),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_pixel_only_verbs_refuse_a_pipeline_artifact(verb, tiny_sd_artifact, tmp_path, monkeypatch):
    extra, entry = VERBS[verb]
    monkeypatch.setattr(entry, _tripwire)
    res = CliRunner().invoke(main, [verb, "--artifact", str(tiny_sd_artifact)]
                             + [a.format(tmp=tmp_path) for a in extra])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    line = lines[0]
    assert line.startswith(f"abcd-edge: error: {verb}: artifact ") and "is a text-to-image pipeline" in line
    assert f"`abcd-edge {verb}` supports pixel-space artifacts (denoiser.onnx) only" in line
    assert PIPELINE_NOT_YET[verb] in line and "`abcd-edge run` take pipeline artifacts" in line
    assert not list(tmp_path.iterdir())                       # nothing written


def test_pixel_artifacts_and_unreadable_folders_pass_the_check(tmp_path):
    assert pixel_artifact_only(paths.DEMO_ARTIFACT_DIR, "bench-runtime") is None  # the committed demo (pixel)
    assert pixel_artifact_only(None, "bench-schedules") is None                    # the verb's default
    assert pixel_artifact_only(tmp_path / "missing", "bench-runtime") is None     # the verb names what is wrong
    (tmp_path / "manifest.json").write_text("{not json")
    assert pixel_artifact_only(tmp_path, "bench-schedules") is None


def test_every_refusing_verb_has_its_reason():
    assert set(PIPELINE_NOT_YET) == set(VERBS)
