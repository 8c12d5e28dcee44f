"""amg index: build and inspect training-set embedding indexes.

amg index build SOURCE --out DIR [--embedder mel|clap --checkpoint PATH]   embed a folder or manifest
amg index build EMBEDDINGS.parquet --out DIR [--embedder mel|clap] [--checkpoint PATH]   precomputed
amg index info DIR                                                         embedder, size, a few items

SOURCE is a folder of audio files (searched recursively; ids are relative paths, captions come from
sidecar <name>.txt files), a Parquet manifest with id, caption, path[, seconds], or a Parquet file of
precomputed embeddings: id, caption, vector (a list of float16/32/64, unit-norm)[, seconds],
with the embedder's identity as JSON under the file metadata key "amg.embedder" (name, sample_rate,
dim, checkpoint_hash; checked as the engine checks an index, so a CLAP file needs --checkpoint), or,
for a file another tool wrote, --embedder naming the embedder that computed the vectors.
The index is written memory-mapped (vectors.npy, items.arrow); an interrupted build resumes where it
stopped when rerun with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time


def register(subparsers) -> None:
    """Add ``build`` and ``info`` to an argparse subparsers object (``amg index <verb>``)."""
    build = subparsers.add_parser(
        "build", help="embed training audio into an index folder", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    build.add_argument("source", type=Path, help="folder of audio files, or a Parquet manifest")
    build.add_argument("--out", type=Path, required=True, help="index folder to write")
    build.add_argument(
        "--embedder", choices=("mel", "clap"), default=None,
        help="embedder (default mel); for precomputed embeddings, the one that computed a file without "
        "the amg.embedder metadata (other tools' files)",
    )  # fmt: skip
    build.add_argument(
        "--checkpoint", "--embedder-checkpoint", dest="checkpoint", type=Path,
        help="LAION-CLAP checkpoint (630k-audioset-best.pt layout)",
    )  # fmt: skip
    build.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow a checkpoint that needs full unpickling (it can run code: only for files you trust)",
    )  # fmt: skip
    build.add_argument("--batch-size", type=int, default=32, help="clips per embedding batch")
    build.add_argument(
        "--dtype", choices=("float16", "float32"),
        help="stored vector precision (default: float32 from audio, float16 from precomputed embeddings)",
    )  # fmt: skip
    build.add_argument("--device", default="cpu", help="torch device for embedding, e.g. cpu or cuda")
    build.add_argument("--workers", type=int, default=4, help="threads reading audio files")
    build.add_argument("--restart", action="store_true", help="discard an unfinished build of other inputs")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build)
    info = subparsers.add_parser("info", help="print an index's embedder, size and first items")
    info.add_argument("index", type=Path, help="index folder")
    info.add_argument("--show", type=int, default=5, help="how many ids and captions to print")
    info.set_defaults(func=cmd_info)


def make_embedder(name: str, checkpoint: Path | None, trust_checkpoint: bool = False):
    """The embedder the ``--embedder`` flag names."""
    if name == "mel":
        from amg_engine.index.embedders import MelEmbedder

        return MelEmbedder()
    if checkpoint is None:
        raise ValueError("--embedder clap needs --checkpoint PATH (a local 630k-audioset-best.pt)")
    from amg_engine.index.clap import ClapEmbedder

    return ClapEmbedder(checkpoint, trust_checkpoint=trust_checkpoint)


def cmd_build(args) -> int:
    from amg_engine.index.build import (
        build_from_embeddings,
        build_index_resumable,
        clips_from_source,
        is_embeddings,
    )

    if is_embeddings(args.source):
        index = build_from_embeddings(
            args.source, args.out, args.checkpoint, args.dtype or "float16", restart=args.restart,
            progress=not args.quiet, embedder=args.embedder,
        )  # fmt: skip
        print(f"indexed {len(index)} precomputed {index.embedder.name} embeddings into {args.out}")
        return 0
    clips = clips_from_source(args.source)
    embedder = make_embedder(args.embedder or "mel", args.checkpoint, args.trust_checkpoint).to(args.device)
    index = build_index_resumable(
        clips, embedder, args.out, args.batch_size, device=args.device, progress=not args.quiet,
        restart=args.restart, workers=args.workers, dtype=args.dtype or "float32",
    )  # fmt: skip
    print(f"indexed {len(index)} clips with {index.embedder.name} into {args.out}")
    return 0


def cmd_info(args) -> int:
    from amg_engine.index.store import EmbeddingIndex

    index = EmbeddingIndex.load(args.index)
    e = index.embedder
    print(f"index: {args.index}")
    print(f"embedder: {e.name} ({e.sample_rate} Hz, checkpoint {e.checkpoint_hash})")
    print(f"vectors: {len(index)} x {e.dim} ({index.precision})")
    latents = "none" if index.latents is None else "x".join(map(str, index.latents.shape))
    print(f"latents: {latents}")
    for i in range(min(args.show, len(index))):
        print(f"  {index.ids[i]}\t{index.seconds[i]:.2f} s\t{index.captions[i]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amg index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m amg_engine.index.cli``); ``amg index`` (jobs/cli.py) is the same."""
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"amg index: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
