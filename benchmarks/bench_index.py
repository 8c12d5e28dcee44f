"""Benchmark the nearest-neighbour paths of index/search.py against the exact torch path.

For N in 10^4, 10^5, 10^6 random unit vectors (D = 512, CLAP's size) it times, per path, the build
(moving/sharding the vectors, or FAISS train + add) and the latency of one query batch of ``--nq``
rows (the per-step batch), and prints the speed-up over the exact path measured in the same run:

- exact:          ExactSearcher, one shard (matrix product + top-k on the device; the default)
- exact-sharded:  ExactSearcher split into ``--shards`` parts on the same device
- faiss-flat:     FaissSearcher("Flat"), exact inner product in faiss
- faiss-ivfpq:    FaissSearcher("IVF{nlist},PQ64"), nlist = 2^round(log2 √N), nprobe = nlist/8,
                  trained on 64·nlist vectors; ``--refine`` adds "…,RFlat" (exact re-rank)

Approximate paths report recall@1 against the exact path for two query sets of 200: "replica"
queries at cosine 0.9 to a database row (a generated clip close to a training clip, what the
detector must find) and "near" queries at cosine 0.5 (around the AMG gate λ); and |ΔD@1|, the mean
error of the top similarity, which is what the gate compares with λ. Uniformly random queries are
not used: in 512 dimensions their nearest neighbour is barely nearer than the next (cosine ~0.25
vs ~0.249 at N = 10^6), so "recall" there measures noise, not the index.

One JSON line per row is appended to benchmarks/results.jsonl (machine, versions, git SHA, command).

    OMP_NUM_THREADS=1 python benchmarks/bench_index.py --quick    # 10^4 and 10^5, ~1 min on this CPU
    python benchmarks/bench_index.py --device cuda                # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.bench_common; amg_engine comes from the install (make setup)

import bench_common  # noqa: E402

from amg_engine.index.search import ExactSearcher, FaissSearcher, faiss_gpus, recall_at  # noqa: E402

PATHS = ("exact", "exact-sharded", "faiss-flat", "faiss-ivfpq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only 10^4 and 10^5 vectors")
    p.add_argument("--sizes", type=int, nargs="+", help="database sizes (default 10^4 10^5 10^6)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (CLAP: 512)")
    p.add_argument("--nq", type=int, default=16, help="queries per timed batch (the per-step batch)")
    p.add_argument("--shards", type=int, help="exact-sharded parts (default 4)")
    p.add_argument("--pq", type=int, default=64, help="PQ sub-quantizers (512 / 64 = 8 dims each)")
    p.add_argument("--nprobe-div", type=int, default=8, help="nprobe = nlist / this")
    p.add_argument("--refine", action="store_true", help="also time IVF-PQ with exact re-ranking (RFlat)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed query batches, median reported")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSONL file")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to --results")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def query_ms(search: Callable[[torch.Tensor], object], xq: torch.Tensor, device: str, repeats: int) -> float:
    search(xq)  # warm-up
    return statistics.median(timed(lambda: search(xq), device)[1] * 1e3 for _ in range(repeats))


def unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    return x.div_(x.norm(dim=1, keepdim=True))


def queries_at(xb: torch.Tensor, cos: float, n: int, g: torch.Generator) -> torch.Tensor:
    """n unit queries at exactly cosine ``cos`` to random rows of xb."""
    src = xb[torch.randint(0, xb.shape[0], (n,), generator=g)]
    noise = unit_rows(n, xb.shape[1], g)
    noise = torch.nn.functional.normalize(noise - (noise * src).sum(1, keepdim=True) * src, dim=1)
    return cos * src + math.sqrt(1 - cos**2) * noise


def ivf_factory(n: int, pq: int, refine: bool) -> tuple[str, int, int]:
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    return f"IVF{nlist},PQ{pq}" + (",RFlat" if refine else ""), nlist, 64 * nlist


def builders(args, n: int) -> dict[str, tuple[Callable, dict]]:
    shards = args.shards or 4
    out = {
        "exact": (lambda xb: ExactSearcher(xb), {}),
        "exact-sharded": (lambda xb: ExactSearcher(xb, shards=shards), {"shards": shards}),
        "faiss-flat": (lambda xb: FaissSearcher(xb.cpu(), "Flat"), {"factory": "Flat"}),
    }
    for refine in (False, True) if args.refine else (False,):
        factory, nlist, train = ivf_factory(n, args.pq, refine)
        params = {"nprobe": max(1, nlist // args.nprobe_div)} | ({"k_factor_rf": 16} if refine else {})
        build = lambda xb, f=factory, p=params, t=train: FaissSearcher(xb.cpu(), f, params=p, train_size=t)  # noqa: E731
        out["faiss-ivfpq" + ("-rflat" if refine else "")] = (
            build,
            {"factory": factory, **params, "train": train},
        )
    return out


def bench_size(args, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    xb = unit_rows(n, args.dim, g)
    xq = unit_rows(args.nq, args.dim, g).to(args.device)
    sets = {"replica": queries_at(xb, 0.9, 200, g), "near": queries_at(xb, 0.5, 200, g)}
    xb = xb.to(args.device)
    rows, truth = [], {}
    for path, (build, config) in builders(args, n).items():
        searcher, build_s = timed(lambda b=build: b(xb), args.device)
        ms = query_ms(lambda q, s=searcher: s.search(q, 10), xq, args.device, args.repeats)
        row = dict(n=n, dim=args.dim, nq=args.nq, path=path, config=config, build_s=build_s, query_ms=ms)
        for name, q in sets.items():
            res = searcher.search(q.to(args.device), 10)
            if path == "exact":
                truth[name] = res
            row[f"recall1_{name}"] = recall_at(res.I.cpu(), truth[name].I.cpu(), 1)
            row[f"d_err_{name}"] = (res.D[:, 0].cpu() - truth[name].D[:, 0].cpu()).abs().mean().item()
        row["faiss_gpu"] = path.startswith("faiss") and searcher.gpu
        rows.append(row)
        del searcher
    base = rows[0]["query_ms"]
    for row in rows:
        row["speedup_vs_exact"] = base / row["query_ms"]
    return rows


def environment(args: argparse.Namespace) -> dict:
    import faiss

    return dict(
        **bench_common.environment(args.device), faiss=faiss.__version__, faiss_gpus=faiss_gpus(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch_threads=torch.get_num_threads(),
    )  # fmt: skip


def print_row(row: dict) -> None:
    rate = row["n"] / row["build_s"] if row["build_s"] > 0 else float("inf")
    print(
        f"{row['n']:>9,} {row['path']:<19} {row['build_s']:8.2f} {rate:12,.0f} {row['query_ms']:9.2f} "
        f"{row['speedup_vs_exact']:8.2f}x {row['recall1_replica']:8.3f} {row['recall1_near']:8.3f} "
        f"{row['d_err_replica']:8.4f}  {row['config']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args)
    print(
        f"device {args.device} ({env['machine']['gpu'] or env['machine']['cpu']}, {env['machine']['cores']} "
        f"cores, OMP_NUM_THREADS={env['omp_num_threads']}), torch {env['torch']}, faiss {env['faiss']} "
        f"(GPUs: {env['faiss_gpus']}), D={args.dim}, query batch {args.nq}, 10 neighbours"
    )
    print(
        f"{'N':>9} {'path':<19} {'build s':>8} {'build vec/s':>12} {'query ms':>9} {'vs exact':>9} "
        f"{'R@1 .9':>8} {'R@1 .5':>8} {'|ΔD@1|':>8}  config"
    )
    for n in args.sizes:
        rows = bench_size(args, n)
        for row in rows:
            print_row(row)
            if not args.no_record:
                record = dict(
                    bench="index", time=datetime.datetime.now(datetime.UTC).isoformat(), device=args.device,
                    **env, **row,
                )  # fmt: skip
                bench_common.append_record(args.results, record)
    if not args.no_record:
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
