"""``amg generate --engine ray``: the same job on a pool of Ray actors, one engine per actor.

The driver validates the manifest, keeps this shard's rows that are not done yet (exactly as the
local path does, :func:`jobs.generate.plan_run`), and hands them to Ray Data
(``ray.data.from_arrow``), ordered so that rows sharing per-row overrides are adjacent. Ray Data
feeds batches of ``batch_size`` rows to ``map_batches`` over an actor pool; each actor loads one
:class:`engine.engine.Engine` and runs :class:`jobs.runner.BatchRunner`, which writes the audio and
one result shard per batch into the output folder. The driver then merges the shards into
``results.parquet``.

Resources: each actor asks for ``gpus_per_actor`` GPUs (default: 1 when the cluster has GPUs, and
the engine then runs on ``cuda``; else 0 and ``cpu``) and ``cpus_per_actor`` CPUs. The pool has
``actors`` actors (default: one per GPU in the cluster, else 1).

On a cluster: start Ray on the nodes (``ray start --head`` / ``ray start --address=HEAD:6379``),
install this project into the same environment on every node, put the model, the index, the
manifest and the output folder on storage every node sees at the same path, and run the command
with ``RAY_ADDRESS=HEAD:6379`` (or ``--ray-address``). Without an address a local Ray is started.

Ray is optional: ``pip install 'ray[data]'``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from engine.config import EngineConfig
from jobs.generate import JobConfig, Plan, RunIds, Summary, finish_run, plan_run, progress_bar, run_log
from jobs.manifest import Limits
from jobs.results import ResultStore

log = logging.getLogger(__name__)

RAY_REQUIREMENT = "ray[data]>=2.40"


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
        from engine.models import check_model_files
        from index.embedders import check_embedder

        check_model_files(self.model_dir)
        check_embedder(self.embedder_info(), self.embedder_checkpoint)

    def embedder_info(self):
        from index.clip import EmbedderInfo

        path = Path(self.index_dir) / "embedder.json"
        if not path.is_file():
            raise FileNotFoundError(f"index folder {self.index_dir} has no embedder.json; pass --index DIR")
        return EmbedderInfo(**json.loads(path.read_text()))

    def load(self):
        from engine.engine import Engine

        return Engine(
            self.config, self.model_dir, self.index_dir, self.embedder_checkpoint, self.trust_checkpoint
        )

    def window_seconds(self) -> float:
        cfg = json.loads((Path(self.model_dir) / "model_config.json").read_text())
        return cfg["sample_size"] / cfg["sample_rate"]

    def ids(self) -> RunIds:
        """The ids and threshold an :class:`engine.engine.Engine` of this spec has (actors check them)."""
        from engine.models import model_id
        from index.embedders import replication_threshold
        from index.store import index_id

        return RunIds(
            model_id(self.model_dir), index_id(self.index_dir), replication_threshold(self.embedder_info())
        )


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
                 ids: RunIds) -> None:  # fmt: skip
        from jobs.runner import BatchRunner

        self._log = run_log(Path(out_dir) / "run.log")
        self._log.__enter__()  # for the actor's lifetime
        engine = spec.load()
        loaded = (engine.model_id, engine.index_id)
        if loaded != (ids.model_id, ids.index_id):
            raise RuntimeError(f"actor loaded model, index {loaded}; the driver planned for {ids}")
        self.runner = BatchRunner(engine, ResultStore(out_dir, tag), schema, audio_format)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.to_pylist()
        results = self.runner.run([(r.pop("row"), r) for r in records])
        return pa.table({"row": [r["row"] for r in results], "status": [r["status"] for r in results]})


def run_generate_ray(
    manifest: str | Path, out_dir: str | Path, spec: EngineSpec, job: JobConfig, opts: RayOptions
) -> Summary:
    """:func:`jobs.generate.run_generate` on a Ray actor pool (see the module docstring)."""
    ray = import_ray()
    store = ResultStore(out_dir, job.shard.tag)
    store.dir.mkdir(parents=True, exist_ok=True)
    with run_log(store.dir / "run.log"):
        store.prepare()
        log.info("run: engine ray, config %s, shard %s, %s", spec.config, job.shard, opts)
        plan = plan_run(manifest, store, Limits(spec.window_seconds(), spec.config), spec.ids(), job)
        start = time.perf_counter()
        if plan.todo:
            started = not ray.is_initialized()
            if started:
                ray.init(address=opts.address, include_dashboard=False)
            try:
                _execute(ray, plan, spec, store, job, opts)
            finally:
                if started:
                    ray.shutdown()
        return finish_run(plan, store, job, time.perf_counter() - start)


def _execute(ray, plan: Plan, spec: EngineSpec, store: ResultStore, job: JobConfig, opts: RayOptions) -> None:
    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
    gpus = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus_in_cluster else 0.0)
    actors = opts.actors or (max(1, int(gpus_in_cluster / gpus)) if gpus else 1)
    config = replace(spec.config, device=opts.device or ("cuda" if gpus else "cpu"))
    log.info("ray: %d actors × (%g CPU, %g GPU), device %s", actors, opts.cpus_per_actor, gpus, config.device)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows
    positions = [r.index for r in plan.todo]
    todo = plan.manifest.take(pa.array(positions, pa.int64())).append_column(
        "row", pa.array(positions, pa.int64())
    )
    results = ray.data.from_arrow(todo).map_batches(
        GenerateActor,
        fn_constructor_kwargs=dict(spec=replace(spec, config=config), out_dir=str(store.dir), tag=store.tag,
                                   schema=plan.schema, audio_format=job.audio_format,
                                   ids=RunIds(plan.model_id, plan.index_id, plan.threshold)),
        batch_size=config.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=opts.cpus_per_actor, num_gpus=gpus,
    )  # fmt: skip
    counts = {"ok": 0, "error": 0}
    with progress_bar(len(positions), job.progress) as bar:
        for out in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            for status in out["status"].to_pylist():
                counts[status] += 1
            bar.update(out.num_rows)
            bar.set_postfix(counts, refresh=False)
