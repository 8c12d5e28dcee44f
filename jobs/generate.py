"""The main job: a Parquet manifest in, audio files and ``results.parquet`` out; resumable, shardable.

Every manifest row yields exactly one result row (status ``ok`` or ``error``); a bad row or a failing
batch is recorded, never raised. The output folder layout, the results schema and what counts as
done are described in :mod:`jobs.results`; the manifest schema in :mod:`jobs.manifest`.

A run: claim its rows (a second run of the same rows is refused, :class:`~jobs.results.FolderBusy`);
take the folder lock shared; delete this process's leftover temporary files; validate the
manifest; keep this shard's rows (row k belongs to shard k mod n); skip rows already done under the
same configuration hash (error rows too, unless ``retry_failed``), choosing them from a scan of the
key columns only; generate the rest in batches of rows sharing their per-row overrides, writing one
result shard per batch; then, if no other run holds the folder, compact the shards and stream
``results.parquet`` (:mod:`jobs.merge`). Killing the process at any moment loses at most the
batches in flight: a rerun of the same command regenerates exactly those rows.

An operating-system error on the output folder (a full disk, a read-only or lost folder) is the
run's fault, not a row's: the run stops at once with :class:`~jobs.results.OutputUnavailable`
naming the path and the cause (the CLI's exit code 4), the rows in flight get no result row, and a
failed merge leaves the shards as they were and no temporary file; so the same rerun finishes the
job. A result shard that cannot be read is set aside (:meth:`~jobs.results.ResultStore.scan`).

Under a release gate (``JobConfig.gate``, :mod:`jobs.gate`) a row whose final similarity is at or
above τ is generated again, its retries gathered across batches into full batches, up to N attempts;
a rerun continues rows that were between attempts.

A :class:`~jobs.runner.CircuitBreaker` stops the run after ``max_failed_batches`` consecutive
batches failed in the engine (default 3): the run still merges what it finished, then raises
:class:`~jobs.runner.CircuitOpen`, whose message names the error (the CLI exits with code 3).

``--shard i/n`` processes may share one output folder: each deletes only its own temporary files,
shard numbers are claimed atomically, and the run that finishes while no other run holds the
folder lock (the last one) compacts the shards and writes the complete ``results.parquet``; earlier
finishers leave it to that one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from amg_engine.engine.config import EngineConfig
from amg_engine.jobs.gate import ReleaseGate, RetryQueue, schedule
from amg_engine.jobs.manifest import Limits, Overrides, Row, read_manifest, validate
from amg_engine.jobs.merge import ResultsWriter, RowReader, compact, matching, newest, write_results
from amg_engine.jobs.results import (
    AUDIO_IDENTITY,
    KEY,
    FolderLock,
    OutputUnavailable,
    ResultStore,
    error_result,
    output_errors,
    result_schema,
    same_audio,
)
from amg_engine.jobs.runner import AUDIO_FORMATS, BatchRunner, CircuitBreaker, CircuitOpen

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
    max_failed_batches: int = 3  # consecutive batches failed in the engine that stop the run; 0: never
    # similarity at or above which the summary counts an output as a replica (None: the embedder's own)
    threshold: float | None = None
    gate: ReleaseGate | None = None  # the release gate (jobs.gate); None: every output is released

    def __post_init__(self) -> None:
        if self.audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format={self.audio_format!r}: choose one of {AUDIO_FORMATS}")
        if not (isinstance(self.max_failed_batches, int) and self.max_failed_batches >= 0):
            raise ValueError(
                f"max_failed_batches={self.max_failed_batches!r}: need an integer ≥ 0 (0 never stops a run)"
            )
        t = self.threshold
        if t is not None and not (isinstance(t, int | float) and -1.0 <= t <= 1.0):
            raise ValueError(
                f"threshold={t!r}: give a cosine similarity in [-1, 1], e.g. 0.9 (mel) or 0.5 (CLAP)"
            )
        if self.gate is not None and not isinstance(self.gate, ReleaseGate):
            raise ValueError(f"gate={self.gate!r}: need a jobs.gate.ReleaseGate or None")


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
    gate: ReleaseGate | None = None  # resolved (its τ set)
    priors: dict[str, dict] = field(default_factory=dict)  # id -> last attempt, of rows between attempts


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
    # the release gate's figures (gate None: no gate; then every ok row was released at its first try)
    gate: str | None = None
    rejected: int = 0  # rows no attempt of which cleared τ
    retrying: int = 0  # rows between two attempts (a stopped run; a rerun finishes them)
    attempt_histogram: dict[int, int] = field(default_factory=dict)  # attempts -> released + rejected rows
    row_generations: int = 0  # attempts spent on the released and rejected rows

    @property
    def released(self) -> int:
        return self.ok

    @property
    def generations_per_released(self) -> float:
        return self.row_generations / self.ok if self.ok else float("nan")

    def lines(self) -> list[str]:
        rate = self.generated / self.seconds if self.seconds else 0.0
        rejected = f", {self.rejected} rejected" if self.gate else ""
        out = [f"rows: {self.ok} ok, {self.errors} error{rejected} ({rate:.2f} rows/s, {self.seconds:.1f} s)"]
        if self.reused:
            out.append(f"resumed: {self.reused} rows kept from earlier runs, {self.generated} generated now")
        out += [
            f"final similarity to nearest training clip: mean {self.mean_similarity:.3f}, "
            f"max {self.max_similarity:.3f}",
            f"rows at or above the memorization threshold {self.threshold}: {self.replicated}",
        ]
        if self.gate:
            hist = ", ".join(f"{k}: {n}" for k, n in sorted(self.attempt_histogram.items())) or "none"
            waiting = f", {self.retrying} between attempts (rerun to finish them)" if self.retrying else ""
            out += [
                f"release gate ({self.gate}): {self.released} released, {self.rejected} rejected{waiting}",
                f"attempts per row (attempts: rows): {hist}; row-generations per released clip: "
                f"{self.generations_per_released:.2f}",
            ]
        return out


def plan_run(manifest: str | Path, store: ResultStore, limits: Limits, ids: RunIds, job: JobConfig) -> Plan:
    """Validate the manifest and decide which of this shard's rows still need generating."""
    table = read_manifest(manifest)
    rows = validate(table.to_pylist(), limits, table.schema)
    gate = None if job.gate is None else job.gate.resolve(ids.threshold)
    gate_key = None if gate is None else gate.key
    hashes: dict[Overrides, str] = {}
    expected = {}
    for r in rows:
        if r.error is None:
            if r.overrides not in hashes:
                hashes[r.overrides] = r.overrides.config_hash(limits.base)
            expected[r.id] = (hashes[r.overrides], ids.model_id, ids.index_id, r.prompt, r.seconds, r.seed,
                              gate_key)  # fmt: skip
    mine = [r for r in rows if job.shard.owns(r.index)]
    schema = result_schema(table.schema)
    done, priors = _done_ids(store, expected, job.retry_failed, schema)
    todo = _group_order([r for r in mine if r.error is None and r.id not in done])
    reused = sum(r.error is None and r.id in done for r in mine)
    invalid = [r.error for r in mine if r.error is not None]
    for err in invalid:
        log.info("invalid: %s", err)
    if invalid:
        log.warning("%d rows of the manifest are invalid (first: %s); they are error rows in the results",
                    len(invalid), invalid[0])  # fmt: skip
    priors = {r.id: priors[r.id] for r in todo if r.id in priors}
    log.info("manifest %s: %d rows, %d in this shard, %d invalid, %d to generate, %d done before",
             manifest, len(rows), len(mine), len(invalid), len(todo), reused)  # fmt: skip
    if priors:
        log.info("%d rows continue the release gate's attempts where an earlier run left them", len(priors))
    threshold = ids.threshold if job.threshold is None else job.threshold
    return Plan(table, schema, rows, todo, len(mine), reused, expected, ids.model_id, ids.index_id,
                limits.base, threshold, gate, priors)  # fmt: skip


def _done_ids(store: ResultStore, expected: dict[str, tuple], retry_failed: bool,
              schema: pa.Schema) -> tuple[set[str], dict[str, dict]]:  # fmt: skip
    """Ids whose newest result matches their key (and, for ok and rejected rows, whose audio is
    unchanged); and the newest rows (whole, ``schema``) of ids between two attempts of the release
    gate whose kept attempt is unchanged, to continue from."""
    scan = store.scan(list(dict.fromkeys([*KEY, *AUDIO_IDENTITY])))
    picks = matching(scan, newest(scan), expected)
    chosen = pa.array(list(picks.values()), pa.int64())
    cols = scan.table.select(list(AUDIO_IDENTITY)).take(chosen).to_pydict()
    done, waiting = set(), []
    for k, rid in enumerate(picks):
        status, path = cols["status"][k], cols["audio_path"][k]
        if status == "error" and not retry_failed:
            done.add(rid)
        elif status == "error" and path is None:  # regenerated from the start
            continue
        elif same_audio(store.dir / (path or ""), cols["audio_bytes"][k], cols["audio_mtime_ns"][k],
                        cols["audio_sha256"][k]):  # fmt: skip
            if status in ("retry", "error"):  # between attempts, or an attempt failed (--retry-failed)
                waiting.append(k)
            else:
                done.add(rid)
    if not waiting:
        return done, {}
    where = scan.table.select(["_file", "_pos"]).take(chosen.take(pa.array(waiting, pa.int64())))
    rows = RowReader(scan, schema).take(where["_file"].to_numpy(), where["_pos"].to_numpy()).to_pylist()
    return done, {r["id"]: r for r in rows}


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
    loggers = [logging.getLogger("amg_engine")]
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
    """Generate every row of ``manifest`` (this shard's, not yet done) into ``out_dir`` with ``engine``.

    Raises :class:`~jobs.runner.CircuitOpen` (after merging what finished) when the engine failed on
    ``job.max_failed_batches`` batches in a row."""
    job = job or JobConfig()
    store = ResultStore(out_dir, job.shard.tag)
    with output_errors(store.dir), open_output(store) as lock:
        log.info("run: engine local, config %s, shard %s", engine.config, job.shard)
        plan = plan_run(manifest, store, Limits.from_engine(engine), RunIds.of(engine), job)
        runner = BatchRunner(engine, store, plan.schema, job.audio_format, plan.gate)

        def work(counts: dict[str, int]) -> None:
            breaker = CircuitBreaker(store, job.max_failed_batches)
            queue = None if plan.gate is None else RetryQueue(plan.gate, engine.config.batch_size)
            for r in plan.todo:
                if r.id in plan.priors:
                    queue.add(r, plan.priors[r.id])
            fresh = [r for r in plan.todo if r.id not in plan.priors]
            first = ([(r, None) for r in b] for b in batches(fresh, engine.config.batch_size))
            with progress_bar(len(plan.todo), job.progress) as bar:
                for batch in schedule(first, queue):
                    outcome = runner.run_batch([(r.index, r.values, prior) for r, prior in batch])
                    retry = _retries(batch, outcome.results)
                    for r, prior in retry:
                        queue.add(r, prior)
                    rejected = sum(res["status"] == "rejected" for res in outcome.results)
                    counts["ok"] += outcome.ok
                    counts["error"] += outcome.errors - len(retry) - rejected
                    if plan.gate is not None:
                        counts["rejected"] = counts.get("rejected", 0) + rejected
                    bar.update(len(batch) - len(retry))
                    bar.set_postfix(counts, refresh=False)
                    done = ", ".join(f"{n} {k}" for k, n in counts.items())
                    log.info("batch of %d rows done (%s so far%s)", len(batch), done,
                             f"; {len(retry)} to try again" if retry else "")  # fmt: skip
                    breaker.record(outcome)
            breaker.close()

        return run_and_finish(plan, store, job, lock, work)


@contextlib.contextmanager
def open_output(store: ResultStore) -> Iterator[FolderLock]:
    """The output folder made ready for a run: created, its log opened, this run's rows claimed (or
    :class:`~jobs.results.FolderBusy`), the folder lock held shared, this process's leftover
    temporary files deleted. Wrap it in :func:`~jobs.results.output_errors`: an operating-system
    error on the folder (a regular file, read-only, full, gone) stops the run as
    :class:`~jobs.results.OutputUnavailable`."""
    if store.dir.exists() and not store.dir.is_dir():
        raise OutputUnavailable(store.dir, NotADirectoryError(errno.ENOTDIR, "not a folder"))
    store.dir.mkdir(parents=True, exist_ok=True)
    with run_log(store.dir / "run.log"), store.lock() as lock:
        store.prepare()
        yield lock


def _retries(batch: list[tuple[Row, dict | None]], results: list[dict]) -> list[tuple[Row, dict]]:
    """The batch's rows that need another attempt of the release gate, each with its result."""
    rows = {r.id: r for r, _ in batch}  # by id: a result from an earlier run may name another position
    return [(rows[res["id"]], res) for res in results if res["status"] == "retry"]


def run_and_finish(plan: Plan, store: ResultStore, job: JobConfig, lock: FolderLock,
                   work: Callable[[dict[str, int]], None]) -> Summary:  # fmt: skip
    """``work(counts)`` (the batches; it counts ok and error rows), then :func:`finish_run`, also when
    the circuit breaker stopped it; then re-raise the breaker's :class:`~jobs.runner.CircuitOpen`."""
    start, stopped, counts = time.perf_counter(), None, {"ok": 0, "error": 0}
    try:
        with _not_input("generating"):
            work(counts)
    except CircuitOpen as e:
        stopped = e
        log.error("%s", e)
    except OutputUnavailable as e:  # stop at once: a full disk would fail the merge too
        log.info("%s", e)  # run.log; the console gets the CLI's one line
        raise
    seconds = time.perf_counter() - start
    with _not_input("merging the results"):
        summary = finish_run(plan, store, job, lock, seconds, sum(counts.values()))
    if stopped is not None:
        raise stopped
    return summary


@contextlib.contextmanager
def _not_input(doing: str) -> Iterator[None]:
    """The input was validated before the run began: a ``ValueError`` raised while it works or merges
    (pyarrow's ``ArrowInvalid`` is one) is a fault of the run, not bad input (the CLI's exit code 2)."""
    try:
        yield
    except ValueError as e:
        raise RuntimeError(f"failed while {doing}: {type(e).__name__}: {e}") from e


def finish_run(plan: Plan, store: ResultStore, job: JobConfig, lock: FolderLock, seconds: float,
               generated: int) -> Summary:  # fmt: skip
    """If no other run holds the folder, compact the shards and stream ``results.parquet`` in the
    same pass (see the module docstring); summarise this shard's rows."""
    alone = lock.try_exclusive()
    scan = store.scan([*KEY, "status", "final_similarity", "attempts"])
    picks = matching(scan, newest(scan), plan.expected)
    by_row = {r.index: picks[r.id] for r in plan.rows if r.error is None and r.id in picks}
    summary = summarise(scan.table, plan, by_row, job.shard, seconds, plan.threshold, generated)
    if alone is False:
        log.info("other runs are working in %s: the last to finish writes results.parquet", store.dir)
    else:
        errors = {r.index: error_result(r, r.error, config_hash=r.config_hash(plan.base),
                                        model_id=plan.model_id, index_id=plan.index_id)
                  for r in plan.rows if r.error}  # fmt: skip
        writer = ResultsWriter(store.dir / "results.parquet", store.tag, plan.schema, plan.manifest, errors)
        try:
            if alone and len(scan.files) > 1:
                compact(store, scan, _manifest_order(plan), (writer, by_row))
            else:
                write_results(writer, scan, by_row)
        except BaseException:
            writer.abort()  # no temporary file left taking space (the shards still hold every row)
            raise
        log.info("results: %s (%d rows)", writer.path, writer.rows)
    for line in summary.lines():
        log.info("%s", line)
    return summary


def _manifest_order(plan: Plan) -> Callable[[list[str]], np.ndarray]:
    """ids -> their positions in the manifest (ids it does not hold sort after all of them)."""
    where = {r.id: r.index for r in plan.rows if r.error is None}
    end = len(plan.rows)
    return lambda ids: np.array([where.get(i, end) for i in ids], np.int64)


def summarise(table: pa.Table, plan: Plan, by_row: dict[int, int], shard: Shard, seconds: float,
              threshold: float, generated: int) -> Summary:  # fmt: skip
    """This shard's figures: ``by_row`` maps manifest positions to their chosen rows of ``table`` (a
    scan holding ``status``, ``final_similarity`` and ``attempts``); invalid rows count as errors."""
    mine = [i for p, i in by_row.items() if shard.owns(p)]
    invalid = sum(r.error is not None and shard.owns(r.index) for r in plan.rows)
    if plan.mine - len(mine) - invalid:  # rows a stopped run did not reach
        log.warning("%d rows of this shard have no result; rerun the same command",
                    plan.mine - len(mine) - invalid)  # fmt: skip
    cols = table.select(["status", "final_similarity", "attempts"]).take(pa.array(mine, pa.int64()))
    status = cols["status"].to_numpy(zero_copy_only=False)
    ok = status == "ok"
    sims = cols["final_similarity"].to_numpy(zero_copy_only=False)[ok].astype(np.float64)
    rejected, retrying = int((status == "rejected").sum()), int((status == "retry").sum())
    final = ok | (status == "rejected")
    tries = [int(a) for a in cols["attempts"].filter(pa.array(final)).to_pylist() if a is not None]
    return Summary(
        ok=len(sims), errors=len(mine) - len(sims) - rejected - retrying + invalid, seconds=seconds,
        generated=generated, reused=plan.reused, replicated=int((sims >= threshold).sum()),
        threshold=threshold, mean_similarity=float(sims.mean()) if len(sims) else float("nan"),
        max_similarity=float(sims.max()) if len(sims) else float("nan"),
        gate=None if plan.gate is None else plan.gate.key, rejected=rejected, retrying=retrying,
        attempt_histogram=dict(sorted(Counter(tries).items())), row_generations=sum(tries),
    )  # fmt: skip
