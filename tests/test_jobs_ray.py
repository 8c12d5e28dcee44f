"""``--engine ray`` on a local Ray (CPU; actors at half a CPU: two actors at one CPU each deadlock a
2-core machine, see the environment notes): the same results as the local engine, the batches
spread over the pool, an actor killed mid-run loses nothing, and the circuit breaker stops a run
whose engine keeps failing.

One local Ray serves the module (started and shut down by the ``local_ray`` fixture, 2 CPUs).
The fake engine's module is pickled by value so that the actors need not import ``tests/``.
"""

from collections import Counter
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import soundfile as sf
from jobs_helpers import (
    FAST_FLAGS,
    PROMPTS,
    FakeSpec,
    GatedRecordingEngine,
    assert_gates_are_clear,
    engine_calls,
    fast_config,
    tiny_assets,
    write_manifest,
)

from amg_engine.jobs.cli import main
from amg_engine.jobs.generate import JobConfig

pytestmark = pytest.mark.slow
pytest.importorskip("ray.data", reason="--engine ray needs the optional ray[data]")


@pytest.fixture(scope="module")
def local_ray():
    import jobs_helpers
    import ray

    ray.cloudpickle.register_pickle_by_value(jobs_helpers)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_run(tmp_path, n, spec_kw=None, job_kw=None, actors=2, batch=4):
    from amg_engine.jobs.ray_run import RayOptions, run_generate_ray

    m = write_manifest(tmp_path / "m.parquet", {"id": [f"r{k:03d}" for k in range(n)],
                                                "prompt": [PROMPTS[k % 6] for k in range(n)]})  # fmt: skip
    log_dir = tmp_path / "calls"
    log_dir.mkdir(exist_ok=True)
    spec = FakeSpec(replace(fast_config(), batch_size=batch), str(log_dir), **(spec_kw or {}))
    opts = RayOptions(actors=actors, cpus_per_actor=0.5)
    summary = run_generate_ray(m, tmp_path / "out", spec, JobConfig(progress=False, **(job_kw or {})), opts)
    return summary, pq.read_table(tmp_path / "out" / "results.parquet"), engine_calls(log_dir)


@pytest.mark.integration
def test_ray_engine_matches_the_local_engine_and_resumes(local_ray, tmp_path, tmp_path_factory):
    assets = tiny_assets(tmp_path_factory)
    m = write_manifest(tmp_path / "m.parquet", {
        "id": [f"r{k}" for k in range(6)],
        "prompt": [*PROMPTS[:4], " ".join(["drum"] * 17), PROMPTS[5]],  # row 4: too long, found by the actor
        "seconds": [0.5, 0.25, 1.0, 0.5, 0.5, 0.75], "cfg_scale": [None, None, 2.0, None, None, 2.0],
    })  # fmt: skip
    common = ["--model", str(assets / "model"), "--index", str(assets / "index"), *FAST_FLAGS]
    ray_flags = ["--engine", "ray", "--ray-actors", "1", "--ray-cpus-per-actor", "0.5"]
    assert main(["generate", str(m), "--out", str(tmp_path / "ray"), *ray_flags, *common]) == 0
    assert main(["generate", str(m), "--out", str(tmp_path / "local"), *common]) == 0
    ray_res = pq.read_table(tmp_path / "ray" / "results.parquet").to_pylist()
    local = pq.read_table(tmp_path / "local" / "results.parquet").to_pylist()
    assert [r["status"] for r in ray_res] == ["ok", "ok", "ok", "ok", "error", "ok"]
    assert "prompt has 17 tokens" in ray_res[4]["error"]
    for a, b in zip(ray_res, local, strict=True):
        for k in ("row", "id", "status", "error", "config_hash", "model_id"):
            assert a[k] == b[k], k
        if a["status"] == "ok":
            assert a["final_similarity"] == pytest.approx(b["final_similarity"], abs=1e-5)
            # the actor runs in another process with its own thread count (Ray sets OMP_NUM_THREADS):
            # σ_t differs by rounding, so gates compare exactly only with every σ_t clear of λ_t
            assert_gates_are_clear(b["trace_similarity"], b["trace_lambda"])
            assert a["neighbour_id"] == b["neighbour_id"] and a["trace_gate"] == b["trace_gate"]
            assert sf.info(tmp_path / "ray" / a["audio_path"]).frames == round(a["seconds"] * 8000)
    parts = len(list((tmp_path / "ray" / "results").iterdir()))
    assert main(["generate", str(m), "--out", str(tmp_path / "ray"), *ray_flags, *common]) == 0  # all done
    assert len(list((tmp_path / "ray" / "results").iterdir())) == parts


def _check_complete(res, n, out, no_tmp=True):
    rows = res.to_pylist()
    assert [r["row"] for r in rows] == list(range(n)) and {r["status"] for r in rows} == {"ok"}
    assert sorted(p.name for p in (out / "audio").iterdir()) == [f"r{k:03d}.flac" for k in range(n)]
    if no_tmp:
        assert list(out.rglob("*.tmp")) == []


def test_two_actors_share_the_batches_and_an_actor_killed_mid_run_loses_nothing(local_ray, tmp_path):
    # 16 batches of 4 at 0.3 s each; both actors wait for each other to load (on a loaded 2-core
    # machine one can take seconds longer), and the kill comes at the 11th batch
    summary, res, calls = _ray_run(tmp_path, 64, dict(delay=0.3, kill_id="r041", barrier=2))
    _check_complete(res, 64, tmp_path / "out")
    assert (summary.ok, summary.errors, summary.generated) == (64, 0, 64)
    killed = [c for c in calls if c["end"] is None]
    assert [c["ids"] for c in killed] == [["r040", "r041", "r042", "r043"]]
    generated = Counter(i for c in calls for i in c["ids"])
    assert generated == {f"r{k:03d}": 2 if 40 <= k < 44 else 1 for k in range(64)}  # no other batch redone
    finished = [c for c in calls if c["end"] is not None]
    per_process = Counter(c["pid"] for c in finished)  # the restarted actor is a third process
    assert len(per_process) >= 2 and sorted(per_process.values())[-2] >= 4, per_process  # a quarter each
    overlap = sum(max(0.0, min(x["end"], y["end"]) - max(x["begin"], y["begin"]))
                  for x in finished for y in finished if x["pid"] < y["pid"])  # fmt: skip
    assert overlap > 0.3, overlap  # two actors generated at the same time, not one after the other


def test_a_batch_that_keeps_killing_its_worker_becomes_error_rows(local_ray, tmp_path):
    from amg_engine.jobs.ray_run import MAX_ATTEMPTS

    summary, res, calls = _ray_run(tmp_path, 12, dict(kill_id="r005", kill_once=False), actors=1)
    status = res["status"].to_pylist()
    assert [k for k, s in enumerate(status) if s == "error"] == [4, 5, 6, 7]
    assert f"died {MAX_ATTEMPTS} times" in res["error"][5].as_py()
    assert sum(c["ids"][0] == "r004" for c in calls) == MAX_ATTEMPTS  # tried, then recorded, not retried


def test_the_circuit_breaker_stops_a_ray_run_and_a_rerun_resumes(local_ray, tmp_path):
    from amg_engine.jobs.runner import CircuitOpen

    with pytest.raises(CircuitOpen, match="3 batches in a row failed in the engine on worker .*CUDA out of"):
        _ray_run(tmp_path, 48, dict(raise_calls="all", delay=0.05))
    assert pq.read_table(tmp_path / "out" / "results.parquet").num_rows == 0  # failed rows are not "done"
    summary, res, _ = _ray_run(tmp_path, 48)  # healthy engine, no --retry-failed: every row is generated
    # (the stopped pool's actors may still write a temporary file or two while they are being killed,
    # after the rerun's start cleaned up: the run after deletes them)
    _check_complete(res, 48, tmp_path / "out", no_tmp=False)
    assert summary.ok == 48


def test_the_driver_keys_rows_as_its_actors_do(local_ray, tmp_path):
    """The driver plans for the device its actors run on: a configuration saying cuda with actors on
    the CPU keys the rows with the actors' precision (fp32), so a rerun finds them done (issue 26,
    item 4; before, the driver hashed the configuration it was given)."""
    from amg_engine.jobs.ray_run import RayOptions, run_generate_ray

    m = write_manifest(tmp_path / "m.parquet", {"id": [f"r{k}" for k in range(4)], "prompt": PROMPTS[:4]})
    (tmp_path / "calls").mkdir()
    spec = FakeSpec(replace(fast_config(), device="cuda"), str(tmp_path / "calls"))
    opts, job = RayOptions(actors=1, cpus_per_actor=0.5, device="cpu"), JobConfig(progress=False)
    assert run_generate_ray(m, tmp_path / "out", spec, job, opts).generated == 4
    res = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert {r["config_hash"] for r in res} == {replace(fast_config(), device="cpu").config_hash()}
    assert run_generate_ray(m, tmp_path / "out", spec, job, opts).generated == 0


def test_the_release_gate_under_ray_gives_the_local_runs_statuses_attempts_and_files(local_ray, tmp_path):
    """--engine ray with the release gate, two actors, one of them killed in the middle of a batch of
    second attempts: every row ends with the statuses, attempts, similarities and files of a local run
    of the same manifest, and no attempt but the killed batch's runs twice (issue 26, item 10)."""
    from amg_engine.jobs.gate import ReleaseGate
    from amg_engine.jobs.generate import run_generate
    from amg_engine.jobs.ray_run import RayOptions, run_generate_ray

    n = 24
    ids = [f"r{k:03d}" for k in range(n)]
    seeds = {rid: 1000 + k for k, rid in enumerate(ids)}
    fails = [[], [0.9], [0.8, 0.7], [0.95, 0.7, 0.9]]  # cleared at attempt 1, 2, 3; rejected
    sims = {rid: fails[k % 4] + [0.2] for k, rid in enumerate(ids)}
    prompts = [PROMPTS[k % 6] for k in range(n)]
    m = write_manifest(tmp_path / "m.parquet", {"id": ids, "prompt": prompts, "seconds": [0.25] * n,
                                                "seed": list(seeds.values())})  # fmt: skip
    config, job = replace(fast_config(), batch_size=4), JobConfig(progress=False, gate=ReleaseGate(0.6, 3))
    for name in ("local-calls", "ray-calls"):
        (tmp_path / name).mkdir()
    local = run_generate(m, tmp_path / "local", GatedRecordingEngine(config, tmp_path / "local-calls", sims,
                                                                     seeds), job)  # fmt: skip
    spec = FakeSpec(config, str(tmp_path / "ray-calls"), kill_id="r005", barrier=2, gate=(sims, seeds, 2))
    summary = run_generate_ray(m, tmp_path / "ray", spec, job, RayOptions(actors=2, cpus_per_actor=0.5))
    keys = ("row", "status", "attempts", "attempt_seeds", "attempt_similarities", "audio_path",
            "final_similarity")  # fmt: skip
    want, got = (pq.read_table(tmp_path / d / "results.parquet").to_pylist() for d in ("local", "ray"))
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
    assert Counter(r["status"] for r in got) == {"ok": 18, "rejected": 6}
    for d in ("audio", "rejected"):
        assert sorted(p.name for p in (tmp_path / "ray" / d).iterdir()) == sorted(
            p.name for p in (tmp_path / "local" / d).iterdir()
        )
    assert (summary.released, summary.rejected, summary.errors, summary.attempt_histogram) == (
        local.released, local.rejected, local.errors, local.attempt_histogram
    )  # fmt: skip
    calls = engine_calls(tmp_path / "ray-calls")
    killed = [c for c in calls if c["end"] is None]
    assert len(killed) == 1 and "r005@2" in killed[0]["ids"]  # killed between its first and third attempt
    ran = Counter(x for c in calls for x in c["ids"])
    assert ran == Counter(x for c in engine_calls(tmp_path / "local-calls") for x in c["ids"]) + Counter(
        killed[0]["ids"]
    )  # every attempt once, the killed batch's twice
    assert list((tmp_path / "ray").rglob("*.tmp")) == []
