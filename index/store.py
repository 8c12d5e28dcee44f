"""A training-set embedding index: unit-norm vectors, ids, captions, durations and the embedder identity.

On disk an index is a folder with ``vectors.safetensors`` ([N, D] float32, unit-norm),
``items.parquet`` (id, caption, seconds, one row per vector, same order) and ``embedder.json``
(the :class:`EmbedderInfo` that built it). A query with another embedder is refused.

:meth:`EmbeddingIndex.search` is the exact path: one matrix product and a max on the device, with
no host synchronisation, so it can sit inside the denoising step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from index.embedders import EmbedderInfo


class EmbedderMismatch(ValueError):
    """The query embedder is not the one the index was built with."""


@dataclass
class EmbeddingIndex:
    vectors: torch.Tensor  # [N, D] unit-norm
    ids: list[str]
    captions: list[str]
    seconds: list[float]
    embedder: EmbedderInfo

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if not (len(self.ids) == len(self.captions) == len(self.seconds) == n):
            raise ValueError(
                f"index has {n} vectors but {len(self.ids)} ids, {len(self.captions)} captions, "
                f"{len(self.seconds)} durations"
            )
        if self.vectors.shape[1] != self.embedder.dim:
            raise ValueError(f"vectors have dim {self.vectors.shape[1]}, embedder says {self.embedder.dim}")

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device) -> EmbeddingIndex:
        return EmbeddingIndex(self.vectors.to(device), self.ids, self.captions, self.seconds, self.embedder)

    def check_embedder(self, info: EmbedderInfo) -> None:
        if info != self.embedder:
            raise EmbedderMismatch(
                f"index was built with {self.embedder.to_json()} but queried with {info.to_json()}; "
                "rebuild the index with `amg index build` using the same embedder"
            )

    def search(self, xq: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact maximum-cosine search. xq [B, D] unit-norm -> (D [B, k] similarity, I [B, k] index)."""
        sims = xq.float() @ self.vectors.to(xq.device).T  # [B, N]
        return sims.topk(min(k, len(self)), dim=1)

    def save(self, folder: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors.float().contiguous().cpu()}, folder / "vectors.safetensors")
        table = pa.table({"id": self.ids, "caption": self.captions, "seconds": self.seconds})
        pq.write_table(table, folder / "items.parquet")
        (folder / "embedder.json").write_text(self.embedder.to_json())

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
        return cls(vectors, items["id"], items["caption"], [float(s) for s in items["seconds"]], info)


def build_index(embedder, audio: torch.Tensor, sample_rate: int, ids, captions, seconds, batch_size=64):
    """Embed ``audio`` [N, C, T] in batches and return an :class:`EmbeddingIndex`."""
    with torch.no_grad():
        parts = [embedder(audio[i : i + batch_size], sample_rate) for i in range(0, len(audio), batch_size)]
    return EmbeddingIndex(torch.cat(parts).float(), list(ids), list(captions), list(seconds), embedder.info)
