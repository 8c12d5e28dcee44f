"""Choosing, copying and compacting result rows at a cost per row that does not grow with the run.

A folder's shards (:mod:`jobs.results`) are read in two passes:

1. a :meth:`~jobs.results.ResultStore.scan` of the few columns that choose rows (the resume key,
   status, audio identity) from every shard, each row tagged with its shard number, file and
   position; :func:`newest` picks the newest row of every id from it with array operations;
2. a copy of the chosen rows' full data, traces included, by :class:`RowReader`: chunk by chunk in
   the order wanted, reading only the row groups that hold them, as Arrow data (never Python
   objects), into a Parquet writer. Memory stays at a chunk plus a bounded cache of row groups.

:func:`compact` (under the folder's exclusive lock, so no other run is writing) copies the newest
row of every id into one new shard, in manifest order, with row groups of :data:`CHUNK_ROWS`; the
shard is flushed to disk, renamed onto the highest-numbered existing shard, and only then are the
other shards deleted. At every moment the newest row of every id is the same row content: before
the rename the old shards hold it; after it the compacted shard holds it under the highest number,
and what is left of the older shards is superseded. So a kill at any point leaves a folder that
reads the same, and the next compaction finishes the job. Superseded rows (an id's older results)
are dropped; rows of ids absent from the current manifest are kept, newest wins for them too.

:func:`write_results` streams ``results.parquet`` in manifest order, chunk by chunk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.results import FIXED_SCHEMA, KEY, ResultStore, Scan, conform, fsync_replace, iter_chunks, tmp_name

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # rows per streamed chunk and per row group written (~25 MB with 100-step traces)
CACHE_BYTES = 256 << 20  # decoded row groups kept for the next chunk


def newest(scan: Scan) -> np.ndarray:
    """Positions in ``scan.table`` of the newest row of every id (highest shard number, then the
    later row of that shard), in id order; rows without an id are never chosen."""
    t = scan.table
    if t.num_rows == 0:
        return np.zeros(0, np.int64)
    ids = t.column("id").combine_chunks()
    valid = np.flatnonzero(pc.is_valid(ids).to_numpy(zero_copy_only=False))
    codes = pc.dictionary_encode(ids.take(pa.array(valid))).indices.to_numpy(zero_copy_only=False)
    part = t.column("_part").to_numpy()[valid]
    pos = t.column("_pos").to_numpy()[valid]
    order = np.lexsort((pos, part, codes))  # by id, then shard, then position; the last of a run wins
    last = np.r_[codes[order][1:] != codes[order][:-1], True]
    return valid[order[last]]


def matching(scan: Scan, picked: np.ndarray, expected: dict[str, tuple]) -> dict[str, int]:
    """id -> position in ``scan.table`` of the id's newest row, where that row's key is
    ``expected[id]`` (config_hash, model_id, prompt, seconds, seed). Only the newest row of an id
    counts: the audio file on disk is the one its generation wrote, so an older row under another
    configuration no longer describes it."""
    cols = scan.table.select(list(KEY)).take(pa.array(picked, pa.int64())).to_pydict()
    out = {}
    for k, rid in enumerate(cols["id"]):
        if rid in expected and tuple(cols[c][k] for c in KEY[1:]) == expected[rid]:
            out[rid] = int(picked[k])
    return out


class RowReader:
    """Copies rows out of a scan's shard files, reading only the row groups that hold them, each row
    group decoded once while it stays in a small LRU cache."""

    def __init__(self, scan: Scan, schema: pa.Schema = FIXED_SCHEMA, cache_bytes: int = CACHE_BYTES) -> None:
        self.scan, self.schema, self.cache_bytes = scan, schema, cache_bytes
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cached = 0

    def take(self, file_idx: np.ndarray, pos_idx: np.ndarray) -> pa.Table:
        """Rows (file ``file_idx[k]``, position ``pos_idx[k]``), in that order, with ``schema``."""
        if len(file_idx) == 0:
            return self.schema.empty_table()
        starts = [self.scan.row_groups[f] for f in range(len(self.scan.files))]
        group = np.empty(len(file_idx), np.int64)
        for f in np.unique(file_idx):
            sel = file_idx == f
            group[sel] = np.searchsorted(starts[f], pos_idx[sel], side="right") - 1
        key = file_idx.astype(np.int64) << 32 | group
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        pieces = []
        for seg in np.split(order, bounds):
            f, g = int(file_idx[seg[0]]), int(group[seg[0]])
            local = pos_idx[seg] - starts[f][g]
            pieces.append(self._row_group(f, g).take(pa.array(local, pa.int64())))
        out = pa.concat_tables(pieces)
        return out.take(pa.array(np.argsort(order, kind="stable"), pa.int64()))

    def _row_group(self, f: int, g: int) -> pa.Table:
        import pyarrow.parquet as pq

        if (f, g) in self._cache:
            self._cache.move_to_end((f, g))
            return self._cache[(f, g)]
        pf = pq.ParquetFile(self.scan.files[f])
        present = [c for c in self.schema.names if c in pf.schema_arrow.names]
        table = conform(pf.read_row_group(g, columns=present), self.schema)
        self._cache[(f, g)] = table
        self._cached += table.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return table


def compact(store: ResultStore, scan: Scan, position: Callable[[list[str]], np.ndarray]) -> Scan:
    """Replace the folder's shards by one holding the newest row of every id (see the module
    docstring); returns the scan of the result. ``position(ids)`` orders the rows (the ids'
    manifest positions; ids not in the manifest sort last). Call only under the exclusive lock."""
    import pyarrow.parquet as pq

    picked = newest(scan)
    ids = scan.table.column("id").take(pa.array(picked, pa.int64())).to_pylist()
    picked = picked[np.argsort(position(ids), kind="stable")]
    target = scan.files[-1]  # the highest number: the compacted rows stay the newest of their ids
    tmp = tmp_name(target, store.tag or "run")
    reader, files, pos = RowReader(scan), scan.table.column("_file").to_numpy(), scan.table.column("_pos")
    pos = pos.to_numpy()
    with pq.ParquetWriter(tmp, FIXED_SCHEMA) as writer:
        for lo, hi in iter_chunks(len(picked), CHUNK_ROWS):
            writer.write_table(
                reader.take(files[picked[lo:hi]], pos[picked[lo:hi]]), row_group_size=CHUNK_ROWS
            )
    fsync_replace(tmp, target)
    for old in scan.files[:-1]:
        old.unlink(missing_ok=True)
    log.info("compacted %d shards (%d rows) into %s (%d rows)", len(scan.files), scan.table.num_rows,
             target.name, len(picked))  # fmt: skip
    n = len(picked)
    table = scan.table.take(pa.array(picked, pa.int64()))
    table = table.set_column(table.schema.get_field_index("_file"), "_file", pa.array(np.zeros(n, np.int32)))
    table = table.set_column(
        table.schema.get_field_index("_pos"), "_pos", pa.array(np.arange(n, dtype=np.int64))
    )
    starts = np.arange(0, n, CHUNK_ROWS, dtype=np.int64) if n else np.zeros(1, np.int64)
    return Scan([target], [starts], table)


def write_results(path: Path, tag: str, schema: pa.Schema, manifest: pa.Table, scan: Scan,
                  picks: dict[int, int], errors: dict[int, dict]) -> None:  # fmt: skip
    """Stream ``results.parquet``: for each manifest position, the shard row ``picks[position]``
    (its outputs; ``row`` and the carried-through columns from ``manifest`` as it is now) or the
    fresh error row ``errors[position]``, in manifest order."""
    import pyarrow.parquet as pq

    done_pos = np.array(sorted(picks), np.int64)
    done_idx = np.array([picks[p] for p in done_pos], np.int64)
    files = scan.table.column("_file").to_numpy()
    pos = scan.table.column("_pos").to_numpy()
    extra = [f.name for f in schema if f.name not in FIXED_SCHEMA.names]
    reader = RowReader(scan)
    tmp = tmp_name(path, tag)
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo, hi in iter_chunks(max(manifest.num_rows, 1), CHUNK_ROWS):
            a, b = np.searchsorted(done_pos, [lo, hi])
            rows = reader.take(files[done_idx[a:b]], pos[done_idx[a:b]])
            positions = pa.array(done_pos[a:b], pa.int64())
            here = manifest.select(extra).take(positions)
            cols = [positions if f.name == "row" else (rows.column(f.name) if f.name in FIXED_SCHEMA.names
                    else here.column(f.name)) for f in schema]  # fmt: skip
            chunk = pa.Table.from_arrays(
                [c.cast(f.type) for c, f in zip(cols, schema, strict=True)], schema=schema
            )
            errs = [errors[p] for p in range(lo, hi) if p in errors]
            if errs:
                chunk = pa.concat_tables([chunk, pa.Table.from_pylist(errs, schema=schema)]).sort_by("row")
            writer.write_table(chunk, row_group_size=CHUNK_ROWS)
    fsync_replace(tmp, path)
