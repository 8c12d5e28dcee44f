"""``amg generate --engine ray``: the same job on a pool of Ray actors, one engine per actor.

The driver validates the manifest and keeps this shard's rows that are not done yet (exactly as the
local path does, :func:`jobs.generate.plan_run`), cuts them into the same batches as the local path
(:func:`jobs.generate.batches`: at most ``batch_size`` rows sharing their per-row overrides) and
hands Ray Data one Arrow block per batch (``ray.data.from_arrow`` of a list of tables; Ray Data
never splits or merges a block under ``map_batches(batch_size=None)``). So every batch is one task
that any idle actor of the pool can take, and a retried task redoes that one batch. Each actor loads
one :class:`engine.engine.Engine` and runs :class:`jobs.runner.BatchRunner`, which writes the audio
and the batch's result shard into the output folder, and returns one small row saying what became of
the batch; the driver counts them, feeds them to the :class:`~jobs.runner.CircuitBreaker`, and at
the end merges the shards into ``results.parquet``. The driver first decides the actors' device (and
so their precision, part of every row's key) and plans with the actors' configuration (:class:`Pool`).

Under the release gate (:mod:`jobs.gate`) the run goes in rounds: the fresh rows (and rows an earlier
run left between attempts), then each round the rows whose attempt did not clear τ, gathered into
batches by the same :class:`~jobs.gate.RetryQueue` as a local run. Each row's previous attempt travels
in its block (JSON, :func:`jobs.runner.carried`) and each outcome returns the results of the rows to
try again, so the statuses, attempts and files are those of a local run (tested, with an actor killed
in a round of second attempts). Each round is one Ray Data job, whose actors load their engines again:
at most ``--max-attempts`` loads per actor.

Failures: an actor that dies (killed, out of host memory, a crashed driver library) is restarted by
Ray and its batch is retried on the pool; a batch whose worker died :data:`MAX_ATTEMPTS` times is
not run again but recorded as a batch failed in the engine (``WorkerLost``), which the circuit
breaker counts. The breaker's streaks are per actor; when it stops the run the driver stops feeding
the pool, merges what finished and raises :class:`~jobs.runner.CircuitOpen` (actors still finishing
a batch while Ray stops them may leave a temporary file behind: the next run deletes it).

Resources: each actor asks for ``gpus_per_actor`` GPUs (default: 1 when the cluster has GPUs, and
the engine then runs on ``cuda``; else 0 and ``cpu``) and ``cpus_per_actor`` CPUs. The pool has
``actors`` actors (default: one per GPU in the cluster, so every GPU works; else 1). Each actor has
at most two batches queued, so no actor hoards work while another idles.

On a cluster: start Ray on the nodes (``ray start --head`` / ``ray start --address=HEAD:6379``),
install this project into the same environment on every node, put the model, the index, the
manifest and the output folder on storage every node sees at the same path, and run the command
with ``RAY_ADDRESS=HEAD:6379`` (or ``--ray-address``). Without an address a local Ray is started.

Ray is optional: ``pip install 'ray[data]'``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from amg_engine.engine.config import EngineConfig
from amg_engine.jobs.gate import ReleaseGate, RetryQueue
from amg_engine.jobs.generate import (
    JobConfig,
    Plan,
    RunIds,
    Summary,
    batches,
    open_output,
    plan_run,
    progress_bar,
    run_and_finish,
    run_log,
)
from amg_engine.jobs.manifest import Limits
from amg_engine.jobs.results import ResultStore, output_errors
from amg_engine.jobs.runner import BatchOutcome, CircuitBreaker, carried

log = logging.getLogger(__name__)

RAY_REQUIREMENT = "ray[data]>=2.40"
MAX_ATTEMPTS = 3  # times a batch may kill its worker before it is recorded as failed, not retried
TASKS_PER_ACTOR = 2  # batches queued on an actor: one running, one ready
OUTCOME = pa.schema([("ok", pa.int64()), ("errors", pa.int64()), ("failure", pa.string()),
                     ("pending", pa.string()), ("first_row", pa.int64()),
                     ("worker", pa.string()), ("rejected", pa.int64()),
                     ("retry", pa.string())])  # fmt: skip
# Under the release gate a batch's block carries each row's previous attempt (JSON, see
# jobs.runner.carried) in a column named like a reserved result column, so no manifest column clashes.
PRIOR = "attempts"


class RayUnavailable(ImportError):
    """``--engine ray`` was asked for but Ray Data is not installed."""


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RayUnavailable(
            f"--engine ray needs Ray Data, which is not installed ({e}); "
            f"install it with: pip install '{RAY_REQUIREMENT}', or run with --engine local"
        ) from e
    return ray


@dataclass(frozen=True)
class EngineSpec:
    """What an actor needs to load its own engine. Built on the driver, it checks the model's files,
    the index and the embedder checkpoint against it at once (no weights loaded), so bad input fails
    before any actor starts or anything is written."""

    config: EngineConfig
    model_dir: Path
    index_dir: Path
    embedder_checkpoint: Path | None = None
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        from amg_engine.engine.engine import check_objective
        from amg_engine.engine.models import check_model_files, diffusion_objective
        from amg_engine.index.embedders import check_embedder

        # the configuration against the model's objective too (a schedule in the wrong time variable,
        # reference mode on a flow model: engine.engine.check_objective)
        check_objective(self.config, diffusion_objective(check_model_files(self.model_dir)))
        check_embedder(self.embedder_info(), self.embedder_checkpoint)

    def embedder_info(self):
        from amg_engine.index.clip import EmbedderInfo

        path = Path(self.index_dir) / "embedder.json"
        if not path.is_file():
            raise FileNotFoundError(f"index folder {self.index_dir} has no embedder.json; pass --index DIR")
        return EmbedderInfo(**json.loads(path.read_text()))

    def load(self):
        from amg_engine.engine.engine import Engine

        return Engine(
            self.config, self.model_dir, self.index_dir, self.embedder_checkpoint, self.trust_checkpoint
        )

    def window_seconds(self) -> float:
        cfg = json.loads((Path(self.model_dir) / "model_config.json").read_text())
        return cfg["sample_size"] / cfg["sample_rate"]

    def ids(self) -> RunIds:
        """The ids and threshold an :class:`engine.engine.Engine` of this spec has (actors check them)."""
        from amg_engine.engine.models import model_id
        from amg_engine.index.embedders import replication_threshold
        from amg_engine.index.store import index_id

        threshold = replication_threshold(self.embedder_info())
        return RunIds(model_id(self.model_dir), index_id(self.index_dir), threshold)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS if set, else start a local Ray
    actors: int | None = None  # None: one per cluster GPU, else 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    device: str | None = None  # torch device in the actors; None: cuda with GPUs, else cpu

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--ray-actors {self.actors}: need at least 1")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor or 0) < 0:
            raise ValueError(
                f"cpus_per_actor={self.cpus_per_actor}, gpus_per_actor={self.gpus_per_actor}: need ≥ 0"
            )


class GenerateActor:
    """A Ray Data map_batches callable: one engine, one batch of manifest rows per call."""

    def __init__(self, spec: EngineSpec, out_dir: str, tag: str, schema: pa.Schema, audio_format: str,
                 ids: RunIds, config_hash: str, gate: ReleaseGate | None = None) -> None:  # fmt: skip
        import ray

        from amg_engine.jobs.runner import BatchRunner

        self._log = run_log(Path(out_dir) / "run.log")
        self._log.__enter__()  # for the actor's lifetime
        engine = spec.load()
        loaded = (engine.model_id, engine.index_id)
        if loaded != (ids.model_id, ids.index_id):
            raise RuntimeError(f"actor loaded model, index {loaded}; the driver planned for {ids}")
        mine = engine.config.config_hash()
        if mine != config_hash:  # the rows' key the driver expects is the one this actor writes
            raise RuntimeError(f"actor's configuration {engine.config} keys as {mine}; the driver "
                               f"planned for {config_hash}")  # fmt: skip
        self.store = ResultStore(out_dir, tag)
        self.runner = BatchRunner(engine, self.store, schema, audio_format, gate)
        self.worker = ray.get_runtime_context().get_actor_id() or "driver"  # kept across restarts

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if self.runner.gate is None:
            records = [(r.pop("row"), r) for r in rows]
        else:
            records = [(r.pop("row"), r, _loads(r.pop(PRIOR))) for r in rows]
        marker = self.store.parts / f"attempt-{records[0][0]}.{self.store.tag or 'run'}.tmp"
        attempts = int(marker.read_text() or 0) if marker.exists() else 0
        forced = None
        if attempts >= MAX_ATTEMPTS:
            forced = f"the worker running this batch died {attempts} times (killed, or out of memory?)"
        else:
            marker.write_text(str(attempts + 1))  # survives this process if the batch kills it
        out = self.runner.run_batch(records, forced)
        marker.unlink(missing_ok=True)
        retry = [carried(r) for r in out.results if r["status"] == "retry"]
        row = dict(ok=out.ok, errors=out.errors, failure=out.failure, first_row=out.first_row,
                   pending=str(out.pending) if out.pending else None, worker=self.worker,
                   rejected=sum(r["status"] == "rejected" for r in out.results),
                   retry=json.dumps(retry) if retry else None)  # fmt: skip
        return pa.Table.from_pylist([row], schema=OUTCOME)


def _loads(prior: str | None) -> dict | None:
    return None if prior is None else json.loads(prior)


@dataclass(frozen=True)
class Pool:
    """The actor pool of a run: its size, each actor's GPUs, and the configuration the actors run
    (``device`` set). The driver plans with that configuration: the rows' resume key (the
    configuration's hash, which holds the precision the device resolves) is the one the actors write."""

    actors: int
    gpus: float
    config: EngineConfig

    @classmethod
    def of(cls, ray, opts: RayOptions, config: EngineConfig) -> Pool:
        gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
        gpus = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus_in_cluster else 0.0)
        actors = opts.actors or (max(1, int(gpus_in_cluster / gpus)) if gpus else 1)
        return cls(actors, gpus, replace(config, device=opts.device or ("cuda" if gpus else "cpu")))


def run_generate_ray(
    manifest: str | Path, out_dir: str | Path, spec: EngineSpec, job: JobConfig, opts: RayOptions
) -> Summary:
    """:func:`jobs.generate.run_generate` on a Ray actor pool (see the module docstring)."""
    ray = import_ray()
    store = ResultStore(out_dir, job.shard.tag)
    with output_errors(store.dir), open_output(store) as lock:
        started = not ray.is_initialized()
        if started:  # the cluster decides the actors' device, and so the rows' key: before planning
            ray.init(address=opts.address, include_dashboard=False)
        try:
            pool = Pool.of(ray, opts, spec.config)
            spec = replace(spec, config=pool.config)
            log.info("run: engine ray, config %s, shard %s, %s", spec.config, job.shard, opts)
            plan = plan_run(manifest, store, Limits(spec.window_seconds(), spec.config), spec.ids(), job)

            def work(counts: dict[str, int]) -> None:
                if plan.todo:
                    _execute(ray, plan, spec, pool, store, job, opts, counts)

            return run_and_finish(plan, store, job, lock, work)
        finally:
            if started:
                ray.shutdown()


def _execute(ray, plan: Plan, spec: EngineSpec, pool: Pool, store: ResultStore, job: JobConfig,
             opts: RayOptions, counts: dict[str, int]) -> None:  # fmt: skip
    """The plan's rows in rounds: the fresh rows (and rows an earlier run left between attempts of the
    release gate), then, under the gate, each round the rows that need another attempt, gathered into
    batches as the local run gathers them (:class:`~jobs.gate.RetryQueue`). Each round is one Ray Data
    job on a pool of ``pool.actors`` actors (each loads its engine again)."""
    log.info("ray: %d actors × (%g CPU, %g GPU), device %s", pool.actors, opts.cpus_per_actor, pool.gpus,
             spec.config.device)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows
    size = spec.config.batch_size
    queue = None if plan.gate is None else RetryQueue(plan.gate, size)
    rows = {r.id: r for r in plan.todo}
    for r in plan.todo:
        if r.id in plan.priors:
            queue.add(r, carried(plan.priors[r.id]))
    fresh = [r for r in plan.todo if r.id not in plan.priors]
    todo = [[(r, None) for r in b] for b in batches(fresh, size)]
    breaker = CircuitBreaker(store, job.max_failed_batches)
    with progress_bar(len(plan.todo), job.progress) as bar:
        while todo := todo + ([] if queue is None else list(iter(queue.drain, None))):
            for prior in _round(ray, todo, plan, spec, pool, store, job, opts, counts, breaker, bar):
                queue.add(rows[prior["id"]], prior)
            todo = []
    breaker.close()


def _round(ray, todo: list[list[tuple]], plan: Plan, spec: EngineSpec, pool: Pool, store: ResultStore,
           job: JobConfig, opts: RayOptions, counts: dict[str, int], breaker: CircuitBreaker,
           bar) -> list[dict]:  # fmt: skip
    """One Ray Data job over the batches ``todo`` (lists of (row, prior)); -> the rows' results that
    need another attempt (:func:`jobs.runner.carried`)."""
    blocks = []
    for batch in todo:  # one block per batch
        positions = pa.array([r.index for r, _ in batch], pa.int64())
        block = plan.manifest.take(positions).append_column("row", positions)
        if plan.gate is not None:
            priors = [None if p is None else json.dumps(p) for _, p in batch]
            block = block.append_column(PRIOR, pa.array(priors, pa.string()))
        blocks.append(block)
    results = ray.data.from_arrow(blocks).map_batches(
        GenerateActor,
        fn_constructor_kwargs=dict(spec=spec, out_dir=str(store.dir), tag=store.tag,
                                   schema=plan.schema, audio_format=job.audio_format,
                                   ids=RunIds(plan.model_id, plan.index_id, plan.threshold),
                                   config_hash=plan.base.config_hash(), gate=plan.gate),
        batch_size=None, batch_format="pyarrow", num_cpus=opts.cpus_per_actor, num_gpus=pool.gpus,
        compute=ray.data.ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=TASKS_PER_ACTOR),
    )  # fmt: skip
    outcomes = iter(results.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        return _collect(outcomes, counts, breaker, bar)
    finally:
        if hasattr(outcomes, "close"):  # stop the pool now, not when the iterator is collected
            outcomes.close()


def _collect(outcomes, counts: dict[str, int], breaker: CircuitBreaker, bar) -> list[dict]:
    """Count the batches' outcomes as they arrive and feed them to the circuit breaker; -> the results
    of rows to try again."""
    retries = []
    for out in outcomes:
        for r in out.to_pylist():
            pending = Path(r["pending"]) if r["pending"] else None
            outcome = BatchOutcome(
                r["ok"], r["errors"], r["failure"], pending, r["first_row"], worker=r["worker"]
            )
            retry = json.loads(r["retry"]) if r["retry"] else []
            retries += retry
            counts["ok"] += outcome.ok
            counts["error"] += outcome.errors - len(retry) - r["rejected"]
            if r["rejected"] or "rejected" in counts:
                counts["rejected"] = counts.get("rejected", 0) + r["rejected"]
            bar.update(outcome.ok + outcome.errors - len(retry))
            bar.set_postfix(counts, refresh=False)
            breaker.record(outcome)  # raises CircuitOpen: the iterator is dropped, the pool stops
    return retries
