"""Benchmark the fused AMG kernels (nn_search, amg_combine) against their torch twins.

For each kernel and size it prints: the eager twin, the torch.compile'd twin and the Triton kernel
(median ms), the kernel's speed-ups over both, and its achieved bandwidth (bytes = inputs read once +
outputs written once) next to a measured device-to-device copy, the practical ceiling. Compile time is
reported separately. Every gate is open in the amg_combine inputs, so the kernel reads all four latents.

On CPU the Triton kernel does not run (unless TRITON_INTERPRET=1, which is a correctness path, not a
performance one): the script then times the twin and the compiled twin only. One JSON line per result
is appended to benchmarks/results.jsonl with the machine, versions, git SHA and command.

    python benchmarks/bench_kernels.py                      # cuda if available, full sizes there
    python benchmarks/bench_kernels.py --device cpu --quick  # < 1 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.bench_common; amg_engine comes from the install (make setup)

import bench_common  # noqa: E402

from amg_engine.kernels._dispatch import is_interpreted  # noqa: E402
from amg_engine.kernels.guidance import _amg_combine_kernel, amg_combine_ref  # noqa: E402
from amg_engine.kernels.nn_search import nn_search_ref  # noqa: E402

SIZES = {
    # amg_combine: B x 64 x 1024 latents (Stable Audio Open: 64 channels, 1024 latent frames).
    # nn_search: B CLAP queries (D = 512) against N reference embeddings.
    "full": {
        "amg_combine": [dict(B=b, C=64, T=1024) for b in (8, 32, 64)],
        "nn_search": [dict(B=b, N=n, D=512) for b in (1, 16, 64) for n in (10_000, 100_000, 1_000_000)],
    },
    "quick": {
        "amg_combine": [dict(B=8, C=64, T=1024)],
        "nn_search": [dict(B=16, N=10_000, D=512)],
    },
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda when available)",
    )
    p.add_argument(
        "--sizes", choices=sorted(SIZES), default=None, help="size set (default: full on cuda, quick on cpu)"
    )
    p.add_argument("--quick", action="store_true", help="shorthand for --sizes quick")
    p.add_argument(
        "--kernels",
        nargs="+",
        choices=["nn_search", "amg_combine"],
        default=["nn_search", "amg_combine"],
        help="which kernels to time",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the latents and embeddings"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls, median reported (default: 50 on cuda, 5 on cpu)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results.jsonl",
        help="JSON-lines file the results are appended to",
    )
    p.add_argument("--no-record", action="store_true", help="print only, do not append to --results")
    args = p.parse_args(argv)
    args.sizes = "quick" if args.quick else (args.sizes or ("full" if args.device == "cuda" else "quick"))
    args.repeats = args.repeats or (50 if args.device == "cuda" else 5)
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(device: str, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + write) of a 512 MiB buffer, the practical ceiling."""
    src = torch.empty(128 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make_inputs(kernel: str, size: dict, dtype: torch.dtype, device: str) -> tuple[tuple, int]:
    """Inputs for one call and the bytes it must move (inputs read once + outputs written once)."""
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)
    if kernel == "nn_search":
        B, N, D = size["B"], size["N"], size["D"]
        xq, xb = rand(B, D).to(dtype), torch.nn.functional.normalize(rand(N, D), dim=1).to(dtype)
        return (xq, xb), (B * D + N * D) * xq.element_size() + B * (4 + 8)
    B, C, T = size["B"], size["C"], size["T"]
    lat = [rand(B, C, T).to(dtype) for _ in range(4)]
    full = lambda v: torch.full((B,), v, device=device)
    rows = (full(0.9), full(0.4), full(0.5), full(7.0), full(10.0), full(3.0), full(1000.0))  # all gated
    nbytes = 5 * B * C * T * lat[0].element_size() + 7 * B * 4 + B * (4 + 4 + 1)
    return (*lat, *rows), nbytes


def kernel_runs_here(device: str) -> bool:
    return device == "cuda" or is_interpreted(_amg_combine_kernel)


def bench_one(kernel: str, size: dict, args: argparse.Namespace, ceiling: float | None) -> dict:
    dtype = DTYPES[args.dtype]
    inputs, nbytes = make_inputs(kernel, size, dtype, args.device)
    twin = {"nn_search": nn_search_ref, "amg_combine": amg_combine_ref}[kernel]
    t = lambda fn: time_ms(lambda: fn(*inputs), args.device, args.warmup, args.repeats)
    row = dict(kernel=kernel, size=size, dtype=args.dtype, bytes=nbytes, twin_ms=t(twin))
    compiled = torch.compile(twin, dynamic=False)
    t0 = time.perf_counter()
    compiled(*inputs)
    sync(args.device)
    row["compile_s"] = time.perf_counter() - t0
    row["compiled_ms"] = t(compiled)
    row["kernel_ms"] = None
    if kernel_runs_here(args.device):
        op = getattr(torch.ops.amg, kernel)
        once = args.device == "cpu"  # the interpreter: one call shows it runs, more would only be slow
        row["kernel_ms"] = time_ms(
            lambda: op(*inputs), args.device, 0 if once else args.warmup, 1 if once else args.repeats
        )
    best = row["kernel_ms"] or row["compiled_ms"]
    row["speedup_vs_twin"] = row["twin_ms"] / row["kernel_ms"] if row["kernel_ms"] else None
    row["speedup_vs_compiled"] = row["compiled_ms"] / row["kernel_ms"] if row["kernel_ms"] else None
    row["gbps"] = nbytes / best / 1e6  # of the kernel, or of the compiled twin on CPU
    row["copy_gbps"] = ceiling
    return row


def environment(args: argparse.Namespace) -> dict:
    return dict(
        **bench_common.environment(args.device),
        triton=triton.__version__,
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args)
    ceiling = copy_gbps(args.device, args.repeats) if args.device == "cuda" else None
    print(
        f"device {args.device} {env['machine']['gpu'] or env['machine']['cpu']}, dtype {args.dtype}, "
        f"torch {env['torch']}, triton {env['triton']}, sizes {args.sizes}"
    )
    if ceiling:
        print(f"device-to-device copy: {ceiling:.0f} GB/s (ceiling)")
    if not kernel_runs_here(args.device):
        print("Triton kernel: needs a GPU; timing the twin and the compiled twin only (GB/s: compiled twin).")
    elif args.device == "cpu":
        print("Triton kernel under TRITON_INTERPRET=1: a correctness path, its times mean nothing.")
    head = f"{'kernel':<12} {'size':<24} {'twin ms':>9} {'compiled':>9} {'kernel':>9} {'vs twin':>8} "
    print(head + f"{'vs comp.':>8} {'GB/s':>7} {'% copy':>7} {'compile s':>9}")
    for kernel in args.kernels:
        for size in SIZES[args.sizes][kernel]:
            row = bench_one(kernel, size, args, ceiling)
            label = "x".join(f"{k}{v}" for k, v in size.items())
            pct = 100 * row["gbps"] / ceiling if ceiling and row["kernel_ms"] else None
            print(
                f"{kernel:<12} {label:<24} {row['twin_ms']:9.3f} {row['compiled_ms']:9.3f} "
                f"{fmt(row['kernel_ms'], '.3f'):>9} {fmt(row['speedup_vs_twin'], '.2f', 'x'):>8} "
                f"{fmt(row['speedup_vs_compiled'], '.2f', 'x'):>8} {row['gbps']:7.1f} {fmt(pct, '.1f'):>7} "
                f"{row['compile_s']:9.1f}"
            )
            if not args.no_record:
                record = dict(
                    bench="kernels",
                    time=datetime.datetime.now(datetime.UTC).isoformat(),
                    device=args.device,
                    **env,
                    **row,
                )
                bench_common.append_record(args.results, record)
    if not args.no_record:
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
