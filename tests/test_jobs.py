"""The generate job on a fake engine (silence, instantly): results, resume, retry, shards, overrides."""

import math
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from jobs_helpers import FakeEngine, fast_config, good_manifest, write_manifest

from amg_engine.index.files import sha256_stream
from amg_engine.jobs.cli import main
from amg_engine.jobs.generate import JobConfig, Shard, run_generate
from amg_engine.jobs.manifest import default_seed
from amg_engine.jobs.results import FIXED_SCHEMA, ResultStore
from amg_engine.jobs.runner import engine_view


def _run(manifest, out, engine=None, **job):
    engine = engine or FakeEngine()
    summary = run_generate(manifest, out, engine, JobConfig(progress=False, **job))
    return summary, pq.read_table(out / "results.parquet"), engine


def _generated(engine) -> list[str]:
    return sorted(i for call in engine.calls for i in call)


def test_every_row_gets_one_result_with_the_documented_columns(tmp_path):
    m = write_manifest(tmp_path / "m.parquet", {
        "id": ["a", "b", "bad/id", "c"], "prompt": ["x y", "z", "w", "v"], "seconds": [0.5, None, 0.5, 0.25],
        "notes": ["n0", "n1", "n2", "n3"], "tags": [[1], [], [2, 3], None],
    })  # fmt: skip
    engine = FakeEngine()
    summary, res, _ = _run(m, tmp_path / "out", engine)
    extra = ["notes", "tags"]
    assert res.column_names == ["row", *FIXED_SCHEMA.names[1:12], *extra, *FIXED_SCHEMA.names[12:]]
    rows = res.to_pylist()
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    assert rows[2]["error"].startswith("row 2: id 'bad/id' is not a safe file name")
    assert [r["notes"] for r in rows] == ["n0", "n1", "n2", "n3"] and rows[2]["tags"] == [2, 3]
    cfg = engine.config
    for r in (rows[0], rows[1], rows[3]):
        audio, sr = sf.read(tmp_path / "out" / r["audio_path"])
        assert sr == 8000 and len(audio) == round(r["seconds"] * sr)
        assert r["seed"] == default_seed(r["id"]) and r["config_hash"] == cfg.config_hash()
        assert (r["cfg_scale"], r["steps"], r["sampler"], r["c3"]) == (3.0, 3, "dpmpp-2m", 50.0)
        assert r["model_id"] == "fake:000000000000" and r["timing"] > 0
        assert (r["neighbour_id"], r["neighbour_caption"]) == ("clip-000", "a drum loop")
        assert r["trace_neighbour_id"] == ["clip-001"] * 3 and r["trace_gate"] == [True] * 3
        assert r["trace_similarity"] == [0.5] * 3 and r["max_similarity"] == 0.5 and r["guided_steps"] == 3
    assert rows[1]["seconds"] == 8192 / 8000  # the model's window by default
    assert (summary.ok, summary.errors, summary.generated, summary.reused) == (3, 1, 3, 0)
    log = (tmp_path / "out" / "run.log").read_text()
    assert "rows: 3 ok, 1 error" in log and "not a safe file name" in log


def test_rerun_skips_done_rows_and_leaves_results_unchanged(tmp_path):
    m = good_manifest(tmp_path / "m.parquet", 10)
    _, first, _ = _run(m, tmp_path / "out")
    summary, second, engine = _run(m, tmp_path / "out")
    assert engine.calls == [] and second.equals(first)
    assert (summary.ok, summary.generated, summary.reused) == (10, 0, 10)
    assert "resumed: 10 rows kept" in summary.lines()[1]


def test_changing_a_guidance_flag_regenerates_and_switching_back_regenerates_again(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 5), tmp_path / "out"
    _, a, _ = _run(m, out)
    _, b, engine = _run(m, out, FakeEngine(fast_config(c1=2.0)))
    assert len(_generated(engine)) == 5
    assert set(b["config_hash"].to_pylist()) == {fast_config(c1=2.0).config_hash()} != set(a["config_hash"])
    # the audio files now hold the c1=2 outputs, so the old rows no longer describe them
    _, c, engine = _run(m, out)
    assert len(_generated(engine)) == 5 and c["config_hash"].to_pylist() == a["config_hash"].to_pylist()


def test_per_row_overrides_form_their_own_batches_and_keys(tmp_path):
    cols = {"id": ["a", "b", "c", "d"], "prompt": ["x"] * 4, "cfg_scale": [None, 2.0, None, 2.0],
            "steps": [None, None, 4, None]}  # fmt: skip
    m, out = write_manifest(tmp_path / "m.parquet", cols), tmp_path / "out"
    _, res, engine = _run(m, out)
    by_call = {tuple(ids): cfg for ids, cfg in zip(engine.calls, engine.configs, strict=True)}
    assert set(by_call) == {("a",), ("b", "d"), ("c",)}
    assert by_call[("b", "d")].guidance.cfg_scale == 2.0 and by_call[("a",)].guidance.cfg_scale == 3.0
    assert by_call[("c",)].sampler.steps == 4 and len(res["trace_gate"][2].as_py()) == 4
    assert engine.config == fast_config()  # the engine itself is untouched
    assert res["cfg_scale"].to_pylist() == [3.0, 2.0, 3.0, 2.0] and res["steps"].to_pylist() == [3, 3, 4, 3]
    cols["cfg_scale"] = [None, 2.0, 2.5, 2.0]  # change one row's override: only that row reruns
    _, _, engine = _run(write_manifest(tmp_path / "m.parquet", cols), out)
    assert engine.calls == [["c"]]


def test_failed_rows_are_recorded_and_retried_only_when_asked(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 12), tmp_path / "out"
    broken = FakeEngine(fail_ids={"row-0001"}, raise_on={"row-0009"})  # batches: rows 0–7, rows 8–11
    summary, res, _ = _run(m, out, broken)
    status = res["status"].to_pylist()
    assert [i for i, s in enumerate(status) if s == "error"] == [1, 8, 9, 10, 11]
    assert res["error"][1].as_py() == "row 1: non-finite audio (latents diverged); row discarded"
    assert res["error"][8].as_py() == "row 8: engine failed on its batch: RuntimeError: engine exploded"
    assert not (out / "audio" / "row-0001.flac").exists() and (out / "audio" / "row-0002.flac").exists()
    _, again, engine = _run(m, out, FakeEngine())
    assert engine.calls == [] and again["status"].to_pylist() == status
    summary, fixed, engine = _run(m, out, FakeEngine(), retry_failed=True)
    assert _generated(engine) == ["row-0001", "row-0008", "row-0009", "row-0010", "row-0011"]
    assert set(fixed["status"].to_pylist()) == {"ok"} and (summary.generated, summary.reused) == (5, 7)


def test_missing_replaced_or_orphaned_audio_is_regenerated(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 6), tmp_path / "out"
    _run(m, out)
    (out / "audio" / "row-0000.flac").unlink()
    replaced = out / "audio" / "row-0003.flac"  # e.g. a killed later run wrote other audio there
    sf.write(replaced, np.full(sf.info(replaced).frames, 0.25), 8000, subtype="PCM_16")
    _, res, engine = _run(m, out)
    assert _generated(engine) == ["row-0000", "row-0003"]
    assert all((out / p).is_file() for p in res["audio_path"].to_pylist())


def test_leftover_temporary_files_are_deleted_on_start(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 3), tmp_path / "out"
    (out / "audio").mkdir(parents=True)
    (out / "results").mkdir()
    leftovers = [out / "audio" / "row-0000.flac.tmp", out / "results" / "part-abc.run.tmp",
                 out / "results.parquet.tmp"]  # fmt: skip
    other_shard = out / "audio" / "row-0001.flac.shard1of2.tmp"
    for p in [*leftovers, other_shard]:
        p.write_bytes(b"half a file")
    _run(m, out, shard=Shard(0, 2))
    assert other_shard.exists()  # another shard's process may still be writing it
    _run(m, out)
    assert list(out.rglob("*.tmp")) == [other_shard]  # an unsharded run leaves shards' files alone too


def test_shards_split_the_rows_and_share_one_folder(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 10), tmp_path / "out"
    seen = []
    for i in (2, 0, 1):
        summary, res, engine = _run(m, out, shard=Shard(i, 3))
        seen += _generated(engine)
        assert _generated(engine) == [f"row-{k:04d}" for k in range(10) if k % 3 == i]
        assert summary.ok == len(_generated(engine))
    assert sorted(seen) == [f"row-{k:04d}" for k in range(10)]
    assert res["row"].to_pylist() == list(range(10)) and set(res["status"].to_pylist()) == {"ok"}
    _, _, engine = _run(m, out)  # unsharded rerun: everything is done
    assert engine.calls == []


@pytest.mark.parametrize("text", ["3/3", "-1/2", "0/0", "a/b", "1", "1/2/3", ""])
def test_bad_shard_specs_are_refused(text, tmp_path, capsys):
    with pytest.raises(ValueError, match="i/n"):
        Shard.parse(text)
    m = good_manifest(tmp_path / "m.parquet", 1)
    assert main(["generate", str(m), "--out", str(tmp_path / "o"), f"--shard={text}", "--quiet"]) == 2
    assert "i/n" in capsys.readouterr().err


def test_shard_parse_and_ownership():
    s = Shard.parse("1/4")
    assert (s.index, s.count, s.tag) == (1, 4, "shard1of4")
    assert [k for k in range(10) if s.owns(k)] == [1, 5, 9] and Shard().tag == ""


def test_bad_rows_of_every_kind_and_the_rest_still_run(tmp_path):
    long = " ".join(["word"] * 17)  # the fake text encoder reads 16 words
    m = write_manifest(tmp_path / "m.parquet", {
        "id": ["ok1", "neg", "long", "ok2", "seed", "steps"], "prompt": ["x", "x", long, "y", "z", "w"],
        "negative_prompt": [None, "loud", None, "", None, None], "seed": [1, 2, 3, 4, -5, 6],
        "steps": [None, None, None, None, None, 0], "seconds": [0.5, 0.5, 0.5, math.inf, 0.5, 0.5],
    })  # fmt: skip
    _, res, _ = _run(m, tmp_path / "out")
    errors = res["error"].to_pylist()
    assert res["status"].to_pylist() == ["ok", "error", "error", "error", "error", "error"]
    assert "negative_prompt is not supported yet" in errors[1]
    assert "prompt has 17 tokens but the text encoder reads at most 16" in errors[2]
    assert "seconds inf is not a finite number" in errors[3] and "seed -5" in errors[4]
    assert "steps=0: need 2..10000" in errors[5]


def test_wav_output(tmp_path):
    _, res, _ = _run(good_manifest(tmp_path / "m.parquet", 2), tmp_path / "out", audio_format="wav")
    for p in res["audio_path"].to_pylist():
        assert p.endswith(".wav") and sf.info(tmp_path / "out" / p).format == "WAV"
    with pytest.raises(ValueError, match="audio_format='mp3'"):
        JobConfig(audio_format="mp3")


def test_two_shard_stores_in_one_folder_never_overwrite_each_others_shards(tmp_path):
    """Two shards' stores writing in turn in this one process: each keeps its own next number, so each
    tries numbers the other took and the hard link refuses them. Shard processes really running at
    once: tests/test_jobs_merge.py."""
    a, b = ResultStore(tmp_path, "shard0of2"), ResultStore(tmp_path, "shard1of2")
    a.prepare()
    schema = FIXED_SCHEMA
    for k in range(3):
        a.write_part([{"row": 2 * k, "id": f"a{k}", "status": "ok"}], schema)
        b.write_part([{"row": 2 * k + 1, "id": f"b{k}", "status": "ok"}], schema)
    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert names == [f"part-{k:05d}.parquet" for k in range(6)]
    parts = a.read(["id"])
    assert sorted(parts["id"].to_pylist()) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert parts["_part"].to_pylist() == sorted(parts["_part"].to_pylist())


def test_engine_view_shares_the_model_and_leaves_the_engine_alone():
    engine = FakeEngine()
    view = engine_view(engine, fast_config(c1=0.0))
    assert view.model is engine.model and view.index is engine.index
    assert view.config.guidance.c1 == 0.0 and engine.config.guidance.c1 == 1.0
    assert engine_view(engine, engine.config) is engine


def test_empty_manifest_gives_empty_results(tmp_path):
    m = write_manifest(
        tmp_path / "m.parquet", {"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}
    )
    summary, res, _ = _run(m, tmp_path / "out")
    assert res.num_rows == 0 and (summary.ok, summary.errors) == (0, 0)


def test_engine_ray_without_ray_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_config.json").write_text("{}")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "embedder.json").write_text("{}")
    m = good_manifest(tmp_path / "m.parquet", 1)
    argv = ["generate", str(m), "--out", str(tmp_path / "o"), "--engine", "ray", "--quiet",
            "--model", str(tmp_path / "model"), "--index", str(tmp_path / "index")]  # fmt: skip
    assert main(argv) == 2
    assert "pip install 'ray[data]" in capsys.readouterr().err


def test_a_runner_never_touches_files_outside_the_audio_folder(tmp_path):
    from amg_engine.jobs.results import result_schema
    from amg_engine.jobs.runner import BatchRunner

    victim = tmp_path / "out" / "victim.flac"
    victim.parent.mkdir()
    victim.write_bytes(b"keep me")
    store = ResultStore(tmp_path / "out")
    store.prepare()
    schema = result_schema(pa.schema([("id", pa.string()), ("prompt", pa.string())]))
    (res,) = BatchRunner(FakeEngine(), store, schema).run([(0, {"id": "../victim", "prompt": "x"})])
    assert res["status"] == "error" and "not a safe file name" in res["error"]
    assert victim.read_bytes() == b"keep me"


def test_transition_strategy_rows_record_no_detector_values(tmp_path, tmp_path_factory):
    """--strategy transition runs no detector: no similarity, no neighbour ids; guided steps = pre-TP."""
    from jobs_helpers import FAST_FLAGS, tiny_assets

    from amg_engine.jobs.cli import main

    root = tiny_assets(tmp_path_factory)
    m = write_manifest(
        tmp_path / "m.parquet", {"id": ["a", "b"], "prompt": ["Wind howling outside", "A warm pad"]}
    )
    args = ["generate", str(m), "--out", str(tmp_path / "o"), "--strategy", "transition", *FAST_FLAGS]
    assert main([*args, "--model", str(root / "model"), "--index", str(root / "index")]) == 0
    res = pq.read_table(tmp_path / "o" / "results.parquet").to_pandas()
    assert (res.status == "ok").all()
    assert res.max_similarity.isna().all()
    assert all(all(n is None for n in ids) for ids in res.trace_neighbour_id)
    assert (res.guided_steps >= 1).all()  # the first steps always precede the transition point


def test_a_folder_copied_without_its_times_resumes_without_regenerating(tmp_path):
    import shutil

    m = good_manifest(tmp_path / "m.parquet", 6)
    _, first, _ = _run(m, tmp_path / "out")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy, copy_function=shutil.copyfile)  # new modification times
    times = [(copy / p).stat().st_mtime_ns for p in first["audio_path"].to_pylist()]
    assert times != first["audio_mtime_ns"].to_pylist()
    _, again, engine = _run(m, copy)
    assert engine.calls == [] and again["audio_sha256"].to_pylist() == first["audio_sha256"].to_pylist()


def test_a_real_change_of_an_audio_file_regenerates_its_row(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 4), tmp_path / "out"
    _, first, _ = _run(m, out, audio_format="wav")
    path = out / first["audio_path"][2].as_py()
    size = path.stat().st_size
    sf.write(path, np.full(sf.info(path).frames, 0.5), 8000, subtype="PCM_16")  # other audio, same size
    assert path.stat().st_size == size
    _, res, engine = _run(m, out, audio_format="wav")
    assert _generated(engine) == ["row-0002"]
    assert (
        sha256_stream(path) == res["audio_sha256"][2].as_py() == first["audio_sha256"][2].as_py()
    )  # rewritten


def test_rows_written_before_digests_were_recorded_still_need_the_time(tmp_path):
    m, out = good_manifest(tmp_path / "m.parquet", 3), tmp_path / "out"
    _run(m, out)
    (part,) = ResultStore(out).part_files()
    pq.write_table(pq.read_table(part).drop_columns(["audio_sha256"]), part)  # as an older version wrote it
    path = out / "audio" / "row-0001.flac"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    _, res, engine = _run(m, out)
    assert _generated(engine) == ["row-0001"] and res["audio_sha256"][0].as_py() is None
