import json

import numpy as np
import pytest

from abcd_edge.core.samplers import SAMPLER_NAMES
from abcd_edge.errors import UserError
from abcd_edge.formats.profile import SCHEMA_VERSION, DeviceProfile, LatencyStats, load_profile
from abcd_edge.profiling.measure import measure_profile


def test_latency_stats_known_samples():
    s = LatencyStats.from_samples(list(range(1, 101)))
    assert s.n == 100 and s.min_ms == 1 and s.max_ms == 100
    assert s.p50_ms == pytest.approx(50.5) and s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.cv == pytest.approx(np.std(np.arange(1, 101)) / 50.5)
    assert len(s.samples_ms) == 100


def test_measured_profile_fields(tiny_profile, tiny_artifact):
    from abcd_edge.formats.manifest import load_manifest, manifest_hash

    prof = load_profile(tiny_profile, manifest_hash(tiny_artifact))
    assert prof.schema_version == SCHEMA_VERSION and prof.backend == "ort-cpu" and prof.threads == 1
    assert "-1t" in prof.device_id and prof.host not in prof.device_id
    b1 = prof.for_batch(1)
    assert b1.step.n == 40 and 0 < b1.step.min_ms <= b1.step.p50_ms <= b1.step.p99_ms <= b1.step.max_ms
    assert b1.flops_per_step == load_manifest(tiny_artifact).flops_per_step
    assert b1.flops_per_s == pytest.approx(b1.flops_per_step / (b1.step.p50_ms / 1e3))
    assert set(b1.sampler_ms) == set(SAMPLER_NAMES)
    assert prof.power.meter == "none" and b1.energy_per_step_mj is None     # no meter: no invented figure
    assert prof.controller_decision.p50_ms > 0


def test_roundtrip_and_validation(tiny_profile, tmp_path):
    data = json.loads(tiny_profile.read_text())
    again = DeviceProfile.from_json(json.loads(json.dumps(DeviceProfile.from_json(data).to_json())))
    assert again.to_json() == DeviceProfile.from_json(data).to_json()

    def refused(mutate, match):
        d = json.loads(tiny_profile.read_text())
        mutate(d)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(UserError, match=match):
            load_profile(p)

    refused(lambda d: d.pop("device_id"), "missing field 'device_id'")
    refused(lambda d: d["batches"][0]["step"].__setitem__("p99_ms", "fast"), r"batches\[0\]\.step\.p99_ms")
    refused(lambda d: d.__setitem__("schema_version", 99), "schema_version 99")
    p = tmp_path / "junk.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_profile(p)


def test_profile_for_another_artifact_refused(tiny_profile):
    with pytest.raises(UserError, match="another artifact"):
        load_profile(tiny_profile, manifest_hash="0" * 64)


def test_bad_arguments(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="--runs 0"):
        measure_profile(tiny_artifact, runs=0, progress=False)
    with pytest.raises(UserError, match="unknown backend"):
        measure_profile(tiny_artifact, backend="tpu", runs=5, progress=False)
    with pytest.raises(UserError):
        measure_profile(tmp_path / "missing", runs=5, progress=False)
