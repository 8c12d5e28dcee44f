"""The main job: a Parquet manifest in, audio files and ``results.parquet`` out.

Every manifest row yields exactly one result row (status ``ok`` or ``error``). Audio is written
before its result row; ``results.parquet`` is rewritten after every batch under a temporary name
and renamed, so an interrupted run keeps every finished row.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.manifest import Row, read_manifest, validate

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "id", "prompt", "seconds", "seed", "status", "error", "audio_path", "neighbour_id", "neighbour_caption",
    "final_similarity", "max_similarity", "guided_steps", "trace_similarity", "trace_lambda", "trace_gate",
    "config_hash", "model_id",
)  # fmt: skip


@dataclass(frozen=True)
class Summary:
    ok: int
    errors: int
    seconds: float
    replicated: int  # ok rows whose final similarity ≥ threshold
    threshold: float
    mean_similarity: float
    max_similarity: float

    def lines(self) -> list[str]:
        rate = (self.ok + self.errors) / self.seconds if self.seconds else 0.0
        return [
            f"rows: {self.ok} ok, {self.errors} error ({rate:.2f} rows/s, {self.seconds:.1f} s)",
            f"final similarity to nearest training clip: mean {self.mean_similarity:.3f}, "
            f"max {self.max_similarity:.3f}",
            f"rows at or above the memorization threshold {self.threshold}: {self.replicated}",
        ]


def _result_row(row: Row, cfg_hash: str, model_id: str, **fields: Any) -> dict[str, Any]:
    base = {c: None for c in RESULT_COLUMNS}
    base.update({k: v for k, v in row.values.items() if k not in RESULT_COLUMNS})  # carried-through columns
    prompt = row.values.get("prompt")
    base.update(id=row.id, prompt=prompt if isinstance(prompt, str) else None,
                seconds=row.seconds, seed=row.seed, config_hash=cfg_hash, model_id=model_id)  # fmt: skip
    base.update(fields)
    return base


def _write_results(rows: list[dict[str, Any]], out_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out_dir / "results.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out_dir / "results.parquet")


def _write_audio(path: Path, audio, sample_rate: int) -> None:
    import soundfile as sf

    tmp = path.with_name(path.name + ".tmp")
    sf.write(tmp, audio.T.numpy(), sample_rate, format=path.suffix[1:].upper(), subtype="PCM_16")
    os.replace(tmp, path)


def run_generate(
    manifest: str | Path, out_dir: str | Path, engine, audio_format: str = "flac", progress: bool = True
) -> Summary:
    """Generate every valid manifest row in batches of ``engine.config.batch_size``."""
    from tqdm import tqdm

    from engine.engine import Request

    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rows = validate(read_manifest(manifest), max_seconds=engine.window / engine.sample_rate)
    cfg_hash, model_id = engine.config.config_hash(), engine.model_id
    results: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.error:
            log.warning("%s", r.error)
            results[r.index] = _result_row(r, cfg_hash, model_id, status="error", error=r.error)
    todo = [r for r in rows if r.error is None]
    start, bs = time.time(), engine.config.batch_size
    with tqdm(total=len(todo), unit="clip", disable=not progress, desc="generate") as bar:
        for k in range(0, len(todo), bs):
            batch = todo[k : k + bs]
            reqs = [Request(r.id, r.prompt, r.seconds, r.seed) for r in batch]
            try:
                outs = engine.generate(reqs)
            except Exception as e:  # a failing batch is recorded row by row; the run goes on
                log.exception("batch starting at row %d failed", batch[0].index)
                for r in batch:
                    results[r.index] = _result_row(
                        r, cfg_hash, model_id, status="error", error=f"{type(e).__name__}: {e}"
                    )
            else:
                for r, g in zip(batch, outs, strict=True):
                    results[r.index] = _finished_row(r, g, engine, out_dir, audio_format, cfg_hash, model_id)
            _write_results([results[i] for i in sorted(results)], out_dir)
            bar.update(len(batch))
    _write_results([results[i] for i in sorted(results)], out_dir)
    return _summarise(list(results.values()), time.time() - start, engine.embedder.replication_threshold)


def _finished_row(r: Row, g, engine, out_dir: Path, audio_format: str, cfg_hash: str, model_id: str):
    if g.error:
        return _result_row(r, cfg_hash, model_id, status="error", error=g.error)
    rel = Path("audio") / f"{r.id}.{audio_format}"
    _write_audio(out_dir / rel, g.audio, engine.sample_rate)
    sims = [s["similarity"] for s in g.trace]
    return _result_row(
        r, cfg_hash, model_id, status="ok", audio_path=str(rel),
        neighbour_id=engine.index.ids[g.neighbour], neighbour_caption=engine.index.captions[g.neighbour],
        final_similarity=g.final_similarity, max_similarity=max(sims) if sims else None,
        guided_steps=sum(bool(s["gate"]) for s in g.trace),
        trace_similarity=sims, trace_lambda=[s["lambda"] for s in g.trace],
        trace_gate=[bool(s["gate"]) for s in g.trace],
    )  # fmt: skip


def _summarise(results: list[dict[str, Any]], seconds: float, threshold: float) -> Summary:
    ok = [r for r in results if r["status"] == "ok"]
    sims = [r["final_similarity"] for r in ok]
    return Summary(
        ok=len(ok), errors=len(results) - len(ok), seconds=seconds,
        replicated=sum(s >= threshold for s in sims), threshold=threshold,
        mean_similarity=sum(sims) / len(sims) if sims else float("nan"),
        max_similarity=max(sims) if sims else float("nan"),
    )  # fmt: skip
