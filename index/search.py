"""Nearest-neighbour search over an index's unit-norm vectors: one interface, exact or FAISS.

Every searcher answers ``search(xq [B, D], k) -> SearchResult(D [B, k], I [B, k])``: D the inner
products (cosines, since both sides are unit-norm) in descending order, I the rows of ``xb`` (the
index vectors), -1 where an approximate index found fewer than k; ``result.ids`` maps I to the
index's ids (a host synchronisation, so only outside the denoising step).

- :class:`ExactSearcher`: matrix product + top-k on ``xb``'s device, ``xb`` optionally split into
  ``shards`` parts on that device or over several (``devices``; ``make_searcher(..., device="cuda")``
  shards over every visible GPU), each scanned in chunks of ``chunk`` rows so the [B, chunk]
  similarity block stays small. No host synchronisation. The default, up to ~10^7 vectors. (The
  denoising step itself uses the fused ``kernels.nn_search``, see engine/guidance.py ``search_fn``.)
  ``xb`` may be a float16 memory map (a memory-mapped index, index/store.py): on the CPU each chunk
  is converted to float32 as it is scanned, so the scan holds one chunk, never the whole index.
- :class:`FaissSearcher`: any ``faiss.index_factory`` string ("Flat", "IVF1024,PQ64", "HNSW32", …)
  with inner-product metric, trained on a random sample of ``xb`` when the index needs training,
  filled chunk by chunk (one float32 chunk at a time, never a float32 copy of xb; a memory-mapped
  index's rows are read with positioned reads, :meth:`EmbeddingIndex.row_source`, so the pass over
  10 GB does not become the process's resident memory), split into
  ``faiss.IndexShards``, on all GPUs when asked (``gpu=True``) or, by default, when the installed
  faiss has GPU support and the factory is one faiss's GPU cloner takes (:func:`gpu_cloneable`;
  HNSW is not: ``gpu=True`` with it is refused before any training). Runtime parameters
  (``nprobe``, ``k_factor_rf``, ``efSearch``) go through ``faiss.ParameterSpace``. Queries cross to
  the host (numpy): not for the per-step path. For a memory-mapped index the trained and filled
  structure is kept in the index folder (``faiss/``) and read back by the next process
  (:func:`make_searcher`), so a 10^7 IVF-PQ index is built once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

KINDS = ("exact", "faiss")


@dataclass(frozen=True)
class SearchResult:
    """D [B, k] similarities (descending), I [B, k] rows of xb (-1: none), on the query's device."""

    D: torch.Tensor
    I: torch.Tensor  # noqa: E741  (faiss naming)
    id_table: Sequence[str] | None = field(default=None, repr=False)

    @property
    def ids(self) -> list[list[str | None]]:
        """The ids of I (None where I is -1). Reads I on the host: a synchronisation."""
        if self.id_table is None:
            raise ValueError("this result has no id table; search through EmbeddingIndex.searcher()")
        return [[self.id_table[i] if i >= 0 else None for i in row] for row in self.I.tolist()]


class Searcher(Protocol):
    ntotal: int

    def search(self, xq: torch.Tensor, k: int = 1) -> SearchResult: ...


@dataclass(frozen=True)
class SearchConfig:
    """How to search an index. ``kind`` "exact" (torch, sync-free) or "faiss" (``factory`` string).

    shards: exact: number of parts of xb, all on its device (None: 1); faiss: number of
    ``IndexShards`` parts (None: 1, or one per GPU on GPU).
    chunk: exact: rows of xb per matrix product. params: faiss runtime parameters, e.g.
    {"nprobe": 64}. train_size: faiss training sample (None: min(N, 100_000)). seed: the sample's seed.
    gpu: faiss on GPU (None: when ``faiss.get_num_gpus() > 0`` and the factory can go there; True
    with a factory the GPU cloner cannot take is refused). cache: keep a memory-mapped index's
    faiss structure in its folder and reuse it. refine: faiss returns ``refine·k`` candidates that
    are re-scored exactly against the stored vectors (1: none; e.g. 10 with IVF-PQ, whose codes alone
    lose near-duplicates of random-like data and report estimated, not exact, similarities).
    """

    kind: str = "exact"
    factory: str = "Flat"
    shards: int | None = None
    chunk: int = 1 << 16  # 128 MiB of float32 at D = 512: the CPU's per-chunk conversion stays small
    params: Mapping[str, float] = field(default_factory=dict)
    train_size: int | None = None
    seed: int = 0
    gpu: bool | None = None
    cache: bool = True
    refine: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {KINDS}")
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"shards={self.shards}: use a positive number, or None for the default")
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk}: use a positive number of rows, e.g. {1 << 20}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size={self.train_size}: use a positive sample size or None")
        if self.refine < 1:
            raise ValueError(
                f"refine={self.refine}: use 1 (no re-scoring) or more candidates per hit, e.g. 10"
            )
        if not self.factory.strip():
            raise ValueError("factory is empty: use a faiss index_factory string such as 'Flat'")


def check_config(config: SearchConfig, dim: int) -> None:
    """Refuse, before any work, a faiss configuration that cannot run: a factory faiss cannot parse
    for ``dim``, or one its GPU cloner cannot take with ``gpu=True``."""
    if config.kind != "faiss":
        return
    import faiss

    try:
        faiss.index_factory(dim, config.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise ValueError(f"faiss factory {config.factory!r} for dim {dim}: {msg}") from None
    if config.gpu and not gpu_cloneable(config.factory, dim):
        raise ValueError(
            f"faiss factory {config.factory!r} cannot go to the GPU (faiss's GPU cloner takes Flat, "
            "IVF*,Flat, IVF*,PQ* and IVF*,SQ*, optionally after a transform, not HNSW, fast-scan PQ "
            "(…x4fs) or others): use such a factory, e.g. 'IVF4096,PQ64', or keep faiss on the CPU "
            "(amg audit: --faiss-cpu)"
        )


def gpu_cloneable(factory: str, dim: int) -> bool:
    """Whether ``faiss.index_cpu_to_gpu`` can take an index of this factory (decided on the CPU)."""
    import faiss

    made = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # owns the C++ index: keep it
    index = faiss.downcast_index(made)
    if isinstance(index, faiss.IndexPreTransform):  # "PCA64,IVF…": the transforms go, what they feed?
        index = faiss.downcast_index(index.index)
    gpu_kinds = (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2, faiss.IndexIVFFlat, faiss.IndexIVFPQ,
                 faiss.IndexIVFScalarQuantizer)  # fmt: skip
    return type(index) in gpu_kinds


def make_searcher(index, config: SearchConfig, device: str | torch.device | None = None) -> Searcher:
    """A searcher over ``index.vectors`` (an :class:`EmbeddingIndex`) whose results carry its ids.

    device: where exact search runs (None: where the vectors are; a memory-mapped index's vectors go
    to a GPU once, in their stored dtype); faiss goes to the GPU when ``config.gpu`` says so."""
    check_config(config, index.vectors.shape[1])
    if config.kind == "exact":
        return ExactSearcher(
            index.vectors, shards=config.shards, chunk=config.chunk, ids=index.ids, devices=_devices(device)
        )
    cached = _faiss_cache(index, config)
    rows = index.row_source()  # a memory-mapped index: read with pread, not through the map
    if cached is not None and cached.exists():
        log.info("faiss index from %s", cached)
        return FaissSearcher.load(cached, config, ids=index.ids, xb=rows)
    searcher = FaissSearcher(
        rows, factory=config.factory, shards=config.shards, params=config.params,
        train_size=config.train_size, seed=config.seed, gpu=config.gpu, ids=index.ids, refine=config.refine,
    )  # fmt: skip
    if cached is not None:
        try:
            searcher.save(cached)
        except OSError as e:  # a read-only index folder: the structure is only rebuilt next time
            log.warning("could not keep the faiss index in %s: %s", cached, e)
    return searcher


def _devices(device: str | torch.device | None) -> list[torch.device] | None:
    """None: where the vectors are; "cuda" (no index): every visible GPU, the index sharded over them;
    any other device: that one."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _faiss_cache(index, config: SearchConfig):
    """Where a memory-mapped index keeps this configuration's faiss structure (None: not kept)."""
    import hashlib
    import json

    folder = getattr(index, "folder", None)
    if not config.cache or folder is None or not (folder / "index.json").exists():
        return None
    stored = json.loads((folder / "index.json").read_text())["vectors_sha256"]
    key = json.dumps([stored, config.factory, config.shards, config.train_size, config.seed])
    return folder / "faiss" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.faissindex"


# -- exact ---------------------------------------------------------------------------------------


def topk_chunked(xq: torch.Tensor, xb: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact max-inner-product top-k of xq [B, D] over xb [N, D] in row chunks -> (D [B, k'], I [B, k']).

    k' = min(k, N). Everything stays on the device; no host synchronisation. On the CPU a half-precision
    xb (a memory map) is scanned in float32, one chunk converted at a time; on a GPU the product runs
    in xb's dtype. Similarities come back float32.
    """
    upcast = xb.device.type == "cpu" and xb.dtype in (torch.float16, torch.bfloat16)
    xq = xq.float() if upcast else xq.to(xb.dtype)
    parts_d, parts_i = [], []
    for start in range(0, xb.shape[0], chunk):
        part = xb[start : start + chunk]
        part = part.float() if upcast else part
        d, i = (xq @ part.T).topk(min(k, part.shape[0]), dim=1)
        parts_d.append(d.float())
        parts_i.append(i + start)
    return merge_topk(parts_d, parts_i, k) if len(parts_d) > 1 else (parts_d[0], parts_i[0])


def merge_topk(
    parts_d: list[torch.Tensor], parts_i: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-part top-k results (same device, global row ids) -> (D [B, k'], I [B, k'])."""
    d, i = torch.cat(parts_d, dim=1), torch.cat(parts_i, dim=1)
    d, j = d.topk(min(k, d.shape[1]), dim=1)
    return d, i.gather(1, j)


class ExactSearcher:
    """Exact maximum-inner-product search over xb on its device, optionally in shards; sync-free.

    xb [N, D] (kept in its dtype; pass float16/bfloat16 to halve memory at 10^7 vectors). shards:
    parts of xb, each searched in turn and merged (default 1, or one per device). devices: where the
    shards live, shard j on ``devices[j % len(devices)]`` (each copied there once, in xb's dtype;
    default: xb's device), e.g. every visible GPU. Results come back on the query's device.
    """

    def __init__(
        self,
        xb: torch.Tensor,
        shards: int | None = None,
        chunk: int = 1 << 16,
        ids: Sequence[str] | None = None,
        devices: Sequence[str | torch.device] | None = None,
    ) -> None:
        devices = list(devices or [xb.device])
        shards = shards or len(devices)
        bounds = np.linspace(0, xb.shape[0], shards + 1).round().astype(int).tolist()
        self.shards = [
            (lo, xb[lo:hi].to(devices[j % len(devices)])) for j, (lo, hi) in enumerate(pairwise(bounds))
        ]
        self.ntotal, self.chunk, self.ids = xb.shape[0], chunk, ids
        log.debug("exact search over %d vectors in %d shard(s) on %s", self.ntotal, shards, xb.device)

    def search(self, xq: torch.Tensor, k: int = 1) -> SearchResult:
        """xq [B, D] -> SearchResult(D [B, k], I [B, k]) on xq's device, no host synchronisation."""
        parts_d, parts_i = [], []
        for offset, xs in self.shards:
            d, i = topk_chunked(xq.to(xs.device, non_blocking=True), xs, k, self.chunk)
            parts_d.append(d.float().to(xq.device, non_blocking=True))
            parts_i.append((i + offset).to(xq.device, non_blocking=True))
        d, i = merge_topk(parts_d, parts_i, k) if len(parts_d) > 1 else (parts_d[0], parts_i[0])
        return SearchResult(d, i, self.ids)


# -- faiss ---------------------------------------------------------------------------------------


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train_sample(xb: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A random sample of xb's rows for training (all rows when ``size`` >= N), in row order."""
    n = xb.shape[0]
    size = min(n, size or 100_000)
    if size == n:
        return xb[0:n]  # a VectorFile reads its rows here; an array or tensor gives a view
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return xb[rows]


class FaissSearcher:
    """A faiss index from a factory string, inner-product metric, optionally sharded and on GPU.

    xb [N, D] (torch, numpy, or an index.store.VectorFile reading a memory-mapped index's file with
    positioned reads; any float dtype, converted a chunk at a time). Trained on
    ``train_sample(xb, train_size, seed)`` when the factory needs training (without polysemous PQ
    training, see ``_no_polysemous_training``); the trained, empty index is cloned into ``shards``
    parts that each get a contiguous slice of xb (``IndexShards(successive_ids=True)``, so I are rows
    of xb).
    """

    def __init__(
        self,
        xb,
        factory: str = "Flat",
        shards: int | None = None,
        params: Mapping[str, float] | None = None,
        train_size: int | None = None,
        seed: int = 0,
        gpu: bool | None = None,
        ids: Sequence[str] | None = None,
        refine: int = 1,
    ) -> None:
        import faiss

        n, d = xb.shape
        self.xb, self.refine = xb, refine  # a reference (a memory map stays one), for re-scoring
        self.gpu = _use_gpu(factory, d, gpu)  # refuses gpu=True with HNSW & co. before any training
        template = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        _no_polysemous_training(faiss, template)
        if not template.is_trained:
            template.train(_as_float32(train_sample(xb, train_size, seed)))
        self.parts = self._fill(faiss, template, xb, 1 if self.gpu else (shards or 1))
        self._finish(faiss, d, factory, n, shards, params, ids)

    def _finish(self, faiss, d, factory, n, shards, params, ids) -> None:
        self.index = self.parts[0] if len(self.parts) == 1 else self._shard(faiss, d, self.parts)
        if self.gpu:
            self.index = _to_gpus(faiss, self.index, shards)
        self.factory, self.ntotal, self.ids = factory, n, ids
        self.set_params(params or {})

    @staticmethod
    def _fill(faiss, template, xb, shards: int, chunk: int = 1 << 16) -> list:
        """Clones of the trained ``template``, each filled with its slice of xb, one float32 chunk of
        ``chunk`` rows at a time (at D = 512: 128 MiB, whatever N)."""
        bounds = np.linspace(0, xb.shape[0], shards + 1).round().astype(int).tolist()
        parts = []
        for lo, hi in pairwise(bounds):
            part = faiss.clone_index(template)
            for s in range(lo, hi, chunk):
                part.add(_as_float32(xb[s : min(s + chunk, hi)]))
            parts.append(part)
        return parts

    def save(self, path) -> None:
        """Write the CPU structure (all shards) to ``path``, temporary name first (index/files.py)."""
        import faiss

        from amg_engine.index.files import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        whole = self.parts[0] if len(self.parts) == 1 else self._merged(faiss)
        atomic_write(path, lambda p: faiss.write_index(whole, p))

    def _merged(self, faiss):
        shards = faiss.IndexShards(self.parts[0].d, False, True)
        for part in self.parts:
            shards.add_shard(part)
        return shards

    @classmethod
    def load(cls, path, config: SearchConfig, ids: Sequence[str] | None = None, xb=None) -> FaissSearcher:
        """A searcher over a structure :meth:`save` wrote (costs what the structure costs: for
        IVF-PQ its codes, not the vectors)."""
        import faiss

        index = faiss.read_index(str(path))
        self = cls.__new__(cls)
        self.xb, self.refine = xb, config.refine
        self.gpu = _use_gpu(config.factory, index.d, config.gpu)
        self.parts = [index]
        self._finish(faiss, index.d, config.factory, index.ntotal, config.shards, config.params, ids)
        return self

    @staticmethod
    def _shard(faiss, d: int, parts: list):
        index = faiss.IndexShards(d, True, True)  # threaded, successive_ids
        for part in parts:  # self.parts keeps the Python references alive
            index.add_shard(part)
        return index

    def set_params(self, params: Mapping[str, float]) -> None:
        """Runtime parameters through faiss.ParameterSpace, e.g. {"nprobe": 64, "k_factor_rf": 8}."""
        import faiss

        space = faiss.GpuParameterSpace() if self.gpu else faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self.index, name, float(value))

    def search(self, xq: torch.Tensor, k: int = 1) -> SearchResult:
        """xq [B, D] -> SearchResult(D [B, k], I [B, k]) on xq's device (through the host).

        With ``refine`` > 1 (and the base vectors at hand), ``refine·k`` candidates are re-scored
        exactly against the stored vectors (float32 products with rows gathered from xb, a memory map
        for a memory-mapped index) and the best k kept: D are then exact cosines, not PQ estimates."""
        q = _as_float32(xq)
        refine = self.refine if self.xb is not None else 1
        d, i = self.index.search(q, k * refine)
        if refine > 1:
            d, i = _rescore(q, self.xb, i, k)
        device = xq.device if isinstance(xq, torch.Tensor) else torch.device("cpu")
        return SearchResult(torch.from_numpy(d).to(device), torch.from_numpy(i).to(device), self.ids)


def _no_polysemous_training(faiss, index) -> None:
    """Skip PQ's polysemous code reordering (slow: 30 s vs 1 s for IVF16,PQ8 on 4k x 64 here).

    It only serves Hamming pre-filtering (``polysemous_ht``), which inner-product search here never
    turns on, so search results are the same without it.
    """
    for sub in (index, faiss.try_extract_index_ivf(index)):
        sub = faiss.downcast_index(sub) if sub is not None else None
        for inner in (sub, getattr(sub, "base_index", None), getattr(sub, "index", None)):
            inner = faiss.downcast_index(inner) if inner is not None else None
            if hasattr(inner, "do_polysemous_training"):
                inner.do_polysemous_training = False


def _rescore(q: np.ndarray, xb, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of q [B, D] with its candidate rows cand [B, K] of xb (-1: none) -> the best
    k (D [B, k] float32 descending, I [B, k]); ties keep faiss's order."""
    valid = cand >= 0
    rows = np.where(valid, cand, 0)
    flat = np.unique(rows)  # sorted: a memory map reads forward
    vecs = _as_float32(xb[torch.from_numpy(flat) if isinstance(xb, torch.Tensor) else flat])  # [U, D]
    pos = np.searchsorted(flat, rows)  # [B, K]
    scores = np.einsum("bd,bkd->bk", q, vecs[pos])
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    d, i = np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)
    d[i < 0] = -np.finfo(np.float32).max  # faiss's "no neighbour"
    return d, i


def _use_gpu(factory: str, dim: int, gpu: bool | None) -> bool:
    """gpu=None: on GPU when faiss has GPUs and the factory can go there; True: refused if it cannot."""
    if gpu is None:
        ok = faiss_gpus() > 0 and gpu_cloneable(factory, dim)
        if faiss_gpus() > 0 and not ok:
            log.info("faiss factory %r stays on the CPU: the GPU cloner does not take it", factory)
        return ok
    if gpu:
        check_config(SearchConfig(kind="faiss", factory=factory, gpu=True), dim)
    return gpu


def _as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _to_gpus(faiss, index, shards: int | None):
    """The CPU index cloned onto every GPU faiss sees, sharded across them when there are several."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = faiss.get_num_gpus() > 1 and (shards is None or shards > 1)
    log.info("faiss index on %d GPU(s) (shard=%s)", faiss.get_num_gpus(), options.shard)
    return faiss.index_cpu_to_all_gpus(index, co=options)


def recall_at(I: torch.Tensor, I_ref: torch.Tensor, r: int = 1) -> float:  # noqa: E741
    """1-recall@r (faiss convention): fraction of queries whose true nearest I_ref[:, 0] is in I[:, :r]."""
    return (I[:, :r] == I_ref[:, :1]).any(dim=1).float().mean().item()
