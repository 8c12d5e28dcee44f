"""What a night brings (issue 27): a full disk, a read-only or missing output folder, a corrupt
result shard, a second run on the same folder, a clip shorter than the model can make.

The run's own faults stop the run with one line naming the path and the cause (exit code 4), and leave
the rows in flight not done, so that a plain rerun finishes them; an unreadable shard is set aside and
what it held is recovered where the audio proves it, else regenerated; a second run of the same rows
is refused (exit code 5) naming the process that holds them. A full disk is simulated by a writer
that raises ``OSError(ENOSPC)``; where the tests run as root, a small tmpfs gives a real one.
"""

import errno
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from jobs_helpers import FakeEngine, fast_config, good_manifest, tiny_assets, write_manifest

from amg_engine import jobs
from amg_engine.jobs.cli import main
from amg_engine.jobs.generate import JobConfig, run_generate
from amg_engine.jobs.manifest import Limits, validate
from amg_engine.jobs.results import FolderBusy, FolderLock, OutputUnavailable, ResultStore

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _job(**kw) -> JobConfig:
    return JobConfig(progress=False, **kw)


def _results(out: Path) -> list[dict]:
    return pq.read_table(out / "results.parquet").to_pylist()


def _shard_rows(out: Path) -> list[dict]:
    return ResultStore(out).read(["id", "status"]).select(["id", "status"]).to_pylist()


def _generated(engine) -> list[str]:
    return sorted(i for call in engine.calls for i in call)


def _full_after(monkeypatch, n: int) -> list[Path]:
    """Audio writes fail with ENOSPC after ``n`` files (the writer jobs.results.write_audio calls)."""
    real, written = jobs.results.atomic_write, []

    def atomic_write(path, write, tmp=None, durable=True):
        if len(written) >= n:
            write = _full  # the disk fills while the file is written
        written.append(Path(path))
        return real(path, write, tmp, durable)

    monkeypatch.setattr(jobs.results, "atomic_write", atomic_write)
    return written


def _full(tmp: str) -> None:
    Path(tmp).write_bytes(b"partial")  # a partly written temporary file, as a full disk leaves
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def _assert_clean_stop(e: OutputUnavailable, out: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and "No space left on device (ENOSPC)" in msg and str(out) in msg
    assert "rerun the same command" in msg


# -- 1. a full disk ----------------------------------------------------------------------------------
def test_a_full_disk_stops_the_run_and_a_plain_rerun_finishes_the_rows(tmp_path, monkeypatch):
    m, out = good_manifest(tmp_path / "m.parquet", 40), tmp_path / "out"
    _full_after(monkeypatch, 12)  # batches of 8: the second batch fills the disk after 4 files
    with pytest.raises(OutputUnavailable) as e:
        run_generate(m, out, FakeEngine(), _job())
    _assert_clean_stop(e.value, out / "audio")
    rows = _shard_rows(out)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 8  # the second batch has no result rows
    assert list(out.rglob("*.tmp")) == []  # the failed write's temporary file went with it
    monkeypatch.undo()  # space freed
    engine = FakeEngine()
    summary = run_generate(m, out, engine, _job())  # no --retry-failed
    assert _generated(engine) == [f"row-{i:04d}" for i in range(8, 40)]  # exactly the rows not done
    assert (summary.ok, summary.errors) == (40, 0)
    assert [r["status"] for r in _results(out)] == ["ok"] * 40


def test_a_full_disk_is_exit_code_4_with_one_line(tmp_path, monkeypatch, capsys):
    m, out = good_manifest(tmp_path / "m.parquet", 20), tmp_path / "out"
    monkeypatch.setattr("amg_engine.engine.engine.Engine", lambda config, *a, **k: FakeEngine(config))
    _full_after(monkeypatch, 3)
    assert main(["generate", str(m), "--out", str(out), "--quiet", "--batch-size", "8"]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"amg: stopped: {out / 'audio'}") and "ENOSPC" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_full_disk_writing_the_shard_leaves_no_part_and_no_row(tmp_path, monkeypatch):
    m, out = good_manifest(tmp_path / "m.parquet", 16), tmp_path / "out"
    real, calls = pq.write_table, []

    def write_table(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            Path(where).write_bytes(b"PAR1 torn")
            raise OSError(
                errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"
            )
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", write_table)
    with pytest.raises(OutputUnavailable) as e:
        run_generate(m, out, FakeEngine(), _job())
    assert "ENOSPC" in str(e.value) and str(out / "results") in str(e.value)
    assert len(_shard_rows(out)) == 8 and list(out.rglob("*.tmp")) == []
    monkeypatch.undo()
    engine = FakeEngine()
    run_generate(m, out, engine, _job())
    assert _generated(engine) == [f"row-{i:04d}" for i in range(8, 16)]


@pytest.mark.parametrize("where", ["compact", "results"])
def test_a_full_disk_during_the_merge_stops_cleanly_and_the_rerun_merges(
    tmp_path, monkeypatch, capsys, where
):
    m, out = good_manifest(tmp_path / "m.parquet", 24), tmp_path / "out"
    real = pq.ParquetWriter.write_table

    def write_table(self, table, *a, **kw):
        target = ".parquet.run.tmp" if where == "compact" else "results.parquet.tmp"  # not a batch's shard
        if str(self.where).endswith(target):
            raise OSError(
                errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"
            )
        return real(self, table, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    monkeypatch.setattr("amg_engine.engine.engine.Engine", lambda config, *a, **k: FakeEngine(config))
    cmd = ["generate", str(m), "--out", str(out), "--quiet", "--batch-size", "8"]
    assert main(cmd) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ENOSPC" in err and "Traceback" not in err
    assert list(out.rglob("*.tmp")) == []  # the half-written merge files do not keep taking space
    assert not (out / "results.parquet").exists()
    assert sorted(r["id"] for r in _shard_rows(out)) == [f"row-{i:04d}" for i in range(24)]  # nothing lost
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)  # space freed
    engines = []
    monkeypatch.setattr(
        "amg_engine.engine.engine.Engine", lambda c, *a, **k: engines.append(FakeEngine(c)) or engines[-1]
    )
    assert main(cmd) == 0
    assert engines[0].calls == [] and [r["status"] for r in _results(out)] == ["ok"] * 24


class NoisyEngine(FakeEngine):
    """Noise instead of silence: files of ~8 KB a clip (FLAC compresses silence to almost nothing)."""

    def generate(self, requests):
        import dataclasses

        import torch

        gen = torch.Generator().manual_seed(0)
        return [dataclasses.replace(g, audio=torch.rand(g.audio.shape, generator=gen) - 0.5)
                for g in super().generate(requests)]  # fmt: skip


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    """Root only (else skipped): a 384 KiB file system that fills up mid-run."""
    out = tmp_path / "small"
    if not _mount_tmpfs(out, "size=384k"):
        pytest.skip("needs root and tmpfs to mount a small file system")
    try:
        m = good_manifest(tmp_path / "m.parquet", 64)
        m_out = out / "run"
        with pytest.raises(OutputUnavailable) as e:
            run_generate(m, m_out, NoisyEngine(), _job())
        assert "ENOSPC" in str(e.value)
        rows = _shard_rows(m_out)
        assert {r["status"] for r in rows} <= {"ok"} and list(m_out.rglob("*.tmp")) == []
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)  # space freed
        engine = NoisyEngine()
        run_generate(m, m_out, engine, _job())
        assert len(_generated(engine)) == 64 - len(rows)
        assert [r["status"] for r in _results(m_out)] == ["ok"] * 64
        for r in _results(m_out):
            assert sf.info(m_out / r["audio_path"]).frames == 4000
    finally:
        subprocess.run(["umount", "--lazy", str(out)], check=False)  # even while a file is open


# -- 5. an output folder that cannot be used ----------------------------------------------------------
def test_out_a_regular_file_is_exit_code_4_for_generate_and_audit(tmp_path, capsys):
    m = good_manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "file"
    out.write_text("not a folder")
    assert main(["generate", str(m), "--out", str(out), "--quiet", "--no-amg"]) == 4
    assert main(["audit", str(tmp_path), "--out", str(out), "--quiet"]) == 4
    for line in capsys.readouterr().err.strip().splitlines():
        assert line.startswith(f"amg: stopped: {out}: Not a directory (ENOTDIR). --out {out}: give a folder")
    assert main(["generate", str(m), "--out", str(out / "sub"), "--quiet"]) == 4  # a file on the way
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "Traceback" not in err


def test_a_read_only_output_folder_is_exit_code_4_for_generate_and_audit(tmp_path, capsys):
    """Root only (else skipped): a read-only tmpfs as --out."""
    out = tmp_path / "ro"
    if not _mount_tmpfs(out, "ro,size=64k"):
        pytest.skip("needs root and tmpfs to mount a read-only file system")
    try:
        m = good_manifest(tmp_path / "m.parquet", 2)
        sf.write(tmp_path / "clip.wav", [0.1, -0.1] * 4000, 8000)
        assert main(["generate", str(m), "--out", str(out), "--quiet", "--no-amg"]) == 4
        assert main(["audit", str(tmp_path), "--out", str(out), "--quiet", "--no-attributes"]) == 4
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2 and all(
            "Read-only file system (EROFS)" in ln and str(out) in ln for ln in lines
        )
    finally:
        subprocess.run(["umount", "--lazy", str(out)], check=False)  # even while a file is open


def test_a_read_only_or_vanished_output_folder_stops_the_run(tmp_path, monkeypatch):
    """Simulated, for any user: every file opened for writing under the folder fails as on a read-only
    file system; then, another run, the audio folder vanishes mid-run (a lost mount)."""
    m, out = good_manifest(tmp_path / "m.parquet", 4), tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr("logging.FileHandler._open", lambda self: read_only(self.baseFilename, os.O_WRONLY))
    with pytest.raises(OutputUnavailable, match=f"stopped: {out}/.*: Read-only file system \\(EROFS\\)"):
        run_generate(m, out, FakeEngine(), _job())
    monkeypatch.undo()

    class Vanishing(FakeEngine):  # the mount is lost after the first batch
        def generate(self, requests):
            if self.calls:
                import shutil

                shutil.rmtree(out / "audio")
            return super().generate(requests)

    m = good_manifest(tmp_path / "m2.parquet", 16)
    with pytest.raises(OutputUnavailable) as e:
        run_generate(m, out, Vanishing(), _job())
    assert "No such file or directory (ENOENT)" in str(e.value) and str(out / "audio") in str(e.value)
    assert len(_shard_rows(out)) == 8


# -- issue 26 item 8: only input validation is exit code 2 ---------------------------------------------
def test_a_pyarrow_error_while_merging_is_not_bad_input(tmp_path, monkeypatch, capsys):
    m, out = good_manifest(tmp_path / "m.parquet", 4), tmp_path / "out"
    monkeypatch.setattr("amg_engine.engine.engine.Engine", lambda config, *a, **k: FakeEngine(config))

    def broken(*a, **k):
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer")

    monkeypatch.setattr("amg_engine.jobs.generate.write_results", broken)
    with pytest.raises(RuntimeError, match="failed while merging the results: ArrowInvalid"):
        main(["generate", str(m), "--out", str(out), "--quiet"])  # a traceback (exit 1), not exit 2
    monkeypatch.undo()
    bad = write_manifest(tmp_path / "bad.parquet", {"prompt": ["x"]})  # input validation: still 2
    assert main(["generate", str(bad), "--out", str(out), "--quiet"]) == 2
    assert main(["generate", str(m), "--out", str(out), "--quiet", "--steps", "0"]) == 2


# -- 2. a corrupt shard -------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_shard_is_set_aside_and_recovered_from_the_results(tmp_path, caplog):
    m, out = good_manifest(tmp_path / "m.parquet", 20), tmp_path / "out"
    run_generate(m, out, FakeEngine(), _job())
    before = _results(out)
    (part,) = ResultStore(out).part_files()  # compacted: every row's record in one file
    _truncate(part)
    (out / "audio" / "row-0003.flac").write_bytes(b"other audio")  # its record cannot be proven
    engine = FakeEngine()
    run_generate(m, out, engine, _job())
    assert engine.calls == [["row-0003"]]  # the rest was proven done by results.parquet and its audio
    assert part.with_name(part.name + ".corrupt").exists()
    assert f"result shard {part} cannot be read" in caplog.text
    after = _results(out)
    assert [r["status"] for r in after] == ["ok"] * 20
    keep = lambda r: {k: v for k, v in r.items() if r["id"] != "row-0003"}  # noqa: E731
    assert [keep(r) for r in after] == [keep(r) for r in before]
    for r in after:
        assert sf.info(out / r["audio_path"]).frames == 4000


def test_a_truncated_shard_not_yet_merged_is_regenerated(tmp_path):
    m8, m24, out = (
        good_manifest(tmp_path / "a.parquet", 8),
        good_manifest(tmp_path / "b.parquet", 24),
        tmp_path / "out",
    )
    run_generate(m8, out, FakeEngine(), _job())  # rows 0-7, merged

    class Killed(FakeEngine):  # the process dies after its batch of rows 8-15 (no merge)
        def generate(self, requests):
            if self.calls:
                raise KeyboardInterrupt
            return super().generate(requests)

    with pytest.raises(KeyboardInterrupt):
        run_generate(m24, out, Killed(fast_config()), JobConfig(progress=False))
    newest = ResultStore(out).part_files()[-1]
    assert sorted(r["id"] for r in pq.read_table(newest).to_pylist()) == [
        f"row-{i:04d}" for i in range(8, 16)
    ]
    _truncate(newest)
    engine = FakeEngine()
    run_generate(m24, out, engine, _job())  # before: ArrowInvalid, the CLI's exit code 2, on every rerun
    assert _generated(engine) == [f"row-{i:04d}" for i in range(8, 24)]  # 8-15: nothing proves them done
    assert [r["status"] for r in _results(out)] == ["ok"] * 24


# -- 3. two runs on one folder ------------------------------------------------------------------------
CHILD = """
import os, sys, time
from pathlib import Path
from jobs_helpers import FakeEngine
import amg_engine.engine.engine
from amg_engine import engine
class Held(FakeEngine):  # after its first batch, waits until the test lets it go on
    def generate(self, requests):
        while self.calls and not Path(os.environ["RELEASE"]).exists():
            time.sleep(0.05)
        return super().generate(requests)
engine.engine.Engine = lambda config, *a, **k: Held(config)
from amg_engine.jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(args: list[str], release: Path) -> subprocess.Popen:
    path = os.pathsep.join([str(Path(__file__).parent), os.getcwd(), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "RELEASE": str(release)}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stderr=subprocess.PIPE, text=True)


def test_a_second_unsharded_run_on_a_busy_folder_is_refused_naming_the_first(tmp_path):
    m, out, release = good_manifest(tmp_path / "m.parquet", 24), tmp_path / "out", tmp_path / "release"
    cmd = ["generate", str(m), "--out", str(out), "--quiet", "--batch-size", "4"]
    first = _spawn(cmd, release)
    procs = [first]
    try:
        deadline = time.monotonic() + 120
        while not list((out / "results").glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        procs += [_spawn(cmd, release), _spawn([*cmd, "--shard", "1/2"], release)]  # a shard: refused too
        for p in procs[1:]:
            assert p.wait(timeout=120) == 5
            err = p.stderr.read()
            assert f"pid {first.pid} on " in err and "another run is working in" in err, err
            assert len(err.strip().splitlines()) == 1
    finally:
        release.touch()
        for p in procs[1:]:
            if p.poll() is None:
                p.kill()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    res = _results(out)
    assert [r["status"] for r in res] == ["ok"] * 24
    assert Counter(r["id"] for r in _shard_rows(out)) == Counter(r["id"] for r in res)  # generated once
    again = _spawn(cmd, release)  # the folder is free once the first run has ended
    assert again.wait(timeout=120) == 0, again.stderr.read()


def test_the_claims_of_unsharded_and_shard_runs(tmp_path):
    """flock locks conflict between two open files in one process too: the matrix, in-process."""
    with FolderLock(tmp_path, "shard0of2"), FolderLock(tmp_path, "shard1of2"):  # shards share a folder
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()} on .*; pid {os.getpid()} on "):
            FolderLock(tmp_path, "").__enter__()
        with pytest.raises(FolderBusy, match="it runs shard0of2 already"):
            FolderLock(tmp_path, "shard0of2").__enter__()
    with FolderLock(tmp_path, ""):
        with pytest.raises(FolderBusy, match="an unsharded run needs the folder to itself"):
            FolderLock(tmp_path, "").__enter__()
        with pytest.raises(FolderBusy, match="an unsharded run does every row"):
            FolderLock(tmp_path, "shard0of3").__enter__()
    with FolderLock(tmp_path, ""):  # released on exit
        pass


# -- 4. a clip shorter than the model can make --------------------------------------------------------
def test_a_clip_shorter_than_one_latent_frame_is_an_error_row(tmp_path):
    m = write_manifest(tmp_path / "m.parquet", {
        "id": ["a", "tiny", "b", "one-sample"], "prompt": ["x", "y", "z", "w"],
        "seconds": [0.5, 1e-9, 0.5, 1 / 8000],
    })  # fmt: skip
    engine = FakeEngine()
    run_generate(m, tmp_path / "out", engine, _job())
    res = _results(tmp_path / "out")
    assert [r["status"] for r in res] == ["ok", "error", "ok", "ok"]
    assert "shorter than one latent frame" in res[1]["error"] and "tiny" not in _generated(engine)
    assert sf.info(tmp_path / "out" / res[3]["audio_path"]).frames == 1  # the fake engine's frame: 1 sample


def test_a_too_short_row_the_ray_driver_lets_through_is_an_error_row_with_its_key(tmp_path):
    """The Ray driver plans without the model (no shortest clip): the actor's runner refuses the row
    and keeps its key, so the merge finds its result."""
    from amg_engine.jobs.generate import RunIds, plan_run
    from amg_engine.jobs.results import KEY
    from amg_engine.jobs.runner import BatchRunner

    m = write_manifest(
        tmp_path / "m.parquet", {"id": ["a", "tiny"], "prompt": ["x", "y"], "seconds": [0.5, 1e-9]}
    )
    engine, store = FakeEngine(), ResultStore(tmp_path / "out")
    store.prepare()
    limits = Limits(engine.window / engine.sample_rate, engine.config)  # as jobs.ray_run plans
    plan = plan_run(m, store, limits, RunIds.of(engine), _job())
    assert [r.id for r in plan.todo] == ["a", "tiny"]
    res = {
        r["id"]: r
        for r in BatchRunner(engine, store, plan.schema).run([(r.index, r.values) for r in plan.todo])
    }
    assert res["a"]["status"] == "ok" and res["tiny"]["status"] == "error"
    assert res["tiny"]["error"].startswith("row 1: seconds 1e-09 is shorter than one latent frame")
    assert tuple(res["tiny"][k] for k in KEY[1:]) == plan.expected["tiny"]
    assert engine.calls == [["a"]]


def test_the_minimum_duration_is_one_latent_frame_of_the_real_model(tmp_path, tmp_path_factory):
    from amg_engine.engine.engine import Engine

    root = tiny_assets(tmp_path_factory)
    engine = Engine(fast_config(), root / "model", root / "index")
    limits = Limits.from_engine(engine)
    ds, rate = engine.model.pretransform.downsampling_ratio, engine.sample_rate
    assert limits.min_seconds == max(ds, -(-rate // engine.embedder.sample_rate)) / rate
    rows = validate([{"id": "a", "prompt": "x", "seconds": limits.min_seconds},
                     {"id": "b", "prompt": "x", "seconds": limits.min_seconds * 0.99}], limits)  # fmt: skip
    assert rows[0].error is None and "shorter than one latent frame" in rows[1].error
    m = write_manifest(tmp_path / "m.parquet", {"id": ["a", "b"], "prompt": ["Wind howling outside"] * 2,
                                                "seconds": [limits.min_seconds, 0.5]})  # fmt: skip
    run_generate(m, tmp_path / "out", engine, _job(gate=None))
    res = _results(tmp_path / "out")
    assert [r["status"] for r in res] == ["ok", "ok"]
    audio, _ = sf.read(tmp_path / "out" / res[0]["audio_path"], always_2d=True)
    assert len(audio) == round(limits.min_seconds * rate) > 0 and -1 <= res[0]["final_similarity"] <= 1


# -- what held, kept: SIGKILLs inside the merge, hostile rows ------------------------------------------
MERGE_CHILD = """
import sys, time
from pathlib import Path
from jobs_helpers import FakeEngine
import amg_engine.jobs.merge as merge
from amg_engine.jobs.generate import JobConfig, run_generate
class Logged(FakeEngine):  # every id it generates, appended to a file that outlives the process
    def generate(self, requests):
        with open(sys.argv[3], "a") as f:
            f.write("".join(r.id + "\\n" for r in requests))
        return super().generate(requests)
merge.CHUNK_ROWS, take = 4, merge.RowReader.take  # a merge long enough for a kill to land in it
merge.RowReader.take = lambda self, *a: (time.sleep(0.05), take(self, *a))[1]
run_generate(sys.argv[1], sys.argv[2], Logged(), JobConfig(progress=False, audio_format="wav"))
"""


def test_sigkills_inside_the_merge_lose_nothing_and_generate_nothing_twice(tmp_path):
    m, out, ids = good_manifest(tmp_path / "m.parquet", 32), tmp_path / "out", tmp_path / "ids.txt"
    path = os.pathsep.join([str(Path(__file__).parent), os.getcwd(), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    merging = lambda: (
        any((out / "results").glob("*.parquet.run.tmp")) or (out / "results.parquet.tmp").exists()
    )  # noqa: E731
    for delay in (0.0, 0.1, 0.25):
        p = subprocess.Popen([sys.executable, "-c", MERGE_CHILD, str(m), str(out), str(ids)], env=env)
        deadline = time.monotonic() + 120
        while not merging() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert p.poll() is None, "the run ended before its merge could be killed"
        time.sleep(delay)
        p.kill()
        assert p.wait(timeout=60) == -9
    p = subprocess.Popen([sys.executable, "-c", MERGE_CHILD, str(m), str(out), str(ids)], env=env)
    assert p.wait(timeout=120) == 0
    res = _results(out)
    assert [r["id"] for r in res] == [f"row-{i:04d}" for i in range(32)] and {r["status"] for r in res} == {
        "ok"
    }
    assert sorted(ids.read_text().split()) == [r["id"] for r in res]  # each row generated once
    for r in res:
        data = (out / r["audio_path"]).read_bytes()
        assert jobs.results.hashlib.sha256(data).hexdigest() == r["audio_sha256"]
        assert sf.info(out / r["audio_path"]).frames == 4000
    assert sorted(p.name for p in (out / "audio").iterdir()) == [f"{r['id']}.wav" for r in res]
    assert list(out.rglob("*.tmp")) == []


def test_hostile_rows_are_clear_errors_and_nothing_is_written_outside_the_folder(tmp_path):
    hostile = [("id", "../up"), ("id", "a/b"), ("id", ".."), ("id", "nul\x00id"), ("id", "new\nline"),
               ("seconds", float("nan")), ("seconds", float("inf")), ("seconds", -float("inf")),
               ("seconds", 1e300), ("seconds", 1e-9), ("seed", 2**63 - 1 + 1.0),
               ("cfg_scale", -float("inf")), ("steps", 10**9),
               ("prompt", "x " * 50_000)]  # 100k characters  # fmt: skip
    n = len(hostile) + 3
    cols = {"id": [f"r{k}" for k in range(n)], "prompt": ["a drum loop"] * n, "seconds": [0.5] * n,
            "seed": [float(k) for k in range(n)], "cfg_scale": [None] * n, "steps": [None] * n}  # fmt: skip
    for k, (col, value) in enumerate(hostile):
        cols[col][k] = value
    m = tmp_path / "in" / "m.parquet"
    m.parent.mkdir()
    pq.write_table(pa.table(cols), m)
    before = sorted(tmp_path.rglob("*"))
    run_generate(m, tmp_path / "out", FakeEngine(), _job())
    res = _results(tmp_path / "out")
    assert [r["row"] for r in res] == list(range(n))
    assert [r["status"] for r in res] == ["error"] * len(hostile) + ["ok"] * 3
    for r in res[: len(hostile)]:
        assert (
            r["error"].startswith(f"row {r['row']}: ") and len(r["error"]) < 1000 and r["audio_path"] is None
        )
    after = {p for p in tmp_path.rglob("*") if (tmp_path / "out") not in p.parents and p != tmp_path / "out"}
    assert sorted(after) == before
