"""Where a run's results live: the results schema, per-batch Parquet shards, the merged view, audio.

Output folder ``DIR``:

- ``DIR/audio/<id>.flac`` (or ``.wav``): one file per ok row, 16-bit PCM at the model's sample rate,
  clipped to [-1, 1]; written to a temporary name and renamed *before* the row's result is written.
- ``DIR/results/part-XXXXX.parquet``: one shard per batch, written to a temporary name and published
  under the first free number (a hard link that fails if the name exists, so processes sharing the
  folder never overwrite each other's shards). Shards are the record of the run; nothing edits them.
- ``DIR/results.parquet``: the merged view, one row per manifest row that has a result, in manifest
  order; for every valid row, the newest shard row whose key matches the current manifest and
  configuration. Rewritten (temporary name, rename) at the end of every run, resumed or not.
- ``DIR/run.log``: what happened, appended by every run.

Temporary files end in ``.tmp`` (``.<shard tag>.tmp`` under ``--shard``) and are deleted on start.

Results schema, in column order:

================== =============== =============================================================
column             type            meaning
================== =============== =============================================================
row                int64           position of the row in the manifest (0-based); unique
id, prompt         string          as in the manifest (null where the input had the wrong type)
seconds, seed,     float64, int64, the values used: the manifest's, or the run's default; for an
cfg_scale, steps,  ...             error row the manifest's value where it has the right type
sampler, c1–c3,
negative_prompt
(other columns)    as manifest     carried through unchanged
status             string          ``ok`` or ``error``
error              string          ``row <k>: <problem>`` for error rows, else null
audio_path         string          ``audio/<id>.flac`` relative to DIR (ok rows)
final_similarity   float64         cosine similarity of the finished audio to its nearest training clip
max_similarity     float64         largest per-step similarity σ_t the detector saw (null without AMG)
neighbour_id       string          index id of that nearest training clip
neighbour_caption  string          its caption
guided_steps       int64           steps whose AMG gate was open
timing             float64         seconds per row: the batch's wall time / its size
audio_bytes,       int64           size and modification time of the audio file as written; a rerun
audio_mtime_ns                     regenerates the row if the file is gone or no longer matches
config_hash        string          hash of the row's engine configuration, overrides applied (null if they
                                   are invalid); device, batch size and compilation excluded
model_id           string          model folder name and weights digest
index_id           string          the training index: embedder name and a digest of its identity
                                   (checkpoint digest included), vectors, ids and captions
finished_at        timestamp (UTC) when the result was written
trace_similarity,  list<float32>   per step: σ_t, λ_t, s1, s2 (empty without AMG)
trace_lambda,
trace_s1, trace_s2
trace_gate         list<bool>      per step: gate open
trace_neighbour_id list<string>    per step: the index id of the detector's nearest neighbour
================== =============== =============================================================

A row counts as done, and is skipped by a rerun, when the newest shard row of its ``id`` has the same
``config_hash``, ``model_id``, ``index_id``, ``prompt``, ``seconds`` and ``seed`` and, for an ok row,
its audio file is still the one written (same size and modification time); error rows are retried only with
``--retry-failed``. "Newest" is by shard number, which grows with every batch written to the folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

# Inputs the results hold as typed columns (the values used, see the module docstring).
INPUT_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(), "prompt": pa.string(), "seconds": pa.float64(), "seed": pa.int64(),
    "negative_prompt": pa.string(), "cfg_scale": pa.float64(), "steps": pa.int64(),
    "sampler": pa.string(), "c1": pa.float64(), "c2": pa.float64(), "c3": pa.float64(),
}  # fmt: skip
OUTPUT_TYPES: dict[str, pa.DataType] = {
    "status": pa.string(), "error": pa.string(), "audio_path": pa.string(),
    "final_similarity": pa.float64(), "max_similarity": pa.float64(), "neighbour_id": pa.string(),
    "neighbour_caption": pa.string(), "guided_steps": pa.int64(), "timing": pa.float64(),
    "audio_bytes": pa.int64(), "audio_mtime_ns": pa.int64(), "config_hash": pa.string(),
    "model_id": pa.string(), "index_id": pa.string(), "finished_at": pa.timestamp("us", tz="UTC"),
    "trace_similarity": pa.list_(pa.float32()), "trace_lambda": pa.list_(pa.float32()),
    "trace_gate": pa.list_(pa.bool_()), "trace_s1": pa.list_(pa.float32()),
    "trace_s2": pa.list_(pa.float32()), "trace_neighbour_id": pa.list_(pa.string()),
}  # fmt: skip
RESERVED = frozenset({"row", *OUTPUT_TYPES})
FIXED_SCHEMA = pa.schema([("row", pa.int64()), *INPUT_TYPES.items(), *OUTPUT_TYPES.items()])
KEY = ("id", "config_hash", "model_id", "index_id", "prompt", "seconds", "seed")
PART = re.compile(r"^part-(\d+)\.parquet$")


def result_schema(manifest_schema: pa.Schema) -> pa.Schema:
    """``row``, the typed inputs, the manifest's other columns (their own types), the outputs."""
    extra = [f for f in manifest_schema if f.name not in INPUT_TYPES]
    return pa.schema([("row", pa.int64()), *INPUT_TYPES.items(), *extra, *OUTPUT_TYPES.items()])


def _fits(value: Any, typ: pa.DataType) -> bool:
    if value is None:
        return True
    if pa.types.is_string(typ):
        return isinstance(value, str)
    if pa.types.is_integer(typ):
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return isinstance(value, int | float) and not isinstance(value, bool)


def base_result(position: int, values: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict:
    """A result row's input part: the raw inputs where their type fits, then ``inputs`` (values used)."""
    row = {k: v for k, v in values.items() if k not in INPUT_TYPES}  # carried-through columns
    row.update({k: (v if _fits(v, INPUT_TYPES[k]) else None) for k, v in values.items() if k in INPUT_TYPES})
    row.update(inputs or {})
    row["row"] = position
    return row


def error_result(row, message: str, **fields: Any) -> dict:
    """The result of a row that failed (validation, engine, audio); ``fields``: config_hash, model_id,
    index_id..."""
    out = base_result(row.index, row.values)
    out.update(status="error", error=message, finished_at=now(), **fields)
    return out


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def tmp_name(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.name}.{tag}.tmp" if tag else f"{path.name}.tmp")


def write_audio(path: Path, audio, sample_rate: int, tag: str = "") -> os.stat_result:
    """``audio`` [C, T] (numpy) to FLAC or WAV by the suffix; temporary name, then rename. -> its stat"""
    import numpy as np
    import soundfile as sf

    data = np.clip(np.asarray(audio, dtype=np.float32).T, -1.0, 1.0)  # [T, C]
    tmp = tmp_name(path, tag)
    sf.write(tmp, data, sample_rate, format=path.suffix[1:].upper(), subtype="PCM_16")
    os.replace(tmp, path)
    return os.stat(path)


class ResultStore:
    """The result files of one output folder, as one process (or one shard, ``tag``) sees them."""

    def __init__(self, out_dir: str | Path, tag: str = "") -> None:
        self.dir = Path(out_dir)
        self.parts = self.dir / "results"
        self.audio = self.dir / "audio"
        self.tag = tag
        self._next: int | None = None

    def prepare(self) -> int:
        """Create the folders and delete this process's leftover temporary files; returns how many."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self.audio.mkdir(parents=True, exist_ok=True)
        pattern = f"*.{self.tag}.tmp" if self.tag else "*.tmp"
        stale = [p for d in (self.dir, self.parts, self.audio) for p in d.glob(pattern) if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("deleted %d leftover temporary files from an interrupted run", len(stale))
        return len(stale)

    def write_part(self, rows: list[dict[str, Any]], schema: pa.Schema) -> Path | None:
        """Write one shard; it becomes visible (renamed) only once complete."""
        import pyarrow.parquet as pq

        if not rows:
            return None
        tmp = self.parts / f"part-{uuid.uuid4().hex}.{self.tag or 'run'}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        return self._publish(tmp)

    def _publish(self, tmp: Path) -> Path:
        seq = self._next if self._next is not None else self._max_seq() + 1
        while True:
            final = self.parts / f"part-{seq:05d}.parquet"
            try:
                os.link(tmp, final)  # fails if another process took the number
            except FileExistsError:
                seq += 1
                continue
            except OSError:  # a file system without hard links: rename (not safe across processes)
                if final.exists():
                    seq += 1
                    continue
                os.replace(tmp, final)
            tmp.unlink(missing_ok=True)
            self._next = seq + 1
            return final

    def _max_seq(self) -> int:
        seqs = [int(m.group(1)) for p in self.parts.iterdir() if (m := PART.match(p.name))]
        return max(seqs, default=-1)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every shard row: the fixed columns (a manifest's own columns are not read back) and
        ``_part``, the number of the shard that holds it (higher is newer for a given id)."""
        import pyarrow.dataset as ds

        columns = list(columns or FIXED_SCHEMA.names)
        schema = pa.schema([FIXED_SCHEMA.field(c) for c in columns] + [("_part", pa.int64())])
        files = sorted(str(p) for p in self.parts.glob("part-*.parquet") if PART.match(p.name))
        if not files:
            return schema.empty_table()
        scanner = ds.dataset(files, schema=FIXED_SCHEMA, format="parquet").scanner(columns=columns)
        batches = []
        for tagged in scanner.scan_batches():
            b = tagged.record_batch
            seq = int(PART.match(Path(tagged.fragment.path).name).group(1))
            batches.append(pa.RecordBatch.from_arrays([*b.columns, pa.array([seq] * b.num_rows, pa.int64())],
                                                      schema=schema))  # fmt: skip
        return pa.Table.from_batches(batches, schema=schema)

    def write_merged(self, table: pa.Table) -> Path:
        import pyarrow.parquet as pq

        path = self.dir / "results.parquet"
        tmp = tmp_name(path, self.tag)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path


def newest_matching(parts: pa.Table, expected: dict[str, tuple]) -> dict[str, int]:
    """id -> position in ``parts`` of the id's newest shard row, where that row's key is ``expected[id]``.

    Only the newest row of an id counts: the audio file on disk is the one its generation wrote, so an
    older row under another configuration no longer describes it. ``parts`` needs the :data:`KEY`
    columns and ``_part``; ``expected`` maps each valid id to (config_hash, model_id, index_id, prompt,
    seconds, seed).
    """
    cols = parts.select([*KEY, "_part"]).to_pydict()
    newest: dict[str, tuple[int, int]] = {}
    for i, (rid, seq) in enumerate(zip(cols["id"], cols["_part"], strict=True)):
        if rid in expected and (rid not in newest or seq >= newest[rid][0]):
            newest[rid] = (seq, i)
    return {rid: i for rid, (_, i) in newest.items() if tuple(cols[k][i] for k in KEY[1:]) == expected[rid]}


def assemble(parts: pa.Table, picks: dict[int, int], manifest: pa.Table, errors: list[dict],
             schema: pa.Schema) -> pa.Table:  # fmt: skip
    """The merged view: ``picks`` (manifest position -> shard row) plus ``errors``, in manifest order.

    Shard rows keep their outputs; their ``row`` and carried-through columns come from the manifest
    as it is now.
    """
    positions = sorted(picks)
    done = parts.take(pa.array([picks[p] for p in positions], pa.int64()))
    extra = manifest.take(pa.array(positions, pa.int64()))
    cols = []
    for f in schema:
        if f.name == "row":
            cols.append(pa.array(positions, pa.int64()))
        elif f.name in FIXED_SCHEMA.names:
            cols.append(done.column(f.name).cast(f.type))
        else:
            cols.append(extra.column(f.name))
    merged = pa.Table.from_arrays(cols, schema=schema)
    if errors:
        merged = pa.concat_tables([merged, pa.Table.from_pylist(errors, schema=schema)])
    return merged.sort_by("row")
