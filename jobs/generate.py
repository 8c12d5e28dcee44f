"""The main job: a Parquet manifest in, audio files and ``results.parquet`` out; resumable, shardable.

Every manifest row yields exactly one result row (status ``ok`` or ``error``); a bad row or a failing
batch is recorded, never raised. The output folder layout, the results schema and what counts as
done are described in :mod:`jobs.results`; the manifest schema in :mod:`jobs.manifest`.

A run: delete leftover temporary files; validate the manifest; keep this shard's rows (row k
belongs to shard k mod n); skip rows already done under the same configuration hash (error rows
too, unless ``retry_failed``); generate the rest in batches of rows sharing their per-row
overrides, writing one result shard per batch; merge every shard into ``results.parquet``.
Killing the process at any moment loses at most the batches in flight: a rerun of the same command
regenerates exactly those rows.

``--shard i/n`` processes may share one output folder (each cleans only its own temporary files;
shard numbers are claimed atomically); each rewrites ``results.parquet`` from all shards written so
far when it finishes, so the last one to finish (or any rerun) leaves the complete view.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from engine.config import EngineConfig
from jobs.manifest import Limits, Overrides, Row, read_manifest, validate
from jobs.results import (
    KEY,
    ResultStore,
    assemble,
    error_result,
    newest_matching,
    result_schema,
)
from jobs.runner import AUDIO_FORMATS, BatchRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Static sharding: manifest row k belongs to shard ``k mod count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(
                f"shard {self.index}/{self.count}: need i/n with n ≥ 1 and 0 ≤ i < n, e.g. 0/4 … 3/4"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        i, sep, n = text.partition("/")
        if not (sep and i.strip().isdigit() and n.strip().isdigit()):
            raise ValueError(f"--shard {text!r}: write it as i/n, e.g. 0/4 for the first of four shards")
        return cls(int(i), int(n))

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    @property
    def tag(self) -> str:
        return "" if self.count == 1 else f"shard{self.index}of{self.count}"


@dataclass(frozen=True)
class JobConfig:
    audio_format: str = "flac"
    retry_failed: bool = False  # regenerate rows whose recorded status is error
    shard: Shard = Shard()
    progress: bool = True  # tqdm bar on stderr
    # similarity at or above which the summary counts an output as a replica (None: the embedder's own)
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format={self.audio_format!r}: choose one of {AUDIO_FORMATS}")
        t = self.threshold
        if t is not None and not (isinstance(t, int | float) and -1.0 <= t <= 1.0):
            raise ValueError(
                f"threshold={t!r}: give a cosine similarity in [-1, 1], e.g. 0.9 (mel) or 0.5 (CLAP)"
            )


@dataclass(frozen=True)
class RunIds:
    """What keys a run's results besides each row's own inputs, and the embedder's replica threshold."""

    model_id: str
    index_id: str
    threshold: float

    @classmethod
    def of(cls, engine) -> RunIds:
        return cls(engine.model_id, engine.index_id, engine.replication_threshold)


@dataclass(frozen=True)
class Plan:
    """What a run will do: every manifest row validated, and this shard's rows still to generate."""

    manifest: pa.Table
    schema: pa.Schema  # of the results
    rows: list[Row]
    todo: list[Row]  # in batch order: rows sharing overrides are adjacent
    mine: int  # rows of this shard
    reused: int  # rows of this shard done by earlier runs
    expected: dict[str, tuple]  # valid id -> its resume key (see jobs.results.KEY)
    model_id: str
    index_id: str
    base: EngineConfig  # the run's configuration, before per-row overrides
    threshold: float  # similarity at or above which an output counts as a replica (the summary's)


@dataclass(frozen=True)
class Summary:
    ok: int
    errors: int
    seconds: float
    generated: int  # rows processed by this run
    reused: int  # rows of this shard kept from earlier runs
    replicated: int  # ok rows whose final similarity ≥ threshold
    threshold: float
    mean_similarity: float
    max_similarity: float

    def lines(self) -> list[str]:
        rate = self.generated / self.seconds if self.seconds else 0.0
        out = [f"rows: {self.ok} ok, {self.errors} error ({rate:.2f} rows/s, {self.seconds:.1f} s)"]
        if self.reused:
            out.append(f"resumed: {self.reused} rows kept from earlier runs, {self.generated} generated now")
        return out + [
            f"final similarity to nearest training clip: mean {self.mean_similarity:.3f}, "
            f"max {self.max_similarity:.3f}",
            f"rows at or above the memorization threshold {self.threshold}: {self.replicated}",
        ]


def plan_run(manifest: str | Path, store: ResultStore, limits: Limits, ids: RunIds, job: JobConfig) -> Plan:
    """Validate the manifest and decide which of this shard's rows still need generating."""
    table = read_manifest(manifest)
    rows = validate(table.to_pylist(), limits)
    hashes: dict[Overrides, str] = {}
    expected = {}
    for r in rows:
        if r.error is None:
            if r.overrides not in hashes:
                hashes[r.overrides] = r.config(limits.base).config_hash()
            expected[r.id] = (hashes[r.overrides], ids.model_id, ids.index_id, r.prompt, r.seconds, r.seed)
    mine = [r for r in rows if job.shard.owns(r.index)]
    done = _done_ids(store, expected, job.retry_failed)
    todo = _group_order([r for r in mine if r.error is None and r.id not in done])
    reused = sum(r.error is None and r.id in done for r in mine)
    invalid = [r.error for r in mine if r.error is not None]
    for err in invalid:
        log.info("invalid: %s", err)
    if invalid:
        log.warning("%d rows of the manifest are invalid (first: %s); they are error rows in the results",
                    len(invalid), invalid[0])  # fmt: skip
    log.info("manifest %s: %d rows, %d in this shard, %d invalid, %d to generate, %d done before",
             manifest, len(rows), len(mine), len(invalid), len(todo), reused)  # fmt: skip
    schema = result_schema(table.schema)
    threshold = ids.threshold if job.threshold is None else job.threshold
    return Plan(table, schema, rows, todo, len(mine), reused, expected, ids.model_id, ids.index_id,
                limits.base, threshold)  # fmt: skip


def _done_ids(store: ResultStore, expected: dict[str, tuple], retry_failed: bool) -> set[str]:
    parts = store.read([*KEY, "status", "audio_path", "audio_bytes", "audio_mtime_ns"])
    picks = newest_matching(parts, expected)
    cols = parts.select(["status", "audio_path", "audio_bytes", "audio_mtime_ns"]).to_pydict()
    done = set()
    for rid, i in picks.items():
        if cols["status"][i] != "ok":
            if not retry_failed:
                done.add(rid)
        elif _same_file(store.dir / (cols["audio_path"][i] or ""), cols["audio_bytes"][i],
                        cols["audio_mtime_ns"][i]):  # fmt: skip
            done.add(rid)
    return done


def _same_file(path: Path, size: int | None, mtime_ns: int | None) -> bool:
    """The audio file is still the one its result row describes."""
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and st.st_size == size and st.st_mtime_ns == mtime_ns


def _group_order(rows: list[Row]) -> list[Row]:
    """Rows sharing overrides made adjacent (groups in order of first appearance, rows in order)."""
    groups: dict[Overrides, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.overrides, []).append(r)
    return [r for g in groups.values() for r in g]


def batches(todo: list[Row], batch_size: int) -> Iterator[list[Row]]:
    """Batches of at most ``batch_size`` rows that share their overrides."""
    batch: list[Row] = []
    for r in todo:
        if batch and (len(batch) == batch_size or r.overrides != batch[0].overrides):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Append this project's INFO-level log records to ``path`` for the duration."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("jobs", "engine", "index")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", desc="generate", disable=not enabled, smoothing=0.1)


def run_generate(manifest: str | Path, out_dir: str | Path, engine, job: JobConfig | None = None) -> Summary:
    """Generate every row of ``manifest`` (this shard's, not yet done) into ``out_dir`` with ``engine``."""
    job = job or JobConfig()
    store = ResultStore(out_dir, job.shard.tag)
    store.dir.mkdir(parents=True, exist_ok=True)
    with run_log(store.dir / "run.log"):
        store.prepare()
        log.info("run: engine local, config %s, shard %s", engine.config, job.shard)
        plan = plan_run(manifest, store, Limits.from_engine(engine), RunIds.of(engine), job)
        runner = BatchRunner(engine, store, plan.schema, job.audio_format)
        start, counts = time.perf_counter(), {"ok": 0, "error": 0}
        with progress_bar(len(plan.todo), job.progress) as bar:
            for batch in batches(plan.todo, engine.config.batch_size):
                for res in runner.run([(r.index, r.values) for r in batch]):
                    counts[res["status"]] += 1
                bar.update(len(batch))
                bar.set_postfix(counts, refresh=False)
                log.info("batch of %d rows done (%d ok, %d error so far)", len(batch), *counts.values())
        return finish_run(plan, store, job, time.perf_counter() - start)


def finish_run(plan: Plan, store: ResultStore, job: JobConfig, seconds: float) -> Summary:
    """Merge every shard into ``results.parquet`` and summarise this shard's rows."""
    merged = merge_results(plan, store)
    mine = merged.filter(pa.array([job.shard.owns(r) for r in merged["row"].to_pylist()], pa.bool_()))
    summary = summarise(mine, plan, seconds, plan.threshold)
    missing = plan.mine - mine.num_rows
    if missing:  # cannot happen unless another process deleted shards under us
        log.error("%d rows of this shard have no result; rerun the same command", missing)
    log.info("results: %s (%d rows)", store.dir / "results.parquet", merged.num_rows)
    for line in summary.lines():
        log.info("%s", line)
    return summary


def merge_results(plan: Plan, store: ResultStore) -> pa.Table:
    """Rewrite ``results.parquet``: newest matching shard row per valid id, fresh rows for invalid ones."""
    parts = store.read()
    latest = newest_matching(parts, plan.expected)
    picks = {r.index: latest[r.id] for r in plan.rows if r.error is None and r.id in latest}
    errors = [error_result(r, r.error, config_hash=r.config_hash(plan.base), model_id=plan.model_id,
                           index_id=plan.index_id) for r in plan.rows if r.error]  # fmt: skip
    merged = assemble(parts, picks, plan.manifest, errors, plan.schema)
    store.write_merged(merged)
    return merged


def summarise(results: pa.Table, plan: Plan, seconds: float, threshold: float) -> Summary:
    status = results["status"].to_pylist()
    sims = [s for s, st in zip(results["final_similarity"].to_pylist(), status, strict=True) if st == "ok"]
    return Summary(
        ok=len(sims), errors=len(status) - len(sims), seconds=seconds, generated=len(plan.todo),
        reused=plan.reused, replicated=sum(s >= threshold for s in sims), threshold=threshold,
        mean_similarity=sum(sims) / len(sims) if sims else float("nan"),
        max_similarity=max(sims) if sims else float("nan"),
    )  # fmt: skip
