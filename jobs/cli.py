"""amg: batched text-to-audio generation with Anti-Memorization Guidance, and memorization audits.

amg generate MANIFEST.parquet --out DIR     generate audio for every manifest row (AMG on by default)
amg demo --out DIR                          generate the bundled example manifest on the default model
amg index build SOURCE --out DIR             embed a folder of audio or a Parquet manifest into an index
amg index info DIR                           show an index's embedder, size and a few items
amg audit SOURCE --out DIR                   how close a folder of audio (or results.parquet) is to the
                                             training set: audit.parquet, summary.json, report.html
amg ablate --out DIR                         the AMG ablation table on the embedded default model
amg calibrate                                the cascade's free-signal threshold for a model
                                             (MODEL/cascade.json; --cascade uses it)

Rerunning the same command resumes: rows already done under the same configuration are skipped
(--retry-failed also regenerates error rows). --shard i/n runs rows k with k mod n = i only;
--engine ray runs the batches on a Ray actor pool (RAY_ADDRESS or --ray-address for a cluster).

--max-similarity [TAU] is the release gate: no output at or above TAU is released (jobs/gate.py).

Exit codes: 0 done (bad rows are error rows, not failures); 2 bad input (the message names it);
3 stopped because the engine failed on --max-failed-batches batches in a row (the message names the
error; finished rows are kept and the same command resumes); 4 the output folder failed (full,
read-only, gone, not a folder: the message names the path and the cause; finished rows are kept and
the same command resumes); 5 another run is working on the same rows in --out (the message names its
process); 1 an unexpected error (a traceback: please report it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time

EXAMPLE_MANIFEST = Path(__file__).parent / "examples" / "manifest.parquet"
INDEX_THRESHOLD = object()  # `--max-similarity` without a value: the index embedder's threshold
CALIBRATED = object()  # `--cascade` without a value: the model's calibrated threshold (cascade.json)


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
    from amg_engine.engine.config import PRESETS
    from amg_engine.engine.precision import PRECISIONS

    p.add_argument("--out", type=Path, required=True, help="output folder (audio/ and results.parquet)")
    p.add_argument(
        "--preset",
        default="default-model",
        choices=sorted(PRESETS),
        help="named engine configuration; default-flow runs the bundled few-step flow model "
        "(engine/default/assets/model-flow) unless --model says otherwise",
    )
    p.add_argument("--no-amg", action="store_true", help="plain classifier-free guidance baseline (no AMG)")
    p.add_argument("--mode", choices=("corrected", "reference"), help="AMG semantics (see README)")
    p.add_argument(
        "--strategy",
        choices=("amg", "transition"),
        help="amg (default), or transition: Jain et al.'s online transition point",
    )
    p.add_argument(
        "--scale-before",
        type=float,
        help="with --strategy transition: guidance scale before the transition point "
        "(1 = none, < 0 = opposite guidance)",
    )
    p.add_argument(
        "--gradient",
        choices=("full", "detector"),
        help="AMG's similarity gradient: full (default; backward through the model, decoder and "
        "embedder) or detector (decoder and embedder only, dx0/dx_t taken as 1/(1+sigma^2): no "
        "backward through the model)",
    )
    p.add_argument(
        "--cascade",
        nargs="?",
        type=float,
        const=CALIBRATED,
        metavar="THETA",
        help="run the detector for a row only from the step after its free signal ||x0_c - x0_u|| "
        "(RMS) first reaches THETA (and at step 0); elsewhere plain CFG. 0 is full AMG. Without a "
        "value: the model's calibrated threshold (MODEL/cascade.json, written by `amg calibrate`)",
    )
    p.add_argument(
        "--cascade-every",
        type=int,
        help="with --cascade: also run every row's detector at every K-th step (default 0: never)",
    )
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale s0")
    p.add_argument("--c1", type=float, help="despecification scale (0 turns it off)")
    p.add_argument("--c2", type=float, help="caption-deduplication scale (0 turns it off)")
    p.add_argument("--c3", type=float, help="dissimilarity-gradient scale (0 turns it off)")
    p.add_argument(
        "--min-scale",
        type=float,
        help="smallest prompt scale s0 − s1 − s2 despecification and caption deduplication may leave: 1 "
        "as published; 0 (the flow presets) lets them reach the unconditional prediction at cfg_scale 1; "
        "flow models only",
    )
    p.add_argument("--lambda-min", type=float, help="threshold λ_t at high noise")
    p.add_argument("--lambda-max", type=float, help="threshold λ_t approached at low noise")
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument(
        "--sampler",
        help="dpmpp-3m-sde, dpmpp-2m-sde, dpmpp-2m or euler; on a flow model (--preset sao-small, "
        "sao-small-amg, default-flow) pingpong or euler",
    )
    p.add_argument("--batch-size", type=int, help="rows per denoising batch")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument(
        "--index-devices",
        help="spread the training index over these devices for the per-step exact search: 'all' (every "
        "visible CUDA device) or a list such as cuda:0,cuda:1 (default: the --device alone)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="model, decoder and embedder precision (default: bf16 on CUDA, fp32 on CPU); "
        "sampler state, guidance and gates stay fp32",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the batched model call and sampler step"
    )
    p.add_argument(
        "--grad-memory-gib",
        type=float,
        help="memory for the autograd graphs of AMG's gated rows: the dissimilarity gradient runs in "
        "micro-batches of as many rows as fit (default: no split; see README, memory of the gated path)",
    )
    p.add_argument(
        "--grad-row-gib",
        type=float,
        help="with --grad-memory-gib: one row's graph in GiB (benchmarks/bench_amg_cost.py); default: "
        "measured on the first gradient of each batch",
    )
    p.add_argument("--format", default="flac", choices=("flac", "wav"), help="audio file format")
    p.add_argument("--model", type=Path, help="model directory (model_config.json + model.safetensors)")
    p.add_argument("--index", type=Path, help="training-set index folder")
    p.add_argument(
        "--embedder-checkpoint",
        type=Path,
        help="weights of the index's learned embedder (LAION-CLAP: the 630k-audioset-best.pt the index "
        "was built with)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="similarity at or above which the summary counts an output as a replica "
        "(default: the index embedder's own, 0.9 for the mel default, 0.5 for CLAP)",
    )
    p.add_argument(
        "--max-similarity",
        nargs="?",
        type=float,
        const=INDEX_THRESHOLD,
        metavar="TAU",
        help="release gate: a row whose final similarity is at or above TAU is generated again (new "
        "seed), up to --max-attempts; one that never clears is status rejected, its audio in "
        "rejected/ (default TAU: the index embedder's replication threshold)",
    )
    p.add_argument("--max-attempts", type=int, help="release gate: attempts per row in all (default 3)")
    p.add_argument(
        "--escalate",
        type=float,
        help="release gate: multiply the dissimilarity scale c3 by this at each new attempt (default 1)",
    )
    _add_trust_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--retry-failed", action="store_true", help="also regenerate rows recorded as errors")
    p.add_argument("--shard", default="0/1", help="i/n: run only manifest rows k with k mod n = i")
    p.add_argument(
        "--max-failed-batches",
        type=int,
        default=3,
        help="stop the run (exit code 3) after this many batches in a row failed in the engine "
        "(out of memory, a missing file...); bad rows never count; 0: never stop",
    )
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="where batches run")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--ray-actors", type=int, help="actor pool size (default: one per cluster GPU, else 1)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves")
    p.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        help="GPUs each actor reserves (default: 1 if the cluster has any)",
    )


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow .ckpt/.pt files that need full unpickling (weights_only=False): they can run code, "
        "so only for files you trust; by default such a file is refused",
    )


def _engine_config(args):
    from dataclasses import replace

    from amg_engine.engine.config import PRESETS, with_overrides

    cfg = with_overrides(
        PRESETS[args.preset], amg=False if args.no_amg else None, mode=args.mode, cfg_scale=args.cfg_scale,
        strategy=args.strategy, scale_before=args.scale_before,
        c1=args.c1, c2=args.c2, c3=args.c3, lambda_min=args.lambda_min, lambda_max=args.lambda_max,
        min_scale=args.min_scale,
        gradient=args.gradient, cascade_threshold=_cascade_threshold(args), cascade_every=args.cascade_every,
    )  # fmt: skip
    sampler = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v is not None}
    top = {k: v for k, v in (("batch_size", args.batch_size), ("device", args.device)) if v is not None}
    if args.precision is not None:
        top["precision"] = args.precision
    if args.index_devices is not None:
        top["index_devices"] = args.index_devices
    for name in ("grad_memory_gib", "grad_row_gib"):
        if getattr(args, name) is not None:
            top[name] = getattr(args, name)
    if args.compile:
        top["compile"] = True
    return replace(cfg, sampler=replace(cfg.sampler, **sampler), **top)


def _cascade_threshold(args) -> float | None:
    """``--cascade THETA``, or the model's calibrated θ for ``--cascade`` alone, or None."""
    if args.cascade is None:
        if args.cascade_every is not None:
            raise ValueError("--cascade-every configures the cascade: give --cascade [THETA] too")
        return None
    if args.cascade is CALIBRATED:
        from amg_engine.jobs.calibrate import read_cascade

        return float(read_cascade(args.model)["threshold"])
    return args.cascade


def _gate(args):
    """The release gate of ``--max-similarity [TAU] --max-attempts N --escalate F``, or None."""
    from amg_engine.jobs.gate import ReleaseGate

    if args.max_similarity is None:
        if args.max_attempts is not None or args.escalate is not None:
            raise ValueError("--max-attempts and --escalate configure the release gate: give "
                             "--max-similarity [TAU] too")  # fmt: skip
        return None
    tau = None if args.max_similarity is INDEX_THRESHOLD else args.max_similarity
    n = 3 if args.max_attempts is None else args.max_attempts
    return ReleaseGate(tau, n, 1.0 if args.escalate is None else args.escalate)


def cmd_generate(args) -> int:
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine
    from amg_engine.engine.models import DEFAULT_FLOW_MODEL_DIR, DEFAULT_MODEL_DIR
    from amg_engine.jobs.generate import JobConfig, Shard, run_generate

    job = JobConfig(
        args.format, args.retry_failed, Shard.parse(args.shard), not args.quiet, args.max_failed_batches,
        threshold=args.threshold, gate=_gate(args),
    )  # fmt: skip
    bundled = DEFAULT_FLOW_MODEL_DIR if args.preset == "default-flow" else DEFAULT_MODEL_DIR
    model, index = args.model or bundled, args.index or DEFAULT_INDEX_DIR
    checkpoint, trust = args.embedder_checkpoint, args.trust_checkpoint
    if args.engine == "ray":
        from amg_engine.jobs.ray_run import EngineSpec, RayOptions, import_ray, run_generate_ray

        opts = RayOptions(
            args.ray_address, args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor, args.device
        )
        import_ray()  # the first thing to know: whether --engine ray can run at all
        spec = EngineSpec(_engine_config(args), model, index, checkpoint, trust)
        summary = run_generate_ray(args.manifest, args.out, spec, job, opts)
    else:
        engine = Engine(_engine_config(args), model, index, checkpoint, trust)
        summary = run_generate(args.manifest, args.out, engine, job)
    for line in summary.lines():
        print(line)
    print(f"results: {args.out / 'results.parquet'}")
    return 0


def audit_search_config(args):
    """The audit's SearchConfig from its flags: FAISS goes where ``--device`` says unless ``--faiss-cpu``."""
    from amg_engine.index.search import SearchConfig

    return SearchConfig(
        kind=args.search, factory=args.faiss_factory,
        gpu=args.device.startswith("cuda") and args.search == "faiss" and not args.faiss_cpu,
        params={"nprobe": args.faiss_nprobe} if args.faiss_nprobe else {}, refine=args.faiss_refine,
    )  # fmt: skip


def cmd_audit(args) -> int:
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR
    from amg_engine.jobs.audit import AuditConfig, format_summary, run_audit

    index = args.index or DEFAULT_INDEX_DIR
    train_audio, heldout = args.train_audio, args.heldout_index
    if args.index is None:  # the bundled index: its training clips and held-out set ship too
        from amg_engine.engine.default.heldout import HELDOUT_INDEX_DIR

        train_audio = train_audio or DEFAULT_INDEX_DIR.parent / "train" / "train.parquet"
        heldout = heldout or HELDOUT_INDEX_DIR
    config = AuditConfig(
        k=args.k, batch_size=args.batch_size, thresholds=tuple(args.thresholds), pairs=args.pairs,
        search=audit_search_config(args), attributes=not args.no_attributes, device=args.device,
    )  # fmt: skip
    text = _clap_text(args) if args.clap_text_encoder else None
    summary = run_audit(
        args.source, index, args.out, config, args.embedder_checkpoint, args.reference_index,
        train_audio, text, progress=not args.quiet, restart=args.restart,
        trust_checkpoint=args.trust_checkpoint, heldout_dir=heldout,
    )  # fmt: skip
    print(format_summary(summary))
    print(f"report: {args.out / 'report.html'}")
    return 0


def _clap_text(args):
    """CLAP text embeddings from the local checkpoint plus a local RoBERTa config/tokenizer folder."""
    from amg_engine.index.clap import ClapEmbedder

    if args.embedder_checkpoint is None:
        raise ValueError("--clap-text-encoder needs --embedder-checkpoint (the CLAP checkpoint)")
    clap = ClapEmbedder(
        args.embedder_checkpoint, text_encoder=args.clap_text_encoder, trust_checkpoint=args.trust_checkpoint
    ).eval()
    return clap.embed_text


def _add_audit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="folder of audio files, or an `amg generate` results.parquet")
    p.add_argument("--out", type=Path, required=True, help="output folder (audit.parquet, report.html)")
    p.add_argument("--index", type=Path, default=None, help="training index folder (default: bundled)")
    p.add_argument(
        "--train-audio",
        type=Path,
        default=None,
        help="training manifest or folder, for the report's players (default: the bundled set, "
        "with the bundled index)",
    )
    p.add_argument("--embedder-checkpoint", type=Path, default=None, help="LAION-CLAP checkpoint, if CLAP")
    p.add_argument(
        "--clap-text-encoder",
        type=Path,
        default=None,
        help="local RoBERTa config + tokenizer folder: adds the CLAP score (prompt adherence)",
    )
    p.add_argument(
        "--reference-index",
        type=Path,
        default=None,
        help="index of the reference set for FAD/KAD (default: the training index)",
    )
    p.add_argument(
        "--heldout-index",
        type=Path,
        default=None,
        help="index of held-out audio for FAD/KAD beside the reference's (default: the bundled held-out "
        "set, with the bundled index)",
    )
    p.add_argument(
        "--no-attributes",
        action="store_true",
        help="skip the tempo/chord/instrument adherence check of default-model prompts",
    )
    p.add_argument("-k", type=int, default=5, help="nearest training examples kept per file")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.4, 0.5],
        help="similarity levels whose exceedance share is reported (the embedder's own is added)",
    )
    p.add_argument("--pairs", type=int, default=12, help="most similar pairs shown in the report")
    p.add_argument("--batch-size", type=int, default=32, help="files embedded per batch")
    p.add_argument("--search", choices=("exact", "faiss"), default="exact", help="nearest-neighbour search")
    p.add_argument("--faiss-factory", default="Flat", help="faiss index_factory string, with --search faiss")
    p.add_argument(
        "--faiss-nprobe", type=int, default=None,
        help="IVF lists visited per query, with an IVF factory (faiss default 1; e.g. 128 with IVF4096 "
        "at 10^7 clips)",
    )  # fmt: skip
    p.add_argument(
        "--faiss-refine", type=int, default=1,
        help="re-score this many faiss candidates per neighbour exactly against the stored vectors "
        "(1: none; e.g. 10 with IVF-PQ, whose own similarities are estimates)",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu",
        help="where the embedder and the search run: cpu, cuda (faiss too, unless --faiss-cpu: a "
        "factory its GPU cloner cannot take, such as HNSW or fast-scan PQ, is refused before any work)",
    )  # fmt: skip
    p.add_argument(
        "--faiss-cpu", action="store_true",
        help="keep faiss on the CPU when --device is cuda (the embedder and exact search stay on the "
        "GPU): for factories the GPU cloner cannot take, e.g. IVF4096,PQ64x4fs",
    )  # fmt: skip
    p.add_argument("--restart", action="store_true", help="discard an unfinished audit of other inputs")
    _add_trust_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate audio for a Parquet manifest")
    gen.add_argument(
        "manifest", type=Path, help="Parquet file: id, prompt; optional seconds, seed, per-row overrides"
    )
    _add_generate_flags(gen)
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="run `generate` on the bundled example manifest")
    _add_generate_flags(demo)
    demo.set_defaults(func=cmd_generate, manifest=EXAMPLE_MANIFEST)
    from amg_engine.index.cli import register

    idx = sub.add_parser("index", help="build or inspect a training-set embedding index")
    register(idx.add_subparsers(dest="index_command", required=True))
    audit = sub.add_parser("audit", help="audit audio files for replication of the training set")
    _add_audit_flags(audit)
    audit.set_defaults(func=cmd_audit)
    from amg_engine.jobs.ablate import register_ablate

    register_ablate(sub)
    from amg_engine.jobs.calibrate import register_calibrate

    register_calibrate(sub)
    return parser


def _output_folder(path: Path) -> None:
    """``--out`` must be a folder, or a path where one can be created: checked before anything loads."""
    import errno

    from amg_engine.jobs.results import OutputUnavailable

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        advice = f"--out {path}: give a folder, or a path where one can be created"
        raise OutputUnavailable(existing, NotADirectoryError(errno.ENOTDIR, "not a folder"), advice)


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa

    from amg_engine.jobs.manifest import ManifestError
    from amg_engine.jobs.ray_run import RayUnavailable
    from amg_engine.jobs.results import FolderBusy, OutputUnavailable, os_cause
    from amg_engine.jobs.runner import CircuitOpen

    args = build_parser().parse_args(argv)
    root = logging.getLogger()
    if not root.handlers:  # the console gets warnings; DIR/run.log gets INFO records (jobs.generate)
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(console)
        root.setLevel(logging.WARNING)
    try:
        if isinstance(getattr(args, "out", None), Path):
            _output_folder(args.out)
        return args.func(args)
    except (ManifestError, FileNotFoundError, RayUnavailable) as e:
        print(f"amg: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if isinstance(e, pa.ArrowException):  # pyarrow's, raised while working: not input validation
            raise
        print(f"amg: error: {e}", file=sys.stderr)
        return 2
    except CircuitOpen as e:
        print(f"amg: {e}", file=sys.stderr)
        return 3
    except OutputUnavailable as e:
        print(f"amg: {e}", file=sys.stderr)
        return 4
    except OSError as e:  # a folder or file that cannot be written or read: the environment's fault
        if e.errno is None:  # pyarrow's unreadable data: a traceback
            raise
        print(f"amg: error: {e.filename or getattr(args, 'out', '?')}: {os_cause(e)}", file=sys.stderr)
        return 4
    except FolderBusy as e:
        print(f"amg: {e}", file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())
