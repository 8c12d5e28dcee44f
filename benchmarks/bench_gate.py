"""What a released clip costs under the release gate: plain CFG + gate (generate-and-filter) against
full AMG + gate, on the default model's caption prompts; with ``--variants`` also the cheaper variants of
AMG (issue 29: the ablation's variant rows, jobs/ablate.VARIANT_ROWS), each under the gate.

    python benchmarks/bench_gate.py [--prompts 32] [--reps 3] [--variants] [--block captions|novel]
                                    [--no-gate] [--preset default-model|default-flow]

The two runs alternate, ``--reps`` times each, every run into a fresh folder with its engine already
loaded and warmed up, so a change of load on a shared machine hits both alike; the figures are the
medians. Per configuration: the share of prompts released and rejected, the row-generations and the
wall seconds per released clip, and the ratio of full AMG's seconds per released clip to the
generate-and-filter baseline's measured in the same run (below 1: AMG is cheaper). The gate is
``amg generate --max-similarity`` with its defaults (τ the index's threshold, 3 attempts). With
``--variants`` each configuration's seconds per row-generation is also given over plain CFG's (the
issue's cost per generation: full AMG 3.0x, the target 1.5x). ``--no-gate`` runs the same
configurations without the gate: one generation per row, each in the same full batches, so the seconds
per generation compare the guidance alone (under the gate plain CFG's retries run in smaller batches).
``--preset default-flow`` measures plain against full AMG on the few-step flow variant of the default
model (engine/default/assets/model-flow, 8 ping-pong steps, no CFG: "plain CFG" is then the conditional
prediction alone); the variants are not defined there.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import ROOT, append_record, environment  # noqa: E402

CONFIGS = (("plain CFG + gate", False), ("full AMG + gate", True))


def configs(variants: bool, preset: str = "default-model") -> dict:
    """name -> engine configuration: plain CFG and full AMG of ``preset``, and with ``variants`` the
    ablation's variant rows (jobs/ablate.VARIANT_ROWS; the cascade at the bundled model's calibrated θ)."""
    from amg_engine.engine.config import PRESETS, with_overrides
    from amg_engine.jobs.ablate import VARIANT_ROWS, row_config

    out = {name: with_overrides(PRESETS[preset], amg=amg) for name, amg in CONFIGS}
    if variants:
        out |= {f"{r.name} + gate": row_config(r) for r in VARIANT_ROWS}
    return out


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq
    import torch

    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine
    from amg_engine.engine.models import DEFAULT_FLOW_MODEL_DIR, DEFAULT_MODEL_DIR
    from amg_engine.jobs.gate import ReleaseGate
    from amg_engine.jobs.generate import JobConfig, run_generate
    from amg_engine.jobs.replication import caption_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="the first N prompts of the block")
    p.add_argument("--reps", type=int, default=3, help="runs of each configuration, alternating")
    p.add_argument("--variants", action="store_true", help="also the cheaper variants of AMG (issue 29)")
    p.add_argument(
        "--block", choices=("captions", "novel"), default="captions",
        help="the distinct training captions (default) or the novel prompts",
    )  # fmt: skip
    p.add_argument("--no-gate", action="store_true", help="the same configurations without the gate")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON-lines log")
    p.add_argument(
        "--preset",
        choices=("default-model", "default-flow"),
        default="default-model",
        help="default-model (the bundled v model) or default-flow (its few-step flow variant)",
    )
    args = p.parse_args(argv)
    model_dir = DEFAULT_FLOW_MODEL_DIR if args.preset == "default-flow" else DEFAULT_MODEL_DIR
    if args.prompts < 1 or args.reps < 1:
        p.error("--prompts and --reps need to be ≥ 1")
    if args.variants and args.preset != "default-model":
        p.error("--variants are the v model's (default-model); the flow model has none")

    cfgs = configs(args.variants, args.preset)
    if args.no_gate:
        cfgs = {name.removesuffix(" + gate"): cfg for name, cfg in cfgs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.block == "captions":
            manifest = caption_manifest(tmp / "captions.parquet")
        else:
            from amg_engine.engine.default.heldout import novel_manifest

            manifest = novel_manifest(tmp / "novel.parquet")
        pq.write_table(pq.read_table(manifest).slice(0, args.prompts), manifest)
        n = pq.read_metadata(manifest).num_rows
        warm = tmp / "warm.parquet"
        pq.write_table(pq.read_table(manifest).slice(0, 2), warm)
        engines = {}
        for k, (name, cfg) in enumerate(cfgs.items()):
            engines[name] = Engine(cfg, model_dir, DEFAULT_INDEX_DIR)
            run_generate(warm, tmp / f"warm-{k}", engines[name], JobConfig(progress=False))
        job = JobConfig(progress=False, gate=None if args.no_gate else ReleaseGate())
        runs: dict[str, list[dict]] = {name: [] for name in cfgs}
        for rep in range(args.reps):
            for name in cfgs:
                start = time.perf_counter()
                s = run_generate(manifest, tmp / f"{slug(name)}-{rep}", engines[name], job)  # a fresh folder
                wall = time.perf_counter() - start
                runs[name].append(dict(seconds=wall, released=s.released, rejected=s.rejected,
                                       generations=s.row_generations or s.ok))  # fmt: skip
                print(f"{name}, run {rep + 1}: {s.released} released, {s.rejected} rejected, "
                      f"{runs[name][-1]['generations']} row-generations, {wall:.1f} s",
                      file=sys.stderr)  # fmt: skip
    figures = {}
    for name, rs in runs.items():
        released = rs[0]["released"]  # seeds are fixed: every run releases the same rows
        per = lambda v, r=released: v / r if r else float("nan")  # noqa: E731
        median = statistics.median(r["seconds"] for r in rs)
        figures[name] = dict(
            released=released / n, rejected=rs[0]["rejected"] / n,
            generations_per_released=per(rs[0]["generations"]),
            seconds_per_released=per(median), seconds_per_generation=median / rs[0]["generations"],
            seconds=[r["seconds"] for r in rs],
        )  # fmt: skip
    cfg, amg = list(figures.values())[:2]  # plain CFG, full AMG
    ratio = amg["seconds_per_released"] / cfg["seconds_per_released"]
    for f in figures.values():  # the cost per generation, over plain CFG's in the same runs
        f["cost_per_generation_over_cfg"] = f["seconds_per_generation"] / cfg["seconds_per_generation"]
    width = max(len(name) for name in figures)
    print(f"{'':{width}s} {'released':>9s} {'rejected':>9s} {'gens/released':>14s} {'s/released':>11s} "
          f"{'s/gen vs CFG':>13s}")  # fmt: skip
    for name, f in figures.items():
        print(f"{name:{width}s} {f['released']:9.0%} {f['rejected']:9.0%} "
              f"{f['generations_per_released']:14.2f} {f['seconds_per_released']:11.3f} "
              f"{f['cost_per_generation_over_cfg']:12.2f}x")  # fmt: skip
    verdict = ("generate-and-filter released nothing" if not cfg["released"] else
               "AMG cheaper" if ratio < 1 else "generate-and-filter cheaper")  # fmt: skip
    gate = "" if args.no_gate else " + gate"
    verdict = "no gate" if args.no_gate else verdict
    print(f"full AMG{gate} / plain CFG{gate}, seconds per released clip: {ratio:.2f}x ({verdict}; "
          f"medians of {args.reps} alternating runs, {n} prompts, {args.preset})")  # fmt: skip
    record = dict(bench="gate", when=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  **environment("cpu"), prompts=n, block=args.block, gate=not args.no_gate, reps=args.reps,
                  preset=args.preset, threads=torch.get_num_threads(), figures=figures,
                  amg_over_filter_seconds_per_released=ratio)  # fmt: skip
    append_record(args.out, record)
    return 0


def slug(name: str) -> str:
    return name.replace(" + ", "-").replace(", ", "-").replace(" ", "-").lower()


if __name__ == "__main__":
    sys.exit(main())
