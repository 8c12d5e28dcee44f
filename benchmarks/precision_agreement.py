"""How far does a reduced precision (bf16 autocast by default) move the engine from fp32?

On the bundled default model (preset ``default-model``, the distinct training captions, seeds
100, 101, ...), in one run:

1. plain CFG: the final latents of each row in fp32 and in the reduced precision, their relative
   L2 difference per row (||x_low − x_fp32|| / ||x_fp32||);
2. AMG, teacher-forced: along the fp32 AMG trajectory, at every step, the detector's similarity
   computed on the same latents in both precisions; the share of row-steps whose gate (σ_t > λ_t)
   agrees, and how close to λ_t the disagreeing ones were;
3. AMG, end to end: both precisions sampled independently; the share of row-steps whose gates agree
   (a gate that flips steers its row onto another trajectory, so this share also counts the later
   consequences of a flip) and of rows with the same gate at every step;
4. batch invariance in the reduced precision: rows sampled alone against the same rows in the batch
   (max relative difference, gate flips);
5. non-finite values anywhere.

    python benchmarks/precision_agreement.py                   # bf16, 32 prompts (~3 min, 2 cores)
    python benchmarks/precision_agreement.py --precision fp16 --prompts 8

Prints the figures and appends a JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_common  # noqa: E402


def requests(n: int):
    """The first ``n`` distinct training captions at their clip's duration, seeds 100, 101, ..."""
    from amg_engine.engine.default.data import make_clips
    from amg_engine.engine.engine import Request

    clips = make_clips()
    captions = sorted({c.caption for c in clips})[:n]
    secs = {cap: max(c.seconds for c in clips if c.caption == cap) for cap in captions}
    return [Request(f"cap-{i:02d}", cap, secs[cap], 100 + i) for i, cap in enumerate(captions)]


def engines(precision: str, device: str = "cpu", steps: int | None = None, model_dir=None, index_dir=None):
    """(fp32 engine, reduced-precision engine) of the default-model preset, AMG on, no forward reuse
    (every step calls the full-batch model once, which the teacher-forced probe hooks into)."""
    from amg_engine.engine.config import PRESETS
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine
    from amg_engine.engine.models import DEFAULT_MODEL_DIR

    cfg = replace(PRESETS["default-model"], device=device, reuse_forward=False)
    if steps:
        cfg = replace(cfg, sampler=replace(cfg.sampler, steps=steps))
    dirs = (model_dir or DEFAULT_MODEL_DIR, index_dir or DEFAULT_INDEX_DIR)
    return Engine(replace(cfg, precision="fp32"), *dirs), Engine(replace(cfg, precision=precision), *dirs)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row ||a − b|| / ||b||, [B]."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def plain(engine):
    cfg = engine.config
    return replace(cfg, guidance=replace(cfg.guidance, amg=False))


def with_config(engine, config):
    """Run ``engine`` under another config (same loaded model) inside a with-block."""

    class _Scope:
        def __enter__(self):
            self.saved, engine.config = engine.config, config
            return engine

        def __exit__(self, *exc):
            engine.config = self.saved

    return _Scope()


def teacher_forced(e32, low, reqs) -> dict:
    """Along e32's AMG trajectory: per step, the similarity of the same latents in both precisions.

    Hooks e32's full-batch model call (reuse_forward is off, so it is called once per step with the
    whole batch) and runs ``low``'s model call, detector and search on the same inputs.
    """
    from amg_engine.engine.guidance import search_fn

    g = e32.config.guidance
    detect = low.detector([r.seconds for r in reqs], reference=False)
    rows = torch.arange(len(reqs), device=e32.device)
    s0 = g.cfg_scale
    original, low_sims = e32._branches, []

    def spy(x, sigma, cond, uncond):
        with torch.no_grad(), low.precision.flags():
            c, u = low._branches(x, sigma, cond, uncond)
            low_sims.append(search_fn(x.device)(detect(u + s0 * (c - u), rows), low.index.vectors)[0])
        return original(x, sigma, cond, uncond)

    e32._branches = spy
    try:
        _, traces = e32.sample(reqs)
    finally:
        e32._branches = original
    sim32 = torch.stack([t.sim for t in traces])  # [steps, B]
    lam = torch.stack([t.lam for t in traces])
    sim_low = torch.stack(low_sims)
    agree = (sim32 > lam) == (sim_low > lam)
    margin = (sim32 - lam).abs()
    return dict(
        share=agree.float().mean().item(),
        row_steps=agree.numel(),
        max_abs_sim_diff=(sim_low - sim32).abs().max().item(),
        median_abs_sim_diff=(sim_low - sim32).abs().median().item(),
        max_margin_of_a_flip=margin[~agree].max().item() if (~agree).any() else None,
        finite=bool(torch.isfinite(sim_low).all()),
    )


def end_to_end(e32, low, reqs) -> dict:
    x32, t32 = e32.sample(reqs)
    xlo, tlo = low.sample(reqs)
    g32, glo = torch.stack([t.gate for t in t32]), torch.stack([t.gate for t in tlo])  # [steps, B]
    return dict(
        share=(g32 == glo).float().mean().item(),
        rows_identical=int((g32 == glo).all(dim=0).sum()),
        open_share_fp32=g32.float().mean().item(),
        open_share_low=glo.float().mean().item(),
        max_rel_latent_diff=rel_diff(xlo, x32).max().item(),
        finite=bool(torch.isfinite(xlo).all()),
    )


def plain_cfg(e32, low, reqs) -> dict:
    with with_config(e32, plain(e32)), with_config(low, plain(low)):
        x32, _ = e32.sample(reqs)
        xlo, _ = low.sample(reqs)
    d = rel_diff(xlo, x32)
    return dict(max_rel=d.max().item(), median_rel=d.median().item(), finite=bool(torch.isfinite(xlo).all()))


def batch_invariance(low, reqs, alone=(0, 3, 6)) -> dict:
    """Rows alone vs in the batch, in ``low``'s precision, plain CFG and AMG."""
    out = {}
    for name, cfg in (("plain", plain(low)), ("amg", low.config)):
        with with_config(low, cfg):
            batch, traces = low.sample(reqs)
            diffs, flips = [], 0
            for i in (i for i in alone if i < len(reqs)):
                one, t1 = low.sample([reqs[i]])
                diffs.append(rel_diff(batch[i : i + 1], one).item())
                if traces:
                    flips += int(
                        (
                            torch.stack([t.gate[i] for t in traces]) != torch.stack([t.gate[0] for t in t1])
                        ).sum()
                    )
        out[name] = dict(max_rel=max(diffs), gate_flips=flips if traces else None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp16", "tf32"), help="the reduced precision"
    )
    p.add_argument("--prompts", type=int, default=32, help="distinct training captions (at most 32)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON-lines log")
    args = p.parse_args()

    reqs = requests(args.prompts)
    e32, low = engines(args.precision, args.device)
    t0 = time.perf_counter()
    figures = dict(
        plain_cfg=plain_cfg(e32, low, reqs),
        teacher_forced=teacher_forced(e32, low, reqs),
        end_to_end=end_to_end(e32, low, reqs),
        batch_invariance=batch_invariance(low, reqs),
    )
    took = time.perf_counter() - t0
    pc, tf, ee, bi = (figures[k] for k in ("plain_cfg", "teacher_forced", "end_to_end", "batch_invariance"))
    print(f"{args.precision} vs fp32 on {args.device}, default model, {len(reqs)} prompts, "
          f"{e32.config.sampler.steps} steps ({took:.0f} s)")  # fmt: skip
    print(f"plain CFG final latents, ||x_low - x_fp32|| / ||x_fp32|| per row: max {pc['max_rel']:.2e}, "
          f"median {pc['median_rel']:.2e}")  # fmt: skip
    print(f"AMG gates, teacher-forced (same latents): {100 * tf['share']:.2f}% of {tf['row_steps']} "
          f"row-steps agree; |sim diff| max {tf['max_abs_sim_diff']:.2e}, "
          f"median {tf['median_abs_sim_diff']:.2e}; "
          f"largest |sim - lambda| of a flipped gate: {tf['max_margin_of_a_flip']}")  # fmt: skip
    print(f"AMG gates, end to end: {100 * ee['share']:.2f}% of row-steps agree, {ee['rows_identical']}/"
          f"{len(reqs)} rows with identical gates; open share fp32 {ee['open_share_fp32']:.3f}, "
          f"{args.precision} {ee['open_share_low']:.3f}")  # fmt: skip
    print(f"batch invariance in {args.precision} (rows alone vs in the batch): plain CFG max rel "
          f"{bi['plain']['max_rel']:.2e}; AMG max rel {bi['amg']['max_rel']:.2e}, "
          f"{bi['amg']['gate_flips']} gate flips")  # fmt: skip
    print(f"all finite: {pc['finite'] and tf['finite'] and ee['finite']}")
    record = {
        "bench": "precision_agreement", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **bench_common.environment(args.device), "precision": args.precision, "prompts": len(reqs),
        "steps": e32.config.sampler.steps, "seconds": took, **figures,
    }  # fmt: skip
    bench_common.append_record(args.out, record)


if __name__ == "__main__":
    main()
