"""amg: batched text-to-audio generation with Anti-Memorization Guidance, and memorization audits.

amg generate MANIFEST.parquet --out DIR     generate audio for every manifest row (AMG on by default)
amg demo --out DIR                          generate the bundled example manifest on the default model
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time

EXAMPLE_MANIFEST = Path(__file__).parent / "examples" / "manifest.parquet"


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
    from engine.config import PRESETS

    p.add_argument("--out", type=Path, required=True, help="output folder (audio/ and results.parquet)")
    p.add_argument(
        "--preset", default="default-model", choices=sorted(PRESETS), help="named engine configuration"
    )
    p.add_argument("--no-amg", action="store_true", help="plain classifier-free guidance baseline (no AMG)")
    p.add_argument("--mode", choices=("corrected", "reference"), help="AMG semantics (see README)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale s0")
    p.add_argument("--c1", type=float, help="despecification scale (0 turns it off)")
    p.add_argument("--c2", type=float, help="caption-deduplication scale (0 turns it off)")
    p.add_argument("--c3", type=float, help="dissimilarity-gradient scale (0 turns it off)")
    p.add_argument("--lambda-min", type=float, help="threshold λ_t at high noise")
    p.add_argument("--lambda-max", type=float, help="threshold λ_t approached at low noise")
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument("--sampler", help="dpmpp-3m-sde, dpmpp-2m-sde, dpmpp-2m or euler")
    p.add_argument("--batch-size", type=int, help="rows per denoising batch")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument("--format", default="flac", choices=("flac", "wav"), help="audio file format")
    p.add_argument("--model", type=Path, help="model directory (model_config.json + model.safetensors)")
    p.add_argument("--index", type=Path, help="training-set index folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _engine_config(args):
    from dataclasses import replace

    from engine.config import PRESETS, with_overrides

    cfg = with_overrides(
        PRESETS[args.preset], amg=False if args.no_amg else None, mode=args.mode, cfg_scale=args.cfg_scale,
        c1=args.c1, c2=args.c2, c3=args.c3, lambda_min=args.lambda_min, lambda_max=args.lambda_max,
    )  # fmt: skip
    sampler = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v is not None}
    top = {k: v for k, v in (("batch_size", args.batch_size), ("device", args.device)) if v is not None}
    return replace(cfg, sampler=replace(cfg.sampler, **sampler), **top)


def cmd_generate(args) -> int:
    from engine.engine import DEFAULT_INDEX_DIR, Engine
    from engine.models import DEFAULT_MODEL_DIR
    from jobs.generate import run_generate

    engine = Engine(_engine_config(args), args.model or DEFAULT_MODEL_DIR, args.index or DEFAULT_INDEX_DIR)
    summary = run_generate(args.manifest, args.out, engine, args.format, progress=not args.quiet)
    for line in summary.lines():
        print(line)
    print(f"results: {args.out / 'results.parquet'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate audio for a Parquet manifest")
    gen.add_argument(
        "manifest", type=Path, help="Parquet file with columns id, prompt (optional seconds, seed)"
    )
    _add_generate_flags(gen)
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="run `generate` on the bundled example manifest")
    _add_generate_flags(demo)
    demo.set_defaults(func=cmd_generate, manifest=EXAMPLE_MANIFEST)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jobs.manifest import ManifestError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ManifestError, ValueError, FileNotFoundError) as e:
        print(f"amg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
