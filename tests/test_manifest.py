"""Manifest validation: a bad manifest is refused by name, a bad row becomes an error row."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import ManifestError, read_manifest, validate


def _write(tmp_path, table: dict) -> str:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(table), path)
    return path


def test_missing_prompt_column_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"\['prompt'\]"):
        read_manifest(_write(tmp_path, {"id": ["a"], "text": ["x"]}))


def test_not_parquet_is_refused(tmp_path):
    bad = tmp_path / "m.parquet"
    bad.write_text("id,prompt\na,b\n")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(bad)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "a", "prompt": "   "}, "prompt is empty"),
        ({"id": "a", "prompt": ""}, "prompt is empty"),
        ({"id": "a", "prompt": None}, "is not text"),
        ({"id": "../etc/passwd", "prompt": "x"}, "not a safe file name"),
        ({"id": "a/b", "prompt": "x"}, "not a safe file name"),
        ({"id": "a\x00", "prompt": "x"}, "not a safe file name"),
        ({"id": "a", "prompt": "x", "seconds": 0.0}, "outside"),
        ({"id": "a", "prompt": "x", "seconds": 5.0}, "outside"),
        ({"id": "a", "prompt": "x", "seconds": math.nan}, "not a finite number"),
        ({"id": "a", "prompt": "x", "seed": -1}, "not a non-negative integer"),
    ],
)
def test_bad_rows_get_a_named_error(row, message):
    good = {"id": "ok", "prompt": "a drum loop"}
    rows = validate([good, row], max_seconds=1.0)
    assert rows[0].error is None
    assert rows[1].error is not None and message in rows[1].error and rows[1].error.startswith("row 1:")


def test_duplicate_ids_keep_the_first():
    rows = validate([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], max_seconds=1.0)
    assert rows[0].error is None and "duplicate id" in rows[1].error


def test_defaults_are_reproducible():
    a, b = validate([{"id": "a", "prompt": "x"}], 1.0)[0], validate([{"id": "a", "prompt": "x"}], 1.0)[0]
    assert a.seed == b.seed and a.seconds == 1.0
