"""Manifest validation: a bad manifest is refused by name, a bad row becomes an error row."""

import math

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
