"""Merging at scale: compaction keeps exactly the newest row of every id, survives being interrupted
at any step, ``results.parquet`` is streamed in chunks, and shard processes running at the same time
in one folder never delete each other's files while the last to finish writes the complete view."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobs_helpers import FakeEngine, good_manifest

from amg_engine import jobs
from amg_engine.jobs.generate import JobConfig, run_generate
from amg_engine.jobs.merge import ResultsWriter, RowReader, compact, matching, newest, write_results
from amg_engine.jobs.results import FIXED_SCHEMA, KEY, ResultStore

POOL = [f"id{k:02d}" for k in range(30)]


def _random_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        steps = rng.randint(0, 5)
        rows.append(dict(
            row=rng.randint(0, 99), id=rng.choice(POOL), prompt=rng.choice("ab"), seed=rng.randint(0, 3),
            config_hash=rng.choice(["h1", "h2", "h3"]), model_id="m", status=rng.choice(["ok", "error"]),
            seconds=0.5, final_similarity=rng.random(), audio_sha256=f"{rng.getrandbits(64):x}",
            trace_similarity=[rng.random() for _ in range(steps)], trace_gate=[rng.random() < 0.5] * steps,
            trace_neighbour_id=[rng.choice(["n1", None]) for _ in range(steps)],
        ))  # fmt: skip
    return rows


def _folder(tmp_path: Path, seed: int) -> tuple[ResultStore, dict[str, dict]]:
    """A folder of random shards (some with several row groups, some written before audio_sha256
    existed, some with a manifest's extra column) and, by brute force, the newest row of every id."""
    rng, store = random.Random(seed), ResultStore(tmp_path / f"out{seed}")
    store.prepare()
    reference = {}
    for k in range(12):
        rows = _random_rows(rng, rng.randint(1, 9))
        schema = FIXED_SCHEMA
        if k % 4 == 1:  # an older shard
            schema = pa.schema([f for f in FIXED_SCHEMA if f.name != "audio_sha256"])
            rows = [{c: v for c, v in r.items() if c != "audio_sha256"} for r in rows]
        if k % 4 == 2:
            schema = schema.append(pa.field("notes", pa.string()))
        tmp = store.parts / f"t{k}.run.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, row_group_size=rng.randint(1, 4))
        store.publish(tmp)
        for r in rows:
            reference[r["id"]] = r  # later shards, and later rows of a shard, are newer
    return store, reference


def _content(table: pa.Table) -> dict[str, dict]:
    """id -> the row as Python values (fixed columns that the random rows set, plus nulls)."""
    return {r["id"]: r for r in table.select(FIXED_SCHEMA.names).to_pylist()}


def _same(got: dict[str, dict], reference: dict[str, dict]) -> None:
    """Every value equal (exact: copies of the same stored values; the reference goes through the
    same float32 columns), columns a row did not set null."""
    assert got == _content(pa.Table.from_pylist(list(reference.values()), schema=FIXED_SCHEMA))


def _newest_content(store: ResultStore) -> dict[str, dict]:
    scan = store.scan(list(KEY))
    picked = newest(scan)
    files, pos = scan.table["_file"].to_numpy(), scan.table["_pos"].to_numpy()
    return _content(RowReader(scan).take(files[picked], pos[picked]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compaction_keeps_the_newest_row_of_every_id_in_the_order_asked(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(jobs.merge, "CHUNK_ROWS", 5)  # many chunks and row groups, a cache that evicts
    store, reference = _folder(tmp_path, seed)
    files = store.part_files()
    _same(_newest_content(store), reference)
    order = {rid: k for k, rid in enumerate(random.Random(seed).sample(POOL, len(POOL)))}
    monkeypatch.setattr(jobs.merge, "CACHE_BYTES", 1)
    compact(store, store.scan(list(KEY)), lambda ids: np.array([order[i] for i in ids]))
    assert store.part_files() == [files[-1]]  # the highest number holds them all now
    table = pq.read_table(files[-1])
    assert table.schema == FIXED_SCHEMA and pq.ParquetFile(files[-1]).num_row_groups > 1
    assert table["id"].to_pylist() == sorted(reference, key=order.get)
    _same(_content(table), reference)


@pytest.mark.parametrize("stage", ["before the rename", 0, 1, 5])
def test_an_interrupted_compaction_leaves_a_folder_that_reads_the_same(tmp_path, monkeypatch, stage):
    store, reference = _folder(tmp_path, 3)
    real_unlink, deleted = Path.unlink, []

    def unlink(self, missing_ok=False):  # a kill after `stage` shards were deleted
        if self.name.startswith("part-") and self.suffix == ".parquet":
            if len(deleted) == stage:
                raise KeyboardInterrupt("killed")
            deleted.append(self)
        real_unlink(self, missing_ok=missing_ok)

    def killed_before_rename(tmp, path):
        raise KeyboardInterrupt("killed")

    if stage == "before the rename":
        monkeypatch.setattr(jobs.merge, "fsync_replace", killed_before_rename)
    else:
        monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        compact(store, store.scan(list(KEY)), lambda ids: np.zeros(len(ids)))
    monkeypatch.undo()
    _same(_newest_content(store), reference)
    store.prepare()  # the next run's start deletes the half-written compacted shard
    compact(store, store.scan(list(KEY)), lambda ids: np.zeros(len(ids)))
    assert len(store.part_files()) == 1 and list(store.parts.glob("*.tmp")) == []
    _same(_newest_content(store), reference)


def test_results_are_streamed_in_chunks_with_the_same_content(tmp_path, monkeypatch):
    m, out = good_manifest(tmp_path / "m.parquet", 30), tmp_path / "out"
    run_generate(m, out, FakeEngine(fail_ids={"row-0004"}), JobConfig(progress=False))
    whole = pq.read_table(out / "results.parquet")
    assert pq.ParquetFile(out / "results.parquet").num_row_groups == 1
    monkeypatch.setattr(jobs.merge, "CHUNK_ROWS", 4)
    from amg_engine.jobs.generate import RunIds, plan_run
    from amg_engine.jobs.manifest import Limits

    engine = FakeEngine()
    plan = plan_run(m, ResultStore(out), Limits.from_engine(engine), RunIds.of(engine), JobConfig())
    scan = ResultStore(out).scan(list(KEY))
    picks = matching(scan, newest(scan), plan.expected)
    by_row = {r.index: picks[r.id] for r in plan.rows}
    write_results(
        ResultsWriter(tmp_path / "chunked.parquet", "", plan.schema, plan.manifest, {}), scan, by_row
    )
    assert pq.ParquetFile(tmp_path / "chunked.parquet").num_row_groups == 8
    assert pq.read_table(tmp_path / "chunked.parquet").equals(whole)  # the same bytes copied: exact


CHILD = """
import sys, time
from jobs_helpers import FakeEngine
from amg_engine.jobs.generate import JobConfig, Shard, run_generate
class Slow(FakeEngine):
    def generate(self, requests):
        time.sleep(0.03)
        return super().generate(requests)
i, n = map(int, sys.argv[3].split("/"))
run_generate(sys.argv[1], sys.argv[2], Slow(), JobConfig(progress=False, shard=Shard(i, n)))
"""


def test_shard_processes_sharing_a_folder_leave_each_other_alone_and_the_last_merges(tmp_path):
    n, shards = 96, 3
    m, out = good_manifest(tmp_path / "m.parquet", n), tmp_path / "out"
    (out / "audio").mkdir(parents=True)
    (out / "results").mkdir()
    foreign = [out / "audio" / "x.flac.shard7of9.tmp", out / "results" / "part-x.shard7of9.tmp"]
    for p in foreign:  # a shard's files, as it would be writing them
        p.write_bytes(b"in progress")
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(m), str(out), f"{i}/{shards}"], env=env,
                              stderr=subprocess.PIPE) for i in range(shards)]  # fmt: skip
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    res = pq.read_table(out / "results.parquet")
    assert res["row"].to_pylist() == list(range(n)) and set(res["status"].to_pylist()) == {"ok"}
    assert len(list((out / "audio").glob("*.flac"))) == n
    assert all(p.read_bytes() == b"in progress" for p in foreign)
    assert len(ResultStore(out).part_files()) == 1  # the run that found itself alone compacted
    log = (out / "run.log").read_text()
    assert log.count("rows: 32 ok, 0 error") == shards
