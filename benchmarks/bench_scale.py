"""A training index at dataset scale: build, load and search 10^6 or 10^7 unit vectors on this machine.

    python benchmarks/bench_scale.py --n 1000000 --work /tmp/scale

Synthetic data: N unit vectors (D = 512, i.i.d. Gaussian, normalised), written as a Parquet file of
precomputed embeddings (the layout ``amg index build`` takes, index/build.py). Queries are planted
near-duplicates of known rows at known cosines (0.95, 0.9, 0.5): q = c·x_r + sqrt(1 - c²)·u with u a
random unit vector orthogonal to x_r, so the row r is the true nearest neighbour (random rows score
about sqrt(2 ln N / D) ≈ 0.25 at most), and recall@1 is the share of queries whose top hit is r.

Each stage runs in its own process (a child of this one), which reports its wall time and its peak
memory two ways: ``maxrss`` (getrusage: resident pages, memory-mapped file pages included) and
``peak_anon`` (RssAnon sampled every 10 ms: the process's own memory, page cache excluded). The
two differ by the file pages a process maps: the exact stage scans the memory map, so its maxrss
counts the whole file; the build, the faiss stages and the queries read rows with positioned reads
(index/store.py ``VectorFile``), so theirs do not. Stages:
embeddings (the input file), build (``build_from_embeddings``: the memory-mapped fp16 index),
ivfpq (train and fill the FAISS structure, kept in the index folder; by default IVF with 4-bit
fast-scan PQ codes, re-scored exactly against the memory map), load (the index and the FAISS
structure, nothing searched), exact (chunked float32 scan of the fp16 memory map) and ivfpq-search.
Appends one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COSINES = (0.95, 0.9, 0.5)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon every 10 ms in a thread; ``peak`` the largest seen."""

    def __init__(self) -> None:
        self.peak, self._stop = _rss_anon(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _rss_anon())


# -- stages (each runs in a child process) ------------------------------------------------------------


def stage_embeddings(a) -> dict:
    """The Parquet file of N synthetic unit vectors (float16), written in row groups of 2^17."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = {"name": "mel-pattern-v2", "sample_rate": 16000, "dim": a.dim, "checkpoint_hash": "synthetic"}
    schema = pa.schema(
        [("id", pa.string()), ("caption", pa.string()), ("vector", pa.list_(pa.float16(), a.dim))],
        metadata={"amg.embedder": json.dumps(info)},
    )
    rows = 1 << 17
    with pq.ParquetWriter(a.work / "embeddings.parquet", schema, compression="none") as w:
        for k, s in enumerate(range(0, a.n, rows)):
            b = min(rows, a.n - s)
            x = np.random.default_rng([a.seed, k]).standard_normal((b, a.dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), a.dim)
            ids = pa.array([f"clip-{i:09d}" for i in range(s, s + b)])
            w.write_table(pa.table([ids, pa.array([f"synthetic clip {i}" for i in range(s, s + b)]), vec],
                                   schema=schema))  # fmt: skip
    return {"bytes": (a.work / "embeddings.parquet").stat().st_size}


def stage_build(a) -> dict:
    from amg_engine import index
    from amg_engine.index.build import build_from_embeddings

    # synthetic vectors come from no registered embedder: skip the identity check the CLI makes
    index.embedders.check_embedder = lambda info, checkpoint=None: None

    idx = build_from_embeddings(
        a.work / "embeddings.parquet", a.work / "index", dtype="float16", progress=False
    )
    return {
        "rows": len(idx),
        "bytes": sum(p.stat().st_size for p in (a.work / "index").iterdir() if p.is_file()),
    }


def _search_config(a):
    from amg_engine.index.search import SearchConfig

    return SearchConfig(
        kind="faiss",
        factory=a.factory,
        params={"nprobe": a.nprobe},
        train_size=a.train_size,
        gpu=False,
        refine=a.refine,
    )


def stage_ivfpq(a) -> dict:
    from amg_engine.index.search import _faiss_cache, make_searcher
    from amg_engine.index.store import EmbeddingIndex

    index, config = EmbeddingIndex.load(a.work / "index"), _search_config(a)
    kept = _faiss_cache(index, config)
    if kept.exists():  # a structure of this configuration from an earlier run: train and fill anew
        kept.unlink()
    make_searcher(index, config)
    return {"bytes": kept.stat().st_size}


def stage_load(a) -> dict:
    from amg_engine.index.search import make_searcher
    from amg_engine.index.store import EmbeddingIndex

    t = time.perf_counter()
    index = EmbeddingIndex.load(a.work / "index")
    t_index = time.perf_counter() - t
    anon_index = _rss_anon()
    make_searcher(index, _search_config(a))
    return {"index_s": t_index, "anon_after_index": anon_index, "faiss_s": time.perf_counter() - t - t_index}


def planted_queries(xb, n_per: int, seed: int):
    """([3·n_per, D] float32 queries, their planted rows, their cosines)."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])
    rows = rng.choice(xb.shape[0], size=len(COSINES) * n_per, replace=False)
    x = xb[np.sort(rows)].astype(np.float32)  # xb: an array or an index.store.VectorFile
    order = np.argsort(rows)
    x = x[np.argsort(order)]  # back to the order of ``rows``
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    u = rng.standard_normal(x.shape).astype(np.float32)
    u -= (u * x).sum(1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cos = np.repeat(np.array(COSINES, dtype=np.float32), n_per)[:, None]
    return cos * x + np.sqrt(1 - cos**2) * u, rows, cos[:, 0]


def _search(a, kind: str) -> dict:
    import numpy as np
    import torch

    from amg_engine.index.search import SearchConfig, make_searcher
    from amg_engine.index.store import EmbeddingIndex

    index = EmbeddingIndex.load(a.work / "index")
    xq, rows, cos = planted_queries(index.row_source(), a.queries, a.seed)  # read, not through the map
    config = SearchConfig(kind="exact", chunk=a.chunk) if kind == "exact" else _search_config(a)
    searcher = make_searcher(index, config)
    searcher.search(torch.from_numpy(xq[:8]), 1)  # warm-up (and, for exact, nothing cached: pages)
    t = time.perf_counter()
    res = searcher.search(torch.from_numpy(xq), 1)
    seconds = time.perf_counter() - t
    top = res.I[:, 0].numpy()
    recall = {
        f"{c:g}": float((top[cos == np.float32(c)] == rows[cos == np.float32(c)]).mean()) for c in COSINES
    }
    return {"queries": len(xq), "search_s": seconds, "qps": len(xq) / seconds, "recall_at_1": recall}


def stage_exact(a) -> dict:
    return _search(a, "exact")


def stage_ivfpq_search(a) -> dict:
    return _search(a, "ivfpq")


STAGES = {
    "embeddings": stage_embeddings, "build": stage_build, "ivfpq": stage_ivfpq, "load": stage_load,
    "exact": stage_exact, "ivfpq-search": stage_ivfpq_search,
}  # fmt: skip


def child(a) -> None:
    sys.path.insert(0, str(ROOT))
    peak = PeakAnon()
    t = time.perf_counter()
    out = STAGES[a.stage](a)
    out["wall_s"] = time.perf_counter() - t
    out["peak_anon"] = peak.stop()
    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent ---------------------------------------------------------------------------------------


def run_stage(a, stage: str) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    print(f"{stage:>13}: " + json.dumps(out), flush=True)
    return out


def _git_sha() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("numpy", "pyarrow", "torch", "faiss-cpu")}


def _nlist(factory: str) -> int:
    """The IVF list count a factory string names (0: not an IVF factory)."""
    import re

    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="index rows")
    p.add_argument("--dim", type=int, default=512, help="vector dimension")
    p.add_argument("--work", type=Path, required=True, help="folder for the data and the index")
    p.add_argument("--queries", type=int, default=1000, help="planted queries per cosine")
    p.add_argument(
        "--factory", default=None,
        help="faiss factory (default IVF<nlist>,PQ64x4fs, nlist = sqrt N rounded to a power of 2: "
        "4-bit fast-scan PQ, 32 bytes a vector)",
    )  # fmt: skip
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default 2·√nlist)")
    p.add_argument("--refine", type=int, default=10, help="IVF-PQ candidates re-scored exactly per hit")
    p.add_argument(
        "--train-size", type=int, default=None, help="IVF-PQ training sample (default max(10^5, 50·nlist))"
    )
    p.add_argument(
        "--remove-input", action="store_true",
        help="delete the input Parquet once the build stage has read it (10^7 rows: 10 GB of disk)",
    )  # fmt: skip
    p.add_argument("--chunk", type=int, default=1 << 16, help="rows per chunk of the exact scan")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.factory is None:
        a.factory = f"IVF{1 << round(math.log2(math.sqrt(a.n)))},PQ64x4fs"
    nlist = _nlist(a.factory)
    if a.nprobe is None:
        a.nprobe = round(2 * math.sqrt(nlist)) if nlist else 1
    if a.train_size is None:
        a.train_size = max(100_000, 50 * nlist)
    if a.stage:
        return child(a)
    a.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for stage in a.stages.split(","):
        results[stage] = run_stage(a, stage)
        if stage == "build" and a.remove_input:
            (a.work / "embeddings.parquet").unlink()
    record = {
        "bench": "scale", "n": a.n, "dim": a.dim, "factory": a.factory, "nprobe": a.nprobe,
        "refine": a.refine, "train_size": a.train_size,
        "queries_per_cosine": a.queries, "cpus": os.cpu_count(), "load": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": results,
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "versions": _versions(), "command": " ".join(sys.argv),
        "git": _git_sha(),
    }  # fmt: skip
    with open(ROOT / "benchmarks" / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
