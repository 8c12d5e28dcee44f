"""Attribute adherence of audited audio: does each file have the tempo, chord or key and instrument
its prompt asked for? (the default model's prompts; engine/default/attributes.py)

Only files whose prompt names a measurable attribute are checked (:func:`parse_prompt`); a folder of
anyone's audio with other prompts, or none, gets no rows. Per checked file, ``attributes.parquet``
holds what the prompt asked, what the estimators read and a hit (true/false) per asked attribute.
The summary gives, per attribute, the share of hits among the files that asked for it, and the
pooled share over every (file, attribute) check ("all"). A rerun of the audit into the same folder
reuses the row of each file whose id, path, prompt and content identity (size, modification and
status-change times) are unchanged, and checks the others again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "attributes.parquet"
ROW_KEYS = "row_keys"  # metadata: per row, the key of the file it was checked on (_row_key)


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
    from amg_engine.index.files import unreadable_file

    row = {"id": item.id, "prompt": item.prompt, "family": target.family, "asked": list(target.asked()),
           "status": "ok", "error": None, "target_bpm": target.bpm, "target_instrument": target.instrument,
           "target_chord": None if target.chord is None else " ".join(target.chord)}  # fmt: skip
    if problem := getattr(item, "error", None) or unreadable_file(item.path):  # outside, missing, unreadable
        return row | {"status": "error", "error": problem}
    try:
        audio, sr = sf.read(item.path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is an error row, not a crash
        return row | {"status": "error", "error": f"cannot read {item.path}: {type(e).__name__}: {e}"}
    return row | check(target, audio, sr)


def _row_key(item) -> str:
    """A row is reused for the same id, path and prompt and an unchanged file only (files.file_identity)."""
    from amg_engine.index.files import file_identity

    path = Path(item.path)
    row = [item.id, str(path.resolve()), item.prompt, getattr(item, "error", None), file_identity(path)]
    return hashlib.sha256(json.dumps(row).encode()).hexdigest()


def _cached_rows(path: Path) -> dict[str, dict]:
    """The rows of an earlier ``attributes.parquet`` by their key ({} when there is none to reuse)."""
    import pyarrow.parquet as pq

    if not path.exists():
        return {}
    try:
        keys = json.loads((pq.read_metadata(path).metadata or {}).get(ROW_KEYS.encode(), b"[]"))
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - a cache that cannot be read is only recomputed
        log.warning("cannot reuse %s (%s): checking every file again", path, e)
        return {}
    return dict(zip(keys, rows, strict=True)) if len(keys) == len(rows) else {}


def attribute_rows(items: Sequence, out_dir: Path, progress: bool = True):
    """Check every item whose prompt parses -> the table (also written to ``out_dir/attributes.parquet``),
    or None when no prompt parses. Items need ``id``, ``path`` and ``prompt``. A rerun into the same
    folder reuses the rows of files that did not change and checks the others again."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from amg_engine.engine.default.attributes import parse_prompt
    from amg_engine.index.files import atomic_write

    todo = [(it, t) for it in items if (t := parse_prompt(it.prompt)) is not None]
    if not todo:
        return None
    path = Path(out_dir) / FILE
    keys, old = [_row_key(it) for it, _ in todo], _cached_rows(path)  # keys before any file is read
    rows = [old.get(k) or _row(it, t)
            for (it, t), k in tqdm(list(zip(todo, keys, strict=True)), desc="attributes", unit="file",
                                   disable=not progress)]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema()).replace_schema_metadata({ROW_KEYS: json.dumps(keys)})
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
