"""Throughput of the batched engine against the published-style AMG baseline, in one run.

Same prompts and seeds through:
  (a) baseline: ``engine.reference.published_amg`` — batch size 1, eager, every step three model
      forwards, the decode, the embedding and the backward pass whatever the gate says;
  (b) the engine with AMG (batched, gate-skipping, fused combine; ``--compile`` adds torch.compile);
  (c) the engine with plain CFG, so AMG's overhead is a ratio measured in the same run.
Prints clips/s and audio-seconds per wall-second for each, the speed-ups, the largest difference
between baseline and engine outputs (they must agree: same maths), and where the engine's AMG step
time goes (torch.profiler labels). Appends one JSON line to benchmarks/results.jsonl.

    python benchmarks/bench_engine.py               # CPU, embedded default model, 8 prompts
    python benchmarks/bench_engine.py --prompts 16 --steps 30
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_common  # noqa: E402


def _requests(n: int):
    from amg_engine.engine.default.data import make_clips
    from amg_engine.engine.engine import Request

    clips = make_clips()
    captions = sorted({c.caption for c in clips})[:n]
    secs = {c.caption: c.seconds for c in clips}
    return [Request(f"b{i}", cap, secs[cap], 1000 + i) for i, cap in enumerate(captions)]


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _breakdown(engine, reqs) -> dict[str, float]:
    """Seconds per label over one engine.generate call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, total = _timed(lambda: engine.generate(reqs))
    out = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith(("amg/", "sampler/")):
            out[evt.key] += evt.cpu_time_total / 1e6
    out["total"] = total
    return dict(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (distinct training captions)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's)")
    p.add_argument("--preset", default="default-model", help="engine preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's step")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: embedded)")
    p.add_argument("--index", type=Path, default=None, help="index directory (default: embedded)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON-lines log")
    return p.parse_args(argv)


@dataclass
class Figures:
    """What one run measured: wall seconds per path, agreement with the baseline, the gates."""

    n: int
    audio_s: float
    steps: int
    seconds: dict[str, float]  # baseline, engine_amg, engine_plain, warmup, engine_amg_no_reuse
    diff: float  # largest per-row relative difference, baseline against engine
    agree: int  # rows agreeing within 1e-3
    parts: dict[str, float]
    open_share: float
    warm_share: float


def measure(args: argparse.Namespace) -> Figures:
    """Warm up, then time the baseline, the engine with AMG, with plain CFG and without forward reuse
    on the same prompts and seeds; profile one AMG run."""
    from amg_engine.engine.config import PRESETS
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine
    from amg_engine.engine.models import DEFAULT_MODEL_DIR
    from amg_engine.engine.reference import published_amg

    cfg = PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, sampler=replace(cfg.sampler, steps=args.steps))
    reqs = _requests(args.prompts)
    cfg = replace(cfg, device=args.device, batch_size=len(reqs), compile=args.compile)
    engine = Engine(cfg, args.model or DEFAULT_MODEL_DIR, args.index or DEFAULT_INDEX_DIR)

    # warm-up; compiled graphs are specialised to the batch shape, so compile warms up on the full batch
    warm_reqs = reqs if args.compile else reqs[:1]
    t0 = time.perf_counter()
    engine.generate(warm_reqs)
    warmup = time.perf_counter() - t0
    base = []
    _, t_base = _timed(lambda: base.extend(published_amg(engine, r) for r in reqs))
    (ours, traces), t_amg = _timed(lambda: engine.sample(reqs))  # latents, as the baseline returns
    plain_cfg = replace(cfg, guidance=replace(cfg.guidance, amg=False))
    plain_engine = Engine(plain_cfg, args.model or DEFAULT_MODEL_DIR, args.index or DEFAULT_INDEX_DIR)
    plain_engine.generate(warm_reqs)
    _, t_plain = _timed(lambda: plain_engine.sample(reqs))
    engine.config = replace(cfg, reuse_forward=False)  # every gated row runs its forward again
    _, t_recompute = _timed(lambda: engine.sample(reqs))
    engine.config = cfg
    # per row: max |baseline − engine| over the row's latents, relative to the row's scale. A row can
    # differ when its similarity sits within float rounding of λ_t and the gate falls the other way
    # (batched and single-row matmuls round differently); such a row then follows another trajectory.
    row_diff = (torch.cat(base) - ours).flatten(1).abs().amax(1) / ours.flatten(1).abs().amax(1)
    parts = _breakdown(engine, reqs)
    gates = torch.stack([t.gate for t in traces])  # [steps, B]
    return Figures(
        n=len(reqs), audio_s=sum(r.seconds for r in reqs), steps=cfg.sampler.steps,
        seconds={"baseline": t_base, "engine_amg": t_amg, "engine_plain": t_plain, "warmup": warmup,
                 "engine_amg_no_reuse": t_recompute},
        diff=row_diff.max().item(), agree=int((row_diff < 1e-3).sum()), parts=parts,
        open_share=gates.float().mean().item(),  # row-steps whose gate is open
        warm_share=(gates[1:] & gates[:-1]).sum().item() / max(1, gates.sum().item()),  # reused a forward
    )  # fmt: skip


def print_table(args: argparse.Namespace, f: Figures) -> None:
    t = f.seconds
    rows = [
        ("baseline (published-style)", t["baseline"]),
        ("engine AMG", t["engine_amg"]),
        ("engine AMG, no forward reuse", t["engine_amg_no_reuse"]),
        ("engine plain CFG", t["engine_plain"]),
    ]
    print(f"device {args.device}, preset {args.preset}, {f.n} prompts, {f.steps} steps, "
          f"compile={args.compile} (warm-up {t['warmup']:.1f} s)")  # fmt: skip
    print(f"{'path':30s} {'wall s':>8s} {'clips/s':>8s} {'audio-s/s':>10s}")
    for name, s in rows:
        print(f"{name:30s} {s:8.2f} {f.n / s:8.3f} {f.audio_s / s:10.3f}")
    print(f"speed-up engine AMG vs baseline: {t['baseline'] / t['engine_amg']:.1f}x")
    print(f"AMG overhead vs plain CFG: {t['engine_amg'] / t['engine_plain']:.2f}x")
    reuse = t["engine_amg_no_reuse"] / t["engine_amg"]
    print(f"forward reuse for warm rows: {reuse:.2f}x faster than recomputing it")
    print(f"rows whose final latents agree with the baseline (rel. diff < 1e-3): {f.agree}/{f.n} "
          f"(largest difference {f.diff:.2e})")  # fmt: skip
    print(f"gate open on {100 * f.open_share:.0f}% of row-steps; {100 * f.warm_share:.0f}% of those "
          f"reused the row's forward (open at the previous step too)")  # fmt: skip
    print("engine AMG step time by part (profiled run, s):")
    for k, v in sorted(f.parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:22s} {v:8.3f}")


def main() -> None:
    args = parse_args()
    f = measure(args)
    print_table(args, f)
    t = f.seconds
    record = {
        "bench": "engine", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device,
        **bench_common.environment(args.device),
        "prompts": f.n, "steps": f.steps, "compile": args.compile,
        "seconds": t,
        "speedup_vs_baseline": t["baseline"] / t["engine_amg"],
        "amg_overhead_vs_plain": t["engine_amg"] / t["engine_plain"],
        "max_rel_diff": f.diff, "rows_agreeing": f.agree, "breakdown_s": f.parts,
        "gate_open_share": f.open_share, "warm_reuse_share": f.warm_share,
    }  # fmt: skip
    bench_common.append_record(args.out, record)


if __name__ == "__main__":
    main()
