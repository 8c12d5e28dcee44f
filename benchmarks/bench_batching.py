"""Per-row cost of the default model's CFG call against batch size, without and with the backward.

What the engine's speed-up over the batch-of-one baseline is made of, measured on its own: the
[conditional; unconditional] model call per row at batch sizes 1..128, alone (the engine's main
call) and with autograd plus the backward pass (what a gated row's dissimilarity gradient costs).
Each figure is printed with its ratio to batch size 1, measured in the same run; one JSON line is
appended to benchmarks/results.jsonl.

    python benchmarks/bench_batching.py
    python benchmarks/bench_batching.py --sizes 1 8 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_common  # noqa: E402


def _per_call(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _cfg_call(model, x, sigma, cond, uncond, backward: bool):
    """The CFG model call; with ``backward``, under autograd and followed by the gradient w.r.t. x."""
    from amg_engine.engine.compile import cfg_branches

    if not backward:
        with torch.no_grad():
            return cfg_branches(model, x, sigma, cond, uncond)
    xg = x.detach().requires_grad_(True)
    x0_c, x0_u = cfg_branches(model, xg, sigma, cond, uncond)
    return torch.autograd.grad((x0_u + 4 * (x0_c - x0_u)).square().sum(), xg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128], help="batch sizes (rows)")
    p.add_argument("--sigma", type=float, default=2.0, help="noise level of the inputs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON-lines log")
    args = p.parse_args()

    from amg_engine.engine.default.data import make_clips
    from amg_engine.engine.models import DEFAULT_MODEL_DIR, encode_conditioning, load_model

    model, config = load_model(DEFAULT_MODEL_DIR, "cpu")
    frames = config["sample_size"] // model.pretransform.downsampling_ratio
    clips = make_clips()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"default model, CPU ({torch.get_num_threads()} threads), CFG call = conditional + unconditional")
    head = ("rows", "fwd ms/row", "vs b=1", "fwd+bwd ms/row", "vs b=1", "(f+b)/f")
    print("{:>5s} {:>11s} {:>7s} {:>15s} {:>7s} {:>8s}".format(*head))
    for n in args.sizes:
        meta = [{"prompt": clips[i % len(clips)].caption, "seconds_total": clips[i % len(clips)].seconds}
                for i in range(n)]  # fmt: skip
        with torch.no_grad():
            cond = encode_conditioning(model, meta, "cpu")
        uncond = cond.null_text()
        x = torch.randn((n, model.io_channels, frames), generator=gen) * args.sigma
        sigma = torch.full((n,), args.sigma)

        forward = partial(_cfg_call, model, x, sigma, cond, uncond, backward=False)
        forward_backward = partial(_cfg_call, model, x, sigma, cond, uncond, backward=True)

        reps = max(3, 64 // n)
        fwd, fb = _per_call(forward, reps) / n, _per_call(forward_backward, reps) / n
        rows.append({"rows": n, "forward_s_per_row": fwd, "forward_backward_s_per_row": fb})
        f1, fb1 = rows[0]["forward_s_per_row"], rows[0]["forward_backward_s_per_row"]
        print(f"{n:5d} {1e3 * fwd:11.2f} {f1 / fwd:6.1f}x {1e3 * fb:15.2f} {fb1 / fb:6.1f}x {fb / fwd:8.2f}")

    record = {
        "bench": "batching", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": "cpu",
        **bench_common.environment("cpu"), "sigma": args.sigma, "rows": rows,
    }  # fmt: skip
    bench_common.append_record(args.out, record)


if __name__ == "__main__":
    main()
