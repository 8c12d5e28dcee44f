"""What a released clip costs under the release gate: plain CFG + gate (generate-and-filter) against
full AMG + gate, on the default model's caption prompts.

    python benchmarks/bench_gate.py [--prompts 32] [--reps 3] [--preset default-flow]

The two runs alternate, ``--reps`` times each, every run into a fresh folder with its engine already
loaded and warmed up, so a change of load on a shared machine hits both alike; the figures are the
medians. Per configuration: the share of prompts released and rejected, the row-generations and the
wall seconds per released clip, and the ratio of full AMG's seconds per released clip to the
generate-and-filter baseline's measured in the same run (below 1: AMG is cheaper). The gate is
``amg generate --max-similarity`` with its defaults (τ the index's threshold, 3 attempts).
``--preset default-flow`` measures the same on the few-step flow variant of the default model
(engine/default/assets/model-flow, 8 ping-pong steps, no CFG: "plain CFG" is then the conditional
prediction alone).
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


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from amg_engine.engine.config import PRESETS, with_overrides
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine
    from amg_engine.engine.models import DEFAULT_FLOW_MODEL_DIR, DEFAULT_MODEL_DIR
    from amg_engine.jobs.gate import ReleaseGate
    from amg_engine.jobs.generate import JobConfig, run_generate
    from amg_engine.jobs.replication import caption_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="the first N distinct training captions")
    p.add_argument("--reps", type=int, default=3, help="runs of each configuration, alternating")
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

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = caption_manifest(tmp / "captions.parquet")
        pq.write_table(pq.read_table(manifest).slice(0, args.prompts), manifest)
        warm = tmp / "warm.parquet"
        pq.write_table(pq.read_table(manifest).slice(0, 2), warm)
        engines = {}
        for name, amg in CONFIGS:
            config = with_overrides(PRESETS[args.preset], amg=amg)
            engines[name] = Engine(config, model_dir, DEFAULT_INDEX_DIR)
            run_generate(warm, tmp / f"warm-{amg}", engines[name], JobConfig(progress=False))
        job = JobConfig(progress=False, gate=ReleaseGate())
        runs: dict[str, list[dict]] = {name: [] for name, _ in CONFIGS}
        for rep in range(args.reps):
            for name, _ in CONFIGS:
                start = time.perf_counter()
                s = run_generate(manifest, tmp / f"{slug(name)}-{rep}", engines[name], job)
                wall = time.perf_counter() - start
                runs[name].append(dict(seconds=wall, released=s.released, rejected=s.rejected,
                                       generations=s.row_generations))  # fmt: skip
                print(f"{name}, run {rep + 1}: {s.released} released, {s.rejected} rejected, "
                      f"{s.row_generations} row-generations, {wall:.1f} s", file=sys.stderr)  # fmt: skip
    n = args.prompts
    figures = {}
    for name, rs in runs.items():
        released = rs[0]["released"]  # seeds are fixed: every run releases the same rows
        per = lambda v, r=released: v / r if r else float("nan")  # noqa: E731
        figures[name] = dict(
            released=released / n, rejected=rs[0]["rejected"] / n,
            generations_per_released=per(rs[0]["generations"]),
            seconds_per_released=per(statistics.median(r["seconds"] for r in rs)),
            seconds=[r["seconds"] for r in rs],
        )  # fmt: skip
    cfg, amg = (figures[name] for name, _ in CONFIGS)
    ratio = amg["seconds_per_released"] / cfg["seconds_per_released"]
    print(f"{'':18s} {'released':>9s} {'rejected':>9s} {'gens/released':>14s} {'s/released':>11s}")
    for name, f in figures.items():
        print(f"{name:18s} {f['released']:9.0%} {f['rejected']:9.0%} {f['generations_per_released']:14.2f} "
              f"{f['seconds_per_released']:11.3f}")  # fmt: skip
    verdict = ("generate-and-filter released nothing" if not cfg["released"] else
               "AMG cheaper" if ratio < 1 else "generate-and-filter cheaper")  # fmt: skip
    print(f"full AMG + gate / plain CFG + gate, seconds per released clip: {ratio:.2f}x ({verdict}; "
          f"medians of {args.reps} alternating runs, {n} prompts, {args.preset})")  # fmt: skip
    record = dict(bench="gate", when=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  **environment("cpu"), prompts=n, reps=args.reps, preset=args.preset, figures=figures,
                  amg_over_filter_seconds_per_released=ratio)  # fmt: skip
    append_record(args.out, record)
    return 0


def slug(name: str) -> str:
    return name.replace(" + ", "-").replace(" ", "-").lower()


if __name__ == "__main__":
    sys.exit(main())
