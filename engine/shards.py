"""The training index's vectors split over several devices, searched per step as one index.

A training set of 10^7 clips is 10 GB of float16 vectors: more than one wants beside a 1B-parameter
model on one card, and on a machine with several cards the per-step exact search can run on all of
them at once. :class:`ShardedVectors` holds contiguous row ranges of the index, one per device, and
answers the two questions the AMG step asks of ``index_vectors``:

- ``nearest(xq)``: each query's best cosine over the whole index and its global row (the step's search),
- ``rows(idx)``: the vectors of given global rows (the neighbour each gated row's gradient is taken
  against).

Both return on the primary device (the engine's), without a host synchronisation: the queries go to
each shard's device and the shards' answers come back by device-to-device copies, which the host does
not wait for. The step's one host read (the gate) stays the only one.

Same answer as one device, by construction: each shard is searched by the same function as the whole
index (``search_fn``: the Triton kernel on CUDA, the chunked twin elsewhere), whose similarity for a
(query, row) pair does not depend on the other rows (the kernel's blocks depend on the batch, not on
N), and the shards are merged in row order with a strict comparison, so the lowest global row wins a
tie, as it does within one search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SearchFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# rows copied to a device at a time when a (maybe memory-mapped) index is split: 64 MiB of float16
SPLIT_CHUNK = 1 << 16


def resolve_devices(spec: str | Sequence[str] | None, device: torch.device | str) -> tuple[torch.device, ...]:
    """The devices the index is spread over: ``None`` or empty, the engine's ``device`` alone; ``"all"``,
    every visible CUDA device (the engine's device alone when it is not CUDA); else the listed devices,
    e.g. ``"cuda:0,cuda:1"``. ``ValueError`` for a device that does not exist or is listed twice."""
    device = torch.device(device)
    if not spec:
        return (device,)
    if isinstance(spec, str) and spec.strip() == "all":
        if device.type != "cuda":
            return (device,)
        return tuple(torch.device("cuda", i) for i in range(torch.cuda.device_count()))
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    try:
        devices = tuple(torch.device(n) for n in names if n)
    except RuntimeError as e:
        raise ValueError(f"index devices {spec!r}: {e}") from None
    if not devices:
        raise ValueError(f"index devices {spec!r}: name at least one device, or 'all'")
    if len(set(devices)) < len(devices):
        raise ValueError(f"index devices {spec!r}: a device is listed twice")
    for d in devices:
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"index devices {spec!r}: {d} does not exist here ({torch.cuda.device_count()} CUDA devices "
                "visible)"
            )
        if d.type not in ("cuda", "cpu"):
            raise ValueError(f"index devices {spec!r}: {d} is neither a CUDA device nor the CPU")
    return devices


def shard_bounds(n: int, parts: int) -> list[int]:
    """Row boundaries of ``parts`` contiguous shards of ``n`` rows, sizes differing by at most one."""
    if parts < 1:
        raise ValueError(f"parts={parts}: need at least one shard")
    return [round(i * n / parts) for i in range(parts + 1)]


@dataclass(frozen=True)
class ShardedVectors:
    """Contiguous row ranges of an index, ``shards[i]`` = rows ``starts[i]:starts[i + 1]`` on its own
    device; ``device`` is where queries come from and answers go."""

    shards: tuple[torch.Tensor, ...]  # [N_i, D] each
    starts: tuple[int, ...]  # len(shards) + 1 boundaries, starts[0] = 0
    device: torch.device

    @staticmethod
    def split(vectors, devices: Sequence[torch.device], primary: torch.device | str) -> ShardedVectors:
        """Copy ``vectors`` [N, D] (a tensor or numpy array, memory-mapped or not) to ``devices``, a chunk
        of rows at a time, so the host never holds more than one chunk beyond the map; the dtype is
        kept (float16 stays float16: the search reads it as it is)."""
        n = vectors.shape[0]
        bounds = shard_bounds(n, len(devices))
        shards = []
        for dev, a, b in zip(devices, bounds[:-1], bounds[1:], strict=True):
            part = torch.empty((b - a, vectors.shape[1]), dtype=_dtype(vectors), device=dev)
            for s in range(a, b, SPLIT_CHUNK):
                chunk = vectors[s : min(b, s + SPLIT_CHUNK)]
                chunk = torch.from_numpy(np.array(chunk)) if isinstance(chunk, np.ndarray) else chunk
                part[s - a : s - a + chunk.shape[0]] = chunk.to(dev)
            shards.append(part)
        return ShardedVectors(tuple(shards), tuple(bounds), torch.device(primary))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.starts[-1], self.shards[0].shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0].dtype

    def __len__(self) -> int:
        return self.starts[-1]

    def nearest(self, xq: torch.Tensor, search: SearchFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(sim [B] float32, global row [B] int64) on ``self.device``: ``search`` on every shard (each on
        its own device, all launched before any is merged), merged in row order, a later shard replacing
        the best only when strictly better."""
        found = []
        for shard, start in zip(self.shards, self.starts, strict=False):
            q = xq.to(shard.device, non_blocking=True)
            sim, idx = search(q, shard)
            found.append((sim, idx, start))
        best = arg = None
        for sim, idx, start in found:
            sim = sim.to(self.device, non_blocking=True)
            idx = idx.to(self.device, non_blocking=True) + start
            if best is None:
                best, arg = sim, idx
                continue
            better = sim > best
            best, arg = torch.where(better, sim, best), torch.where(better, idx, arg)
        return best, arg

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The vectors of global rows ``idx`` [G] (on any device), as [G, D] on ``self.device``; no host
        sync: each shard gathers the clamped local rows and the right shard's rows are selected."""
        idx = idx.to(self.device)
        out = torch.zeros((idx.shape[0], self.shape[1]), dtype=self.dtype, device=self.device)
        for shard, a, b in zip(self.shards, self.starts[:-1], self.starts[1:], strict=True):
            if b == a:
                continue
            local = (idx - a).clamp(0, b - a - 1).to(shard.device, non_blocking=True)
            mine = ((idx >= a) & (idx < b))[:, None]
            out = torch.where(mine, shard[local].to(self.device, non_blocking=True), out)
        return out


def _dtype(vectors) -> torch.dtype:
    if isinstance(vectors, torch.Tensor):
        return vectors.dtype
    return torch.from_numpy(np.zeros(0, dtype=vectors.dtype)).dtype


def index_rows(vectors, idx: torch.Tensor) -> torch.Tensor:
    """``vectors[idx]`` for a tensor or a :class:`ShardedVectors` (the gradient's neighbour vectors)."""
    if isinstance(vectors, ShardedVectors):
        return vectors.rows(idx)
    return vectors[idx]


def nearest(xq: torch.Tensor, vectors, search: SearchFn) -> tuple[torch.Tensor, torch.Tensor]:
    """``search(xq, vectors)`` for a tensor, the merged search of its shards for a :class:`ShardedVectors`."""
    if isinstance(vectors, ShardedVectors):
        return vectors.nearest(xq, search)
    return search(xq, vectors)
