"""Record validation by type (issue 34, class 2), as a property: LLaVA JSON records whose fields take every JSON
type (nested too), unicode, control characters and huge values, mixed with good records, load without raising
anything; each bad record is skipped with its id and a reason, and every good record is kept as written."""

from __future__ import annotations

import json

from conftest import GOOD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.data.formats import BadSample, hf_record_messages, llava_json

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ROLE = st.sampled_from(["human", "gpt", "user", "assistant", "system"]) | JSON
TURN = st.fixed_dictionaries({"from": ROLE, "value": st.text(max_size=40) | JSON}) | JSON
RECORD = (
    st.fixed_dictionaries(
        {},
        optional={"id": JSON, "image": st.text(max_size=20) | JSON, "conversations": st.lists(TURN, max_size=4) | JSON},
    )
    | JSON
)
GOOD_RECORDS = [{"id": f"good{i}", "image": "a.png", "conversations": GOOD} for i in range(3)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(RECORD, max_size=8))
def test_any_record_is_loaded_or_skipped_with_a_reason(tmp_path, bad):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([*GOOD_RECORDS, *bad]))
    ds = llava_json(path, tmp_path)  # must not raise: a bad record is a skip, never a stop
    kept = {s.id for s in ds.samples}
    assert {r["id"] for r in GOOD_RECORDS} <= kept
    seen = kept | {s["id"] for s in ds.skipped}  # (skips are recorded once per id)
    for n, rec in enumerate(bad, start=len(GOOD_RECORDS)):  # each record is kept or skipped under its id
        assert (str(rec.get("id", f"#{n}")) if isinstance(rec, dict) else f"#{n}") in seen
    assert all(isinstance(s["reason"], str) and s["reason"] for s in ds.skipped)
    for s in ds.samples:
        assert all(isinstance(m["content"], str) and isinstance(m["role"], str) for m in s.messages)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=10), JSON, max_size=3) | st.fixed_dictionaries({"messages": JSON}))
def test_any_hf_record_parses_or_is_a_bad_sample(record):
    try:
        messages, _ = hf_record_messages(record)
    except BadSample:
        return
    assert all(isinstance(m["content"], str) and m["role"] in ("user", "assistant", "system") for m in messages)
