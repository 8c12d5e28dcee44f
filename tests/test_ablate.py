"""`amg ablate`: the rows switch the right guidance terms, a small run produces the table, and its
attribute-adherence, retained-share and held-out FAD/KAD columns equal their per-row definitions."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from amg_engine.engine.config import PRESETS
from amg_engine.engine.default.attributes import ATTRIBUTES
from amg_engine.engine.default.heldout import HELDOUT_INDEX_DIR
from amg_engine.engine.models import DEFAULT_MODEL_DIR
from amg_engine.index.distances import Moments, fad, kad
from amg_engine.index.store import EmbeddingIndex
from amg_engine.jobs.ablate import (
    AMBIENT_ROWS,
    ATTRIBUTE_COLUMNS,
    FLOW_ROWS,
    PROMPT_SETS,
    ROWS,
    Row,
    add_retained,
    family_adherence,
    format_table,
    row_config,
    run_ablation,
    slug,
)


def test_rows_follow_the_papers_table_layout():
    names = [r.name for r in ROWS]
    assert names[0] == "baseline" and names[-1] == "full AMG" and len(ROWS) == 8
    on = {r.name: (r.c1, r.c2, r.c3) for r in ROWS if r.amg}
    assert sorted(on.values()) == sorted(
        {(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)} - {(0, 0, 0)}
    )


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_row_config_switches_exactly_the_rows_terms(row):
    base, cfg = PRESETS["default-model"].guidance, row_config(row).guidance
    assert cfg.amg == row.amg
    for name in ("c1", "c2", "c3"):
        assert getattr(cfg, name) == (getattr(base, name) if getattr(row, name) else 0.0)
    assert (cfg.cfg_scale, cfg.lambda_min, cfg.lambda_max) == (
        base.cfg_scale,
        base.lambda_min,
        base.lambda_max,
    )


def test_family_adherence_counts_ok_rows_only():
    prompts = [
        "An acoustic drum loop, 90 bpm",
        "A warm synth pad playing a C major chord",
        "Wind howling outside",
    ]
    nearest = ["Dusty vinyl loop with drums", "A marimba arpeggio in A minor, 100 bpm", None]
    assert family_adherence(prompts, nearest, ["ok", "ok", "error"]) == 0.5


def _estimators(headline=("tempo", "pitch")):
    """A stand-in for estimator_accuracy() (measured in tests/test_attributes.py), with the instrument
    estimator left out of the headline so that the pooled column must leave it out too."""
    one = {"n": 1, "hits": 1, "accuracy": 1.0, "misses": []}
    return {"training": {a: one for a in ATTRIBUTES}, "heldout": {a: one for a in ATTRIBUTES},
            "headline": list(headline)}  # fmt: skip


@pytest.mark.slow
def test_small_ablation_writes_the_table(tmp_path):
    rows = (ROWS[0], ROWS[-1])
    # the default model stands in for an ambient one: this checks the plumbing of the extra rows
    table = run_ablation(tmp_path, rows=rows, ambient=DEFAULT_MODEL_DIR, limit=3, steps=6, progress=False,
                         extra_models={"control": DEFAULT_MODEL_DIR}, estimators=_estimators())  # fmt: skip
    names = ["baseline", "full AMG", *(r.name for r in AMBIENT_ROWS), "control model", "control + AMG"]
    assert [(r["prompts"], r["row"]) for r in table] == [(b.name, n) for b in PROMPT_SETS for n in names]
    # under the gate n counts the released clips only; FAD and KAD need two of them
    audited = [r for r in table if r["n"] >= 2]
    for r in table:
        assert r["n"] == (round(3 * r["released"]) if "gate" in r["row"] else 3)
        if r["n"]:  # (a gate row that released nothing has no audit: its figures are None)
            assert -1 <= r["mean"] <= r["p95"] <= r["max"] <= 1.0001
            assert 0 <= r["share_replica"] <= 1 and 0 <= r["family_adherence"] <= 1
    for r in audited:
        assert r["kad"] is not None and r["fad_heldout"] is not None and r["kad_heldout"] is not None
    k = len(names)
    for block in (table[:k], table[k:]):
        # same model, same prompts and seeds, no AMG: the ambient-model stand-in reproduces the baseline
        assert block[2]["mean"] == pytest.approx(block[0]["mean"], abs=1e-6)
        assert block[6]["mean"] == pytest.approx(block[0]["mean"], abs=1e-6)
        assert block[7]["mean"] == pytest.approx(block[1]["mean"], abs=1e-6)
        for r in block:  # without a gate every ok row is released, at one generation each
            if "gate" not in r["row"]:
                assert (r["released"], r["rejected"], r["gens_per_released"]) == (1.0, 0.0, 1.0)
        for r in block[4:6]:  # under the gate: no released clip at or above τ, by the audit's own measure
            assert r["released"] + r["rejected"] == 1.0 and r["gens_per_released"] >= 1.0
            assert r["n"] == 0 or r["max"] < 0.9
    saved = pq.read_table(tmp_path / "ablation.parquet").to_pylist()
    assert [r["row"] for r in saved] == [r["row"] for r in table]
    md = (tmp_path / "ablation.md").read_text()
    assert md.startswith("| prompts | row |") and format_table(table) in md
    assert md.split("\n\n")[0].count("\n") == len(table) + 1
    assert "instrument estimator" in md and "NOT in `attributes`" in md and "full AMG keeps" in md
    assert (tmp_path / "captions" / "full-amg" / "audit" / "report.html").exists()
    assert json.loads((tmp_path / "estimators.json").read_text())["headline"] == ["tempo", "pitch"]
    for r in audited:
        _check_new_columns(r, tmp_path / r["prompts"] / slug(r["row"]) / "audit", table)


def _check_new_columns(r, audit_dir, table):
    """The row's new columns against their definitions, recomputed from its audit's own files."""
    attrs = pq.read_table(audit_dir / "attributes.parquet").to_pylist()
    ok = [a for a in attrs if a["status"] == "ok"]
    pooled = []
    for name in ATTRIBUTE_COLUMNS:  # share of hits among the outputs whose prompt asked for it
        checks = [a[name] for a in ok if a[name] is not None]
        assert r[name] == (sum(checks) / len(checks) if checks else None), name
        pooled += checks if name in ("tempo", "pitch") else []
    assert r["attributes"] == (sum(pooled) / len(pooled) if pooled else None)
    base = next(b for b in table if b["prompts"] == r["prompts"] and b["row"] == "baseline")
    assert r["retained"] == (r["attributes"] / base["attributes"] if base["attributes"] else None)
    # FAD/KAD to the held-out set: the row's stored output embeddings against the held-out vectors
    heldout = EmbeddingIndex.load(HELDOUT_INDEX_DIR)
    moments = Moments(heldout.embedder.dim)
    parts = sorted((audit_dir / "parts").glob("part-*.safetensors"))
    e = torch.cat([load_file(p)["e"] for p in parts])
    for p in parts:  # the audit folds the parts in this order
        moments.add(load_file(p)["e"])
    # the same float64 sums and matrix functions as the audit: only BLAS thread order can differ
    assert r["fad_heldout"] == pytest.approx(fad(moments, heldout.vectors), rel=1e-9)
    assert r["kad_heldout"] == pytest.approx(kad(e, heldout.vectors), rel=1e-9)


def test_compare_model_flag_needs_name_and_folder(tmp_path, capsys):
    from amg_engine.jobs.cli import main

    assert main(["ablate", "--out", str(tmp_path), "--compare-model", "nofolder"]) == 2
    assert "NAME=MODEL_DIR" in capsys.readouterr().err


def test_row_is_frozen():
    with pytest.raises(AttributeError):
        Row("x").c1 = False  # type: ignore[misc]


def test_retained_is_relative_to_the_baseline_of_the_same_block():
    table = [
        {"prompts": "captions", "row": "baseline", "attributes": 0.8},
        {"prompts": "captions", "row": "full AMG", "attributes": 0.6},
        {"prompts": "novel", "row": "baseline", "attributes": 0.5},
        {"prompts": "novel", "row": "full AMG", "attributes": 0.5},
        {"prompts": "novel", "row": "c1 + c2", "attributes": None},
    ]
    assert [r["retained"] for r in add_retained(table)] == [1.0, 0.6 / 0.8, 1.0, 1.0, None]


def test_an_unknown_row_is_named_and_nothing_is_written(tmp_path, capsys):
    from amg_engine.jobs.cli import main

    out = tmp_path / "ablation"
    assert main(["ablate", "--out", str(out), "--no-ambient", "--rows", "full-amg-gate", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--rows nope: no such row" in err and "baseline-gate" in err and not out.exists()


def test_a_gate_row_that_releases_nothing_is_a_row_of_its_own(tmp_path, monkeypatch):
    """Every prompt rejected (τ just above −1, one attempt): the row has n = 0, no audit figures, all
    rejected, and the table goes on."""
    from amg_engine import jobs
    from amg_engine.jobs.ablate import GATE_ROWS, run_row
    from amg_engine.jobs.replication import caption_manifest

    real = jobs.gate.ReleaseGate
    monkeypatch.setattr(jobs.gate, "ReleaseGate", lambda: real(-0.99, 1))
    manifest = caption_manifest(tmp_path / "captions.parquet")
    pq.write_table(pq.read_table(manifest).slice(0, 2), manifest)
    models = {"default": DEFAULT_MODEL_DIR}
    r = run_row(GATE_ROWS[0], "captions", manifest, tmp_path, models, 3, False, ["tempo"])
    assert (r["n"], r["released"], r["rejected"], r["mean"], r["attributes"]) == (0, 0.0, 1.0, None, None)
    assert r["gens_per_released"] is None and "n/a" in format_table([r])


@pytest.mark.parametrize("row", FLOW_ROWS, ids=lambda r: r.name)
def test_flow_rows_switch_the_flow_presets_terms(row):
    """The flow rows run the default-flow preset (cfg 1, caps down to the unconditional prediction) on
    the bundled flow model, each with its own terms on."""
    base, cfg = PRESETS["default-flow"].guidance, row_config(row).guidance
    assert row.model == "flow" and row.preset == "default-flow" and cfg.amg == row.amg
    for name in ("c1", "c2", "c3"):
        assert getattr(cfg, name) == (getattr(base, name) if getattr(row, name) else 0.0)
    assert (cfg.cfg_scale, cfg.min_scale) == (1.0, 0.0)
    assert row_config(row).sampler == PRESETS["default-flow"].sampler


def test_flow_retained_is_relative_to_the_flow_baseline():
    table = [
        {"prompts": "captions", "row": "baseline", "model": "default", "attributes": 0.8},
        {"prompts": "captions", "row": "flow baseline", "model": "flow", "attributes": 0.5},
        {"prompts": "captions", "row": "flow full AMG", "model": "flow", "attributes": 0.4},
    ]
    assert [r["retained"] for r in add_retained(table)] == [1.0, 1.0, 0.4 / 0.5]


def test_step_profile_averages_the_traces_of_ok_rows(tmp_path):
    import pyarrow as pa

    from amg_engine.jobs.ablate import step_profile

    cols = {"status": ["ok", "ok", "error"], "trace_similarity": [[0.9, 0.5], [0.7, 0.3], []],
            "trace_gate": [[True, False], [True, True], []]}  # fmt: skip
    pq.write_table(pa.table(cols), tmp_path / "r.parquet")
    prof = step_profile(tmp_path / "r.parquet")
    assert prof["sim_by_step"] == pytest.approx([0.8, 0.4]) and prof["gate_by_step"] == [1.0, 0.5]
    cols = {"status": ["ok"], "trace_similarity": [[]], "trace_gate": [[]]}  # AMG off: no traces
    pq.write_table(pa.table(cols), tmp_path / "off.parquet")
    assert step_profile(tmp_path / "off.parquet") == {"sim_by_step": None, "gate_by_step": None}
