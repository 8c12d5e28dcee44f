"""benchmarks/bench_amg_cost.py cannot rot: a tiny-width run of the SAO 1.0 layout times every part,
and the meta-device count that projects the graph to the full window agrees with the bytes measured
on the real tensors at the bench's own window (the projection's only check before a GPU runs it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_amg_cost  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.slow  # ~2 min on the shared 2-core CPU: CLAP's 10 s window, forward and backward, many times
def test_tiny_run_times_every_part_and_the_meta_count_matches(tmp_path, one_thread):
    out = tmp_path / "results.jsonl"
    argv = ["--tiny", "--frames", "4", "--batches", "1", "2", "--reps", "1", "--index-size", "64"]
    assert bench_amg_cost.main([*argv, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["bench"] == "amg_cost" and [r["batch"] for r in rec["rows"]] == [1, 2]
    for row in rec["rows"]:
        assert set(row["s"]) == set(bench_amg_cost.PARTS) and all(v >= 0 for v in row["s"].values())
        mem = row["bytes"]
        assert 0 < mem["graph_detector"] <= mem["graph"]
    ac = rec["rows"][0]["bytes"]["bf16_autocast"]  # measured at the first batch size only
    assert 0 < ac["graph_detector"] <= ac["graph"]
    b1, b2 = (r["bytes"]["graph"] for r in rec["rows"])
    assert b1 < b2 <= 2 * b1  # a second row adds its own graph, nothing more than the first's
    short, full = (rec["projection"]["float32"][str(f)] for f in (4, bench_amg_cost.FULL_FRAMES))
    # the meta count of one row at the bench's window against the measured one: the same ops on the
    # same shapes, except what the projection leaves out (the detector's repeat-fill of CLAP's window)
    measured = rec["rows"][0]["bytes"]["graph"]
    assert abs(short["graph"]["bytes"] - measured) <= 0.05 * measured
    assert full["graph"]["bytes"] > short["graph"]["bytes"]  # more frames, a larger graph
    assert full["cfg"]["flops"] > short["cfg"]["flops"] > 0
    bf16 = rec["projection"]["bfloat16"][str(bench_amg_cost.FULL_FRAMES)]["graph"]["bytes"]
    assert 0.4 * full["graph"]["bytes"] <= bf16 <= 0.6 * full["graph"]["bytes"]  # half the bytes a value
    assert rec["projection"]["bf16_autocast_full"]["bytes"] > 0
    table = bench_amg_cost.report(out)  # the RESULTS.md tables of that record
    assert all(f"| {k} |" in table for k in bench_amg_cost.PARTS) and "bf16 autocast (estimate)" in table
