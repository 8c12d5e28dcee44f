"""Manifest validation: a bad manifest is refused by name, a bad row becomes an error row."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amg_engine.engine.config import EngineConfig
from amg_engine.jobs.manifest import (
    NEGATIVE_PROMPT_UNSUPPORTED,
    Limits,
    ManifestError,
    Overrides,
    read_manifest,
    validate,
)


def _write(tmp_path, table) -> str:
    path = tmp_path / "m.parquet"
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return path


def test_missing_prompt_column_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"\['prompt'\]"):
        read_manifest(_write(tmp_path, {"id": ["a"], "text": ["x"]}))


def test_not_parquet_is_refused(tmp_path):
    bad = tmp_path / "m.parquet"
    bad.write_text("id,prompt\na,b\n")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(bad)


def test_reserved_and_repeated_column_names_are_refused(tmp_path):
    with pytest.raises(ManifestError, match=r"\['status'\] reserved"):
        read_manifest(_write(tmp_path, {"id": ["a"], "prompt": ["x"], "status": ["y"]}))
    twice = pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array([1])], ["id", "prompt", "id"])
    with pytest.raises(ManifestError, match=r"\['id'\] repeated"):
        read_manifest(_write(tmp_path, twice))


LIMITS = Limits(1.0, EngineConfig(), max_tokens=4, count_tokens=lambda text: len(text.split()))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "a", "prompt": "   "}, "prompt is empty"),
        ({"id": "a", "prompt": ""}, "prompt is empty"),
        ({"id": "a", "prompt": "\t\n"}, "prompt is empty"),
        ({"id": "a", "prompt": None}, "is not text"),
        ({"id": "a", "prompt": 3}, "prompt 3 is not text"),
        ({"id": "a", "prompt": "one two three four five"}, "has 5 tokens but the text encoder reads at"),
        ({"id": "../etc/passwd", "prompt": "x"}, "not a safe file name"),
        ({"id": "..", "prompt": "x"}, "not a safe file name"),
        ({"id": "a/b", "prompt": "x"}, "not a safe file name"),
        ({"id": "a\\b", "prompt": "x"}, "not a safe file name"),
        ({"id": "a\x00", "prompt": "x"}, "not a safe file name"),
        ({"id": "a\nb", "prompt": "x"}, "not a safe file name"),
        ({"id": "clip\n", "prompt": "x"}, "not a safe file name"),  # `$` alone would accept it
        ({"id": "\nclip", "prompt": "x"}, "not a safe file name"),
        ({"id": "a b", "prompt": "x"}, "not a safe file name"),
        ({"id": "", "prompt": "x"}, "not a safe file name"),
        ({"id": "x" * 129, "prompt": "x"}, "not a safe file name"),
        ({"id": 7, "prompt": "x"}, "id 7 is not text"),
        ({"id": "a", "prompt": "x", "seconds": 0.0}, "outside"),
        ({"id": "a", "prompt": "x", "seconds": -0.5}, "outside"),
        ({"id": "a", "prompt": "x", "seconds": 5.0}, "outside (0, 1], the model's window"),
        ({"id": "a", "prompt": "x", "seconds": math.nan}, "seconds nan is not a finite number"),
        ({"id": "a", "prompt": "x", "seconds": math.inf}, "seconds inf is not a finite number"),
        ({"id": "a", "prompt": "x", "seconds": "1"}, "seconds '1' is not a finite number"),
        ({"id": "a", "prompt": "x", "seconds": True}, "seconds True is not a finite number"),
        ({"id": "a", "prompt": "x", "seed": -1}, "not a non-negative integer"),
        ({"id": "a", "prompt": "x", "seed": 1.5}, "seed 1.5 is not a non-negative integer"),
        ({"id": "a", "prompt": "x", "seed": 2**63}, "below 2**63"),
        ({"id": "a", "prompt": "x", "cfg_scale": 0.5}, "cfg_scale=0.5: must be ≥ 1"),
        ({"id": "a", "prompt": "x", "cfg_scale": math.inf}, "cfg_scale inf is not a finite number"),
        ({"id": "a", "prompt": "x", "c1": -1.0}, "c1=-1.0: must be ≥ 0"),
        ({"id": "a", "prompt": "x", "c3": math.nan}, "c3 nan is not a finite number"),
        ({"id": "a", "prompt": "x", "steps": 1}, "steps=1: need 2..10000"),
        ({"id": "a", "prompt": "x", "steps": 2.5}, "steps 2.5 is not an integer"),
        ({"id": "a", "prompt": "x", "steps": "30"}, "steps '30' is not an integer"),
        ({"id": "a", "prompt": "x", "sampler": "bogus"}, "sampler='bogus': choose one of"),
        ({"id": "a", "prompt": "x", "sampler": 2}, "sampler 2 is not text"),
        ({"id": "a", "prompt": "x", "negative_prompt": "loud"}, NEGATIVE_PROMPT_UNSUPPORTED),
        ({"id": "a", "prompt": "x", "negative_prompt": 1}, "negative_prompt 1 is not text"),
    ],
)  # fmt: skip
def test_bad_rows_get_a_named_error(row, message):
    good = {"id": "ok", "prompt": "a drum loop"}
    rows = validate([good, row], LIMITS)
    assert rows[0].error is None
    assert rows[1].error is not None and message in rows[1].error and rows[1].error.startswith("row 1:")
    assert rows[1].seconds is None and rows[1].seed is None


def test_duplicate_ids_keep_the_first_also_ignoring_case():
    rows = validate([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}, {"id": "A", "prompt": "z"}], 1.0)
    assert rows[0].error is None
    assert "duplicate id 'a'; row 0 keeps it" in rows[1].error
    assert "duplicate id 'A' ('a' differs only in case)" in rows[2].error


def test_a_bad_first_use_does_not_claim_the_id():
    rows = validate([{"id": "a", "prompt": ""}, {"id": "a", "prompt": "y"}], 1.0)
    assert "prompt is empty" in rows[0].error and rows[1].error is None


def test_defaults_are_reproducible():
    a, b = validate([{"id": "a", "prompt": "x"}], 1.0)[0], validate([{"id": "a", "prompt": "x"}], 1.0)[0]
    assert a.seed == b.seed and a.seconds == 1.0


def test_overrides_are_parsed_and_applied():
    row = {"id": "a", "prompt": "x", "cfg_scale": 2, "steps": 12.0, "sampler": "euler", "c1": 0.0,
           "c2": None, "c3": 5, "negative_prompt": ""}  # fmt: skip
    (r,) = validate([row], LIMITS)
    assert r.error is None
    assert r.overrides == Overrides(
        cfg_scale=2.0, steps=12, sampler="euler", c1=0.0, c3=5.0, negative_prompt=""
    )
    cfg = r.config(EngineConfig())
    assert (cfg.guidance.cfg_scale, cfg.guidance.c1, cfg.guidance.c2, cfg.guidance.c3) == (2.0, 0.0, 6.0, 5.0)
    assert (cfg.sampler.steps, cfg.sampler.sampler) == (12, "euler")
    assert cfg.config_hash() != EngineConfig().config_hash()
    (plain,) = validate([{"id": "a", "prompt": "x", "negative_prompt": None}], LIMITS)
    assert plain.overrides == Overrides() and plain.config(EngineConfig()) == EngineConfig()


def test_token_limit_is_skipped_without_a_tokenizer():
    long = {"id": "a", "prompt": "one two three four five"}
    assert validate([long], Limits(1.0, EngineConfig()))[0].error is None


# Every numeric type a Parquet writer may choose (DuckDB writes ``0.5 + 0.5 * x`` as DECIMAL(22,1), and
# DECIMALs of precision ≤ 18 as INT32/INT64 with a decimal annotation: store_decimal_as_integer).
NUMERIC_TYPES = [
    pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(),
    pa.float16(), pa.float32(), pa.float64(),
    pa.decimal128(3, 0), pa.decimal128(9, 1), pa.decimal128(22, 1), pa.decimal128(38, 10),
    pa.decimal256(40, 2),
]  # fmt: skip


def _holds_fractions(typ: pa.DataType) -> bool:
    return pa.types.is_floating(typ) or (pa.types.is_decimal(typ) and typ.scale > 0)


def _column(values: list, typ: pa.DataType) -> pa.Array:
    """``values`` as a column of type ``typ``, built the way a writer holding that type would."""
    import decimal

    if pa.types.is_decimal(typ):
        return pa.array([None if v is None else decimal.Decimal(str(v)) for v in values], typ)
    if pa.types.is_float16(typ):
        nulls = np.array([v is None for v in values])
        return pa.array(np.array([0 if v is None else v for v in values], np.float16), typ, mask=nulls)
    return pa.array(values, typ)


@pytest.mark.parametrize("as_integer", [False, True], ids=["plain", "decimal-as-int"])
@pytest.mark.parametrize("typ", NUMERIC_TYPES, ids=str)
def test_every_arrow_numeric_type_is_read_by_its_value(tmp_path, typ, as_integer):
    """A valid value is valid in any numeric type (each value below is exact in every type it is
    written in); only the value decides."""
    whole = {"seconds": 1, "seed": 7, "steps": 30, "cfg_scale": 3, "c1": 0, "c3": 20}
    part = {**whole, "seconds": 0.5, "cfg_scale": 2.5, "c3": 0.5} if _holds_fractions(typ) else whole
    table = pa.table({"id": ["a", "b"], "prompt": ["x", "y"],
                      **{k: _column([whole[k], part[k]], typ) for k in whole}})  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet", store_decimal_as_integer=as_integer)
    read = read_manifest(tmp_path / "m.parquet")
    assert read.schema.field("seconds").type == typ
    for r, want in zip(validate(read.to_pylist(), LIMITS), (whole, part), strict=True):
        assert r.error is None, r.error
        assert r.seconds == want["seconds"] and type(r.seconds) is float
        assert r.seed == 7 and type(r.seed) is int
        ov = r.overrides
        assert (ov.steps, ov.cfg_scale, ov.c1, ov.c3) == (30, want["cfg_scale"], 0, want["c3"])
        assert type(ov.steps) is int and all(type(v) is float for v in (ov.cfg_scale, ov.c1, ov.c3))
        assert r.config_hash(EngineConfig()) is not None


@pytest.mark.parametrize(
    ("column", "value", "typ", "message"),
    [
        ("seed", "1.5", pa.decimal128(22, 1), "seed 1.5 (decimal128(22, 1)) is not a non-negative integer"),
        ("steps", "2.50", pa.decimal256(40, 2), "steps 2.50 (decimal256(40, 2)) is not an integer"),
        ("seconds", "2.0", pa.decimal128(22, 1), "seconds 2 is outside (0, 1]"),
        ("seconds", math.nan, pa.float16(), "seconds nan (halffloat) is not a finite number"),
        ("cfg_scale", math.inf, pa.float32(), "cfg_scale inf (float) is not a finite number"),
        ("seed", 2**64 - 1, pa.uint64(), "seed 18446744073709551615 is not a non-negative integer below"),
        ("seconds", 0, pa.uint8(), "seconds 0 is outside (0, 1]"),
        ("seconds", math.nan, pa.float64(), "seconds nan is not a finite number"),  # double: no type named
        ("steps", 2.5, pa.float64(), "steps 2.5 is not an integer"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_by_its_value_and_named_with_its_type(tmp_path, column, value, typ, message):
    table = pa.table({"id": ["ok", "bad"], "prompt": ["x", "y"], column: _column([None, value], typ)})
    pq.write_table(table, tmp_path / "m.parquet")
    read = read_manifest(tmp_path / "m.parquet")
    ok, bad = validate(read.to_pylist(), LIMITS, read.schema)
    assert ok.error is None and bad.error.startswith(f"row 1: {message}"), bad.error


def test_a_manifest_written_by_pandas_is_read_by_its_values(tmp_path):
    """pandas' own column types (numpy widths, nullable integers, float16, Python decimals) through
    ``DataFrame.to_parquet``. (pandas writes with pyarrow; DuckDB and polars are not installed here.)"""
    import decimal

    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({
        "id": ["a", "b", "c"], "prompt": ["x", "y", "z"],
        "seconds": np.array([0.5, 1.0, 0.25], np.float16),
        "seed": pd.array([1, None, 2**63 - 1], dtype="UInt64"),
        "steps": np.array([2, 30, 100], np.int8),
        "cfg_scale": [decimal.Decimal("1.5"), None, decimal.Decimal("7")],
        "c3": pd.array([0.5, None, 20.0], dtype="Float32"),
    })  # fmt: skip
    frame.to_parquet(tmp_path / "m.parquet")
    read = read_manifest(tmp_path / "m.parquet")
    rows = validate(read.to_pylist(), LIMITS, read.schema)
    assert [r.error for r in rows] == [None, None, None]
    assert [r.seconds for r in rows] == [0.5, 1.0, 0.25] and rows[2].seed == 2**63 - 1
    assert [r.overrides.steps for r in rows] == [2, 30, 100]
    assert [r.overrides.cfg_scale for r in rows] == [1.5, None, 7.0]
    assert [r.overrides.c3 for r in rows] == [0.5, None, 20.0]


def test_a_duckdb_style_manifest_generates_and_resumes(tmp_path):
    """The manifest DuckDB writes for ``SELECT 0.5 + 0.5 * x AS seconds, ...``: decimal durations and
    scales (one stored as an integer), narrow and unsigned integers. Every valid row generates; a rerun
    reuses them all (the resume key holds the values, not their types); an out-of-range decimal is an
    error row of its own."""
    import decimal

    from jobs_helpers import FakeEngine

    from amg_engine.jobs.generate import JobConfig, run_generate

    d = decimal.Decimal
    table = pa.table({
        "id": ["a", "b", "c"], "prompt": ["x", "y", "z"],
        "seconds": pa.array([d("0.5"), d("1.0"), d("0.3")], pa.decimal128(22, 1)),
        "seed": pa.array([1, 2, 3], pa.uint8()),
        "steps": pa.array([3, 3, 3], pa.int8()),
        "cfg_scale": pa.array([d("3.0"), d("2.5"), d("3.5")], pa.decimal128(9, 1)),
        "c3": pa.array([d("1.25"), d("0.00"), d("2.5")], pa.decimal256(40, 2)),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet", store_decimal_as_integer=True)
    bad = table.set_column(5, "cfg_scale", pa.array([d("3.0"), d("0.5"), d("3.5")], pa.decimal128(9, 1)))
    summary = run_generate(tmp_path / "m.parquet", tmp_path / "out", FakeEngine(), JobConfig(progress=False))
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3 and summary.generated == 3
    assert [r["seconds"] for r in rows] == [0.5, 1.0, 0.3] and [r["seed"] for r in rows] == [1, 2, 3]
    assert [(r["cfg_scale"], r["c3"]) for r in rows] == [(3.0, 1.25), (2.5, 0.0), (3.5, 2.5)]
    again = run_generate(tmp_path / "m.parquet", tmp_path / "out", FakeEngine(), JobConfig(progress=False))
    assert (again.generated, again.reused) == (0, 3)
    pq.write_table(bad, tmp_path / "bad.parquet")
    run_generate(tmp_path / "bad.parquet", tmp_path / "out2", FakeEngine(), JobConfig(progress=False))
    rows = pq.read_table(tmp_path / "out2" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"].startswith("row 1: cfg_scale=0.5: must be ≥ 1")
