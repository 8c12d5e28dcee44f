"""What identifies a result: the index and the model by content, cached digests, the threshold.

A rerun skips a row only when its configuration, model weights and *index* are the ones it was made
with: another index (other training clips, embedder or checkpoint) regenerates every row; the same
index copied elsewhere, another batch size or another replica threshold regenerates none.
"""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from jobs_helpers import FAST_FLAGS, good_manifest, tiny_assets

from amg_engine.jobs.cli import main


def _parts(out) -> int:
    return len(list((out / "results").glob("part-*.parquet")))


def test_only_another_index_regenerates_the_rows(tmp_path, tmp_path_factory, capsys):
    from amg_engine.index.build import build_from_manifest
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import index_id

    assets = tiny_assets(tmp_path_factory)
    m, out = good_manifest(tmp_path / "m.parquet", 4), tmp_path / "out"
    base = ["generate", str(m), "--out", str(out), "--model", str(assets / "model"), *FAST_FLAGS]
    assert main([*base, "--index", str(assets / "index")]) == 0
    parts = _parts(out)
    copy = tmp_path / "copied-index"
    shutil.copytree(assets / "index", copy)
    for f in copy.iterdir():  # a copy with new times: same content, same id
        os.utime(f, ns=(1, 1))
    assert index_id(copy) == index_id(assets / "index")
    for flags in (["--index", str(copy)], ["--index", str(copy), "--batch-size", "3", "--threshold", "0.5"]):
        capsys.readouterr()
        assert main([*base, *flags]) == 0
        assert (
            _parts(out) == parts and "4 rows kept from earlier runs, 0 generated" in capsys.readouterr().out
        )

    train = assets / "train" / "train.parquet"
    t = pq.read_table(train).slice(0, 20)  # another training set: its first 20 clips
    paths = [str((train.parent / p).resolve()) for p in t.column("path").to_pylist()]
    pq.write_table(t.set_column(t.schema.get_field_index("path"), "path", [paths]), tmp_path / "sub.parquet")
    build_from_manifest(tmp_path / "sub.parquet", MelEmbedder(), tmp_path / "other-index", progress=False)
    capsys.readouterr()
    assert main([*base, "--index", str(tmp_path / "other-index")]) == 0
    printed = capsys.readouterr().out
    assert "rows: 4 ok, 0 error" in printed and "kept from earlier runs" not in printed  # all 4 again
    res = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["index_id"] for r in res} == {index_id(tmp_path / "other-index")}
    assert {r["neighbour_id"] for r in res} <= set(pq.read_table(tmp_path / "sub.parquet")["id"].to_pylist())


def test_threshold_flag_is_validated_and_used(tmp_path, tmp_path_factory, capsys):
    assets = tiny_assets(tmp_path_factory)
    m = good_manifest(tmp_path / "m.parquet", 2)
    base = [
        "generate",
        str(m),
        "--model",
        str(assets / "model"),
        "--index",
        str(assets / "index"),
        *FAST_FLAGS,
    ]
    assert main([*base, "--out", str(tmp_path / "bad"), "--threshold", "1.5"]) == 2
    assert "threshold=1.5" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "out"), "--threshold", "-1"]) == 0
    assert "memorization threshold -1.0: 2" in capsys.readouterr().out  # every row is at or above -1


def test_digests_stream_and_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib

    from amg_engine.index import files

    monkeypatch.setenv("AMG_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3 * files.CHUNK // 2))  # more than one chunk
    calls = []
    real = files.sha256_stream
    monkeypatch.setattr(files, "sha256_stream", lambda p: calls.append(p) or real(p))
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert files.file_digest(path, 64) == want and len(calls) == 1
    files._memo.clear()  # another process: only the on-disk cache is shared
    assert files.file_digest(path, 12) == want[:12] and len(calls) == 1
    path.write_bytes(b"changed")  # other size and mtime: hashed again
    assert files.file_digest(path) == hashlib.sha256(b"changed").hexdigest()[:16] and len(calls) == 2


def test_model_id_covers_a_ckpt_and_refuses_pickled_code(tmp_path, tmp_path_factory):
    import argparse

    from amg_engine.engine.models import load_model, model_id
    from amg_engine.index.files import UntrustedCheckpoint

    assets = tiny_assets(tmp_path_factory)
    ckpt_dir = tmp_path / "ckpt-model"
    shutil.copytree(assets / "model", ckpt_dir)
    from safetensors.torch import load_file

    state = load_file(ckpt_dir / "model.safetensors")
    (ckpt_dir / "model.safetensors").unlink()
    torch.save({"state_dict": state}, ckpt_dir / "model.ckpt")
    assert model_id(ckpt_dir).startswith("ckpt-model:") and "unknown" not in model_id(ckpt_dir)
    load_model(ckpt_dir)  # tensors only: loads with weights_only=True
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1e-4)}, ckpt_dir / "model.ckpt")
    with pytest.raises(UntrustedCheckpoint, match="--trust-checkpoint"):
        load_model(ckpt_dir)
    load_model(ckpt_dir, trust_checkpoint=True)


def test_neighbour_conditioning_is_cached_as_copies(tmp_path_factory):
    """Each cached row owns its memory: a view would keep its whole encoded batch alive."""
    from amg_engine.engine.config import EngineConfig
    from amg_engine.engine.engine import Engine

    assets = tiny_assets(tmp_path_factory)
    engine = Engine(EngineConfig(), assets / "model", assets / "index")
    rows = engine._encode_training_captions([0, 1, 2])
    for c in rows:
        t = c.cross_attn
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_sao_presets_sample_with_the_brownian_tree():
    from amg_engine.engine.config import PRESETS

    assert PRESETS["sao-paper"].sampler.noise == PRESETS["sao-demo"].sampler.noise == "brownian"
    assert PRESETS["default-model"].sampler.noise == "gaussian"


def test_the_resume_key_holds_the_precision_the_device_runs_in():
    """An unset precision is the device's default (fp32 on CPU, bf16 on CUDA): the key holds the one
    resolved, so a run resumed on another device regenerates, and a precision given explicitly keys
    like the same precision chosen by default (issue 26, item 4)."""
    from dataclasses import replace

    from amg_engine.engine.config import PRESETS

    base = PRESETS["default-model"]  # device cpu, precision unset
    cuda = replace(base, device="cuda")
    assert base.config_hash() != cuda.config_hash()
    assert replace(base, precision="bf16").config_hash() == cuda.config_hash()
    assert replace(cuda, precision="fp32").config_hash() == base.config_hash()
    assert replace(base, precision="fp32").config_hash() == base.config_hash()
    assert replace(cuda, device="cuda:1").config_hash() == cuda.config_hash()  # the device only via it
