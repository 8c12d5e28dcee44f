"""How often does the image paper's latent nL2 (no decode) agree with the embedding similarity?

Runs the embedded default model on every distinct training caption (plain CFG, so the trajectories
are not steered by either signal), captures the CFG-guided clean-latent prediction at every step, and
compares, per step: the share of rows whose embedding-nearest training clip is also latent-nearest,
the Spearman correlation of the two similarities across rows, and the share of rows on which the two
gates agree (embedding σ_t > λ_t of the default preset vs nL2 σ > the given --nl2-threshold).

    python benchmarks/nl2_agreement.py
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nl2-threshold", type=float, default=-1.4, help="nL2 gate threshold (paper: nL2 < 1.4)")
    args = p.parse_args()

    import pyarrow.parquet as pq

    from amg_engine.engine.config import PRESETS
    from amg_engine.engine.engine import Engine, Request
    from amg_engine.engine.guidance import lambda_t
    from amg_engine.index.latent_nl2 import nl2_agreement
    from amg_engine.jobs.replication import caption_manifest

    cfg = PRESETS["default-model"]
    engine = Engine(replace(cfg, guidance=replace(cfg.guidance, amg=False)))
    if engine.index.latents is None:
        raise SystemExit("the index has no training latents (latents.safetensors); rebuild it with train.py")
    rows = pq.read_table(caption_manifest(ROOT / "out" / "nl2" / "captions.parquet")).to_pylist()
    reqs = [Request(r["id"], r["prompt"], r["seconds"], r["seed"]) for r in rows]
    lengths = engine.lengths([r.seconds for r in reqs])
    captured = []
    original = engine._branches

    def spy(x, sigma, cond, uncond):
        x0_c, x0_u = original(x, sigma, cond, uncond)
        captured.append((float(sigma[0]), x0_u + cfg.guidance.cfg_scale * (x0_c - x0_u)))
        return x0_c, x0_u

    engine._branches = spy
    engine.generate(reqs)
    g = cfg.guidance
    print(f"{'sigma':>8s} {'same NN':>8s} {'spearman':>9s} {'gates agree':>12s}")
    for sigma, x0 in captured:
        with torch.no_grad():
            emb = engine.embed(engine.decode(x0), lengths)
        lam = float(lambda_t(torch.tensor(1 / (1 + sigma**2)), g.lambda_min, g.lambda_max))
        a = nl2_agreement(x0, emb, engine.index.vectors, engine.index.latents, (lam, args.nl2_threshold))
        print(f"{sigma:8.3f} {a.nearest:8.2f} {a.rank_correlation:9.2f} {a.gate:12.2f}")


if __name__ == "__main__":
    main()
