import math

import pytest
from hypothesis import given, strategies as st

from abcd_edge.core.budget import Budget, context_vector, parse_budget
from abcd_edge.errors import UserError


@pytest.mark.parametrize("text,kind,value", [
    ("150ms", "latency", 150.0), ("0.15s", "latency", 150.0), ("1s", "latency", 1000.0),
    ("500us", "latency", 0.5), ("2J", "energy", 2000.0), ("500mJ", "energy", 500.0), (" 20 ms ", "latency", 20.0),
    ("1e2ms", "latency", 100.0),
])
def test_parse_good(text, kind, value):
    b = parse_budget(text)
    assert b == Budget(kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["150", "-5ms", "abc", "0ms", "inf", "infms", "nanms", "", "5 kg", "1e999s", "ms"])
def test_parse_bad_names_value_and_forms(text):
    with pytest.raises(UserError) as e:
        parse_budget(text)
    msg = str(e.value)
    assert repr(text) in msg and "ms" in msg and "J" in msg
    assert "\n" not in msg


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
       st.sampled_from(["us", "ms", "s", "mJ", "J"]))
def test_parse_roundtrip_property(x, unit):
    b = parse_budget(f"{x!r}{unit}")
    scale = {"us": 1e-3, "ms": 1, "s": 1e3, "mJ": 1, "J": 1e3}[unit]
    assert b.value == pytest.approx(x * scale)
    assert b.kind == ("energy" if unit in ("mJ", "J") else "latency")


@given(st.text(max_size=12))
def test_parse_never_crashes(text):
    try:
        b = parse_budget(text)
    except UserError:
        return
    assert b.value > 0 and math.isfinite(b.value)


def test_context_vector():
    c = context_vector(150.0, 1e9, 0.5)
    assert c == [pytest.approx(math.log(150.0)), pytest.approx(math.log(1e9)), 0.5]
    with pytest.raises(UserError):
        context_vector(150.0, 1e9, 1.5)
