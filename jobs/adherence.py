"""Attribute adherence of audited audio: does each file have the tempo, chord or key and instrument
its prompt asked for? (the default model's prompts; engine/default/attributes.py)

Only files whose prompt names a measurable attribute are checked (:func:`parse_prompt`); a folder of
anyone's audio with other prompts, or none, gets no rows. Per checked file, ``attributes.parquet``
holds what the prompt asked, what the estimators read and a hit (true/false) per asked attribute.
The summary gives, per attribute, the share of hits among the files that asked for it, and the
pooled share over every (file, attribute) check ("all"). The file is written once per input
listing: a rerun of the same audit reads it back instead of estimating again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "attributes.parquet"


def schema():
    """The columns of ``attributes.parquet`` (one row per file whose prompt could be parsed)."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("family", pa.string()),
        ("asked", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
        ("tempo", pa.bool_()), ("pitch", pa.bool_()), ("instrument", pa.bool_()),
        ("target_bpm", pa.float64()), ("target_chord", pa.string()), ("target_instrument", pa.string()),
        ("est_bpm", pa.float64()), ("est_chord", pa.string()), ("est_instrument", pa.string()),
    ])  # fmt: skip


def _row(item, target) -> dict:
    """One file's checks (an unreadable file: status error, no hits)."""
    import soundfile as sf

    from amg_engine.engine.default.attributes import check

    row = {"id": item.id, "prompt": item.prompt, "family": target.family, "asked": list(target.asked()),
           "status": "ok", "error": None, "target_bpm": target.bpm, "target_instrument": target.instrument,
           "target_chord": None if target.chord is None else " ".join(target.chord)}  # fmt: skip
    try:
        audio, sr = sf.read(item.path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is an error row, not a crash
        return row | {"status": "error", "error": f"cannot read {item.path}: {type(e).__name__}: {e}"}
    return row | check(target, audio, sr)


def _listing_hash(items) -> str:
    listing = [[it.id, str(Path(it.path).resolve()), it.prompt] for it in items]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def attribute_rows(items: Sequence, out_dir: Path, progress: bool = True):
    """Check every item whose prompt parses -> the table (also written to ``out_dir/attributes.parquet``),
    or None when no prompt parses. Items need ``id``, ``path`` and ``prompt``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from amg_engine.engine.default.attributes import parse_prompt
    from amg_engine.index.files import atomic_write

    todo = [(it, t) for it in items if (t := parse_prompt(it.prompt)) is not None]
    if not todo:
        return None
    path, key = Path(out_dir) / FILE, _listing_hash([it for it, _ in todo])
    if path.exists() and pq.read_metadata(path).metadata.get(b"items_sha256", b"").decode() == key:
        return pq.read_table(path)
    rows = [_row(it, t) for it, t in tqdm(todo, desc="attributes", unit="file", disable=not progress)]
    table = pa.Table.from_pylist(rows, schema=schema()).replace_schema_metadata({"items_sha256": key})
    atomic_write(path, lambda p: pq.write_table(table, p))
    return table


def adherence_summary(table) -> dict | None:
    """Per attribute (and "all", pooled): n checks, hits and their share, over ok rows; None for no table."""
    if table is None:
        return None
    from amg_engine.engine.default.attributes import ATTRIBUTES

    cols = table.to_pydict()
    ok = [i for i, s in enumerate(cols["status"]) if s == "ok"]
    out = {"files": len(ok), "errors": len(cols["status"]) - len(ok)}
    pooled_n = pooled_hits = 0
    for a in ATTRIBUTES:
        checks = [cols[a][i] for i in ok if cols[a][i] is not None]
        out[a] = _share(len(checks), sum(checks))
        pooled_n, pooled_hits = pooled_n + len(checks), pooled_hits + sum(checks)
    out["all"] = _share(pooled_n, pooled_hits)
    return out


def _share(n: int, hits: int) -> dict:
    return {"n": n, "hits": hits, "share": hits / n if n else None}


def pooled_share(summary: dict | None, attributes: Sequence[str]) -> float | None:
    """Hits over checks, pooled over ``attributes`` only (the headline: estimators that pass the bar)."""
    if summary is None:
        return None
    n = sum(summary[a]["n"] for a in attributes)
    return sum(summary[a]["hits"] for a in attributes) / n if n else None
