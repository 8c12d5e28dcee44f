"""The per-step search over an index spread across devices (engine/shards.py, issue 30 item 3).

No machine here has two GPUs: the shards live on a list of "devices" that are all the CPU, which is
the code path a list of GPUs takes (copies to each shard's device, merge on the primary one). What
this cannot show is the speed or the memory of real GPUs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jobs_helpers import assert_gates_are_clear, tiny_assets

import amg_engine.engine.shards as shards
from amg_engine.engine.guidance import scan_chunked
from amg_engine.engine.shards import ShardedVectors, index_rows, nearest, resolve_devices, shard_bounds

CPU = torch.device("cpu")


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_sharded_search_equals_one_search(parts):
    """Neighbours equal where the runner-up is clearly below the best; similarities to 1e-6 (a product
    of unit vectors summed in another order moves by less)."""
    g = torch.Generator().manual_seed(parts)
    xb, xq = unit(torch.randn(1000, 32, generator=g)).half(), unit(torch.randn(24, 32, generator=g))
    sim, idx = scan_chunked(xq, xb)
    top2 = (xq @ xb.float().T).topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.sum() >= 18, "the test needs queries without a near-tie for the top"
    sv = ShardedVectors.split(xb, [CPU] * parts, CPU)
    assert [s.shape[0] for s in sv.shards] == np.diff(shard_bounds(1000, parts)).tolist()
    assert sv.dtype == torch.float16 and sv.shape == (1000, 32) and len(sv) == 1000
    s_sim, s_idx = nearest(xq, sv, scan_chunked)
    assert torch.equal(s_idx[clear], idx[clear])
    torch.testing.assert_close(s_sim, sim, atol=1e-6, rtol=0)


def test_a_tie_across_shards_goes_to_the_lowest_row():
    """One-hot rows make every similarity one query component, exactly: rows 3, 400 and 900 are the
    same vector, in three different shards, and the lowest of them must win as in one search."""
    xb = torch.zeros(1000, 16)
    xb[torch.arange(1000), torch.arange(1000) % 16] = 1.0
    xb[[3, 400, 900]] = 0.0
    xb[[3, 400, 900], 15] = 1.0
    xb[15::16] = unit(torch.ones(16))  # no other row is e_15
    xq = torch.zeros(2, 16)
    xq[:, 15] = 1.0
    sv = ShardedVectors.split(xb, [CPU] * 3, CPU)
    assert sv.starts == (0, 333, 667, 1000)
    sim, idx = sv.nearest(xq, scan_chunked)
    assert idx.tolist() == [3, 3] and sim.tolist() == [1.0, 1.0]
    assert scan_chunked(xq, xb)[1].tolist() == [3, 3]  # the one-device search agrees


def test_rows_of_global_indices_are_the_index_rows():
    g = torch.Generator().manual_seed(1)
    xb = unit(torch.randn(101, 8, generator=g))
    sv = ShardedVectors.split(xb, [CPU] * 4, CPU)
    idx = torch.tensor([0, 100, 25, 26, 50, 51, 75, 76, 25])  # both sides of every boundary, repeats
    assert torch.equal(sv.rows(idx), xb[idx])
    assert torch.equal(index_rows(sv, idx), index_rows(xb, idx))


def test_split_copies_a_memory_map_a_chunk_at_a_time(tmp_path, monkeypatch):
    """A float16 .npy memory map (the index layout at scale) is split without a float32 copy, in
    chunks of SPLIT_CHUNK rows, into shards equal to its rows."""
    g = np.random.default_rng(0)
    path = tmp_path / "vectors.npy"
    np.save(path, g.standard_normal((50, 8)).astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    monkeypatch.setattr(shards, "SPLIT_CHUNK", 7)
    for source in (mapped, torch.from_numpy(np.array(mapped))):
        sv = ShardedVectors.split(source, [CPU] * 3, CPU)
        assert sv.dtype == torch.float16
        assert torch.equal(torch.cat(sv.shards), torch.from_numpy(np.array(mapped)))


def test_the_devices_of_the_index_are_checked():
    assert resolve_devices("", "cpu") == (CPU,)
    assert resolve_devices(None, "cpu") == (CPU,)
    assert resolve_devices("all", "cpu") == (CPU,)  # no CUDA device to spread over
    assert resolve_devices("cpu", "cpu") == (CPU,)
    with pytest.raises(ValueError, match="listed twice"):
        resolve_devices("cuda:0,cuda:0", "cpu")
    with pytest.raises(ValueError, match="does not exist here"):
        resolve_devices(f"cuda:{torch.cuda.device_count()}", "cpu")
    with pytest.raises(ValueError, match="bogus"):
        resolve_devices("bogus", "cpu")
    with pytest.raises(ValueError, match="at least one device"):
        resolve_devices(",", "cpu")


def test_index_devices_is_validated_and_not_in_the_resume_key():
    from amg_engine.engine.config import EngineConfig

    assert EngineConfig(index_devices="all").config_hash() == EngineConfig().config_hash()
    with pytest.raises(ValueError, match="index_devices"):
        EngineConfig(index_devices=["cuda:0"])


def test_cli_passes_index_devices():
    from amg_engine.jobs.cli import _engine_config, build_parser

    args = build_parser().parse_args(["generate", "m.parquet", "--out", "o", "--index-devices", "all"])
    assert _engine_config(args).index_devices == "all"


def test_an_amg_run_over_a_sharded_index_is_the_one_device_run(tmp_path_factory, monkeypatch):
    """The AMG step's search, the gradient's neighbour rows and the final search, with the tiny assets'
    index in three shards: the same neighbours and gates at every step and the same audio (gates
    compared only with a clear margin, audio to float32 rounding)."""
    from amg_engine.engine import engine as engine_mod
    from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
    from amg_engine.engine.engine import Engine, Request

    assets = tiny_assets(tmp_path_factory)
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.55, lambda_max=0.65)
    s = SamplerConfig(sampler="dpmpp-2m-sde", steps=4, sigma_min=0.05, sigma_max=20.0)
    prompts = ["An acoustic drum loop, 90 bpm", "A warm synth pad playing a C major chord", "Rain"]
    reqs = [Request(f"r{i}", prompts[i % 3], 0.5 + 0.1 * i, 7 + i) for i in range(4)]
    one = Engine(EngineConfig(g, s), assets / "model", assets / "index")
    assert isinstance(one.search_vectors, torch.Tensor)
    monkeypatch.setattr(engine_mod, "resolve_devices", lambda spec, device: (CPU,) * 3)
    many = Engine(EngineConfig(g, s, index_devices="cpu"), assets / "model", assets / "index")
    assert isinstance(many.search_vectors, ShardedVectors) and len(many.search_vectors.shards) == 3
    a, b = one.generate(reqs), many.generate(reqs)
    sims, lams = [[t["similarity"] for t in r.trace] for r in a], [[t["lambda"] for t in r.trace] for r in a]
    assert_gates_are_clear(sims, lams)
    assert any(t["gate"] for r in a for t in r.trace), "the test needs open gates (the gradient's rows)"
    for x, y in zip(a, b, strict=True):
        assert [t["neighbour"] for t in x.trace] == [t["neighbour"] for t in y.trace]
        assert [t["gate"] for t in x.trace] == [t["gate"] for t in y.trace]
        assert x.neighbour == y.neighbour
        torch.testing.assert_close(x.audio, y.audio, atol=1e-5, rtol=1e-5)
