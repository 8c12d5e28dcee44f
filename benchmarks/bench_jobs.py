"""What the job layer costs per row at 10^3–10^5 rows, when generation itself costs nothing.

An engine stub returns each batch at once (0.25 s of silent 8 kHz audio per row and a 100-step trace
of varied values, drawn from a pool built once), so what is timed is the job layer alone: validating
the manifest, choosing what to run, writing audio (FLAC) and one result shard per batch, compacting
the shards and streaming ``results.parquet``. Each measurement runs in a fresh subprocess (peak
resident memory is that process's):

- ``run``: a fresh folder, every row generated: rows/s, job overhead in ms a row, peak memory, and
  the share of the time spent in the final compaction + merge;
- ``resume``: the same command again with every row done (what a rerun costs before any work: it
  validates the manifest, checks every audio file and rewrites ``results.parquet``);
- at the largest size, the merge of the folder as the run left it before its final merge (all of
  its per-batch shards), by the old path (every column of every shard read into memory, newest
  rows chosen with Python objects, taken, sorted, written: the merge of commit 21087a2, kept below as
  the baseline) and by the new one (key scan, compaction, streamed copy), each in its own process.

Printed: per size the figures and the per-row cost against the smallest size's (growth), and the
new merge against the old one (speed-up, memory). One JSON line per measurement is appended to
benchmarks/results.jsonl.

    python benchmarks/bench_jobs.py                        # 10^3, 10^4, 10^5 rows (about 10 minutes)
    python benchmarks/bench_jobs.py --rows 1000 10000      # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import ROOT, append_record, environment  # noqa: E402

STEPS = 100


class StubEngine:
    """The :class:`engine.engine.Engine` interface the job layer uses; generation costs nothing."""

    def __init__(self, batch_size: int, seconds: float = 0.25) -> None:
        import random
        from dataclasses import replace

        import torch

        from amg_engine.engine.config import EngineConfig, SamplerConfig

        self.config = replace(EngineConfig(), sampler=SamplerConfig(steps=STEPS), batch_size=batch_size)
        self.window, self.sample_rate = 8192, 8000
        self.model, self.model_id, self.index_id = None, "stub:000000000000", "stub-index:000000000000"
        self.replication_threshold = 0.9
        ids = [f"clip-{k:03d}" for k in range(36)]
        self.index = type("Index", (), {"ids": ids, "captions": [f"caption {i}" for i in ids]})()
        self.embedder = type("Embedder", (), {"replication_threshold": 0.9})()
        self.audio = torch.zeros(1, round(seconds * self.sample_rate))
        rng = random.Random(0)
        step = lambda: dict(
            similarity=rng.random(),
            gate=rng.random() < 0.5,
            s1=rng.random(),
            s2=rng.random(),
            neighbour=rng.randrange(36),
            **{"lambda": rng.random()},
        )  # noqa: E731
        self.traces = [[step() for _ in range(STEPS)] for _ in range(1024)]  # fmt: skip

    def generate(self, requests):
        from amg_engine.engine.engine import Generated

        return [Generated(r, self.audio, 0.5, 0, self.traces[hash(r.id) % 1024], None) for r in requests]


CHILD = """
import json, resource, shutil, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import amg_engine.jobs.generate as g
from benchmarks.bench_jobs import StubEngine, old_merge, new_merge
mode, manifest, out, batch = sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
use = resource.getrusage(resource.RUSAGE_SELF)
start_cpu = use.ru_utime + use.ru_stime  # after the imports
timing = {"keep_s": 0.0}
if mode in ("run", "resume"):
    finish = g.finish_run
    def timed_finish(plan, store, *a, **k):
        t = time.perf_counter()
        if mode == "run":  # keep the shards as the run left them, for the merge comparison (hard links)
            keep = out / "parts-before-merge"
            keep.mkdir()
            for p in store.part_files():
                (keep / p.name).hardlink_to(p)
        timing["keep_s"], t = time.perf_counter() - t, time.perf_counter()
        s = finish(plan, store, *a, **k)
        timing["finish_s"] = time.perf_counter() - t
        return s
    g.finish_run = timed_finish
    t = time.perf_counter()
    s = g.run_generate(manifest, out, StubEngine(batch), g.JobConfig(progress=False))
    timing.update(seconds=time.perf_counter() - t - timing["keep_s"], ok=s.ok, generated=s.generated)
elif mode == "idle":  # what the imports alone take: the floor under every peak
    timing.update(seconds=0.0)
else:
    rows, seconds = (old_merge if mode == "merge-old" else new_merge)(manifest, out, StubEngine(batch))
    timing.update(seconds=seconds, rows=rows)
use = resource.getrusage(resource.RUSAGE_SELF)
timing.update(peak_rss_mb=use.ru_maxrss / 1024, cpu_s=use.ru_utime + use.ru_stime - start_cpu)
print(json.dumps(timing))
"""


def _plan(manifest, out, engine):
    from amg_engine.jobs.generate import JobConfig, RunIds, plan_run
    from amg_engine.jobs.manifest import Limits
    from amg_engine.jobs.results import ResultStore

    store = ResultStore(out)
    return plan_run(manifest, store, Limits.from_engine(engine), RunIds.of(engine), JobConfig()), store


def new_merge(manifest, out, engine) -> tuple[int, float]:
    """This version's end of a run (key scan, compaction, streamed results.parquet): -> rows, seconds
    (the plan that precedes it, the same for both paths, not timed)."""
    import time

    from amg_engine.jobs.generate import JobConfig, finish_run
    from amg_engine.jobs.results import FolderLock

    plan, store = _plan(manifest, out, engine)
    start = time.perf_counter()
    with FolderLock(store.dir) as lock:
        rows = finish_run(plan, store, JobConfig(progress=False), lock, 0.0, 0).ok
    return rows, time.perf_counter() - start


def old_merge(manifest, out, engine) -> tuple[int, float]:
    """The merge before this version (commit 21087a2, jobs/results.py and jobs/generate.py), the same
    in what it does: every column of every shard read, newest matching rows chosen over Python lists,
    taken, sorted, written in one piece. -> rows, seconds."""
    import time

    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from amg_engine.jobs.results import FIXED_SCHEMA, KEY, PART, error_result

    plan, store = _plan(manifest, out, engine)
    start = time.perf_counter()
    files = sorted(str(p) for p in store.parts.glob("part-*.parquet"))
    schema = FIXED_SCHEMA.append(pa.field("_part", pa.int64()))
    batches = []
    for tagged in ds.dataset(files, schema=FIXED_SCHEMA, format="parquet").scanner().scan_batches():
        b, seq = tagged.record_batch, int(PART.match(Path(tagged.fragment.path).name).group(1))
        batches.append(pa.RecordBatch.from_arrays([*b.columns, pa.array([seq] * b.num_rows, pa.int64())],
                                                  schema=schema))  # fmt: skip
    parts = pa.Table.from_batches(batches, schema=schema)
    cols = parts.select([*KEY, "_part"]).to_pydict()
    newest: dict[str, tuple[int, int]] = {}
    for i, (rid, seq) in enumerate(zip(cols["id"], cols["_part"], strict=True)):
        if rid in plan.expected and (rid not in newest or seq >= newest[rid][0]):
            newest[rid] = (seq, i)
    latest = {
        rid: i for rid, (_, i) in newest.items() if tuple(cols[k][i] for k in KEY[1:]) == plan.expected[rid]
    }
    picks = {r.index: latest[r.id] for r in plan.rows if r.error is None and r.id in latest}
    errors = [error_result(r, r.error, config_hash=r.config_hash(plan.base), model_id=plan.model_id,
                           index_id=plan.index_id) for r in plan.rows if r.error]  # fmt: skip
    positions = sorted(picks)
    done = parts.take(pa.array([picks[p] for p in positions], pa.int64()))
    extra = plan.manifest.take(pa.array(positions, pa.int64()))
    arrays = [pa.array(positions, pa.int64()) if f.name == "row" else
              (done.column(f.name).cast(f.type) if f.name in FIXED_SCHEMA.names else extra.column(f.name))
              for f in plan.schema]  # fmt: skip
    merged = pa.Table.from_arrays(arrays, schema=plan.schema)
    if errors:
        merged = pa.concat_tables([merged, pa.Table.from_pylist(errors, schema=plan.schema)])
    pq.write_table(merged.sort_by("row"), store.dir / "results.parquet")
    return merged.num_rows, time.perf_counter() - start


def _child(mode: str, manifest: Path, out: Path, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), mode, str(manifest), str(out), str(batch)],
                         cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _manifest(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ["drum loop", "warm pad", "rain on a window", "marimba arpeggio", "wind", "noise texture"]
    cols = {"id": [f"p{k:07d}" for k in range(n)], "prompt": [words[k % 6] for k in range(n)],
            "seconds": [0.25] * n, "note": [f"n{k}" for k in range(n)]}  # fmt: skip
    pq.write_table(pa.table(cols), path)
    return path


def _merge_copy(out: Path, target: Path) -> None:
    """A folder holding the run's audio and its shards as they were before the final merge."""
    (target / "results").mkdir(parents=True)
    (target / "audio").symlink_to(out / "audio")
    for p in (out / "parts-before-merge").iterdir():
        (target / "results" / p.name).hardlink_to(p)


HEADER = (
    "rows",
    "rows/s",
    "ms/row",
    "CPU ms/row",
    "vs first",
    "merge s",
    "peak MB",
    "resume s",
    "of it merge s",
    "resume MB",
)


def _line(n: int, run: dict, resume: dict, first_ms: float) -> str:
    ms = 1000 * run["seconds"] / n
    cpu = 1000 * run["cpu_s"] / n
    cells = (n, f"{n / run['seconds']:.0f}", f"{ms:.2f}", f"{cpu:.2f}", f"{ms / first_ms:.2f}x",
             f"{run['finish_s']:.1f}", f"{run['peak_rss_mb']:.0f}", f"{resume['seconds']:.1f}",
             f"{resume['finish_s']:.1f}", f"{resume['peak_rss_mb']:.0f}")  # fmt: skip
    return " | ".join(f"{c:>{len(h)}}" for c, h in zip(cells, HEADER, strict=True))


def _record(args, when: str, env: dict, kind: str, n: int, figures: dict) -> None:
    append_record(args.results, {"bench": "jobs", "when": when, **env, "kind": kind, "rows": n,
                                 "batch_size": args.batch_size, "steps": STEPS, **figures})  # fmt: skip


def _merges(args, scratch: Path, when: str, env: dict) -> None:
    """The old and the new merge of the largest run's folder as it was before its final merge."""
    n = max(args.rows)
    merges = {}
    for kind in ("merge-old", "merge-new"):
        target = scratch / f"{kind}{n}"
        _merge_copy(scratch / f"out{n}", target)
        merges[kind] = _child(kind, scratch / f"m{n}.parquet", target, args.batch_size)
        _record(args, when, env, kind, n, merges[kind])
    old, new = merges["merge-old"], merges["merge-new"]
    shards = len(list((scratch / f"out{n}" / "parts-before-merge").iterdir()))
    print(
        f"merge of {n} done rows in {shards} shards: old path {old['seconds']:.1f} s, peak "
        f"{old['peak_rss_mb']:.0f} MB | new {new['seconds']:.1f} s, peak {new['peak_rss_mb']:.0f} MB | "
        f"speed-up {old['seconds'] / new['seconds']:.2f}x, "
        f"peak memory x{new['peak_rss_mb'] / old['peak_rss_mb']:.2f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000], help="manifest sizes")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch (the issue's figures: 64)")
    p.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON lines log"
    )
    args = p.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    scratch.mkdir(parents=True, exist_ok=True)
    when, env = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), environment("cpu")
    idle = _child("idle", scratch / "none", scratch / "none", args.batch_size)
    print(f"a process that only imports the job layer peaks at {idle['peak_rss_mb']:.0f} MB", flush=True)
    _record(args, when, env, "idle", 0, idle)
    print(" | ".join(HEADER), flush=True)
    per_row = {}
    for n in sorted(args.rows):
        manifest, out = _manifest(scratch / f"m{n}.parquet", n), scratch / f"out{n}"
        run = _child("run", manifest, out, args.batch_size)
        resume = _child("resume", manifest, out, args.batch_size)
        per_row[n] = 1000 * run["seconds"] / n
        print(_line(n, run, resume, per_row[min(per_row)]), flush=True)
        _record(args, when, env, "run", n, run)
        _record(args, when, env, "resume", n, resume)
    sizes = sorted(per_row)
    for a, b in zip(sizes, sizes[1:], strict=False):
        print(f"{a} -> {b} rows: per-row cost x{per_row[b] / per_row[a]:.2f} (1.00 = linear growth)")
    _merges(args, scratch, when, env)
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
