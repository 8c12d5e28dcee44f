"""A 200-row run with 20 bad rows, SIGKILLed twice mid-run and rerun: nothing lost, nothing doubled.

The CLI runs in a subprocess on the tiny random-weight model (3 sampler steps); it is killed as soon
as a few more result shards have appeared, so the kill lands in the middle of a batch (some of its
audio written, its shard not).
"""

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from jobs_helpers import FAST_FLAGS, PROMPTS, tiny_assets

pytestmark = pytest.mark.slow

N, BAD_EVERY = 200, 10
BAD = [  # (column, value): each makes its row an error row
    ("prompt", ""), ("prompt", "   "), ("prompt", " ".join(["drum"] * 17)), ("seconds", 0.0),
    ("seconds", -1.0), ("seconds", 5.0), ("seconds", math.nan), ("seconds", math.inf), ("seed", -1),
    ("id", "../evil"), ("id", "a/b"), ("id", "bad\x00id"), ("id", "tab\tid"), ("id", "clip-000"),
    ("cfg_scale", 0.5), ("steps", 1), ("sampler", "bogus"), ("c1", -1.0), ("negative_prompt", "loud"),
    ("c1", math.nan),
]  # fmt: skip


def _manifest(path):
    cols = {k: [None] * N for k in ("cfg_scale", "steps", "sampler", "c1", "negative_prompt")}
    cols.update(id=[f"clip-{k:03d}" for k in range(N)], prompt=[PROMPTS[k % len(PROMPTS)] for k in range(N)],
                seconds=[0.25 + 0.05 * (k % 10) for k in range(N)], seed=list(range(N)),
                note=[f"n{k}" for k in range(N)])  # fmt: skip
    for k in range(0, N, 7):
        cols["cfg_scale"][k] = 2.0  # a second group of rows with their own guidance scale
    bad_rows = [BAD_EVERY * j + 3 for j in range(len(BAD))]
    for k, (col, value) in zip(bad_rows, BAD, strict=True):
        cols[col][k] = value
    pq.write_table(pa.table(cols), path)
    return bad_rows


def _parts(out) -> int:
    folder = out / "results"
    return len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0


def _run(cmd, log, kill_after_parts=None, out=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        if kill_after_parts is not None:
            while _parts(out) < kill_after_parts and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"the run ended before it could be killed; see {log}"
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=max(1, deadline - time.monotonic()))


def test_killed_twice_then_resumed(tmp_path, tmp_path_factory):
    assets = tiny_assets(tmp_path_factory)
    manifest, out, log = tmp_path / "m.parquet", tmp_path / "out", tmp_path / "cli.log"
    bad_rows = _manifest(manifest)
    cmd = [sys.executable, "-m", "amg_engine.jobs.cli", "generate", str(manifest), "--out", str(out),
           "--model", str(assets / "model"), "--index", str(assets / "index"), *FAST_FLAGS]  # fmt: skip
    assert _run(cmd, log, kill_after_parts=3, out=out) == -signal.SIGKILL
    assert _run(cmd, log, kill_after_parts=_parts(out) + 3, out=out) == -signal.SIGKILL
    done_before = pq.read_table(out / "results").num_rows
    assert 0 < done_before < N - len(BAD)  # both kills interrupted the run
    assert _run(cmd, log) == 0, log.read_text()[-3000:]
    assert "resumed: " in log.read_text()

    res = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["row"] for r in res] == list(range(N))  # one result per manifest row, in order
    status = Counter(r["status"] for r in res)
    assert status == {"ok": N - len(BAD), "error": len(BAD)}
    assert [r["row"] for r in res if r["status"] == "error"] == bad_rows
    assert all(r["error"].startswith(f"row {r['row']}: ") for r in res if r["status"] == "error")
    ok_ids = [r["id"] for r in res if r["status"] == "ok"]
    assert len(set(ok_ids)) == len(ok_ids)
    assert Counter(r["id"] for r in res) == Counter(pq.read_table(manifest)["id"].to_pylist())
    files = sorted(p.name for p in (out / "audio").iterdir())
    assert files == sorted(f"{i}.flac" for i in ok_ids)  # orphans from the kills were regenerated
    for r in res:
        if r["status"] == "ok":
            audio, sr = sf.read(out / r["audio_path"])
            assert len(audio) == round(r["seconds"] * sr) and r["note"] == f"n{r['row']}"
    assert list(out.rglob("*.tmp")) == []
