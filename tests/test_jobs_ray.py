"""``--engine ray`` on a local Ray (CPU, one actor at half a CPU: two actors at one CPU each deadlock
a 2-core machine, see the environment notes) gives the same results as the local engine."""

import pyarrow.parquet as pq
import pytest
import soundfile as sf
from jobs_helpers import FAST_FLAGS, PROMPTS, assert_gates_are_clear, tiny_assets, write_manifest

from jobs.cli import main

pytestmark = pytest.mark.slow
pytest.importorskip("ray.data", reason="--engine ray needs the optional ray[data]")


def test_ray_engine_matches_the_local_engine_and_resumes(tmp_path, tmp_path_factory):
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
