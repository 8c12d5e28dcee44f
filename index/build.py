"""Building an index from training audio: a Parquet manifest or a folder of audio files, resumably.

Sources: a Parquet manifest (``id``, ``caption``, ``path``, optional ``seconds``; paths relative to the
manifest) or a folder searched recursively for flac, wav, ogg (and mp3 when soundfile reads it);
a folder's ids are the files' relative paths and its captions come from a sidecar ``<name>.txt``
next to each file (empty when there is none).

Each clip becomes its embedder's input by the one definition of a clip's embedding (index/clip.py:
mono, resampled to the embedder's rate, fitted to its window with zeros or CLAP's repeat padding,
peak-normalised), on reader threads, and the windows are embedded in batches. Each finished batch is
written to ``OUT/.build/part-<k>.safetensors`` (temporary name, then rename) next to a ``plan.json``
naming the embedder, batch size and clip list; a rerun after an interruption skips finished parts.
At the end the parts become the index folder (:class:`EmbeddingIndex` layout) and ``.build`` goes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from amg_engine.index.clip import input_span, prepare_clips
from amg_engine.index.files import atomic_write, open_plan_dir
from amg_engine.index.store import EmbeddingIndex

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


def clips_from_source(source: str | Path) -> list[Clip]:
    """A folder of audio or a Parquet manifest."""
    source = Path(source)
    if source.is_dir():
        return clips_from_folder(source)
    if source.suffix == ".parquet":
        return clips_from_manifest(source)
    raise ValueError(f"{source}: give a folder of audio files or a .parquet manifest")


def read_clip(path: Path, embedder) -> tuple[torch.Tensor, float]:
    """The embedder's prepared window of an audio file ([window], index/clip.py) and the file's full
    duration in seconds. Only the part of the file the window can see is read."""
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


def build_index_resumable(
    clips: list[Clip],
    embedder,
    out_dir: str | Path,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    restart: bool = False,
    workers: int = 4,
) -> EmbeddingIndex:
    """Embed ``clips`` in batches into ``out_dir`` (index folder layout), resuming an interrupted build.

    device: where the audio batches go (None: the embedder's device). restart: discard an unfinished
    build of other inputs instead of refusing it. workers: threads reading audio files.
    """
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size={batch_size}, workers={workers}: both must be positive, e.g. 32 and 4")
    if not clips:
        raise ValueError("no clips to index")
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else _device_of(embedder)
    work = open_plan_dir(
        out_dir / BUILD_DIR, _plan(clips, embedder, batch_size), restart, "an unfinished build"
    )
    starts = range(0, len(clips), batch_size)
    parts = [work / f"part-{k // batch_size:06d}.safetensors" for k in starts]
    done = sum(p.exists() for p in parts)
    if done:
        log.info("resuming %s: %d of %d batches already embedded", out_dir, done, len(parts))
    bar = tqdm(total=len(parts), initial=done, desc="embed", unit="batch", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for k, part in zip(starts, parts, strict=True):
            if not part.exists():
                tensors = _embed_part(clips[k : k + batch_size], embedder, device, pool)
                atomic_write(part, lambda p, t=tensors: save_file(t, p))
                bar.update(1)
    bar.close()
    loaded = [load_file(p) for p in parts]
    vectors, seconds = torch.cat([t["vectors"] for t in loaded]), torch.cat([t["seconds"] for t in loaded])
    ids, captions = [c.id for c in clips], [c.caption for c in clips]
    index = EmbeddingIndex(vectors, ids, captions, seconds.tolist(), embedder.info)
    index.save(out_dir)
    shutil.rmtree(work)
    log.info("indexed %d clips into %s", len(clips), out_dir)
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
