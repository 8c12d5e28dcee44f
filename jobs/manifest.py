"""Reading and validating a Parquet prompt manifest.

Required columns: ``id`` (a safe file name, unique) and ``prompt`` (non-empty text). Optional:
``seconds`` (default: the model's window) and ``seed`` (default: a hash of the id, so reruns are
reproducible). Other columns are carried through to the results.

A manifest without a required column is refused as a whole (:class:`ManifestError` naming the
column). A bad *row* never stops the run: it becomes a result row with status ``error`` and a
message naming the row and the problem.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED = ("id", "prompt")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, or a required column is missing)."""


@dataclass(frozen=True)
class Row:
    index: int  # position in the manifest
    values: dict[str, Any]  # every input column, as read
    id: str | None
    prompt: str | None
    seconds: float | None
    seed: int | None
    error: str | None  # why this row cannot be generated, or None


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise ManifestError(f"manifest {path} is not a readable Parquet file: {e}") from e
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks required column(s) {missing}; it has {table.column_names}. "
            "A manifest needs `id` and `prompt` (optional: `seconds`, `seed`)."
        )
    return table.to_pylist()


def default_seed(row_id: str) -> int:
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "little")


def _row_error(v: dict[str, Any], max_seconds: float) -> str | None:
    rid, prompt = v.get("id"), v.get("prompt")
    if not isinstance(rid, str):
        return f"id {rid!r} is not text"
    if not SAFE_ID.match(rid):
        return f"id {rid!r} is not a safe file name (letters, digits, '.', '_', '-'; no separators)"
    if not isinstance(prompt, str):
        return f"prompt {prompt!r} is not text"
    if not prompt.strip():
        return "prompt is empty"
    sec = v.get("seconds")
    if sec is not None:
        if isinstance(sec, bool) or not isinstance(sec, int | float) or not math.isfinite(sec):
            return f"seconds {sec!r} is not a finite number"
        if not 0 < sec <= max_seconds:
            return f"seconds {sec} is outside (0, {max_seconds:g}], the model's window"
    seed = v.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        return f"seed {seed!r} is not a non-negative integer"
    return None


def validate(records: list[dict[str, Any]], max_seconds: float) -> list[Row]:
    """One :class:`Row` per record, in order; duplicate ids after the first are errors."""
    rows, seen = [], set()
    for i, v in enumerate(records):
        err = _row_error(v, max_seconds)
        rid = v.get("id")
        if err is None and rid in seen:
            err = f"duplicate id {rid!r} (first use kept)"
        if err is None:
            seen.add(rid)
        ok = err is None
        rows.append(Row(
            index=i, values=v, id=rid if isinstance(rid, str) else None,
            prompt=v["prompt"] if ok else None,
            seconds=(float(v["seconds"]) if v.get("seconds") is not None else max_seconds) if ok else None,
            seed=(int(v["seed"]) if v.get("seed") is not None else default_seed(rid)) if ok else None,
            error=None if ok else f"row {i}: {err}",
        ))  # fmt: skip
    return rows
