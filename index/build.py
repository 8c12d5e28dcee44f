"""Building an index from a Parquet manifest of training audio (id, caption, path, seconds)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from index.store import EmbeddingIndex

log = logging.getLogger(__name__)


def load_audio(path: Path, sample_rate: int, window: int) -> torch.Tensor:
    """Mono audio resampled to ``sample_rate``, cut or zero-padded to ``window`` samples. -> [1, window]"""
    import soundfile as sf
    import torchaudio

    data, sr = sf.read(path, dtype="float32", always_2d=True)  # [T, C]
    x = torch.from_numpy(data.T.copy()).mean(dim=0, keepdim=True)
    if sr != sample_rate:
        x = torchaudio.functional.resample(x, sr, sample_rate)
    return torch.nn.functional.pad(x[:, :window], (0, max(0, window - x.shape[-1])))


def build_from_manifest(
    manifest: str | Path, embedder, out_dir: str | Path, batch_size: int = 32
) -> EmbeddingIndex:
    """Embed every clip the manifest lists (paths relative to the manifest) and save the index."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    manifest = Path(manifest)
    items = pq.read_table(manifest).to_pydict()
    missing = [c for c in ("id", "caption", "path") if c not in items]
    if missing:
        raise ValueError(f"{manifest} lacks column(s) {missing}; an index manifest needs id, caption, path")
    n, parts = len(items["id"]), []
    for k in tqdm(range(0, n, batch_size), desc="embed", unit="batch", disable=n <= batch_size):
        paths = items["path"][k : k + batch_size]
        audio = torch.stack(
            [load_audio(manifest.parent / p, embedder.sample_rate, embedder.window) for p in paths]
        )
        with torch.no_grad():
            parts.append(embedder(audio, embedder.sample_rate))
    seconds = items.get("seconds") or [embedder.window / embedder.sample_rate] * n
    index = EmbeddingIndex(
        torch.cat(parts), items["id"], items["caption"], [float(s) for s in seconds], embedder.info
    )
    index.save(out_dir)
    log.info("indexed %d clips into %s", n, out_dir)
    return index
