"""Calibrate the cascade's free signal for a model (``amg calibrate``): the threshold θ of
``GuidanceConfig.cascade_threshold``, stored beside the model as ``cascade.json``.

    amg calibrate                                   # the default model, its captions and novel prompts
    amg calibrate --model DIR --index DIR --captions TRAIN.parquet --heldout NOVEL.parquet

Each prompt is generated along the plain-CFG trajectory with the detector watching (AMG with λ = 1: the
gate never opens, so the step is the plain-CFG step, and the trace records each step's free signal
‖x0_c − x0_u‖ and detector similarity). A row *would replicate* when its final similarity is at or
above the index embedder's replication threshold. Per step the file records the AUC of the free
signal and of the detector's similarity for that label; θ is the smallest running maximum of the
signal over the replicating rows, less a margin (``--margin``, default 5%): with the cascade's rule (a
row is suspect from the step after its signal first reaches θ) every replicating calibration row is
caught. The seeds are the manifests' plus ``--seed-offset`` (default 1000), so the calibration does
not see the trajectories the ablation measures.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

CASCADE_FILE = "cascade.json"
SIGNAL = "rms(x0_c - x0_u)"  # engine.guidance.free_signal


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def choose_threshold(signals: list[list[float]], labels: list[bool], margin: float) -> float | None:
    """The smallest running maximum of the signal over the positive rows, times (1 − margin): every
    positive row reaches it at some step. None without a positive row."""
    peaks = [max(s) for s, y in zip(signals, labels, strict=True) if y]
    return (1 - margin) * min(peaks) if peaks else None


def first_flag(signal: list[float], threshold: float) -> int | None:
    """The first step whose signal reaches ``threshold`` (the row is suspect from the next), or None."""
    return next((i for i, s in enumerate(signal) if s >= threshold), None)


def calibrate_cascade(
    model_dir: Path | None = None,
    index_dir: Path | None = None,
    captions: Path | None = None,
    heldout: Path | None = None,
    preset: str = "default-model",
    seed_offset: int = 1000,
    margin: float = 0.05,
    out: Path | None = None,
    workdir: Path | None = None,
    embedder_checkpoint: Path | None = None,
    trust_checkpoint: bool = False,
    device: str | None = None,
) -> dict:
    """Measure the free signal's AUC per step and θ; write it to ``out`` (default: beside the model).
    ``captions``/``heldout``: manifests of training captions and held-out prompts (default: the default
    model's caption manifest and novel prompts); ``embedder_checkpoint``, ``trust_checkpoint``: as for
    :class:`engine.engine.Engine` (a CLAP index)."""
    import tempfile

    import pyarrow.parquet as pq

    from amg_engine.engine.config import PRESETS, with_overrides
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine, Request
    from amg_engine.engine.models import DEFAULT_MODEL_DIR

    _check(0 <= margin < 1, f"margin={margin}: need 0 ≤ margin < 1")
    model_dir, index_dir = Path(model_dir or DEFAULT_MODEL_DIR), Path(index_dir or DEFAULT_INDEX_DIR)
    base = PRESETS[preset]
    # gate never open (σ_t ≤ 1 < λ): the plain-CFG trajectory, with the detector and the signal traced
    cfg = with_overrides(base, lambda_min=1.0, lambda_max=1.0, cascade_threshold=0.0)
    cfg = cfg if device is None else replace(cfg, device=device)
    engine = Engine(cfg, model_dir, index_dir, embedder_checkpoint, trust_checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        blocks = _manifests(captions, heldout, Path(workdir or tmp))
        rows, labels, signals, sims, names = [], [], [], [], []
        for name, manifest in blocks.items():
            m = pq.read_table(manifest).to_pylist()
            reqs = [Request(r["id"], r["prompt"], r["seconds"], r["seed"] + seed_offset) for r in m]
            for a in range(0, len(reqs), cfg.batch_size):
                for g in engine.generate(reqs[a : a + cfg.batch_size]):
                    if g.error:
                        log.warning("calibration row %s failed: %s", g.request.id, g.error)
                        continue
                    names.append(name)
                    labels.append(g.final_similarity >= engine.replication_threshold)
                    signals.append([s["signal"] for s in g.trace])
                    sims.append([s["similarity"] for s in g.trace])
                    rows.append(g.request.id)
    theta = choose_threshold(signals, labels, margin)
    _check(theta is not None, "no calibration prompt replicates under plain CFG: the free signal cannot "
           "be calibrated on these prompts (give training captions the model memorized)")  # fmt: skip
    record = _record(engine, base, labels, signals, sims, names, theta, margin, seed_offset, preset)
    out = Path(out) if out is not None else model_dir / CASCADE_FILE
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _record(engine, base, labels, signals, sims, names, theta, margin, seed_offset, preset) -> dict:
    from amg_engine.engine.sampling import SCHEDULES

    s = base.sampler
    sigmas = SCHEDULES[s.schedule](s.steps, s.sigma_min, s.sigma_max, s.rho).tolist()
    per_step = [
        {"step": i, "sigma": sigmas[i], "auc_signal": auc([r[i] for r in signals], labels),
         "auc_similarity": auc([r[i] for r in sims], labels)}
        for i in range(s.steps)
    ]  # fmt: skip
    flags = [first_flag(r, theta) for r in signals]
    blocks = {}
    for name in dict.fromkeys(names):
        idx = [k for k, n in enumerate(names) if n == name]
        pos = [k for k in idx if labels[k]]
        neg = [k for k in idx if not labels[k]]
        blocks[name] = {
            "prompts": len(idx), "would_replicate": len(pos),
            "replicating_flagged": sum(flags[k] is not None for k in pos),
            "others_flagged": sum(flags[k] is not None for k in neg),
        }  # fmt: skip
    return {
        "signal": SIGNAL, "threshold": theta, "margin": margin, "model_id": engine.model_id,
        "index_id": engine.index_id, "preset": preset, "steps": s.steps, "seed_offset": seed_offset,
        "replication_threshold": engine.replication_threshold, "blocks": blocks,
        "flag_steps_of_replicating_rows": sorted(f for f, y in zip(flags, labels, strict=True) if y),
        "per_step": per_step,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def _manifests(captions: Path | None, heldout: Path | None, tmp: Path) -> dict[str, Path]:
    if captions is None:
        from amg_engine.jobs.replication import caption_manifest

        captions = caption_manifest(tmp / "captions.parquet")
    if heldout is None:
        from amg_engine.engine.default.heldout import novel_manifest

        heldout = novel_manifest(tmp / "novel.parquet")
    return {"captions": Path(captions), "heldout": Path(heldout)}


def read_cascade(model_dir: Path | None = None) -> dict:
    """The calibration stored beside a model (``cascade.json``), checked against the model's weights."""
    from amg_engine.engine.models import DEFAULT_MODEL_DIR, model_id

    model_dir = Path(model_dir or DEFAULT_MODEL_DIR)
    path = model_dir / CASCADE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the model has no cascade calibration; run `amg calibrate --model {model_dir}` "
            "first, or give the threshold (--cascade THETA)"
        )
    record = json.loads(path.read_text())
    if record.get("model_id") != model_id(model_dir):
        raise ValueError(
            f"{path} was calibrated for model {record.get('model_id')!r}, not for these weights "
            f"({model_id(model_dir)!r}): run `amg calibrate --model {model_dir}` again"
        )
    theta = record.get("threshold")
    _check(isinstance(theta, int | float) and math.isfinite(theta) and theta >= 0,
           f"{path}: threshold {theta!r} is not a number ≥ 0; run `amg calibrate` again")  # fmt: skip
    return record


def calibrated_config(config, model_dir: Path | None = None, every: int | None = None):
    """``config`` with the cascade on at the model's calibrated threshold (and ``every``, if given)."""
    g = replace(config.guidance, cascade_threshold=float(read_cascade(model_dir)["threshold"]))
    if every is not None:
        g = replace(g, cascade_every=every)
    return replace(config, guidance=g)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def format_calibration(record: dict) -> str:
    """A few lines: θ, what it flags, and the AUC per step."""
    theta, margin = record["threshold"], record["margin"]
    lines = [f"cascade threshold θ = {theta:.4f} ({record['signal']}, margin {margin:.0%})"]
    for name, b in record["blocks"].items():
        lines.append(f"  {name}: {b['would_replicate']}/{b['prompts']} would replicate, "
                     f"{b['replicating_flagged']} of them flagged; "
                     f"{b['others_flagged']} others flagged")  # fmt: skip
    lines.append("  step  sigma     AUC free signal  AUC detector similarity")
    for p in record["per_step"]:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"  {p['step']:4d}  {p['sigma']:8.3f}  {fmt(p['auc_signal']):>15s}  "
                     f"{fmt(p['auc_similarity']):>23s}")  # fmt: skip
    return "\n".join(lines)


def cmd_calibrate(args) -> int:
    record = calibrate_cascade(
        args.model, args.index, args.captions, args.heldout, args.preset, args.seed_offset, args.margin,
        args.save, embedder_checkpoint=args.embedder_checkpoint, trust_checkpoint=args.trust_checkpoint,
        device=args.device,
    )  # fmt: skip
    print(format_calibration(record))
    print(f"calibration: {args.save or Path(args.model or _default_model()) / CASCADE_FILE}")
    return 0


def _default_model() -> Path:
    from amg_engine.engine.models import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def register_calibrate(sub) -> None:
    import argparse

    from amg_engine.engine.config import PRESETS

    p = sub.add_parser("calibrate", help="calibrate the cascade's free-signal threshold for a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, help="model directory (default: the bundled model)")
    p.add_argument("--index", type=Path, help="training-set index folder (default: the bundled index)")
    p.add_argument("--captions", type=Path, help="manifest of training captions (default: the bundled set's)")
    p.add_argument("--heldout", type=Path, help="manifest of held-out prompts (default: the novel prompts)")
    p.add_argument("--preset", default="default-model", choices=sorted(PRESETS), help="engine configuration")
    p.add_argument("--seed-offset", type=int, default=1000, help="added to each manifest seed (default 1000)")
    p.add_argument("--margin", type=float, default=0.05, help="θ under the lowest replicating peak (5%%)")
    p.add_argument("--save", type=Path, help="where to write the calibration (default: MODEL/cascade.json)")
    p.add_argument("--embedder-checkpoint", type=Path, help="the CLAP checkpoint of a CLAP index")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: the preset's, cpu)")
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow checkpoints that need full unpickling (they can run code); refused otherwise",
    )  # fmt: skip
    p.set_defaults(func=cmd_calibrate)
