"""A training-set embedding index: unit-norm vectors, ids, captions, durations and the embedder identity.

On disk an index is a folder with ``vectors.safetensors`` ([N, D] float32, unit-norm),
``items.parquet`` (id, caption, seconds, one row per vector, same order), ``embedder.json``
(the :class:`EmbedderInfo` that built it) and optionally ``latents.safetensors`` ([N, C, L], the
training clips' latents, for the latent-space similarity of index/latent_nl2.py). A query with
another embedder is refused. Each file is written to a temporary name and renamed.

Searching it: the denoising step runs the fused kernel ``kernels.nn_search`` (its torch twin off CUDA)
over :attr:`EmbeddingIndex.vectors` on the engine's device (engine/guidance.py ``search_fn``); the
audit and the benchmarks use index/search.py's exact and FAISS paths behind one interface
(:meth:`EmbeddingIndex.searcher`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from amg_engine.index.clip import EmbedderInfo
from amg_engine.index.embedders import EmbedderMismatch
from amg_engine.index.files import atomic_write, file_digest

__all__ = ["EmbedderMismatch", "EmbeddingIndex", "build_index", "index_id"]


@dataclass
class EmbeddingIndex:
    vectors: torch.Tensor  # [N, D] unit-norm
    ids: list[str]
    captions: list[str]
    seconds: list[float]
    embedder: EmbedderInfo
    latents: torch.Tensor | None = None  # [N, C, L] training latents (latent nL2), None when absent

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

    def to(self, device) -> EmbeddingIndex:
        latents = self.latents.to(device) if self.latents is not None else None
        return EmbeddingIndex(
            self.vectors.to(device), self.ids, self.captions, self.seconds, self.embedder, latents
        )

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
        vectors = {"vectors": self.vectors.float().contiguous().cpu()}
        atomic_write(folder / "vectors.safetensors", lambda p: save_file(vectors, p))
        if self.latents is not None:
            latents = {"latents": self.latents.float().contiguous().cpu()}
            atomic_write(folder / "latents.safetensors", lambda p: save_file(latents, p))
        table = pa.table({"id": self.ids, "caption": self.captions, "seconds": self.seconds})
        atomic_write(folder / "items.parquet", lambda p: pq.write_table(table, p))
        atomic_write(folder / "embedder.json", lambda p: Path(p).write_text(self.embedder.to_json()))

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingIndex:
        import pyarrow.parquet as pq
        from safetensors.torch import load_file

        folder = Path(folder)
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
        return cls(vectors, items["id"], items["caption"], seconds, info, latents)


def index_id(folder: str | Path) -> str:
    """``<embedder name>:<12 hex>``: a digest of what an index folder answers queries with (its embedder
    identity, checkpoint digest included, its vectors and its ids and captions), independent of where
    the folder lives. Part of every result's resume key, so another index regenerates the rows."""
    folder = Path(folder)
    info = (folder / "embedder.json").read_text()
    parts = [json.dumps(json.loads(info), sort_keys=True)]
    parts += [file_digest(folder / name, 64) for name in ("vectors.safetensors", "items.parquet")]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"{json.loads(info)['name']}:{digest}"


def build_index(embedder, audio: torch.Tensor, sample_rate: int, ids, captions, seconds, batch_size=64):
    """Embed ``audio`` [N, C, T] in batches and return an :class:`EmbeddingIndex`."""
    with torch.no_grad():
        parts = [embedder(audio[i : i + batch_size], sample_rate) for i in range(0, len(audio), batch_size)]
    return EmbeddingIndex(torch.cat(parts).float(), list(ids), list(captions), list(seconds), embedder.info)
