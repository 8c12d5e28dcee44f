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

:class:`ResultsWriter` streams ``results.parquet`` in manifest order, chunk by chunk: from the
compaction's own chunks when the run compacts (one read of every row, two writes), else from the
shards through :func:`write_results`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from amg_engine.index.files import fsync_replace
from amg_engine.jobs.results import (
    FIXED_SCHEMA,
    KEY,
    ResultStore,
    Scan,
    conform,
    iter_chunks,
    output_errors,
    parquet_options,
    tmp_name,
)

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # rows per streamed chunk and per row group written (~25 MB with 100-step traces)
CACHE_BYTES = 64 << 20  # decoded row groups kept for the next chunk
READERS = 4  # threads reading row groups (pyarrow releases the GIL)


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
    ``expected[id]`` (config_hash, model_id, index_id, prompt, seconds, seed). Only the newest row of an id
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
        segments = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
        wanted = [(int(file_idx[seg[0]]), int(group[seg[0]])) for seg in segments]
        tables = self._row_groups(wanted)
        pieces = [
            _rows(t, pos_idx[seg] - starts[f][g])
            for seg, (f, g), t in zip(segments, wanted, tables, strict=True)
        ]
        return _rows(pa.concat_tables(pieces), np.argsort(order, kind="stable"))

    def _row_groups(self, wanted: list[tuple[int, int]]) -> list[pa.Table]:
        """The decoded row groups ``wanted`` ((file, group) pairs), the missing ones read in parallel
        threads (many small shards: the time goes into opening and decoding each)."""
        from concurrent.futures import ThreadPoolExecutor

        missing = [fg for fg in wanted if fg not in self._cache]
        with ThreadPoolExecutor(READERS) as pool:
            for fg, table in zip(missing, pool.map(self._read, missing), strict=True):
                self._cache[fg] = table
                self._cached += table.nbytes
        out = [self._cache[fg] for fg in wanted]
        for fg in wanted:
            self._cache.move_to_end(fg)
        while self._cached > self.cache_bytes and len(self._cache) > len(wanted):
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return out

    def _read(self, fg: tuple[int, int]) -> pa.Table:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.scan.files[fg[0]])
        present = [c for c in self.schema.names if c in pf.schema_arrow.names]
        return conform(pf.read_row_group(fg[1], columns=present, use_threads=False), self.schema)


def _rows(table: pa.Table, idx: np.ndarray) -> pa.Table:
    """``table.take(idx)``, without a copy where ``idx`` is a contiguous ascending run (the usual case:
    shards read in the order they were written)."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and (len(idx) == 1 or (np.diff(idx) == 1).all()):
        return table.slice(int(idx[0]), len(idx))
    return table.take(pa.array(idx, pa.int64()))


class ResultsWriter:
    """Streams ``results.parquet`` in manifest order: :meth:`add` chunks of chosen shard rows (their
    outputs; ``row`` and the carried-through columns come from ``manifest`` as it is now) at
    ascending manifest positions; the fresh error rows of invalid manifest rows (``errors``,
    position -> row) are slotted in between; :meth:`close` publishes the file (fsync, rename)."""

    def __init__(self, path: Path, tag: str, schema: pa.Schema, manifest: pa.Table, errors: dict[int, dict]):
        import pyarrow.parquet as pq

        self.path, self.tmp, self.schema = path, tmp_name(path, tag), schema
        self.extra = manifest.select([f.name for f in schema if f.name not in FIXED_SCHEMA.names])
        self.errors, self._error_pos, self._next_error = errors, sorted(errors), 0
        self.rows = 0
        with output_errors(self.tmp):
            self._writer = pq.ParquetWriter(self.tmp, schema, **parquet_options(schema))

    def add(self, done: pa.Table, positions: np.ndarray) -> None:
        """``done``: shard rows (fixed schema) for the manifest ``positions`` (ascending, after the
        previous chunk's)."""
        if len(positions) == 0:
            return
        where = pa.array(positions, pa.int64())
        here = self.extra.take(where)
        cols = [where if f.name == "row" else (done.column(f.name) if f.name in FIXED_SCHEMA.names
                else here.column(f.name)) for f in self.schema]  # fmt: skip
        chunk = pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, self.schema, strict=True)],
                                     schema=self.schema)  # fmt: skip
        self._write(chunk, upto=int(positions[-1]))

    def _write(self, chunk: pa.Table, upto: int | None) -> None:
        """``chunk``, with the error rows at positions up to ``upto`` (None: all that are left)."""
        stop = len(self._error_pos) if upto is None else int(np.searchsorted(self._error_pos, upto, "right"))
        errs = [self.errors[p] for p in self._error_pos[self._next_error : stop]]
        self._next_error = stop
        if errs:
            chunk = pa.concat_tables([chunk, pa.Table.from_pylist(errs, schema=self.schema)]).sort_by("row")
        if chunk.num_rows:
            with output_errors(self.tmp):
                self._writer.write_table(chunk, row_group_size=CHUNK_ROWS)
            self.rows += chunk.num_rows

    def close(self) -> None:
        self._write(self.schema.empty_table(), upto=None)
        with output_errors(self.tmp):
            self._writer.close()
            fsync_replace(self.tmp, self.path)

    def abort(self) -> None:
        """Give up: close the writer (errors ignored: the disk may be full) and delete the temporary
        file; ``results.parquet`` stays as it was."""
        with contextlib.suppress(Exception):
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def write_results(writer: ResultsWriter, scan: Scan, picks: dict[int, int]) -> None:
    """Stream the shard rows ``picks`` (manifest position -> position in ``scan.table``) into
    ``writer``, chunk by chunk in manifest order, and close it."""
    done_pos = np.array(sorted(picks), np.int64)
    done_idx = np.array([picks[p] for p in done_pos], np.int64)
    files, pos = scan.table.column("_file").to_numpy(), scan.table.column("_pos").to_numpy()
    reader = RowReader(scan)
    for lo, hi in iter_chunks(len(done_pos), CHUNK_ROWS):
        sel = done_idx[lo:hi]
        writer.add(reader.take(files[sel], pos[sel]), done_pos[lo:hi])
    writer.close()


def compact(store: ResultStore, scan: Scan, position: Callable[[list[str]], np.ndarray],
            results: tuple[ResultsWriter, dict[int, int]] | None = None) -> None:  # fmt: skip
    """Replace the folder's shards by one holding the newest row of every id (see the module
    docstring). ``position(ids)`` orders the rows (the ids' manifest positions; ids not in the
    manifest sort last). ``results``: (a writer, manifest position -> position in ``scan.table``)
    to stream ``results.parquet`` from the same pass (and close it). Call only under the exclusive
    lock."""
    import pyarrow.parquet as pq

    picked = newest(scan)
    ids = scan.table.column("id").take(pa.array(picked, pa.int64())).to_pylist()
    picked = picked[np.argsort(position(ids), kind="stable")]
    target = scan.files[-1]  # the highest number: the compacted rows stay the newest of their ids
    tmp = tmp_name(target, store.tag or "run")
    reader = RowReader(scan)
    files, pos = scan.table.column("_file").to_numpy(), scan.table.column("_pos").to_numpy()
    chosen = np.full(scan.table.num_rows, -1, np.int64)  # scan row -> its manifest position in results
    if results is not None:
        chosen[list(results[1].values())] = list(results[1])
    try:
        with (
            output_errors(tmp),
            pq.ParquetWriter(tmp, FIXED_SCHEMA, **parquet_options(FIXED_SCHEMA)) as writer,
        ):
            for lo, hi in iter_chunks(len(picked), CHUNK_ROWS):
                rows = reader.take(files[picked[lo:hi]], pos[picked[lo:hi]])
                with output_errors(tmp):
                    writer.write_table(rows, row_group_size=CHUNK_ROWS)
                if results is not None:
                    keep = np.flatnonzero(chosen[picked[lo:hi]] >= 0)
                    results[0].add(_rows(rows, keep), chosen[picked[lo:hi]][keep])
        with output_errors(tmp):
            fsync_replace(tmp, target)
    except BaseException:  # e.g. a full disk: the old shards still hold every row; no temporary file
        tmp.unlink(missing_ok=True)  # stays taking space
        raise
    for old in scan.files[:-1]:
        old.unlink(missing_ok=True)
    log.info("compacted %d shards (%d rows) into %s (%d rows)", len(scan.files), scan.table.num_rows,
             target.name, len(picked))  # fmt: skip
    if results is not None:
        results[0].close()
