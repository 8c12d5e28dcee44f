"""Dress rehearsal of the real-use path: Stable Audio Open 1.0 with its T5 prompt encoder and a
LAION-CLAP index of a folder of training audio, through every command as a user types them.

The files are tiny random models in the real layouts (tests/real_path_fixtures.py), so this proves
the plumbing — loading, the index, resume, the audit, Ray, the errors — not what real weights sound
like or how well they memorize: that cannot be run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from jobs_helpers import write_manifest
from real_path_fixtures import T5_MAX_LENGTH, TRAIN, make_real_path

from amg_engine.jobs.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SECONDS = [1.0, 10.5, 47.0]  # the SAO window is 47.55 s
FAST = ["--steps", "2", "--batch-size", "1", "--quiet"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return make_real_path(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def index(real, tmp_path_factory):
    """`amg index build FOLDER --embedder clap --checkpoint …`, as a user types it."""
    out = tmp_path_factory.mktemp("clap-index") / "index"
    argv = ["index", "build", str(real.train), "--out", str(out), "--embedder", "clap",
            "--checkpoint", str(real.clap), "--batch-size", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out


def manifest(path: Path) -> Path:
    prompts = [c for *_, c in TRAIN] + ["A marimba arpeggio"]
    too_long = " ".join(["loop"] * T5_MAX_LENGTH)  # 16 words + </s> = 17 tokens: must not be cut silently
    return write_manifest(path, {
        "id": [f"r{k}" for k in range(len(SECONDS))] + ["long"],
        "prompt": prompts[: len(SECONDS)] + [too_long],
        "seconds": [*SECONDS, 2.0], "seed": [10 + k for k in range(len(SECONDS) + 1)],
    })  # fmt: skip


def generate_argv(m: Path, out: Path, model: Path, index: Path, clap: Path, *extra: str) -> list[str]:
    return ["generate", str(m), "--out", str(out), "--model", str(model), "--index", str(index),
            "--embedder-checkpoint", str(clap), *FAST, *extra]  # fmt: skip


def run_until_first_part(argv: list[str], out: Path, timeout: float = 600) -> None:
    """Run ``amg`` in a subprocess and SIGKILL it as soon as its first result shard exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "amg_engine.jobs.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not list((out / "results").glob("part-*.parquet")):
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before a shard: {proc.stderr.read()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no result shard within the timeout")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def check_results(out: Path, index_dir: Path, expect_ok: int) -> list[dict]:
    from amg_engine.index.store import EmbeddingIndex, index_id

    rows = pq.read_table(out / "results.parquet").to_pylist()
    ids = EmbeddingIndex.load(index_dir).ids
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == expect_ok, [r["error"] for r in rows if r["status"] != "ok"]
    for r in ok:
        info = sf.info(out / r["audio_path"])
        assert (info.samplerate, info.channels, info.frames) == (44100, 2, round(r["seconds"] * 44100))
        assert -1 <= r["final_similarity"] <= 1 and r["neighbour_id"] in ids
        assert len(r["trace_similarity"]) == 2 and set(r["trace_neighbour_id"]) <= set(ids)
        assert r["index_id"] == index_id(index_dir) and r["model_id"].split(":")[1] != "unknown"
    return rows


@pytest.mark.integration
def test_generate_sao_paper_killed_and_resumed(real, index, tmp_path, capsys):
    m, out = manifest(tmp_path / "m.parquet"), tmp_path / "out"
    argv = generate_argv(m, out, real.model, index, real.clap, "--preset", "sao-paper")
    run_until_first_part(argv, out)
    killed = [r for p in (out / "results").glob("part-*.parquet") for r in pq.read_table(p).to_pylist()]
    assert killed and all(r["status"] == "ok" for r in killed)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rows at or above the memorization threshold 0.5" in printed  # CLAP's own level
    rows = check_results(out, index, expect_ok=len(SECONDS))
    long = rows[-1]
    assert long["status"] == "error" and "17 tokens" in long["error"]  # </s> counted, as T5 adds it
    # the killed run's rows are kept, not generated again (the run then compacts the shards into one)
    kept = f"resumed: {len(killed)} rows kept from earlier runs, {len(SECONDS) - len(killed)} generated now"
    assert kept in printed
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[k["id"]]["audio_sha256"] == k["audio_sha256"] for k in killed)
    assert main(argv) == 0  # all done: nothing generated again
    assert f"{len(SECONDS)} rows kept from earlier runs, 0 generated now" in capsys.readouterr().out


def test_generate_sao_demo_from_a_ckpt_model(real, index, tmp_path):
    from amg_engine.engine.models import model_id

    m = write_manifest(tmp_path / "m.parquet", {"id": ["a", "b"], "prompt": ["A warm pad", "Rain"],
                                                  "seconds": [1.0, 47.0]})  # fmt: skip
    argv = generate_argv(m, tmp_path / "out", real.model_ckpt, index, real.clap, "--preset", "sao-demo")
    assert main(argv) == 0
    rows = check_results(tmp_path / "out", index, expect_ok=2)
    assert {r["model_id"] for r in rows} == {model_id(real.model_ckpt)}  # a .ckpt has a real digest


def test_audit_of_the_results_and_of_the_training_folder(real, index, tmp_path):
    m = write_manifest(tmp_path / "m.parquet", {"id": ["a"], "prompt": ["A warm pad"], "seconds": [4.0]})
    assert main(generate_argv(m, tmp_path / "gen", real.model, index, real.clap, "--no-amg")) == 0
    audit = ["audit", str(tmp_path / "gen" / "results.parquet"), "--index", str(index),
             "--embedder-checkpoint", str(real.clap), "--train-audio", str(real.train),
             "--out", str(tmp_path / "aud"), "--quiet"]  # fmt: skip
    assert main(audit) == 0
    summary = json.loads((tmp_path / "aud" / "summary.json").read_text())
    assert summary["n_ok"] == 1 and 0.5 in summary["thresholds"]
    assert (tmp_path / "aud" / "report.html").stat().st_size > 0
    # the training folder audited against its own index: every file finds itself (one definition of a clip)
    own = ["audit", str(real.train), "--index", str(index), "--embedder-checkpoint", str(real.clap),
           "--out", str(tmp_path / "self"), "--quiet"]  # fmt: skip
    assert main(own) == 0
    for r in pq.read_table(tmp_path / "self" / "audit.parquet").to_pylist():
        assert r["nearest_id"] == r["id"] and r["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_ray_engine_with_the_same_flags(real, index, tmp_path):
    pytest.importorskip("ray.data", reason="--engine ray needs the optional ray[data]")
    m = write_manifest(tmp_path / "m.parquet", {"id": ["a"], "prompt": ["Rain"], "seconds": [12.0]})
    local = generate_argv(m, tmp_path / "local", real.model, index, real.clap, "--preset", "sao-paper")
    ray = generate_argv(m, tmp_path / "ray", real.model, index, real.clap, "--preset", "sao-paper",
                        "--engine", "ray", "--ray-actors", "1", "--ray-cpus-per-actor", "0.5")  # fmt: skip
    assert main(ray) == 0 and main(local) == 0
    a, b = check_results(tmp_path / "ray", index, 1), check_results(tmp_path / "local", index, 1)
    for x, y in zip(a, b, strict=True):
        for key in ("config_hash", "model_id", "index_id", "status"):
            assert x[key] == y[key], key
        # another process with its own thread count: equal within float32 rounding through 2 AMG steps
        assert x["final_similarity"] == pytest.approx(y["final_similarity"], abs=1e-4)


@pytest.mark.integration
def test_one_embedding_of_a_clip_in_every_path(real, index):
    """A training file fed back through each path gives its index vector (to 1e-5) and similarity 1
    with its own row: the build and the audit (file reads), the final similarity (in-memory audio,
    rows of different lengths in one batch) and the corrected-mode detector (its cut of the decode).
    """
    from amg_engine.engine.config import PRESETS
    from amg_engine.engine.engine import Engine
    from amg_engine.index.build import read_clip
    from amg_engine.index.store import EmbeddingIndex

    idx = EmbeddingIndex.load(index)
    engine = Engine(PRESETS["default-model"], real.model, index, real.clap)
    rows = [k for k, (_, rate, *_) in enumerate(TRAIN) if rate == engine.sample_rate]  # 44.1 kHz files
    clips = [torch.from_numpy(sf.read(real.train / TRAIN[k][0], dtype="float32")[0].T.copy()) for k in rows]
    batch = torch.zeros(len(rows), 2, max(c.shape[-1] for c in clips))
    for j, c in enumerate(clips):
        batch[j, :, : c.shape[-1]] = c
    seconds = [c.shape[-1] / engine.sample_rate for c in clips]
    want = idx.vectors[[idx.ids.index(TRAIN[k][0]) for k in rows]]
    with torch.no_grad():
        final = engine.embed(batch, engine.lengths(seconds))
        ds = engine.model.pretransform.downsampling_ratio
        engine.decode = lambda latents: batch[..., : latents.shape[-1] * ds]  # the "decode" is the file
        latents = torch.zeros(len(rows), 64, batch.shape[-1] // ds + 1)
        detected = engine.detector(seconds, reference=False)(latents, torch.arange(len(rows)))
        from_file = torch.stack([engine.embedder.embed_window(read_clip(real.train / TRAIN[k][0],
                                                                         engine.embedder)[0][None])[0]
                                 for k in rows])  # fmt: skip
    for got in (final, detected, from_file):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert ((got * want).sum(1) > 1 - 1e-5).all()


def test_bad_input_is_refused_before_anything_is_written(real, index, tmp_path, capsys):
    m = manifest(tmp_path / "m.parquet")
    other = tmp_path / "other-clap.pt"
    from clap_helpers import build_laion_clap, write_clap_checkpoint

    write_clap_checkpoint(build_laion_clap(seed=9), other)
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(real.model, no_t5)
    (no_t5 / "t5" / "model.safetensors").unlink()
    resampled = tmp_path / "index-44k"
    shutil.copytree(index, resampled)
    info = json.loads((resampled / "embedder.json").read_text())
    (resampled / "embedder.json").write_text(json.dumps({**info, "sample_rate": 44100}))
    cases = {
        "no checkpoint": (["--model", str(real.model), "--index", str(index)], "--embedder-checkpoint"),
        "other checkpoint": (
            ["--model", str(real.model), "--index", str(index), "--embedder-checkpoint", str(other)],
            "checkpoint_hash",
        ),  # fmt: skip
        "no T5 weights": (
            ["--model", str(no_t5), "--index", str(index), "--embedder-checkpoint", str(real.clap)],
            "lacks model.safetensors",
        ),  # fmt: skip
        "index rate": (
            ["--model", str(real.model), "--index", str(resampled), "--embedder-checkpoint", str(real.clap)],
            "sample_rate",
        ),  # fmt: skip
    }
    for name, (flags, message) in cases.items():
        for engine in (["--engine", "local"], ["--engine", "ray"]):
            out = tmp_path / f"out-{name}-{engine[1]}".replace(" ", "-")
            assert main(["generate", str(m), "--out", str(out), *flags, *FAST, *engine]) == 2, name
            assert message in capsys.readouterr().err, name
            assert not out.exists(), name


def test_a_checkpoint_that_needs_unpickling_needs_an_explicit_flag(real, tmp_path, capsys):
    import argparse

    ckpt = torch.load(real.clap, weights_only=True)
    ckpt["args"] = argparse.Namespace(amodel="HTSAT-tiny")  # what training scripts often store beside
    pickled = tmp_path / "pickled.pt"
    torch.save(ckpt, pickled)
    argv = ["index", "build", str(real.train), "--out", str(tmp_path / "idx"), "--embedder", "clap",
            "--checkpoint", str(pickled), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not (tmp_path / "idx").exists()
    assert main([*argv, "--trust-checkpoint"]) == 0


@pytest.fixture(scope="module")
def small_model(real, tmp_path_factory):
    """Stable Audio Open Small's layout (rf_denoiser, one seconds_total conditioner, its 11.9 s window)
    with the same T5 prompt encoder, random weights, saved as model_config.json + model.safetensors."""
    import shutil

    from amg_engine.engine.models import build_model, save_model
    from amg_engine.engine.sao import SAO_SMALL_SAMPLE_SIZE, tiny_sao_small_config

    model_dir = tmp_path_factory.mktemp("sao-small") / "stable-audio-open-small"
    shutil.copytree(real.root / "t5-source", model_dir / "t5")
    config = tiny_sao_small_config(sample_size=SAO_SMALL_SAMPLE_SIZE, t5_dir="t5")
    model = build_model(config, model_dir)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "model.model" in name:  # the DiT zero-initialises its in/out convs; make every weight count
            torch.nn.init.normal_(p, std=0.05)
    save_model(model, config, model_dir)
    return model_dir


@pytest.mark.integration
def test_sao_small_with_amg_gate_resume_and_audit(real, index, small_model, tmp_path, capsys):
    """`amg generate --preset sao-small-amg` on SAO Small's layout with the CLAP index, under the
    release gate; the rerun resumes everything; `amg audit` reads the results."""
    m = write_manifest(tmp_path / "m.parquet", {"id": ["a", "b"], "prompt": ["A warm pad", "Rain"],
                                                  "seconds": [1.0, 10.5], "seed": [3, 4]})  # fmt: skip
    out = tmp_path / "out"
    # τ near 1: this random CLAP embeds every clip alike (similarities above CLAP's 0.5), so at its own
    # threshold the gate would reject every row; the plumbing is what is checked here
    gate = ["--max-similarity", "0.9999"]
    argv = generate_argv(m, out, small_model, index, real.clap, "--preset", "sao-small-amg", *gate)
    assert main(argv) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["attempt_similarities"] for r in rows]
    for r in rows:
        assert len(r["trace_similarity"]) == 2 and r["model_id"].startswith("stable-audio-open-small:")
        assert -1 <= r["final_similarity"] < 0.9999 and r["attempts"] >= 1
        assert sf.info(out / r["audio_path"]).frames == round(r["seconds"] * 44100)
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 rows kept from earlier runs, 0 generated now" in capsys.readouterr().out
    audit = ["audit", str(out / "results.parquet"), "--index", str(index), "--embedder-checkpoint",
             str(real.clap), "--out", str(tmp_path / "audit")]  # fmt: skip
    assert main(audit) == 0
