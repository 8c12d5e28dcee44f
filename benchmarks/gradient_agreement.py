"""How close the detector gradient (GuidanceConfig.gradient="detector") comes to the full one.

    python benchmarks/gradient_agreement.py [--prompts 8]

On the default model's first caption prompts, along each row's plain-CFG trajectory (AMG with the gate
never open), at every step: the full similarity gradient ∇_x σ_t (backward through the model, decoder
and embedder) and the detector gradient ᾱ·∇_{x0} σ_t (decoder and embedder only). Printed per step:
the median cosine between the two and the median ratio of their norms (detector over full); a ratio
near 1 says the scale ᾱ = 1/(1+σ²) is the right one, a cosine near 1 that the direction is kept.
Appends a JSON line to results.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import ROOT, append_record, environment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import pyarrow.parquet as pq
    import torch

    from amg_engine.engine import engine as engine_module
    from amg_engine.engine.config import PRESETS, with_overrides
    from amg_engine.engine.engine import Engine, Request
    from amg_engine.engine.guidance import search_fn
    from amg_engine.jobs.replication import caption_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="the first N distinct training captions")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON-lines log")
    args = p.parse_args(argv)

    engine = Engine(with_overrides(PRESETS["default-model"], lambda_min=1.0, lambda_max=1.0))
    with tempfile.TemporaryDirectory() as tmp:
        rows = pq.read_table(caption_manifest(Path(tmp) / "captions.parquet")).to_pylist()
    reqs = [Request(r["id"], r["prompt"], r["seconds"], r["seed"]) for r in rows[: args.prompts]]
    seen, real = [], engine_module.AMGDenoiser

    class Recording(real):  # the step's input, and the denoiser itself
        def __call__(self, x, sigma):
            seen.append((self, x.detach().clone(), sigma.clone()))
            return super().__call__(x, sigma)

    engine_module.AMGDenoiser = Recording
    try:
        engine.sample(reqs)
    finally:
        engine_module.AMGDenoiser = real
    per_step = []
    for i, (den, x, sigma) in enumerate(seen):
        with torch.no_grad():
            x0_c, x0_u = den._branches(x, sigma, den.cond, den.uncond)
            probe = den._probe(x0_c, x0_u, den.params.cfg_scale)
            _, nn = search_fn(x.device)(den.detector(probe, torch.arange(len(reqs))), den.index_vectors)
        b = torch.arange(len(reqs))
        full = den.similarity_grad(x, sigma, b, nn).flatten(1)
        det = den.detector_grad(probe, sigma, b, nn).flatten(1)
        cos = torch.nn.functional.cosine_similarity(full, det, dim=1)
        ratio = det.norm(dim=1) / full.norm(dim=1)
        per_step.append(dict(step=i, sigma=float(sigma[0]), cosine=statistics.median(cos.tolist()),
                             norm_ratio=statistics.median(ratio.tolist())))  # fmt: skip
        print(f"step {i:2d}  sigma {float(sigma[0]):8.3f}  cosine {per_step[-1]['cosine']:6.3f}  "
              f"|detector|/|full| {per_step[-1]['norm_ratio']:8.3f}")  # fmt: skip
    record = dict(bench="gradient_agreement",
                  when=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  **environment("cpu"), prompts=len(reqs), per_step=per_step)  # fmt: skip
    append_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
