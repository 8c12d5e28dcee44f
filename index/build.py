"""Building an index from training audio: a Parquet manifest or a folder of audio files, resumably.

Sources: a Parquet manifest (``id``, ``caption``, ``path``, optional ``seconds``; paths relative to the
manifest) or a folder searched recursively for flac, wav, ogg (and mp3 when soundfile reads it);
a folder's ids are the files' relative paths and its captions come from a sidecar ``<name>.txt``
next to each file (empty when there is none).

Each clip becomes its embedder's input by the one definition of a clip's embedding (index/clip.py:
mono, resampled to the embedder's rate, fitted to its window with zeros or CLAP's repeat padding,
peak-normalised), on reader threads, and the windows are embedded in batches.

A third source is a Parquet file of embeddings a lab already has (:func:`build_from_embeddings`:
id, caption, vector, and the embedder's identity in the file's metadata), streamed in row batches.

Either way the rows go into ``.npy`` files in ``OUT/.build`` (``vectors.npy``, ``seconds.npy``, written
at each row's offset, not through a memory map, so the written pages stay page cache and out of the
process's resident memory) next to a ``plan.json`` naming the inputs and a ``progress.json`` counting
the rows written (after an fsync);
a rerun after an interruption starts at the first uncounted row. At the end the items are streamed
into ``items.arrow``, the vectors' file is renamed into ``OUT`` and the folder is sealed as a
memory-mapped index (index/store.py); ``.build`` goes. Five files in the work folder and four in the
index, whatever the number of clips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from amg_engine.index.clip import EmbedderInfo, input_span, prepare_clips
from amg_engine.index.files import atomic_write, fsync_replace, open_plan_dir
from amg_engine.index.store import (
    DTYPES,
    INDEX_JSON,
    ITEMS_ARROW,
    VECTORS_NPY,
    EmbeddingIndex,
    finish_mapped,
    write_items,
)

log = logging.getLogger(__name__)

BUILD_DIR = ".build"
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")


@dataclass(frozen=True)
class Clip:
    id: str
    caption: str
    path: Path
    seconds: float | None  # None: read from the file


def audio_suffixes() -> tuple[str, ...]:
    """Suffixes the folder scan picks up: flac, wav, ogg, and mp3 when this soundfile reads it."""
    import soundfile as sf

    return AUDIO_SUFFIXES + ((".mp3",) if "MP3" in sf.available_formats() else ())


def clips_from_folder(folder: str | Path) -> list[Clip]:
    """Every audio file under ``folder`` (recursively, sorted): id = relative path, caption = sidecar."""
    folder = Path(folder)
    suffixes = audio_suffixes()
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not paths:
        raise FileNotFoundError(f"no audio files ({', '.join(suffixes)}) under {folder}")
    clips = []
    for p in paths:
        sidecar = p.with_suffix(".txt")
        caption = sidecar.read_text().strip() if sidecar.is_file() else ""
        clips.append(Clip(p.relative_to(folder).as_posix(), caption, p, None))
    return clips


def clips_from_manifest(manifest: str | Path) -> list[Clip]:
    """Rows of a Parquet manifest (id, caption, path[, seconds]); relative paths are from its folder."""
    import pyarrow.parquet as pq

    manifest = Path(manifest)
    items = pq.read_table(manifest).to_pydict()
    missing = [c for c in ("id", "caption", "path") if c not in items]
    if missing:
        raise ValueError(f"{manifest} lacks column(s) {missing}; an index manifest needs id, caption, path")
    if len(set(items["id"])) != len(items["id"]):
        raise ValueError(f"{manifest} has duplicate ids; every training clip needs its own id")
    seconds = items.get("seconds") or [None] * len(items["id"])
    return [
        Clip(str(i), str(c or ""), manifest.parent / p, None if s is None else float(s))
        for i, c, p, s in zip(items["id"], items["caption"], items["path"], seconds, strict=True)
    ]


def is_embeddings(source: str | Path) -> bool:
    """Whether ``source`` is a Parquet file of precomputed embeddings (it has a ``vector`` column)."""
    import pyarrow.parquet as pq

    source = Path(source)
    return source.suffix == ".parquet" and source.is_file() and "vector" in pq.read_schema(source).names


def clips_from_source(source: str | Path) -> list[Clip]:
    """A folder of audio or a Parquet manifest."""
    source = Path(source)
    if source.is_dir():
        return clips_from_folder(source)
    if source.suffix == ".parquet":
        return clips_from_manifest(source)
    raise ValueError(f"{source}: give a folder of audio files or a .parquet manifest")


def read_clip(path: Path | BinaryIO, embedder) -> tuple[torch.Tensor, float]:
    """The embedder's prepared window of an audio file ([window], index/clip.py) and the file's full
    duration in seconds. Only the part of the file the window can see is read. ``path``: a file, or a
    file object holding one's bytes (the release gate measures a clip's bytes before writing them)."""
    import soundfile as sf

    with sf.SoundFile(path) as f:
        sr, frames = f.samplerate, f.frames
        span = input_span(sr, embedder.sample_rate, embedder.window)
        data = f.read(frames=span, dtype="float32", always_2d=True)  # [T, C]
    if data.shape[0] == 0:
        raise ValueError(f"{path} holds no audio samples")
    x = torch.from_numpy(data.T.copy())[None]  # [1, C, T]
    window = prepare_clips(x, sr, None, embedder.sample_rate, embedder.window, embedder.fill)
    return window[0], frames / sr


def _plan(clips: list[Clip], embedder, batch_size: int) -> dict:
    listing = json.dumps([[c.id, str(c.path.resolve())] for c in clips]).encode()
    return {
        "embedder": json.loads(embedder.info.to_json()),
        "batch_size": batch_size,
        "n": len(clips),
        "clips_sha256": hashlib.sha256(listing).hexdigest(),
    }


def _read_for(embedder, clip: Clip) -> tuple[torch.Tensor, float]:
    try:
        x, seconds = read_clip(clip.path, embedder)
    except Exception as e:  # a training clip silently missing from the index would hide replicas
        raise RuntimeError(f"cannot read training clip {clip.id!r} ({clip.path}): {e}") from e
    return x, seconds if clip.seconds is None else clip.seconds


def _embed_part(clips: list[Clip], embedder, device: torch.device, pool: ThreadPoolExecutor) -> dict:
    """One batch: files read on ``pool``'s threads, embedded on ``device`` -> {"vectors", "seconds"}."""
    windows, seconds = zip(*pool.map(lambda c: _read_for(embedder, c), clips), strict=True)
    with torch.no_grad():
        vectors = embedder.embed_window(torch.stack(windows).to(device)).float().cpu()  # [b, D]
    return {"vectors": vectors.contiguous(), "seconds": torch.tensor(seconds, dtype=torch.float64)}


class _Rows:
    """The build's output rows in the work folder, as ``.npy`` files that survive a kill: ``vectors.npy``
    [N, D] in the index's dtype, ``seconds.npy`` [N] float64, and ``progress.json`` counting the
    rows written (advanced only after the files are synced). A bounded number of files whatever N.

    The files are created (and sized) as ``.npy`` memory maps but written with ``os.pwrite`` at each
    row's offset, not through the map: the written pages are then page cache, not the build process's
    resident memory (a 10^7 x 512 float16 build writes 10 GB)."""

    def __init__(self, work: Path, n: int, dim: int, dtype: str) -> None:
        self._files: dict = {}
        self.work, self.progress = work, work / "progress.json"
        done = json.loads(self.progress.read_text())["rows"] if self.progress.exists() else 0
        mode = "r+" if done else "w+"  # nothing counted yet: (re)create the files
        vectors = work / VECTORS_NPY
        if done == n and not vectors.exists():  # killed while sealing, after the vectors moved out
            vectors = work.parent / VECTORS_NPY
        for name, path, kind, shape in (("vectors", vectors, dtype, (n, dim)),
                                        ("seconds", work / "seconds.npy", np.float64, (n,))):  # fmt: skip
            array = np.lib.format.open_memmap(path, mode, kind, shape)  # header and size; then unmapped
            self._files[name] = (os.open(path, os.O_RDWR), array.offset, array.dtype, array[0:1].nbytes)
            del array
        self.done = done

    def _pwrite(self, name: str, start: int, values: np.ndarray) -> None:
        fd, offset, dtype, row_bytes = self._files[name]
        data = memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B")  # cast to the stored dtype
        at = offset + start * row_bytes
        while data.nbytes:  # a regular file takes it all at once; a short write is continued
            written = os.pwrite(fd, data, at)
            data, at = data[written:], at + written

    def write(self, start: int, vectors: np.ndarray, seconds: np.ndarray | None = None) -> None:
        self._pwrite("vectors", start, vectors)
        if seconds is not None:
            self._pwrite("seconds", start, seconds)

    def commit(self, rows: int) -> None:
        """Everything before row ``rows`` is written: sync the files, then count it."""
        for fd, *_ in self._files.values():
            os.fsync(fd)
        atomic_write(self.progress, lambda p: Path(p).write_text(json.dumps({"rows": rows})))
        self.done = rows

    def close(self) -> None:
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files = {}

    __del__ = close  # a build that raised: its descriptors go with it


def _seal(work: Path, out_dir: Path, rows: _Rows, items: Iterator[dict], info) -> EmbeddingIndex:
    """Move the finished rows into ``out_dir`` as a memory-mapped index (index/store.py) and drop
    ``work``. ``items`` yields {"id", "caption", "seconds"} batches in row order."""
    import pyarrow as pa

    rows.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "embedder.json").unlink(missing_ok=True)  # the folder is not an index until sealed
    for stale in ("vectors.safetensors", "items.parquet", "latents.safetensors", INDEX_JSON):
        (out_dir / stale).unlink(missing_ok=True)  # an older index in this folder
    if (work / VECTORS_NPY).exists():
        fsync_replace(work / VECTORS_NPY, out_dir / VECTORS_NPY)
    write_items(out_dir / ITEMS_ARROW, items)
    check_unique_ids(pa.ipc.open_file(pa.memory_map(str(out_dir / ITEMS_ARROW))).read_all()["id"])
    finish_mapped(out_dir, info)
    shutil.rmtree(work)
    return EmbeddingIndex.load(out_dir)


def check_unique_ids(ids, batch_rows: int = 1 << 16) -> None:
    """Refuse a missing or repeated id, in 16 bytes a row: a 64-bit hash of every id (read a batch at a
    time from the Arrow column, a memory map), sorted; only ids whose hashes are equal are compared.
    (Arrow's own distinct count holds a hash table of the strings: bench_scale's 10^7 build took
    1.82 GB with it, 1.33 GB with this.)"""
    hashes, at = np.empty(len(ids), np.int64), 0
    for chunk in ids.chunks:
        for s in range(0, len(chunk), batch_rows):
            part = chunk.slice(s, batch_rows).to_pylist()
            if None in part:
                raise ValueError(f"row {at + part.index(None)} of the source has no id")
            hashes[at : at + len(part)] = np.fromiter(map(hash, part), np.int64, len(part))
            at += len(part)
    ranked = np.sort(hashes)
    for value in np.unique(ranked[1:][ranked[1:] == ranked[:-1]]):  # hashes seen more than once
        seen: dict[str, int] = {}
        for row in np.flatnonzero(hashes == value).tolist():  # a repeated id, or (rarely) a collision
            text = ids[row].as_py()
            if text in seen:
                raise ValueError(
                    f"the source has duplicate ids: {text!r} at rows {seen[text]} and {row}; "
                    "every training clip needs its own id"
                )
            seen[text] = row


def _batches(values: dict[str, list], size: int = 1 << 16) -> Iterator[dict]:
    n = len(next(iter(values.values())))
    for s in range(0, n, size):
        yield {k: v[s : s + size] for k, v in values.items()}


def build_index_resumable(
    clips: list[Clip],
    embedder,
    out_dir: str | Path,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    restart: bool = False,
    workers: int = 4,
    dtype: str = "float32",
) -> EmbeddingIndex:
    """Embed ``clips`` in batches into ``out_dir`` (a memory-mapped index), resuming an interrupted build.

    device: where the audio batches go (None: the embedder's device). restart: discard an unfinished
    build of other inputs instead of refusing it. workers: threads reading audio files. dtype: the
    stored vectors' precision, "float32" (default: the embedder's output as it is) or "float16".
    """
    from tqdm import tqdm

    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size={batch_size}, workers={workers}: both must be positive, e.g. 32 and 4")
    if not clips:
        raise ValueError("no clips to index")
    _check_dtype(dtype)
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else _device_of(embedder)
    plan = {**_plan(clips, embedder, batch_size), "dtype": dtype}
    work = open_plan_dir(out_dir / BUILD_DIR, plan, restart, "an unfinished build")
    rows = _Rows(work, len(clips), embedder.info.dim, dtype)
    if rows.done:
        log.info("resuming %s: %d of %d clips already embedded", out_dir, rows.done, len(clips))
    bar = tqdm(total=len(clips), initial=rows.done, desc="embed", unit="clip", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for k in range(rows.done, len(clips), batch_size):
            part = _embed_part(clips[k : k + batch_size], embedder, device, pool)
            rows.write(k, part["vectors"].numpy(), part["seconds"].numpy())
            rows.commit(k + len(part["seconds"]))
            bar.update(len(part["seconds"]))
    bar.close()
    seconds = np.load(work / "seconds.npy", mmap_mode="r")  # read a batch at a time by write_items
    items = _batches({"id": [c.id for c in clips], "caption": [c.caption for c in clips], "seconds": seconds})
    index = _seal(work, out_dir, rows, items, embedder.info)
    log.info("indexed %d clips into %s", len(clips), out_dir)
    return index


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: store the vectors as one of {sorted(DTYPES)}")


# -- precomputed embeddings ---------------------------------------------------------------------------

EMBEDDER_KEY = b"amg.embedder"  # the Parquet file's key-value metadata: EmbedderInfo as JSON
NORM_TOLERANCE = 1e-3  # |‖v‖ - 1| above this is not a unit vector (float16 storage alone errs ~1e-4)


EMBEDDER_ALIASES = {"mel": "mel-pattern-v2", "clap": "laion-clap-htsat-tiny"}  # the CLI's short names


def embeddings_info(
    path: str | Path, embedder: str | None = None, checkpoint: str | Path | None = None
) -> tuple[EmbedderInfo, int, int]:
    """(embedder, rows, dim) of a Parquet file of precomputed embeddings, checked without reading rows.

    Layout: columns ``id`` (string, or anything that casts to one), ``caption`` (string), ``vector``
    (a list of float16, float32 or float64 per row, unit-norm: Arrow's fixed-size list, or the plain
    list that pandas, Spark and Hugging Face datasets write, each row then checked to hold ``dim``
    values), optional ``seconds`` (float); the file's key-value metadata ``amg.embedder``
    holds the :class:`EmbedderInfo` JSON (name, sample_rate, dim, checkpoint_hash) of the embedder
    that computed the vectors. A file another tool wrote has no such metadata: ``embedder`` (a
    registered name, or the CLI's "mel" / "clap") with ``checkpoint`` for CLAP then says which
    embedder computed it, and its identity is what that embedder declares; where the file has the
    metadata too, the two must name the same embedder.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amg_engine.index.embedders import EMBEDDERS

    path = Path(path)
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(EMBEDDER_KEY)
    named = EMBEDDER_ALIASES.get(embedder, embedder) if embedder is not None else None
    if named is not None and named not in EMBEDDERS:
        raise ValueError(f"unknown embedder {embedder!r}; use mel, clap or one of {sorted(EMBEDDERS)}")
    if raw is None:
        if named is None:
            raise ValueError(
                f"{path} has no {EMBEDDER_KEY.decode()!r} metadata: say which embedder computed the "
                "vectors (amg index build --embedder mel|clap [--checkpoint PATH]), or store its identity "
                'as JSON ({"name", "sample_rate", "dim", "checkpoint_hash"}) in the file\'s key-value '
                "metadata"
            )
        kind = EMBEDDERS[named]
        if kind.needs_checkpoint and checkpoint is None:
            raise ValueError(
                f"--embedder {embedder} needs --checkpoint PATH, the weights the vectors came from"
            )
        info = kind.info(Path(checkpoint) if checkpoint is not None else None)
    else:
        try:
            info = EmbedderInfo(**json.loads(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {EMBEDDER_KEY.decode()} is not an embedder identity ({e})") from None
        if named is not None and named != info.name:
            raise ValueError(f"{path} records embedder {info.name!r}, not {named!r} as --embedder says")
    missing = [c for c in ("id", "caption", "vector") if c not in schema.names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; an embeddings file needs id, caption, vector")
    vtype = schema.field("vector").type
    lists = (pa.types.is_fixed_size_list, pa.types.is_list, pa.types.is_large_list)
    if not any(is_(vtype) for is_ in lists) or not pa.types.is_floating(vtype.value_type):
        raise ValueError(
            f"{path}: vector is {vtype}; store it as a list (fixed-size or not) of float16, float32 or "
            "float64, one list of the embedder's dimension per row"
        )
    if pa.types.is_fixed_size_list(vtype) and vtype.list_size != info.dim:
        raise ValueError(
            f"{path}: vectors have {vtype.list_size} values but the embedder says dim {info.dim}"
        )
    return info, pq.ParquetFile(path).metadata.num_rows, info.dim


def _vectors_of(batch, dim: int, first_row: int) -> np.ndarray:
    """A record batch's ``vector`` column as [b, dim] float32, refused where a row is not unit-norm."""
    import pyarrow.compute as pc

    col = batch.column("vector")
    if col.null_count:
        raise ValueError(f"a null vector in rows {first_row}..{first_row + len(col)}: every row needs one")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # fixed-size lists: all dim
    wrong = np.flatnonzero(lengths != dim)
    if len(wrong):
        raise ValueError(
            f"row {first_row + int(wrong[0])} has a vector of {lengths[wrong[0]]} values; the embedder's "
            f"dimension is {dim}"
        )
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))
    if len(bad):
        raise ValueError(
            f"row {first_row + int(bad[0])} has norm {norms[bad[0]]:.4g}: the index holds unit vectors; "
            "normalise the embeddings (x / ‖x‖) before building"
        )
    return x


def build_from_embeddings(
    path: str | Path,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    dtype: str = "float16",
    batch_rows: int = 1 << 16,
    restart: bool = False,
    progress: bool = True,
    embedder: str | None = None,
) -> EmbeddingIndex:
    """A memory-mapped index from a Parquet file of precomputed embeddings (:func:`embeddings_info`).

    The file's embedder (from its metadata, or ``embedder`` for a file without it) is checked as the
    engine checks an index's (index/embedders.py ``check_embedder``: a checkpoint-bound embedder
    needs ``checkpoint``). Rows stream in batches of
    ``batch_rows`` within each row group, so memory stays about one batch (plus what the Parquet
    reader buffers of a row group); progress is counted per row group, so a killed build resumes at
    the first unfinished row group. Files written: the work folder's plan, progress and two memory
    maps, then the index's four.
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from amg_engine.index.embedders import check_embedder

    _check_dtype(dtype)
    if batch_rows < 1:
        raise ValueError(f"batch_rows={batch_rows}: use a positive number of rows, e.g. {1 << 16}")
    path, out_dir = Path(path).resolve(), Path(out_dir)
    info, n, dim = embeddings_info(path, embedder, checkpoint)
    check_embedder(info, checkpoint)
    if n == 0:
        raise ValueError(f"{path} has no rows to index")
    st = path.stat()
    plan = {
        "source": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "n": n, "dtype": dtype,
        "embedder": json.loads(info.to_json()),
    }  # fmt: skip
    work = open_plan_dir(out_dir / BUILD_DIR, plan, restart, "an unfinished build")
    rows = _Rows(work, n, dim, dtype)
    pf = pq.ParquetFile(path)
    bar = tqdm(total=n, initial=rows.done, desc="vectors", unit="row", disable=not progress)
    start = 0
    for g in range(pf.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if start + size > rows.done:
            at = start
            for batch in pf.iter_batches(batch_rows, row_groups=[g], columns=["vector"]):
                rows.write(at, _vectors_of(batch, dim, at))
                at += batch.num_rows
            rows.commit(start + size)
            bar.update(size)
        start += size
    bar.close()
    has_seconds = "seconds" in pf.schema_arrow.names
    columns = ["id", "caption"] + (["seconds"] if has_seconds else [])

    def items() -> Iterator[dict]:
        for batch in pf.iter_batches(batch_rows, columns=columns):
            yield {
                "id": batch.column("id").cast("string"),
                "caption": batch.column("caption").cast("string"),
                "seconds": (
                    batch.column("seconds").cast("float64") if has_seconds else [None] * batch.num_rows
                ),
            }  # fmt: skip

    index = _seal(work, out_dir, rows, items(), info)
    log.info("indexed %d precomputed embeddings into %s (%s)", n, out_dir, dtype)
    return index


def build_from_manifest(
    manifest: str | Path,
    embedder,
    out_dir: str | Path,
    batch_size: int = 32,
    progress: bool | None = None,
    restart: bool = False,
) -> EmbeddingIndex:
    """Embed every clip the manifest lists (paths relative to the manifest) and save the index."""
    clips = clips_from_manifest(manifest)
    progress = len(clips) > batch_size if progress is None else progress
    return build_index_resumable(clips, embedder, out_dir, batch_size, progress=progress, restart=restart)


def _device_of(embedder) -> torch.device:
    """Where the embedder's weights or buffers live (CPU for a plain function)."""
    for tensors in ("parameters", "buffers"):
        first = next(iter(getattr(embedder, tensors, lambda: ())()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")
