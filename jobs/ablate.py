"""The AMG ablation on the embedded default model (the layout of the audio AMG paper's Table 1).

    amg ablate --out DIR

Generates every distinct training caption (seeds 100, 101, ...; the same prompts and seeds for every
row) under: the plain-CFG baseline, each guidance term alone (despecification c1, caption
deduplication c2, dissimilarity c3), each pair, and full AMG; with ``--ambient-model`` (default: the
bundled Ambient Diffusion variant when it exists) also that model alone and with full AMG. Each run
is audited against the training index (``amg audit``), and the table lists per row:

- similarity of each output to its nearest training clip: mean, 95th percentile, maximum, and the
  share at or above the embedder's replication threshold (0.9 for the default mel embedder);
- prompt adherence. The paper's CLAP score needs a CLAP text encoder, which cannot be had offline,
  so on the default model we report *family adherence*: the share of outputs whose nearest training
  clip belongs to the prompt's family (drum loop, pad, arpeggio, texture) — coarse, but it says
  whether guidance kept the requested kind of sound while moving away from the exact clip;
- FAD and KAD between the outputs and the training set, on the same embedder.

The table is printed, and saved as ``DIR/ablation.parquet`` and ``DIR/ablation.md``. Each run keeps
its results, audio and audit report under ``DIR/<row>/``; rerunning resumes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One ablation row: which guidance terms are on, and on which model (None: the default)."""

    name: str
    amg: bool = True
    c1: bool = True
    c2: bool = True
    c3: bool = True
    model: str = "default"  # "default" or "ambient"


ROWS = (
    Row("baseline", amg=False),
    Row("c1 despecification", c2=False, c3=False),
    Row("c2 caption dedup", c1=False, c3=False),
    Row("c3 dissimilarity", c1=False, c2=False),
    Row("c1 + c2", c3=False),
    Row("c1 + c3", c2=False),
    Row("c2 + c3", c1=False),
    Row("full AMG"),
)


def model_rows(name: str) -> tuple[Row, Row]:
    """The two rows of an extra model: alone (plain CFG) and with full AMG."""
    return Row(f"{name} model", amg=False, model=name), Row(f"{name} + AMG", model=name)


AMBIENT_ROWS = model_rows("ambient")


def ambient_model_dir() -> Path:
    """Where the bundled Ambient Diffusion variant of the default model lives (may be absent)."""
    from engine.models import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR.parent / "model-ambient"


def row_config(row: Row, preset: str = "default-model", steps: int | None = None):
    """The engine configuration of a row: the preset with the row's terms switched off."""
    from dataclasses import replace

    from engine.config import PRESETS, with_overrides

    base = PRESETS[preset]
    g = base.guidance
    cfg = with_overrides(
        base, amg=row.amg, c1=g.c1 if row.c1 else 0.0, c2=g.c2 if row.c2 else 0.0, c3=g.c3 if row.c3 else 0.0
    )
    return cfg if steps is None else replace(cfg, sampler=replace(cfg.sampler, steps=steps))


def slug(name: str) -> str:
    """A row's folder name: "c1 + c2" -> "c1-c2"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_row(
    row: Row, manifest: Path, out: Path, model_dirs: dict[str, Path], steps: int | None, progress: bool
):
    """Generate and audit one row -> its table entry."""
    import pyarrow.parquet as pq

    from engine.engine import DEFAULT_INDEX_DIR, Engine
    from jobs.audit import AuditConfig, run_audit
    from jobs.generate import JobConfig, run_generate

    run_dir = out / slug(row.name)
    engine = Engine(row_config(row, steps=steps), model_dirs[row.model], DEFAULT_INDEX_DIR)
    run_generate(manifest, run_dir, engine, JobConfig(progress=progress))
    threshold = engine.replication_threshold
    summary = run_audit(
        run_dir / "results.parquet", DEFAULT_INDEX_DIR, run_dir / "audit", AuditConfig(pairs=4),
        train_audio=DEFAULT_INDEX_DIR.parent / "train" / "train.parquet", progress=False,
    )  # fmt: skip
    audit = pq.read_table(run_dir / "audit" / "audit.parquet").to_pydict()
    g = summary.generated
    return {
        "row": row.name, "model": row.model, "n": summary.n_ok,
        "mean": g["mean"], "p95": g["p95"], "max": g["max"],
        "share_replica": g["share_at_or_above"][f"{threshold:g}"],
        "family_adherence": family_adherence(audit["prompt"], audit["nearest_caption"], audit["status"]),
        "fad": summary.fad, "kad": summary.kad,
    }  # fmt: skip


def family_adherence(prompts, nearest_captions, status) -> float:
    """Share of ok rows whose nearest training clip is of the prompt's family."""
    from engine.default.data import family

    pairs = [(p, c) for p, c, s in zip(prompts, nearest_captions, status, strict=True) if s == "ok"]
    return sum(family(p) == family(c) for p, c in pairs) / max(1, len(pairs))


def run_ablation(
    out: str | Path,
    rows=ROWS,
    ambient: Path | None = None,
    limit: int | None = None,
    extra_models: dict[str, Path] | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every row on the caption prompts (the first ``limit`` of them, if given) -> the table rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.models import DEFAULT_MODEL_DIR
    from jobs.replication import caption_manifest

    out = Path(out)
    manifest = caption_manifest(out / "captions.parquet")
    if limit is not None:
        pq.write_table(pq.read_table(manifest).slice(0, limit), manifest)
    model_dirs = {"default": DEFAULT_MODEL_DIR}
    extra = ({"ambient": ambient} if ambient is not None else {}) | dict(extra_models or {})
    for name, path in extra.items():
        model_dirs[name] = Path(path)
        rows = tuple(rows) + model_rows(name)
    table = [run_row(r, manifest, out, model_dirs, steps, progress) for r in rows]
    pq.write_table(pa.Table.from_pylist(table), out / "ablation.parquet")
    (out / "ablation.md").write_text(format_table(table) + "\n")
    return table


def format_table(table: list[dict]) -> str:
    """A Markdown table of the ablation rows."""
    head = "| row | n | mean sim | p95 sim | max sim | share ≥ thr | family adherence | FAD | KAD |"
    lines = [head, "|" + "---|" * 9]
    for r in table:
        lines.append(
            f"| {r['row']} | {r['n']} | {r['mean']:.3f} | {r['p95']:.3f} | {r['max']:.3f} | "
            f"{100 * r['share_replica']:.0f}% | {100 * r['family_adherence']:.0f}% | "
            f"{_num(r['fad'])} | {_num(r['kad'])} |"
        )
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def cmd_ablate(args) -> int:
    ambient = args.ambient_model
    if ambient is None and not args.no_ambient and (ambient_model_dir() / "model_config.json").exists():
        ambient = ambient_model_dir()
    extra = {}
    for spec in args.compare_model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--compare-model {spec!r}: write NAME=MODEL_DIR, e.g. control=/tmp/control/model"
            )
        extra[name] = Path(path)
    table = run_ablation(args.out, ambient=None if args.no_ambient else ambient, limit=args.limit,
                         steps=args.steps, progress=not args.quiet, extra_models=extra)  # fmt: skip
    print(format_table(table))
    print(f"table: {Path(args.out) / 'ablation.md'}")
    return 0


def register_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="the AMG ablation table on the embedded default model")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per row)")
    p.add_argument(
        "--ambient-model",
        type=Path,
        default=None,
        help="an Ambient Diffusion model folder for the extra rows (default: the bundled one, if any)",
    )
    p.add_argument("--no-ambient", action="store_true", help="leave out the ambient-model rows")
    p.add_argument(
        "--compare-model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another model folder for two more rows (alone, and with AMG); repeatable",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N caption prompts (quick look)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate)


def main(argv: list[str] | None = None) -> int:  # `python -m jobs.ablate` == `amg ablate`
    from jobs.cli import main as amg

    return amg(["ablate", *(argv or [])])


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))

__all__ = ["ROWS", "AMBIENT_ROWS", "Row", "model_rows", "run_ablation", "format_table", "register_ablate"]
