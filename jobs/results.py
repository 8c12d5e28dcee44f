"""Where a run's results live: the results schema, per-batch Parquet shards, the folder lock, audio.

Output folder ``DIR``:

- ``DIR/audio/<id>.flac`` (or ``.wav``): one file per ok row, 16-bit PCM at the model's sample rate,
  clipped to [-1, 1]; written to a temporary name and renamed *before* the row's result is written.
- ``DIR/rejected/<id>-a<k>.flac``: under the release gate (:mod:`jobs.gate`), a row's best attempt
  while it is retried (status ``retry``) and, if it never clears, for good (status ``rejected``);
  never among the released files in ``audio/``.
- ``DIR/results/part-XXXXX.parquet``: the record of the run. A batch's shard is written to a
  temporary name and published under the first free number (a hard link that fails if the name
  exists, so processes sharing the folder never overwrite each other's shards). The run that finds
  itself alone in the folder at its end *compacts* them (:mod:`jobs.merge`): the newest row of every
  id is copied into one shard, which replaces the highest-numbered one, and the others are deleted.
- ``DIR/results.parquet``: the merged view, one row per manifest row that has a result, in manifest
  order; for every valid row, the newest shard row whose key matches the current manifest and
  configuration. Written by streaming (temporary name, fsync, rename) by the last run to finish.
- ``DIR/.lock``: every run holds it shared while it runs; compaction and ``results.parquet`` need it
  exclusive, so they only happen when no other run is working in the folder (:class:`FolderLock`).
  ``DIR/.run.lock`` and ``DIR/.shard<i>of<n>.lock``: the runs' claims on their rows (same class).
- ``DIR/results/part-XXXXX.parquet.corrupt``: a shard that could not be read, set aside; its rows are
  recovered from ``results.parquet`` where their audio proves them (:meth:`ResultStore.recover`).
- ``DIR/run.log``: what happened, appended by every run.

Temporary files end in ``.tmp``; under ``--shard i/n`` in ``.shard<i>of<n>.tmp``. A run deletes its
own leftovers on start (an unsharded run: every ``.tmp`` file that is not a shard's), never another
shard's: that shard's process may be writing it.

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
status             string          ``ok``, ``error``; under the release gate also ``rejected`` (no attempt
                                   cleared τ) and, between attempts, ``retry``
error              string          ``row <k>: <problem>`` for error rows, else null
audio_path         string          ``audio/<id>.flac`` relative to DIR (ok rows; ``rejected/<id>-a<k>.flac``
                                   for rejected and retry rows, and for error rows of the gate whose
                                   failed attempt followed earlier ones: their best attempt's)
final_similarity   float64         cosine similarity of the finished audio to its nearest training clip
                                   (rejected rows: their best attempt's)
max_similarity     float64         largest per-step similarity σ_t the detector saw (null without AMG)
neighbour_id       string          index id of that nearest training clip
neighbour_caption  string          its caption
guided_steps       int64           steps whose AMG gate was open
timing             float64         seconds per row: the batch's wall time / its size
audio_bytes,       int64           size and modification time of the audio file as written
audio_mtime_ns
audio_sha256       string          SHA-256 of the audio file's bytes (hex) as written
config_hash        string          hash of the row's engine configuration, overrides applied (null if they
                                   are invalid); device, batch size and compilation excluded
model_id           string          model folder name and weights digest
index_id           string          the training index: embedder name and a digest of its identity
                                   (checkpoint digest included), vectors, ids and captions
gate               string          the release gate (τ, N, F) the row was made under; null without one
attempts           int64           attempts made under the gate (null without one)
attempt_seeds,     list<int64>,    per attempt: its seed, its final similarity, its seconds (the
attempt_similar-   list<float64>,  batch's wall time / its size); the outputs above are the released
ities, attempt_    list<float64>   attempt's (ok) or the best one's (rejected, retry)
seconds
finished_at        timestamp (UTC) when the result was written
trace_similarity,  list<float32>   per step: σ_t, λ_t, s1, s2 (empty without AMG)
trace_lambda,
trace_s1, trace_s2
trace_gate         list<bool>      per step: gate open
trace_neighbour_id list<string>    per step: the index id of the detector's nearest neighbour
================== =============== =============================================================

A row counts as done, and is skipped by a rerun, when the newest shard row of its ``id`` has the same
``config_hash``, ``model_id``, ``index_id``, ``prompt``, ``seconds``, ``seed`` and ``gate`` and, for an
ok or rejected row, its audio file is unchanged (:func:`same_audio`): it exists with the recorded
size, and either its modification time is the recorded one or (a folder copied without preserving
times) its SHA-256 is.
Error rows are retried only with ``--retry-failed`` (a gated error row that kept earlier attempts, its
file unchanged, continues with its next attempt); a ``retry`` row continues with its next attempt.
"Newest" is by shard number, which grows with every batch written to the folder, then by
position in the shard.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import io
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from amg_engine.index.files import atomic_write, fsync_dir, fsync_file, sha256_stream

log = logging.getLogger(__name__)


class OutputUnavailable(RuntimeError):
    """The run cannot write or read its own output folder: a full disk, a read-only or lost folder, no
    permission. That is the run's fault, not a row's: the run stops at once (the CLI exits with code 4)
    and the rows in flight get no result row, so rerunning the same command, once the cause is fixed,
    generates them (module docstring of :mod:`jobs.generate`)."""

    RESUME = ("Rows finished before are kept; fix the cause (free space, remount, permissions) and rerun "
              "the same command to generate the rest")  # fmt: skip

    def __init__(self, path: str | Path, error: OSError, advice: str = RESUME) -> None:
        self.path, self.error = Path(path), error
        super().__init__(f"stopped: {self.path}: {os_cause(error)}. {advice}")


def os_cause(error: OSError) -> str:
    """An operating-system error's cause in words and its errno name: 'No space left on device (ENOSPC)'."""
    code = errno.errorcode.get(error.errno, "") if error.errno else ""
    return f"{os.strerror(error.errno)} ({code})" if code else (error.strerror or str(error))


class FolderBusy(RuntimeError):
    """Another run that would do the same rows is working in the output folder (:class:`FolderLock`)."""


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn an operating-system error (one with an ``errno``) into :class:`OutputUnavailable` naming
    the file it names, else ``path``. pyarrow reports unreadable data as ``OSError`` without an errno:
    those pass through unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise OutputUnavailable(e.filename or path, e) from e


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
    "audio_bytes": pa.int64(), "audio_mtime_ns": pa.int64(), "audio_sha256": pa.string(),
    "config_hash": pa.string(), "model_id": pa.string(), "index_id": pa.string(),
    "finished_at": pa.timestamp("us", tz="UTC"),
    "trace_similarity": pa.list_(pa.float32()), "trace_lambda": pa.list_(pa.float32()),
    "trace_gate": pa.list_(pa.bool_()), "trace_s1": pa.list_(pa.float32()),
    "trace_s2": pa.list_(pa.float32()), "trace_neighbour_id": pa.list_(pa.string()),
    "gate": pa.string(), "attempts": pa.int64(), "attempt_seeds": pa.list_(pa.int64()),
    "attempt_similarities": pa.list_(pa.float64()), "attempt_seconds": pa.list_(pa.float64()),
}  # fmt: skip
RESERVED = frozenset({"row", *OUTPUT_TYPES})
FIXED_SCHEMA = pa.schema([("row", pa.int64()), *INPUT_TYPES.items(), *OUTPUT_TYPES.items()])
KEY = ("id", "config_hash", "model_id", "index_id", "prompt", "seconds", "seed", "gate")
AUDIO_IDENTITY = ("status", "audio_path", "audio_bytes", "audio_mtime_ns", "audio_sha256")
PART = re.compile(r"^part-(\d+)\.parquet$")
SHARD_TMP = re.compile(r"\.shard\d+of\d+\.tmp$")


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


# -- audio files and their identity ------------------------------------------------------------------
@dataclass(frozen=True)
class AudioFile:
    """An audio file as written: what a result row records to recognise it later."""

    size: int
    mtime_ns: int
    sha256: str


def encode_audio(audio, sample_rate: int, fmt: str) -> bytes:
    """``audio`` [C, T] (numpy) as the bytes of a FLAC or WAV file: 16-bit PCM, clipped to [-1, 1]."""
    import soundfile as sf

    data = np.clip(np.asarray(audio, dtype=np.float32).T, -1.0, 1.0)  # [T, C]
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def decode_audio(encoded: bytes) -> np.ndarray:
    """The samples [C, T] (float32) an audio reader gets from the file bytes ``encoded``."""
    import soundfile as sf

    data, _ = sf.read(io.BytesIO(encoded), dtype="float32", always_2d=True)
    return data.T


def write_audio(
    path: Path, audio, sample_rate: int, tag: str = "", encoded: bytes | None = None
) -> AudioFile:
    """``audio`` [C, T] (numpy) to FLAC or WAV by the suffix; encoded in memory (so its digest costs
    no second read; ``encoded``: already encoded, by :func:`encode_audio`), written to a temporary
    name, then renamed."""
    encoded = encode_audio(audio, sample_rate, path.suffix[1:]) if encoded is None else encoded
    # Not fsynced (durable=False): the row records the file's size, time and digest, so a rerun after a
    # power cut regenerates a torn file (same_audio); an fsync a file costs ~0.6 ms here, near the job
    # layer's whole per-row cost (0.70 ms, README: bench_jobs). The shard that names it is durable.
    atomic_write(path, lambda p: Path(p).write_bytes(encoded), tmp=tmp_name(path, tag), durable=False)
    st = os.stat(path)
    return AudioFile(st.st_size, st.st_mtime_ns, hashlib.sha256(encoded).hexdigest())


def same_audio(path: Path, size: int | None, mtime_ns: int | None, sha256: str | None) -> bool:
    """The audio file is still the one its result row describes: the recorded size, and the recorded
    modification time or, where the time differs (a copy that did not keep times), the recorded
    SHA-256 of its bytes. Rows written before digests were recorded need the time."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file() or st.st_size != size:
        return False
    if st.st_mtime_ns == mtime_ns:
        return True
    try:
        return sha256 is not None and sha256_stream(path) == sha256
    except OSError:
        return False


# -- the folder lock (durable writes: index/files.py) ------------------------------------------------
class FolderLock:
    """``DIR/.lock``, an advisory ``flock``: shared while a run works in the folder, exclusive for the
    work that must not race with another run (compaction, ``results.parquet``). The kernel drops it
    when the process dies, so a killed run never leaves the folder locked.

    Before that, a run *claims* its rows: an unsharded run (``tag`` empty) takes ``DIR/.run.lock``
    exclusive, a ``--shard i/n`` run takes it shared plus ``DIR/.<tag>.lock`` exclusive; each claim
    records the process (pid, host, start time) in its file. So ``--shard i/n`` runs share a folder,
    while a second unsharded run, an unsharded run beside shard runs, or a second run of the same
    shard is refused with :class:`FolderBusy` naming the process that holds the claim: two runs of
    the same rows would generate them twice and delete each other's temporary files.

    Where the file system has no locks, :attr:`supported` is False: :meth:`try_exclusive` then
    answers None ("cannot tell") and the caller does only what is safe without one.
    """

    def __init__(self, folder: Path, tag: str = "") -> None:
        self.path = Path(folder) / ".lock"
        self.tag = tag
        self._fd: int | None = None
        self._claims: list[int] = []
        self.supported = True

    def __enter__(self) -> FolderLock:
        """Claim this run's rows (or raise :class:`FolderBusy`), then take the lock shared (waiting
        while another run compacts)."""
        import fcntl

        try:
            self._claim()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.__exit__()
                raise
            self.supported = False  # e.g. ENOLCK on some network file systems
            log.warning("no file locks on %s (%s): concurrent runs in this folder cannot tell when they "
                        "are alone; parts are not compacted", self.path, e)  # fmt: skip
        return self

    def _claim(self) -> None:
        """Take ``.run.lock`` (exclusive unsharded, shared for a shard) and a shard's own lock file."""
        import fcntl

        run = self.path.with_name(".run.lock")
        if not self.tag:
            if not self._take(run, fcntl.LOCK_EX, record=True):
                holders = [h for f in sorted(self.path.parent.glob(".shard*.lock")) if (h := _holder(f))]
                self._busy(holders or [_read(run)], "an unsharded run needs the folder to itself")
            return
        if not self._take(run, fcntl.LOCK_SH, record=False):
            self._busy([_read(run)], f"an unsharded run does every row, {self.tag}'s too")
        own = self.path.with_name(f".{self.tag}.lock")
        if not self._take(own, fcntl.LOCK_EX, record=True):
            self._busy([_read(own)], f"it runs {self.tag} already")

    def _take(self, path: Path, how: int, record: bool) -> bool:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        self._claims.append(fd)
        if record:
            since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {since}".encode(), 0)
        return True

    def _busy(self, holders: list[str], why: str) -> None:
        self.__exit__()
        who = "; ".join(h or "a process that recorded nothing" for h in holders)
        raise FolderBusy(
            f"another run is working in {self.path.parent} ({who}): {why}. Wait for it to finish or "
            "stop it (a killed run leaves no lock), then rerun; --shard i/n runs may share a folder"
        )

    def try_exclusive(self) -> bool | None:
        """Give up the shared lock and try to take it exclusive without waiting: True when no other run
        holds the folder (then hold it until :meth:`__exit__`), False when one does, None without locks."""
        import fcntl

        if not self.supported:
            return None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *exc) -> None:
        for fd in [*self._claims, *([self._fd] if self._fd is not None else [])]:
            os.close(fd)  # releases the lock
        self._claims, self._fd = [], None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _holder(path: Path) -> str | None:
    """What the process holding ``path``'s lock recorded, or None when no process holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path) or "a running process"
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


# -- the shards ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scan:
    """Some columns of every shard row, as Arrow data. ``table`` holds the columns asked for plus
    ``_part`` (the shard's number: higher is newer), ``_file`` (index into ``files``) and ``_pos``
    (the row's position in its file); ``row_groups[f]`` are the first rows of file f's row groups."""

    files: list[Path]
    row_groups: list[np.ndarray]
    table: pa.Table


SCAN_EXTRA = pa.schema([("_part", pa.int64()), ("_file", pa.int32()), ("_pos", pa.int64())])


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How result files are written: dictionary encoding and statistics only where they pay. Trying a
    dictionary on the float traces, which rarely repeat, made writing 2.8x slower (8,192 rows with
    100-step traces: 280 ms against 101 ms on this project's CPU); statistics on nested columns are
    never used to read."""
    flat = lambda t: not (pa.types.is_list(t) or pa.types.is_large_list(t))  # noqa: E731
    strings = lambda t: pa.types.is_string(t) or (not flat(t) and pa.types.is_string(t.value_type))  # noqa: E731
    return dict(use_dictionary=[f.name for f in schema if strings(f.type)] or False,
                write_statistics=[f.name for f in schema if flat(f.type)] or False)  # fmt: skip


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones null (older shards), types cast."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    names, cols = set(table.column_names), []
    for f in schema:
        if f.name in names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _scan_file(path: Path, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    present = [c for c in columns if c in pf.schema_arrow.names]
    table = conform(
        pf.read(columns=present, use_threads=False), pa.schema([FIXED_SCHEMA.field(c) for c in columns])
    )
    return table, np.cumsum([0, *sizes[:-1]], dtype=np.int64)


def _try_scan(path: Path, columns: list[str]) -> tuple[pa.Table, np.ndarray] | Exception:
    """:func:`_scan_file`, or the error that says the file's data is unreadable (pyarrow's; an
    operating-system error, one with an errno, is raised: the folder is at fault, not the file)."""
    try:
        return _scan_file(path, columns)
    except OSError as e:
        if e.errno is not None:
            raise
        return e
    except pa.ArrowException as e:
        return e


class ResultStore:
    """The result files of one output folder, as one process (or one shard, ``tag``) sees them."""

    def __init__(self, out_dir: str | Path, tag: str = "") -> None:
        self.dir = Path(out_dir)
        self.parts = self.dir / "results"
        self.audio = self.dir / "audio"
        self.rejected = self.dir / "rejected"  # the release gate's attempts that did not clear
        self.tag = tag
        self._next: int | None = None

    def prepare(self) -> int:
        """Create the folders and delete this process's leftover temporary files (never another
        shard's); returns how many."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self.audio.mkdir(parents=True, exist_ok=True)
        folders = (self.dir, self.parts, self.audio, self.rejected)
        stale = [p for d in folders if d.is_dir() for p in d.glob("*.tmp") if self._owns(p.name)]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("deleted %d leftover temporary files from an interrupted run", len(stale))
        return len(stale)

    def _owns(self, name: str) -> bool:
        return name.endswith(f".{self.tag}.tmp") if self.tag else not SHARD_TMP.search(name)

    def lock(self) -> FolderLock:
        return FolderLock(self.dir, self.tag)

    def write_pending(self, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
        """Write one shard under a temporary name (this process's: deleted on its next start)."""
        import pyarrow.parquet as pq

        tmp = self.parts / f"part-{uuid.uuid4().hex}.{self.tag or 'run'}.tmp"
        table = pa.Table.from_pylist(rows, schema=schema)
        try:
            with output_errors(tmp):
                pq.write_table(table, tmp, **parquet_options(schema))
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: the part written must not keep taking space
            raise
        return tmp

    def write_part(self, rows: list[dict[str, Any]], schema: pa.Schema) -> Path | None:
        """Write one shard; it becomes visible (renamed) only once complete."""
        return self.publish(self.write_pending(rows, schema)) if rows else None

    def publish(self, tmp: Path) -> Path:
        """Give a complete pending shard the next free number."""
        fsync_file(tmp)  # a power cut must not leave a published shard that is not all there
        seq = self._next if self._next is not None else self._max_seq() + 1
        while True:
            final = self.parts / f"part-{seq:05d}.parquet"
            try:
                os.link(tmp, final)  # fails if another process took the number; data flushed first
            except FileExistsError:
                seq += 1
                continue
            except OSError:  # a file system without hard links: rename (not safe across processes)
                if final.exists():
                    seq += 1
                    continue
                os.replace(tmp, final)
            tmp.unlink(missing_ok=True)
            fsync_dir(self.parts)
            self._next = seq + 1
            return final

    def _max_seq(self) -> int:
        seqs = [int(m.group(1)) for p in self.parts.iterdir() if (m := PART.match(p.name))]
        return max(seqs, default=-1)

    def part_files(self) -> list[Path]:
        """The published shards, oldest first."""
        if not self.parts.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.parts.iterdir() if (m := PART.match(p.name))]
        return [p for _, p in sorted(found)]

    def scan(self, columns: list[str]) -> Scan:
        """``columns`` (of the fixed schema) of every shard row, each file read for those columns only
        (a manifest's own columns are not read back). Files are read in parallel threads. A shard
        whose data cannot be read (truncated, torn) is set aside as ``*.corrupt`` with a warning
        naming it, and what ``results.parquet`` proves of its rows is recovered (:meth:`recover`)."""
        from concurrent.futures import ThreadPoolExecutor

        files = self.part_files()
        with ThreadPoolExecutor(4) as pool:
            read = list(pool.map(lambda p: _try_scan(p, columns), files))
        unreadable = [(p, r) for p, r in zip(files, read, strict=True) if isinstance(r, Exception)]
        if unreadable:  # set aside, recover what results.parquet proves, and read the folder again
            for path, error in unreadable:
                self._set_aside(path, error)
            self.recover()
            return self.scan(columns)
        tables = []
        for k, (path, (table, _)) in enumerate(zip(files, read, strict=True)):
            n = table.num_rows
            extra = [pa.array(np.full(n, int(PART.match(path.name).group(1)), np.int64)),
                     pa.array(np.full(n, k, np.int32)), pa.array(np.arange(n, dtype=np.int64))]  # fmt: skip
            tables.append(pa.Table.from_arrays([*table.columns, *extra], names=[*columns, *SCAN_EXTRA.names]))
        schema = pa.schema([FIXED_SCHEMA.field(c) for c in columns] + list(SCAN_EXTRA))
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        return Scan(files, [rg for _, rg in read], table)

    def _set_aside(self, path: Path, error: Exception) -> None:
        """Rename an unreadable shard out of the way (``*.corrupt``: no run reads or deletes it)."""
        target = path.with_name(f"{path.name}.corrupt")
        if target.exists():
            target = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.corrupt")
        try:
            os.replace(path, target)
        except FileNotFoundError:  # another run of this folder set it aside first
            return
        log.warning("result shard %s cannot be read (%s: %s): set aside as %s; its rows that "
                    "results.parquet records with unchanged audio are recovered, the others will be "
                    "generated again", path, type(error).__name__, error, target.name)  # fmt: skip

    def recover(self) -> int:
        """Publish, as a new shard, the rows of ``results.parquet`` that no readable shard holds (the
        rows of a shard set aside) and that are proven done: an ok, rejected or retry row newer than
        every shard row of its id whose audio file is the one it records (:func:`same_audio`).
        Returns how many."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        path = self.dir / "results.parquet"
        try:
            pf = pq.ParquetFile(path)
            table = pf.read(columns=[c for c in FIXED_SCHEMA.names if c in pf.schema_arrow.names])
        except FileNotFoundError:
            return 0
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise
            log.warning("%s cannot be read either (%s): nothing recovered from it", path, e)
            return 0
        table = conform(table, FIXED_SCHEMA)
        table = table.filter(pc.is_in(table["status"], pa.array(["ok", "rejected", "retry"])))
        latest: dict[str, Any] = {}
        shards = self.scan(["id", "finished_at"]).table.to_pydict()
        for rid, t in zip(shards["id"], shards["finished_at"], strict=True):
            if t is not None and (rid not in latest or t > latest[rid]):
                latest[rid] = t
        keep = [r for r in table.to_pylist() if r["id"] is not None and r["finished_at"] is not None
                and (r["id"] not in latest or r["finished_at"] > latest[r["id"]])
                and same_audio(self.dir / (r["audio_path"] or ""), r["audio_bytes"], r["audio_mtime_ns"],
                               r["audio_sha256"])]  # fmt: skip
        if keep:
            self.write_part(keep, FIXED_SCHEMA)
        log.warning("recovered %d result rows from %s (their audio matches its recorded size and digest)",
                    len(keep), path)  # fmt: skip
        return len(keep)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every shard row's ``columns`` (default: all fixed ones) and ``_part``, ``_file``, ``_pos``."""
        return self.scan(list(columns or FIXED_SCHEMA.names)).table


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)
