"""The circuit breaker: a run whose engine keeps failing stops (naming the error, exit code 3), keeps
what it finished and resumes; one failed batch, or any number of bad rows, never stops a run."""

import pyarrow.parquet as pq
import pytest
from jobs_helpers import FakeEngine, good_manifest, write_manifest

from amg_engine.jobs.cli import main
from amg_engine.jobs.generate import JobConfig, run_generate
from amg_engine.jobs.runner import CircuitOpen

ALWAYS = range(10**9)


def _ids(engine) -> list[str]:
    return sorted(i for call in engine.calls for i in call)


def test_an_engine_that_breaks_for_good_stops_the_run_and_a_rerun_resumes(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 80), tmp_path / "out"  # 10 batches of 8
    broken = FakeEngine(raise_calls=range(2, 10**9))  # batches 0 and 1 finish, then out of memory
    with pytest.raises(CircuitOpen) as stop:
        run_generate(m, out, broken, JobConfig(progress=False))
    msg = str(stop.value)
    assert "3 batches in a row failed in the engine: RuntimeError: CUDA out of memory" in msg
    assert "rerun the same command" in msg and "--max-failed-batches" in msg
    assert len(broken.calls) == 5  # stopped at the third failure, not 80 error rows later
    res = pq.read_table(out / "results.parquet")
    assert res["row"].to_pylist() == list(range(16)) and set(res["status"].to_pylist()) == {"ok"}
    assert "3 batches in a row failed" in (out / "run.log").read_text()
    healthy = FakeEngine()
    summary = run_generate(m, out, healthy, JobConfig(progress=False))  # no --retry-failed needed
    assert _ids(healthy) == [f"row-{k:04d}" for k in range(16, 80)]
    assert (summary.ok, summary.errors, summary.reused) == (80, 0, 16)


def test_an_engine_that_raises_once_costs_one_batch_of_error_rows(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 40), tmp_path / "out"
    summary = run_generate(m, out, FakeEngine(raise_calls={1}), JobConfig(progress=False))
    status = pq.read_table(out / "results.parquet")["status"].to_pylist()
    assert [k for k, s in enumerate(status) if s == "error"] == list(range(8, 16))
    assert (summary.ok, summary.errors) == (32, 8)


def test_streaks_end_with_a_success(tmp_path):
    m = good_manifest(tmp_path / "m.parquet", 64)
    engine = FakeEngine(raise_calls={0, 1, 3, 4, 6, 7})  # never three failed batches in a row
    summary = run_generate(m, tmp_path / "out", engine, JobConfig(progress=False))
    assert (summary.ok, summary.errors) == (16, 48) and len(engine.calls) == 8


def test_bad_rows_never_count(tmp_path):
    """Even with a limit of 1, a run of bad rows (invalid, too long, non-finite audio) goes on."""
    n = 48
    long = " ".join(["word"] * 17)  # the fake text encoder reads 16 words
    prompts = [long if 16 <= k < 32 else ("" if k % 8 == 3 else "a prompt") for k in range(n)]
    m = write_manifest(tmp_path / "m.parquet", {"id": [f"r{k}" for k in range(n)], "prompt": prompts})
    nonfinite = {f"r{k}" for k in range(n) if k % 8 == 5}  # one row of every batch diverges
    engine = FakeEngine(fail_ids=nonfinite)
    summary = run_generate(m, tmp_path / "out", engine, JobConfig(progress=False, max_failed_batches=1))
    res = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert len(res) == n and summary.ok == sum(r["status"] == "ok" for r in res) > 0
    assert sum("non-finite" in (r["error"] or "") for r in res) == len(nonfinite) - 2  # rows 21, 29: too long


def test_zero_never_stops_and_negative_is_refused(tmp_path):
    m = good_manifest(tmp_path / "m.parquet", 40)
    engine = FakeEngine(raise_calls=ALWAYS)
    summary = run_generate(m, tmp_path / "out", engine, JobConfig(progress=False, max_failed_batches=0))
    assert (summary.ok, summary.errors, len(engine.calls)) == (0, 40, 5)
    with pytest.raises(ValueError, match="max_failed_batches=-1"):
        JobConfig(max_failed_batches=-1)


def test_the_cli_exits_with_code_3_naming_the_error(tmp_path, monkeypatch, capsys):
    from amg_engine import engine

    monkeypatch.setattr(
        engine.engine, "Engine", lambda config, model, index, *checkpoint: FakeEngine(raise_calls=ALWAYS)
    )
    m = good_manifest(tmp_path / "m.parquet", 40)
    argv = ["generate", str(m), "--out", str(tmp_path / "out"), "--quiet", "--max-failed-batches", "2"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "2 batches in a row failed in the engine: RuntimeError: CUDA out of memory" in err
