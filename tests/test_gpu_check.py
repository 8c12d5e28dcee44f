"""benchmarks/gpu_check.py cannot rot: its dry run (CPU, tiny shapes) runs every section but the two
that need a GPU's minutes, and writes the JSON and the table; the budget logic skips and records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

DRY_RUN_SKIPS = {"plain-bf16-compiled", "kernel-tests"}  # each recorded with its reason


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--budget", "1e9", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_runs_every_section(dry_run):
    doc, _ = dry_run
    sections = doc["sections"]
    failed = {k: v.get("error") for k, v in sections.items() if v["status"] == "error"}
    assert not failed, failed
    assert {k for k, v in sections.items() if v["status"] == "skipped"} == DRY_RUN_SKIPS
    assert all(sections[k]["reason"].startswith("dry run") for k in DRY_RUN_SKIPS)
    for name in ("env", "kernels-nn_search", "kernels-amg_combine", "sao-build", "amg-closed", "amg-open",
                 "published", "invariance", "decode"):  # fmt: skip
        assert sections[name]["status"] == "ok", name
    assert sections["kernels-nn_search"]["ok"] and sections["kernels-amg_combine"]["ok"]


def test_dry_run_measures_what_the_gpu_run_reports(dry_run):
    doc, table = dry_run
    s = doc["sections"]
    for precision in ("bf16", "fp32"):
        for b in (1,):
            r = s[f"plain-{precision}-eager-b{b}"]
            assert r["batch"] == b and r["s_per_step"] > 0 and r["clips_per_hour"] > 0
    assert s["amg-open"]["gate_open_share"] == 1.0 and s["amg-closed"]["gate_open_share"] == 0.0
    assert s["published"]["s_per_step"] > 0
    assert s["invariance"]["batch"] == 2 and s["invariance"]["rel_l2_diff"] >= 0
    assert s["decode"]["bf16_decode_snr_db"] > 0
    assert doc["dit_flops_per_clip_step"] > 0 and doc["sao"]["dit_params"] > 0
    for fig in ("amg_closed_vs_plain", "amg_open_vs_plain", "engine_open_vs_published", "bf16_vs_fp32_b1"):
        assert doc["figures"][fig] > 0, fig
    assert "| run | batch | s/step |" in table and "| amg_open_vs_plain |" in table
    assert all(f"| {name} |" in table for name in s)


def test_budget_skips_and_failures_are_recorded(tmp_path):
    report = gpu_check.Report(tmp_path, budget_s=10, dry_run=True)
    assert report.run("fits", 1, lambda: {"value": 3}) == {"value": 3}
    assert report.run("too-long", 60, lambda: pytest.fail("a skipped section must not run")) is None
    assert report.run("fails", 1, lambda: 1 / 0) is None
    doc = json.loads((tmp_path / "gpu_check.json").read_text())  # written after every section
    assert doc["sections"]["fits"]["status"] == "ok" and doc["sections"]["fits"]["value"] == 3
    assert (
        doc["sections"]["too-long"]["status"] == "skipped"
        and "estimate 60" in doc["sections"]["too-long"]["reason"]
    )
    assert (
        doc["sections"]["fails"]["status"] == "error"
        and "ZeroDivisionError" in doc["sections"]["fails"]["error"]
    )
    assert "| too-long | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_wheel_list_names_one_pinned_version_each():
    """Each needed package once, pinned by the lock (tests/test_install.py checks the versions)."""
    import fetch_gpu_wheels

    names = fetch_gpu_wheels.NEEDED
    specs = fetch_gpu_wheels.locked(names)
    assert all("==" in s for s in specs) and len(names) == len(set(names))
    assert "stable-audio-tools" in names and "laion-clap" in names and not any("faiss" in n for n in names)
