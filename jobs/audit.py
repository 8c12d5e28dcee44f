"""Dataset-scale memorization audit: how close is a set of audio files to a training set?

    amg audit SOURCE --index INDEX_DIR --out OUT_DIR

SOURCE is a folder of audio files (anyone's: flac, wav, ogg; prompts from ``<name>.txt`` sidecars
when present) or an ``amg generate`` results Parquet (its ok rows, with their prompts). Every file
is embedded with the index's own embedder, in batches, and searched against the training index.

Streaming and resumable: each finished batch is written to ``OUT/parts/part-<k>.parquet`` (its
rows) and ``part-<k>.safetensors`` (its embeddings) under a temporary name and renamed, next to a
``plan.json`` fixing the inputs; a rerun skips finished batches whose files are unchanged (each part
is keyed on its files' size, modification and status-change times: :func:`batch_key`) and embeds the
others again, and memory stays bounded by one batch plus O(D²) running moments whatever the number of
files. A file that cannot be read becomes a row with ``status="error"`` and the reason, never a crash.
Only files inside the source's folder are read: a path that leads out of it (absolute, ``../``, a
symlink) is an error row that reads the same whether the file exists or not.

Outputs in OUT:
- ``audit.parquet``: per file, the top-k training neighbours (ids, captions, similarities), the
  nearest one, the CLAP score where a text encoder is available, status and error.
- ``summary.json``: mean / median / 95th percentile / maximum of the nearest-neighbour similarity,
  the share of files at or above each threshold, the same statistics for the training set against
  itself (nearest *other* clip: the background), FAD and KAD against a reference set (default: the
  training set itself) and, when a held-out index is given, against held-out audio too, and the most
  similar pairs.
- ``attributes.parquet`` and the summary's ``adherence``: for files whose prompt is a default-model
  prompt, whether the audio has the tempo, chord or key and instrument it asked for (jobs/adherence.py).
- ``similarity.png`` (histograms) and ``report.html`` (self-contained: plots, spectrograms and audio
  inline).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from amg_engine.index.build import audio_suffixes, read_clip
from amg_engine.index.clip import embed_windows
from amg_engine.index.distances import Moments, fad, kad
from amg_engine.index.files import atomic_write, file_identity, fsync_replace, open_plan_dir, unreadable_file
from amg_engine.index.search import SearchConfig, Searcher, check_config, make_searcher
from amg_engine.index.store import EmbeddingIndex, index_id

log = logging.getLogger(__name__)

PARTS = "parts"
KEY = "items_sha256"  # the metadata key of a part's batch_key
KAD_SAMPLE = 2000  # embeddings per set for KAD (quadratic cost)
BACKGROUND_SAMPLE = 5000  # training clips searched against the rest for the background histogram
HIST_BINS = 50


@dataclass(frozen=True)
class AuditConfig:
    """How to audit. thresholds: similarity levels whose exceedance share is reported (the
    embedder's own replication threshold is added when it has one); k: neighbours kept per file;
    pairs: most similar pairs listed and played in the report; attributes: check the prompts' tempo,
    chord and instrument where they can be parsed (jobs/adherence.py); device: where the embedder and
    exact search run ("cpu", "cuda", "cuda:1"; faiss goes to the GPU when ``search.gpu`` says so)."""

    k: int = 5
    batch_size: int = 32
    thresholds: tuple[float, ...] = (0.4, 0.5)
    pairs: int = 12
    workers: int = 4
    search: SearchConfig = field(default_factory=SearchConfig)
    attributes: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device={self.device!r}: use a torch device such as 'cpu' or 'cuda'") from None
        for name in ("k", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.pairs < 0:
            raise ValueError(f"pairs={self.pairs}: must be ≥ 0")
        bad = [t for t in self.thresholds if not -1.0 <= t <= 1.0]
        if bad or not self.thresholds:
            raise ValueError(f"thresholds={self.thresholds}: give one or more cosine levels in [-1, 1]")


@dataclass(frozen=True)
class Item:
    """One audited file: id, path, the prompt it was generated from ('' when unknown), and why it is
    not read at all (a path that leads out of the source's folder), else None."""

    id: str
    path: Path
    prompt: str
    error: str | None = None


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies under ``root`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _outside(path: Path, root: Path) -> str:
    # the same text whether the file exists or not, and not where a link points
    return f"{path} is not inside {root}: only files in the audited folder are read"


def unreadable(item: Item) -> str | None:
    """Why ``item`` cannot be read, before decoding it: outside its folder, or no readable file there (a
    missing file, a folder, no permission: one text for all); None when it can be opened."""
    return item.error if item.error is not None else unreadable_file(item.path)


def _folder_items(folder: Path) -> list[Item]:
    """The audio files under ``folder`` (recursively, sorted; ids = relative paths; prompts from
    ``<name>.txt`` sidecars). One whose path leads out of the folder (a symlink) is an error item and
    neither it nor its sidecar is read."""
    root, suffixes = folder.resolve(), audio_suffixes()
    paths = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink())
    )
    if not paths:
        raise FileNotFoundError(f"no audio files ({', '.join(suffixes)}) under {folder}")
    items = []
    for p in paths:
        rel, sidecar = p.relative_to(folder).as_posix(), p.with_suffix(".txt")
        if not _inside(p, root):
            items.append(Item(rel, p, "", _outside(p, root)))
            continue
        prompt = sidecar.read_text().strip() if _inside(sidecar, root) and sidecar.is_file() else ""
        items.append(Item(rel, p, prompt))
    return items


def items_from_source(source: str | Path) -> list[Item]:
    """A folder's audio files (ids = relative paths) or the ok rows of an ``amg generate`` results file.
    Paths resolve inside the folder (a results file's: inside its own folder), symlinks followed, or
    the item is an error row."""
    source = Path(source)
    if source.is_dir():
        return _folder_items(source)
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(source).names
        missing = [c for c in ("id", "audio_path") if c not in names]
        if missing:
            raise ValueError(f"{source} lacks column(s) {missing}: give an `amg generate` results.parquet")
        wanted = [c for c in ("id", "audio_path", "prompt", "status") if c in names]  # not the traces
        rows = pq.read_table(source, columns=wanted).to_pydict()
        status = rows.get("status") or ["ok"] * len(rows["id"])
        prompts = rows.get("prompt") or [""] * len(rows["id"])
        root = source.parent.resolve()
        items = [
            Item(str(i), path, str(pr or ""), None if _inside(path, root) else _outside(path, root))
            for i, p, pr, s in zip(rows["id"], rows["audio_path"], prompts, status, strict=True)
            if s == "ok" and p
            for path in [source.parent / p]
        ]
        if not items:
            raise ValueError(f"{source} has no ok rows with audio to audit")
        return items
    raise ValueError(f"{source}: give a folder of audio files or an `amg generate` results .parquet")


# -- embedding, in resumable parts ------------------------------------------------------------------


def _plan(items: Sequence[Item], index_key: str, config: AuditConfig, embedder_info: dict) -> dict:
    """What the audit folder holds the parts of: the index, the embedder, k, the batches and the listing
    (ids, paths, prompts). The files' contents are keyed per part (:func:`batch_key`)."""
    listing = json.dumps([[it.id, str(it.path.resolve()), it.prompt] for it in items]).encode()
    return {
        "embedder": embedder_info,
        "index_id": index_key,
        "k": config.k,
        "batch_size": config.batch_size,
        "n": len(items),
        "items_sha256": hashlib.sha256(listing).hexdigest(),
    }


def batch_key(items: Sequence[Item]) -> str:
    """The digest a part is stored under: its items (id, resolved path, prompt, why it is not read) and
    the identity of each file's content. A part whose key differs is embedded again."""
    rows = [[it.id, str(it.path.resolve()), it.prompt, it.error, file_identity(it.path)] for it in items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def row_schema():
    """The columns of ``audit.parquet`` (one row per audited file)."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("prompt", pa.string()),
        ("status", pa.string()), ("error", pa.string()),
        ("neighbour_ids", pa.list_(pa.string())), ("neighbour_captions", pa.list_(pa.string())),
        ("neighbour_similarities", pa.list_(pa.float64())),
        ("nearest_id", pa.string()), ("nearest_caption", pa.string()),
        ("similarity", pa.float64()), ("clap_score", pa.float64()),
    ])  # fmt: skip


def _read(item: Item, embedder) -> torch.Tensor | str:
    if problem := unreadable(item):
        return problem
    try:
        return read_clip(item.path, embedder)[0]
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes an error row
        return f"cannot read {item.path}: {type(e).__name__}: {e}"


def _embed_batch(
    items, embedder, searcher, index, k, text_embedder, pool, device="cpu"
) -> tuple[dict, torch.Tensor]:
    """One batch -> (columns of its rows, its embeddings [n_ok, D] in row order of the ok rows)."""
    loaded = list(pool.map(lambda it: _read(it, embedder), items))
    ok = [i for i, x in enumerate(loaded) if isinstance(x, torch.Tensor)]
    k = min(k, len(index))
    cols = {
        "id": [it.id for it in items], "path": [str(it.path) for it in items],
        "prompt": [it.prompt for it in items], "status": ["error"] * len(items),
        "error": [x if isinstance(x, str) else None for x in loaded],
        "neighbour_ids": [None] * len(items), "neighbour_captions": [None] * len(items),
        "neighbour_similarities": [None] * len(items), "nearest_id": [None] * len(items),
        "nearest_caption": [None] * len(items), "similarity": [None] * len(items),
        "clap_score": [None] * len(items),
    }  # fmt: skip
    if not ok:
        return cols, torch.zeros(0, index.embedder.dim)
    with torch.no_grad():
        e = embed_windows(embedder, torch.stack([loaded[i] for i in ok]).to(device))  # [n_ok, D], float32
        res = searcher.search(e, k)
        e = e.cpu()
        scores = _clap_scores(e, [items[i].prompt for i in ok], text_embedder)
    D, I = res.D.cpu().tolist(), res.I.cpu().tolist()  # noqa: E741
    for j, i in enumerate(ok):
        found = [(t, d) for t, d in zip(I[j], D[j], strict=True) if t >= 0]  # faiss: -1 is "no neighbour"
        cols["status"][i] = "ok"
        cols["neighbour_ids"][i] = [index.ids[t] for t, _ in found]
        cols["neighbour_captions"][i] = [index.captions[t] for t, _ in found]
        cols["neighbour_similarities"][i] = [d for _, d in found]
        if found:  # else similarity and nearest stay null: the search found nothing to compare with
            t, d = found[0]
            cols["nearest_id"][i], cols["nearest_caption"][i], cols["similarity"][i] = (
                index.ids[t],
                index.captions[t],
                d,
            )
        cols["clap_score"][i] = None if scores is None else scores[j]
    return cols, e


def _clap_scores(e: torch.Tensor, prompts: list[str], text_embedder) -> list[float | None] | None:
    """Cosine of each audio embedding with its prompt's text embedding (None without a text encoder)."""
    if text_embedder is None:
        return None
    has = [j for j, p in enumerate(prompts) if p]
    out: list[float | None] = [None] * len(prompts)
    if has:
        t = text_embedder([prompts[j] for j in has]).float().cpu()
        for row, j in enumerate(has):
            out[j] = float(e[j] @ t[row])
    return out


def embed_all(
    items: Sequence[Item],
    index: EmbeddingIndex,
    embedder,
    out_dir: Path,
    config: AuditConfig,
    text_embedder: Callable[[list[str]], torch.Tensor] | None = None,
    progress: bool = True,
    restart: bool = False,
    index_key: str | None = None,
    searcher: Searcher | None = None,
) -> list[Path]:
    """Embed and search every item in batches into ``OUT/parts`` (resuming), -> the part row files.

    A batch is done again when any of its files changed since its part was written (:func:`batch_key`);
    ``index_key`` identifies the index (``index.store.index_id`` of its folder; default: a digest of its
    vectors). ``searcher``: over ``index`` (default: made from ``config.search`` on
    ``config.device``)."""
    from tqdm import tqdm

    if index_key is None:  # callers without the index folder: the vectors themselves
        index_key = hashlib.sha256(index.vectors.numpy().tobytes()).hexdigest()
    plan = _plan(items, index_key, config, json.loads(index.embedder.to_json()))
    work = open_plan_dir(out_dir / PARTS, plan, restart, "an audit")
    searcher = searcher or make_searcher(index, config.search, config.device)
    starts = range(0, len(items), config.batch_size)
    parts = [work / f"part-{s // config.batch_size:06d}" for s in starts]
    keys = [batch_key(items[s : s + config.batch_size]) for s in starts]  # before any file is read
    finished = [_finished(p, key) for p, key in zip(parts, keys, strict=True)]
    if any(finished):
        log.info("resuming the audit in %s: %d of %d batches done and unchanged", out_dir, sum(finished),
                 len(parts))  # fmt: skip
    bar = tqdm(total=len(items), desc="audit", unit="file", disable=not progress)
    with ThreadPoolExecutor(config.workers) as pool:
        for s, part, key, done in zip(starts, parts, keys, finished, strict=True):
            batch = items[s : s + config.batch_size]
            if not done:
                cols, e = _embed_batch(
                    batch, embedder, searcher, index, config.k, text_embedder, pool, config.device
                )
                _write_part(part, key, cols, e)
            bar.update(len(batch))
    bar.close()
    return [p.with_suffix(".parquet") for p in parts]


def _write_part(part: Path, key: str, cols: dict, e: torch.Tensor) -> None:
    """A batch's embeddings, then its rows (last: their presence marks the part done), under ``key``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    meta = {KEY: key}
    atomic_write(part.with_suffix(".safetensors"), lambda p: save_file({"e": e.contiguous()}, p, meta))
    table = pa.table(cols, schema=row_schema()).replace_schema_metadata(meta)
    atomic_write(part.with_suffix(".parquet"), lambda p: pq.write_table(table, p))


def _finished(part: Path, key: str) -> bool:
    """Both files of the part are there and were written for these items as they are now (the rows
    are written last, so rows with this key have embeddings with it)."""
    import pyarrow.parquet as pq
    from safetensors import safe_open

    rows, e = part.with_suffix(".parquet"), part.with_suffix(".safetensors")
    if not (rows.exists() and e.exists()):
        return False
    try:
        with safe_open(e, "pt") as f:
            e_key = (f.metadata() or {}).get(KEY)
        rows_key = (pq.read_metadata(rows).metadata or {}).get(KEY.encode(), b"").decode()
    except Exception as err:  # noqa: BLE001 - a part that cannot be read back is done again
        log.warning("%s cannot be read back (%s): embedding its batch again", part, err)
        return False
    return rows_key == e_key == key


# -- aggregation -----------------------------------------------------------------------------------


def similarity_stats(sims: np.ndarray, thresholds: Sequence[float]) -> dict:
    """mean, median, p95, max and the share ≥ each threshold of a 1-D array of similarities."""
    if sims.size == 0:
        return {"n": 0}
    return {
        "n": int(sims.size),
        "mean": float(sims.mean()),
        "median": float(np.median(sims)),
        "p95": float(np.percentile(sims, 95)),
        "max": float(sims.max()),
        "share_at_or_above": {f"{t:g}": float((sims >= t).mean()) for t in thresholds},
    }


def background_similarities(
    index: EmbeddingIndex,
    config: SearchConfig,
    sample: int = BACKGROUND_SAMPLE,
    searcher: Searcher | None = None,
):
    """Each (sampled) training clip's similarity to its nearest *other* training clip (``searcher``:
    the audit's own, so a faiss index is not built twice)."""
    n = len(index)
    if n < 2:
        return np.zeros(0)
    rows = torch.arange(n) if n <= sample else torch.linspace(0, n - 1, sample).long()
    res = (searcher or make_searcher(index, config)).search(index.vectors[rows].float(), 2)
    D, I = res.D.cpu(), res.I.cpu()  # noqa: E741
    # the best match is usually the clip itself; take the best that is not (ties with exact copies stay)
    other = torch.where(I[:, 0] == rows, D[:, 1], D[:, 0])
    return other.numpy()


def _kad_rows(n: int, cap: int = KAD_SAMPLE) -> set[int]:
    return set(range(n)) if n <= cap else {int(i) for i in np.linspace(0, n - 1, cap).round()}


@dataclass
class Summary:
    n_files: int
    n_ok: int
    n_error: int
    n_no_neighbour: int  # ok files for which the (approximate) search returned no training clip
    embedder: dict
    thresholds: list[float]
    generated: dict
    background: dict
    fad: float | None
    kad: float | None
    reference: str
    clap_score: dict | None
    top_pairs: list[dict]
    histogram: dict
    fad_heldout: float | None = None  # against the held-out index, when one is given
    kad_heldout: float | None = None
    adherence: dict | None = None  # jobs.adherence.adherence_summary, where prompts parse

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class _Totals:
    """What :func:`aggregate` keeps while it streams the parts. Preallocated: no per-file Python objects
    outlive their part (views into a part's tensor, or floats made while reading it, would pin its
    memory: measured +0.5 to +3 GB at 10^5 files)."""

    def __init__(self, total: int, dim: int, max_pairs: int) -> None:  # total: an upper bound on ok rows
        self.moments = Moments(dim)
        self.keep = np.array(sorted(_kad_rows(total)))
        self.sims, self.clap = np.empty(total), np.empty(total)
        self.kad_x = torch.empty(len(self.keep), dim)
        self.n_files = self.n_ok = self.n_sim = self.n_clap = self.n_kad = 0
        self.pairs: list = []
        self.max_pairs = max_pairs

    def add(self, table, e: torch.Tensor) -> None:
        """One part: its rows (Arrow) and ``e`` [n_ok of this part, D], the embeddings of its ok rows."""
        import pyarrow.compute as pc

        ok = np.flatnonzero(pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False))
        sim = table["similarity"].to_numpy(zero_copy_only=False)[ok].astype(np.float64)  # NaN: no neighbour
        found = ~np.isnan(sim)
        self.sims[self.n_sim : self.n_sim + found.sum()] = sim[found]
        self.n_sim += int(found.sum())
        clap = table["clap_score"].to_numpy(zero_copy_only=False)[ok].astype(np.float64)
        clap = clap[~np.isnan(clap)]
        self.clap[self.n_clap : self.n_clap + len(clap)] = clap
        self.n_clap += len(clap)
        if len(ok):
            self.moments.add(e)
            sel = np.flatnonzero(np.isin(self.n_ok + np.arange(len(ok)), self.keep))
            self.kad_x[self.n_kad : self.n_kad + len(sel)] = e[torch.from_numpy(sel)]
            self.n_kad += len(sel)
        for j in np.argsort(-np.nan_to_num(sim, nan=-np.inf), kind="stable")[: self.max_pairs]:  # this part's
            if found[j]:  # candidates only
                position = self.n_files + int(ok[j])
                _offer(self.pairs, self.max_pairs, float(sim[j]), position, table.slice(int(ok[j]), 1))
        self.n_files += table.num_rows
        self.n_ok += len(ok)


def aggregate(
    part_files: Sequence[Path],
    index: EmbeddingIndex,
    out_dir: Path,
    config: AuditConfig,
    thresholds: Sequence[float],
    reference: EmbeddingIndex | None = None,
    heldout: EmbeddingIndex | None = None,
    searcher: Searcher | None = None,
) -> Summary:
    """Stream the parts into ``audit.parquet`` and the summary statistics (bounded memory)."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    total = sum(pq.read_metadata(p).num_rows for p in part_files)  # an upper bound on the ok rows
    totals = _Totals(total, index.embedder.dim, config.pairs)
    tmp = out_dir / "audit.parquet.tmp"
    writer = None
    for part in part_files:
        table = pq.read_table(part)
        e = load_file(part.with_suffix(".safetensors"))["e"]  # [n_ok of this part, D]
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
        totals.add(table, e)
    if writer is not None:
        writer.close()
        fsync_replace(tmp, out_dir / "audit.parquet")
    return _summary(totals, index, config, thresholds, reference, heldout, searcher)


def _summary(
    t: _Totals,
    index: EmbeddingIndex,
    config: AuditConfig,
    thresholds: Sequence[float],
    reference: EmbeddingIndex | None,
    heldout: EmbeddingIndex | None,
    searcher: Searcher | None = None,
) -> Summary:
    """The statistics over what the parts held, against the training clips' own background."""
    sims_a, clap_a, kad_x = t.sims[: t.n_sim], t.clap[: t.n_clap], t.kad_x[: t.n_kad]
    background = background_similarities(index, config.search, searcher=searcher)
    fad_v, kad_v = _distances(t.moments, kad_x, reference if reference is not None else index)
    fad_h, kad_h = _distances(t.moments, kad_x, heldout)
    edges = np.linspace(min(-0.0, float(background.min(initial=0)), float(sims_a.min(initial=0))), 1.0,
                        HIST_BINS + 1)  # fmt: skip
    return Summary(
        n_files=t.n_files, n_ok=t.n_ok, n_error=t.n_files - t.n_ok, n_no_neighbour=t.n_ok - t.n_sim,
        embedder=json.loads(index.embedder.to_json()), thresholds=list(thresholds),
        generated=similarity_stats(sims_a, thresholds), background=similarity_stats(background, thresholds),
        fad=fad_v, kad=kad_v, reference="training index" if reference is None else "reference index",
        clap_score=(similarity_stats(clap_a, ()) if t.n_clap else None),
        top_pairs=[p[2] for p in sorted(t.pairs, key=lambda p: p[:2], reverse=True)],
        histogram={
            "edges": edges.tolist(),
            # cosines of float32 unit vectors can exceed 1 by an ulp: clip into the outer bins
            "generated": np.histogram(np.clip(sims_a, edges[0], edges[-1]), edges)[0].tolist(),
            "background": np.histogram(np.clip(background, edges[0], edges[-1]), edges)[0].tolist(),
        },
        fad_heldout=fad_h, kad_heldout=kad_h,
    )  # fmt: skip


def _distances(moments: Moments, kad_x: torch.Tensor, ref: EmbeddingIndex | None) -> tuple:
    """(FAD, KAD) of the audited embeddings against ``ref``; (None, None) without two of each."""
    if ref is None or moments.n < 2 or len(ref) < 2:
        return None, None
    return fad(moments, _moments_of(ref.vectors)), kad(
        kad_x, ref.vectors[sorted(_kad_rows(len(ref)))].float()
    )


def _moments_of(vectors: torch.Tensor, chunk: int = 1 << 16) -> Moments:
    """The running moments of an index's vectors [N, D], a chunk at a time (a memory-mapped index is
    read once, never copied whole)."""
    m = Moments(vectors.shape[1])
    for s in range(0, vectors.shape[0], chunk):
        m.add(vectors[s : s + chunk].float())
    return m


PAIR_FIELDS = ("id", "path", "prompt", "nearest_id", "nearest_caption", "similarity")


def _offer(pairs: list, size: int, sim: float, position: int, row) -> None:
    """Keep the ``size`` most similar rows seen so far in the min-heap ``pairs`` (ties: later rows)."""
    if size == 0 or (len(pairs) == size and (sim, position) <= pairs[0][:2]):
        return
    entry = (sim, position, {k: v for k, v in row.to_pylist()[0].items() if k in PAIR_FIELDS})
    if len(pairs) < size:
        heapq.heappush(pairs, entry)
    else:
        heapq.heapreplace(pairs, entry)


def thresholds_for(config: AuditConfig, embedder) -> list[float]:
    """The configured thresholds plus the embedder's own replication threshold, sorted, unique."""
    extra = getattr(embedder, "replication_threshold", None)
    levels = set(config.thresholds) | ({float(extra)} if extra is not None else set())
    return sorted(levels)


def run_audit(
    source: str | Path,
    index_dir: str | Path,
    out_dir: str | Path,
    config: AuditConfig = AuditConfig(),
    embedder_checkpoint: str | Path | None = None,
    reference_dir: str | Path | None = None,
    train_audio: str | Path | None = None,
    text_embedder: Callable[[list[str]], torch.Tensor] | None = None,
    progress: bool = True,
    restart: bool = False,
    trust_checkpoint: bool = False,
    heldout_dir: str | Path | None = None,
) -> Summary:
    """Audit ``source`` against the index in ``index_dir``; write audit.parquet, summary, plots, report.

    ``heldout_dir``: an index of held-out audio (same embedder) for FAD/KAD beside the reference's.
    The inputs are checked (index, embedder and checkpoint, reference and held-out indexes, source)
    before anything is written: bad input leaves ``out_dir`` untouched.
    """
    from amg_engine.index.embedders import load_embedder
    from amg_engine.jobs.report import write_report

    out_dir = Path(out_dir)
    index = EmbeddingIndex.load(index_dir)  # memory-mapped where it was built so: nothing read yet
    check_config(config.search, index.embedder.dim)  # e.g. HNSW on the GPU: refused before any work
    embedder = load_embedder(index.embedder, embedder_checkpoint, trust_checkpoint)
    if hasattr(embedder, "eval"):
        embedder.eval()
    if hasattr(embedder, "to"):
        embedder = embedder.to(config.device)
    reference, heldout = (_load_like(d, index) for d in (reference_dir, heldout_dir))
    items = items_from_source(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    searcher = make_searcher(index, config.search, config.device)  # one for the files and the background
    parts = embed_all(items, index, embedder, out_dir, config, text_embedder, progress, restart,
                      index_id(index_dir), searcher)  # fmt: skip
    summary = aggregate(
        parts, index, out_dir, config, thresholds_for(config, embedder), reference, heldout, searcher
    )
    if config.attributes:
        from amg_engine.jobs.adherence import adherence_summary, attribute_rows

        summary.adherence = adherence_summary(attribute_rows(items, out_dir, progress))
    atomic_write(out_dir / "summary.json", lambda p: Path(p).write_text(summary.to_json()))
    write_report(summary, out_dir, train_audio=_train_paths(train_audio))
    return summary


def _load_like(folder: str | Path | None, index: EmbeddingIndex) -> EmbeddingIndex | None:
    """The index in ``folder`` (None for None), refused unless built with ``index``'s embedder."""
    if folder is None:
        return None
    other = EmbeddingIndex.load(folder)
    other.check_embedder(index.embedder)
    return other


def _train_paths(train_audio: str | Path | None) -> dict[str, Path]:
    """Training clip id -> audio file, from a training manifest or folder (for the report's players)."""
    if train_audio is None:
        return {}
    from amg_engine.index.build import clips_from_source

    return {c.id: c.path for c in clips_from_source(train_audio)}


def format_summary(summary: Summary) -> str:
    """A few lines for the terminal."""
    g, b = summary.generated, summary.background
    lines = [
        f"audited {summary.n_ok} files ({summary.n_error} errors) "
        f"against the {summary.embedder['name']} index"
    ]
    if summary.n_no_neighbour:
        lines.append(
            f"{summary.n_no_neighbour} files had no training neighbour in the search (approximate index)"
        )
    if g.get("n"):
        lines.append(
            f"nearest-training similarity: mean {g['mean']:.3f}, median {g['median']:.3f}, "
            f"p95 {g['p95']:.3f}, max {g['max']:.3f}"
        )
        lines.append(
            "share at or above: "
            + ", ".join(f"{t}: {100 * v:.1f}%" for t, v in g["share_at_or_above"].items())
        )
    if b.get("n"):
        lines.append(f"training-to-training background: median {b['median']:.3f}, p95 {b['p95']:.3f}")
    if summary.fad is not None:
        lines.append(f"FAD {summary.fad:.4g}, KAD {summary.kad:.4g} (vs the {summary.reference})")
    if summary.fad_heldout is not None:
        lines.append(f"FAD {summary.fad_heldout:.4g}, KAD {summary.kad_heldout:.4g} (vs the held-out index)")
    if summary.adherence:
        a = summary.adherence
        shares = [f"{k} {100 * v['share']:.0f}% of {v['n']}" for k, v in a.items()
                  if isinstance(v, dict) and v["share"] is not None]  # fmt: skip
        lines.append(f"attribute adherence ({a['files']} files with parsed prompts): " + ", ".join(shares))
    if summary.clap_score:
        lines.append(f"CLAP score: mean {summary.clap_score['mean']:.3f}")
    return "\n".join(lines)


__all__ = [
    "AuditConfig", "Item", "Summary", "aggregate", "embed_all", "format_summary", "items_from_source",
    "run_audit", "similarity_stats",
]  # fmt: skip
