"""A training-set embedding index: unit-norm vectors, ids, captions, durations and the embedder identity.

On disk an index is a folder in one of two layouts, both loaded by :meth:`EmbeddingIndex.load`:

- **in-memory** (what :meth:`EmbeddingIndex.save` writes; the bundled indexes): ``vectors.safetensors``
  ([N, D] float32, unit-norm), ``items.parquet`` (id, caption, seconds, one row per vector, same
  order), ``embedder.json`` (the :class:`EmbedderInfo` that built it) and optionally
  ``latents.safetensors`` ([N, C, L], the training clips' latents, for index/latent_nl2.py). Its
  vectors are read into memory; its identity (:func:`index_id`) hashes the files (cached by
  index/files.py's ``file_digest``).
- **memory-mapped** (what ``amg index build`` writes, index/build.py): ``vectors.npy`` ([N, D]
  float16 or float32, unit-norm, opened with ``np.load(mmap_mode=...)``: pages are read when a search
  touches them), ``items.arrow`` (id, caption, seconds as an uncompressed Arrow IPC file, memory-mapped:
  an id is read when asked for, no Python list of 10^7 strings), ``index.json`` (format, N, D, dtype
  and the sha256 of both files, computed once when the index was built) and ``embedder.json``,
  written last. Loading costs the page tables, not the vectors; the identity comes from index.json,
  never from rehashing 10 GB. It holds no training latents (latent nL2 needs the in-memory layout).

A query with another embedder is refused. Each file is written to a temporary name and renamed.

Searching it: the denoising step runs the fused kernel ``kernels.nn_search`` (its torch twin off CUDA)
over :attr:`EmbeddingIndex.vectors` on the engine's device (engine/guidance.py ``search_fn``); the
audit and the benchmarks use index/search.py's exact and FAISS paths behind one interface
(:meth:`EmbeddingIndex.searcher`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amg_engine.index.clip import EmbedderInfo
from amg_engine.index.embedders import EmbedderMismatch
from amg_engine.index.files import atomic_write, file_digest

__all__ = ["Column", "EmbedderMismatch", "EmbeddingIndex", "VectorFile", "build_index", "index_id"]

FORMAT = 2  # index.json's "format": the memory-mapped layout
DTYPES = {"float16": torch.float16, "float32": torch.float32}
INDEX_JSON, VECTORS_NPY, ITEMS_ARROW = "index.json", "vectors.npy", "items.arrow"


class Column(Sequence):
    """One column of an index's items (ids, captions or seconds), read from Arrow on demand.

    Indexing a row converts that one value to Python; ``len``, ``in``, ``index`` and comparison with
    a list work as for a list (the last three walk the column: not for the per-step path). Backed by
    a memory-mapped Arrow file for a memory-mapped index, by Arrow memory otherwise.
    """

    def __init__(self, values) -> None:
        import pyarrow as pa

        self._values = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._values[i].to_pylist()
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a column of {len(self)}")
        return self._values[int(i)].as_py()

    def __iter__(self):
        for chunk in self._values.chunks:
            yield from chunk.to_pylist()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    def __repr__(self) -> str:
        return f"Column({len(self)} rows: {self[:3]}...)"

    def to_numpy(self) -> np.ndarray:
        return self._values.to_numpy()


class VectorFile:
    """The rows of a ``vectors.npy`` read with positioned reads (``os.pread``), never through a mapping.

    Indexing takes what a memory map takes for reading rows, ``f[lo:hi]`` or ``f[rows]`` (a 1-D integer
    array, any order, repeats allowed), and returns a numpy array in the stored dtype. The bytes pass
    through the page cache but never into the process's address space, so a pass over a 10 GB file
    (filling a faiss structure) leaves the process's resident memory at the chunk it holds, where a
    memory map would count every page it touched.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{self.path}: expected a C-ordered [N, D] array, found shape {shape}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._row_bytes = shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read_into(self, fd: int, out: memoryview, row: int) -> None:
        """Fill ``out`` (bytes of whole rows) from the file, starting at ``row``."""
        at = self.offset + row * self._row_bytes
        while out.nbytes:  # a regular file fills it in one call; continue a short read
            got = os.preadv(fd, [out[: 1 << 30]], at)
            if got == 0:
                raise OSError(f"{self.path} ends before the rows asked for: the file was truncated")
            out, at = out[got:], at + got

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("VectorFile reads contiguous slices (step 1) or integer arrays")
            starts, lengths = np.array([lo]), np.array([max(0, hi - lo)])
            inverse = None
        else:
            rows = np.asarray(key, dtype=np.int64)
            if rows.ndim != 1:
                raise IndexError(f"VectorFile takes a slice or a 1-D integer array, not shape {rows.shape}")
            if rows.size and (rows.min() < -self.shape[0] or rows.max() >= self.shape[0]):
                raise IndexError(f"row out of range for {self.shape[0]} rows")
            rows = rows % max(self.shape[0], 1)
            unique, inverse = np.unique(rows, return_inverse=True)  # sorted: the file is read forward
            first = np.flatnonzero(np.diff(unique, prepend=-2) != 1)  # runs of consecutive rows
            starts, lengths = unique[first], np.diff(first, append=len(unique))
        out = np.empty((int(lengths.sum()), self.shape[1]), self.dtype)
        if out.size == 0:
            return out if inverse is None else out[inverse]
        view, pos = memoryview(out).cast("B"), 0
        with open(self.path, "rb") as f:
            for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):  # one read per run
                size = length * self._row_bytes
                self._read_into(f.fileno(), view[pos : pos + size], start)
                pos += size
        return out if inverse is None else out[inverse]


@dataclass
class EmbeddingIndex:
    vectors: torch.Tensor  # [N, D] unit-norm, float32 or float16 (memory-mapped when loaded so)
    ids: Sequence[str]  # a list, or a Column read on demand
    captions: Sequence[str]
    seconds: Sequence[float]
    embedder: EmbedderInfo
    latents: torch.Tensor | None = None  # [N, C, L] training latents (latent nL2), None when absent
    folder: Path | None = None  # where it was loaded from (a faiss structure may be kept there)

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if not (len(self.ids) == len(self.captions) == len(self.seconds) == n):
            raise ValueError(
                f"index has {n} vectors but {len(self.ids)} ids, {len(self.captions)} captions, "
                f"{len(self.seconds)} durations"
            )
        if self.vectors.shape[1] != self.embedder.dim:
            raise ValueError(f"vectors have dim {self.vectors.shape[1]}, embedder says {self.embedder.dim}")
        if self.latents is not None and self.latents.shape[0] != n:
            raise ValueError(f"index has {n} vectors but {self.latents.shape[0]} latents; they must match")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def precision(self) -> str:
        """The stored vectors' dtype name, "float32" or "float16" (part of a memory-mapped index's id)."""
        return str(self.vectors.dtype).removeprefix("torch.")

    def to(self, device) -> EmbeddingIndex:
        latents = self.latents.to(device) if self.latents is not None else None
        return EmbeddingIndex(
            self.vectors.to(device),
            self.ids,
            self.captions,
            self.seconds,
            self.embedder,
            latents,
            self.folder,
        )  # a memory-mapped index stays mapped on the CPU (to("cpu") returns the same tensor)

    def row_source(self):
        """What reads this index's rows for a pass over them on the CPU (filling and re-scoring a faiss
        structure): a :class:`VectorFile` for a memory-mapped index whose vectors are on the CPU, the
        vectors themselves otherwise. Same rows, same dtype."""
        mapped = self.folder is not None and (self.folder / INDEX_JSON).exists()
        if mapped and self.vectors.device.type == "cpu":
            return VectorFile(self.folder / VECTORS_NPY)
        return self.vectors

    def check_embedder(self, info: EmbedderInfo) -> None:
        if info != self.embedder:
            raise EmbedderMismatch(
                f"index was built with {self.embedder.to_json()} but queried with {info.to_json()}; "
                "rebuild the index with `amg index build` using the same embedder"
            )

    def searcher(self, config=None):
        """A :class:`index.search.Searcher` over this index (exact or FAISS, see SearchConfig)."""
        from amg_engine.index.search import SearchConfig, make_searcher

        return make_searcher(self, config or SearchConfig())

    def save(self, folder: str | Path) -> None:
        """Write the index folder; every file goes to a temporary name first, embedder.json last."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vectors = {"vectors": self.vectors.float().contiguous().cpu()}  # this layout is float32
        atomic_write(folder / "vectors.safetensors", lambda p: save_file(vectors, p))
        if self.latents is not None:
            latents = {"latents": self.latents.float().contiguous().cpu()}
            atomic_write(folder / "latents.safetensors", lambda p: save_file(latents, p))
        table = pa.table(
            {"id": list(self.ids), "caption": list(self.captions), "seconds": list(self.seconds)}
        )
        atomic_write(folder / "items.parquet", lambda p: pq.write_table(table, p))
        atomic_write(folder / "embedder.json", lambda p: Path(p).write_text(self.embedder.to_json()))

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingIndex:
        import pyarrow.parquet as pq
        from safetensors.torch import load_file

        folder = Path(folder)
        if (folder / INDEX_JSON).exists():
            return _load_mapped(cls, folder)
        for name in ("vectors.safetensors", "items.parquet", "embedder.json"):
            if not (folder / name).exists():
                raise FileNotFoundError(
                    f"{folder / name} not found: not an index folder (see `amg index build`)"
                )
        items = pq.read_table(folder / "items.parquet").to_pydict()
        info = EmbedderInfo(**json.loads((folder / "embedder.json").read_text()))
        vectors = load_file(folder / "vectors.safetensors")["vectors"]
        latents_file = folder / "latents.safetensors"
        latents = load_file(latents_file)["latents"] if latents_file.exists() else None
        seconds = [float(s) for s in items["seconds"]]
        return cls(vectors, items["id"], items["caption"], seconds, info, latents, folder)


def _load_mapped(cls, folder: Path) -> EmbeddingIndex:
    """A memory-mapped index folder: vectors and items stay on disk until read (see the module doc)."""
    import pyarrow as pa

    meta = read_index_json(folder)
    info = EmbedderInfo(**json.loads((folder / "embedder.json").read_text()))
    # copy-on-write mapping: a writable array (torch needs one) whose pages stay the file's until written
    array = np.load(folder / VECTORS_NPY, mmap_mode="c")
    if array.shape != (meta["n"], meta["dim"]) or str(array.dtype) != meta["dtype"]:
        raise ValueError(
            f"{folder / VECTORS_NPY} holds {array.shape} {array.dtype} but {INDEX_JSON} says "
            f"({meta['n']}, {meta['dim']}) {meta['dtype']}: rebuild the index with `amg index build`"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a memory map is fine as a tensor's storage
        vectors = torch.from_numpy(array)
    table = pa.ipc.open_file(pa.memory_map(str(folder / ITEMS_ARROW))).read_all()  # zero-copy
    return cls(
        vectors, Column(table["id"]), Column(table["caption"]), Column(table["seconds"]), info, None, folder
    )


def read_index_json(folder: str | Path) -> dict:
    """A memory-mapped index's index.json, checked for the format this code reads."""
    folder = Path(folder)
    for name in (INDEX_JSON, VECTORS_NPY, ITEMS_ARROW, "embedder.json"):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder / name} not found: an unfinished index (rerun `amg index build`)"
            )
    meta = json.loads((folder / INDEX_JSON).read_text())
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise ValueError(
            f"{folder / INDEX_JSON}: format {meta.get('format')}, dtype {meta.get('dtype')} is not one this "
            f"version reads (format {FORMAT}, dtype one of {sorted(DTYPES)})"
        )
    return meta


def write_items(path: str | Path, batches: Iterable[dict]) -> None:
    """Stream ``batches`` ({"id", "caption", "seconds"} lists or arrays) into an uncompressed Arrow
    IPC file at ``path`` (a temporary name, then renamed): one batch in memory at a time."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("caption", pa.string()), ("seconds", pa.float64())])

    def write(tmp: str) -> None:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for b in batches:
                writer.write_batch(pa.record_batch([b["id"], b["caption"], b["seconds"]], schema=schema))

    atomic_write(path, write)


def finish_mapped(folder: str | Path, info: EmbedderInfo) -> dict:
    """Seal a memory-mapped index whose vectors.npy and items.arrow are in place: hash both once,
    write index.json, then embedder.json last (a folder without it is an unfinished build)."""
    from amg_engine.index.files import sha256_stream

    folder = Path(folder)
    array = np.load(folder / VECTORS_NPY, mmap_mode="r")
    if str(array.dtype) not in DTYPES:
        raise ValueError(f"{folder / VECTORS_NPY} is {array.dtype}; an index stores one of {sorted(DTYPES)}")
    meta = {
        "format": FORMAT, "n": int(array.shape[0]), "dim": int(array.shape[1]), "dtype": str(array.dtype),
        "vectors_sha256": sha256_stream(folder / VECTORS_NPY),
        "items_sha256": sha256_stream(folder / ITEMS_ARROW),
    }  # fmt: skip
    del array
    atomic_write(folder / INDEX_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    atomic_write(folder / "embedder.json", lambda p: Path(p).write_text(info.to_json()))
    return meta


def save_mapped(index: EmbeddingIndex, folder: str | Path, dtype: str = "float16") -> None:
    """Write an in-memory index in the memory-mapped layout, vectors stored as ``dtype`` (a migration:
    ``amg index build`` writes this layout itself, in bounded memory)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "embedder.json").unlink(missing_ok=True)
    array = index.vectors.detach().cpu().to(DTYPES[dtype]).contiguous().numpy()
    atomic_write(folder / VECTORS_NPY, lambda p: np.save(open(p, "wb"), array))  # noqa: SIM115
    write_items(folder / ITEMS_ARROW, [{
        "id": list(index.ids), "caption": list(index.captions), "seconds": [float(s) for s in index.seconds],
    }])  # fmt: skip
    finish_mapped(folder, index.embedder)


def index_id(folder: str | Path) -> str:
    """``<embedder name>:<12 hex>``: a digest of what an index folder answers queries with (its embedder
    identity, checkpoint digest included, its vectors and its ids and captions), independent of where
    the folder lives. Part of every result's resume key, so another index regenerates the rows.

    A memory-mapped index's digest comes from its index.json (the files' sha256 stored when it was
    built, and the vectors' dtype: the same vectors in float16 and float32 are two indexes, since the
    step's similarities differ), never from reading the vectors again."""
    folder = Path(folder)
    info = (folder / "embedder.json").read_text()
    parts = [json.dumps(json.loads(info), sort_keys=True)]
    if (folder / INDEX_JSON).exists():
        meta = read_index_json(folder)
        parts += [f"format {FORMAT}", meta["dtype"], meta["vectors_sha256"], meta["items_sha256"]]
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
        return f"{json.loads(info)['name']}:{digest}"
    parts += [file_digest(folder / name, 64) for name in ("vectors.safetensors", "items.parquet")]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"{json.loads(info)['name']}:{digest}"


def build_index(embedder, audio: torch.Tensor, sample_rate: int, ids, captions, seconds, batch_size=64):
    """Embed ``audio`` [N, C, T] in batches and return an :class:`EmbeddingIndex`."""
    with torch.no_grad():
        parts = [embedder(audio[i : i + batch_size], sample_rate) for i in range(0, len(audio), batch_size)]
    return EmbeddingIndex(torch.cat(parts).float(), list(ids), list(captions), list(seconds), embedder.info)
