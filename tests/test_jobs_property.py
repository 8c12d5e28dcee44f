"""Malformed manifests never crash a run, and every input row yields exactly one result row.

Hypothesis draws manifests column by column (a Parquet column has one type, so a wrongly typed
value means a wrongly typed column): good and bad ids, prompts, durations, seeds and per-row
overrides, optional columns present or not, extra columns of several types. The fast fake engine
runs them (some rows fail, some batches raise); one hand-written malformed manifest also runs on
the real tiny engine.
"""

import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jobs_helpers import FakeEngine, fast_config, tiny_assets, write_manifest

from amg_engine.jobs.generate import JobConfig, run_generate

BAD_IDS = ["", " ", "../up", "a/b", "a\\b", "a\x00", "a\nb", "a\n", ".hidden", "é", "a" * 129, "R1"]
PROMPTS = ["a drum loop", "Wind howling outside", "ünïcode ✓"]
BAD_PROMPTS = ["", "   ", "\t", " ".join(["word"] * 20)]
SECONDS = [0.5, 1.0, 1.024, None]
BAD_SECONDS = [0.0, -1.0, 5.0, math.nan, math.inf, -math.inf, 1e300]


def _mostly(good: list, bad: list):
    """Nine good values to one bad, so that most manifests have rows that run (hypothesis favours the
    ends of a range, so the bad branch sits in the middle)."""
    return st.integers(0, 9).flatmap(lambda k: st.sampled_from(bad if k == 4 else good))


def _column(n: int, right, *wrong):
    """One column of n values: of the right type (seven times in eight), or all of one wrong type."""
    kind = st.integers(0, 7).flatmap(lambda k: st.sampled_from(wrong) if k == 4 and wrong else st.just(right))
    return kind.flatmap(lambda k: st.lists(k, min_size=n, max_size=n))


@st.composite
def manifests(draw):
    n = draw(st.integers(0, 10))
    good_id = st.integers(0, 30).map(lambda k: f"r{k}")  # repeats make duplicates, "R1" one by case
    cols = {
        "id": draw(
            _column(n, st.one_of(good_id, good_id, good_id, st.sampled_from(BAD_IDS)), st.integers(0, 3))
        ),
        "prompt": draw(_column(n, _mostly(PROMPTS, BAD_PROMPTS + [None]), st.integers(0, 3))),
    }
    optional = {
        "seconds": (_mostly(SECONDS, BAD_SECONDS), st.sampled_from(["1", "x"])),
        "seed": (
            _mostly([0, 7, 2**63 - 1, None], [-1]),
            st.sampled_from([1.5, 3.0, math.nan]),
            st.booleans(),
        ),
        "negative_prompt": (_mostly(["", None], ["loud", " "]),),
        "cfg_scale": (_mostly([1.0, 3.0, None], [0.5, math.nan]),),
        "steps": (_mostly([2, 3, None], [1, 20000]), st.sampled_from([2.5, 3.0])),
        "sampler": (_mostly(["dpmpp-2m", "euler", None], ["bogus"]), st.integers(0, 2)),
        "c1": (_mostly([0.0, 2.0, None], [-1.0, math.inf]),),
        "c3": (_mostly([0.0, 10.0, None], [-5.0]),),
        "notes": (
            st.text(max_size=5),
            st.integers(-(2**63), 2**63 - 1),
            st.lists(st.integers(0, 9), max_size=2),
        ),
        "weird name!": (st.one_of(st.none(), st.floats(allow_nan=True)),),
    }
    for name, (right, *wrong) in optional.items():
        if draw(st.booleans()):
            cols[name] = draw(_column(n, right, *wrong))
    ids = [i for i in cols["id"] if isinstance(i, str)] or ["r0"]
    fail = draw(st.sets(st.sampled_from(ids), max_size=2))
    raise_on = draw(st.sets(st.sampled_from(ids), max_size=1))
    return cols, fail, raise_on


def _check_results(res: pa.Table, n: int, out: Path) -> None:
    rows = res.to_pylist()
    assert [r["row"] for r in rows] == list(range(n))  # exactly one result per input row, in order
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["status"] in ("ok", "error") for r in rows)
    for r in rows:
        if r["status"] == "error":
            assert r["error"].startswith(f"row {r['row']}: ") and r["audio_path"] is None
    ids = [r["id"].casefold() for r in ok]
    assert len(ids) == len(set(ids))
    for r in ok:
        assert r["error"] is None and r["prompt"].strip() and 0 < r["seconds"] <= 8192 / 8000
        assert sf.info(out / r["audio_path"]).frames == round(r["seconds"] * 8000)
    files = {p.name for p in (out / "audio").iterdir()}
    assert files == {Path(r["audio_path"]).name for r in ok}  # no stray or temporary files
    assert list(out.rglob("*.tmp")) == []


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_malformed_manifests_yield_one_result_per_row(case):
    cols, fail, raise_on = case
    n = len(cols["id"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        m = tmp / "m.parquet"
        pq.write_table(pa.table(cols), m)
        engine = FakeEngine(fail_ids=fail, raise_on=raise_on)
        run_generate(m, tmp / "out", engine, JobConfig(progress=False))
        res = pq.read_table(tmp / "out" / "results.parquet")
        _check_results(res, n, tmp / "out")
        event(
            f"ok rows: {min(res['status'].to_pylist().count('ok'), 3)}+"
        )  # see --hypothesis-show-statistics
        # a rerun with a healthy engine retries exactly the rows the engine failed, and nothing else
        failed = {r["id"] for r in res.to_pylist() if r["status"] == "error" and r["timing"] is not None}
        again = FakeEngine()
        run_generate(m, tmp / "out", again, JobConfig(progress=False, retry_failed=True))
        assert {i for call in again.calls for i in call} == failed
        _check_results(pq.read_table(tmp / "out" / "results.parquet"), n, tmp / "out")


@pytest.mark.slow
def test_a_malformed_manifest_on_the_real_tiny_engine(tmp_path, tmp_path_factory):
    from amg_engine.engine.engine import Engine

    root = tiny_assets(tmp_path_factory)
    engine = Engine(fast_config(), root / "model", root / "index")
    m = write_manifest(tmp_path / "m.parquet", {
        "id": ["a", "b", "a", "../c", "d", "e", "f", "g"],
        "prompt": ["Wind howling outside", "An acoustic drum loop, 90 bpm", "x", "x", "   ",
                   " ".join(["drum"] * 17), "Rain falling on a window", "Rain falling on a window"],
        "seconds": [0.5, None, 0.5, 0.5, 0.5, 0.5, math.nan, 0.75],
        "c1": [None, 0.0, None, None, None, None, None, None],
        "notes": list("abcdefgh"),
    })  # fmt: skip
    run_generate(m, tmp_path / "out", engine, JobConfig(progress=False))
    res = pq.read_table(tmp_path / "out" / "results.parquet")
    _check_results(res, 8, tmp_path / "out")
    assert res["status"].to_pylist() == ["ok", "ok", "error", "error", "error", "error", "error", "ok"]
    assert "prompt has 17 tokens but the text encoder reads at most 16" in res["error"][5].as_py()
    for r in res.filter(pa.compute.equal(res["status"], "ok")).to_pylist():
        assert len(r["trace_similarity"]) == 3 and r["neighbour_id"] in engine.index.ids
        assert set(r["trace_neighbour_id"]) <= set(engine.index.ids) and -1 <= r["final_similarity"] <= 1
    assert res["config_hash"][1].as_py() != res["config_hash"][0].as_py()  # the row's own c1
