"""The memory-mapped index (issue 30) at small sizes: the same neighbours as the in-memory index on the
bundled data, an identity from the stored digest, builds from precomputed embeddings that resume after
a kill, chunked scans with the twin's tie rule, and faiss without float32 copies or GPU surprises.

Tolerances: a float16 vector differs from its float32 source by at most 2^-11 relative per component,
so a cosine of unit vectors moves by at most 2^-11 ≈ 4.9e-4 (Σ|q_i v_i| ≤ 1); neighbours are compared
where the runner-up is further than twice that from the best.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from jobs_helpers import assert_gates_are_clear, tiny_assets

from amg_engine.engine.default.heldout import HELDOUT_INDEX_DIR
from amg_engine.engine.engine import DEFAULT_INDEX_DIR
from amg_engine.index.embedders import EmbedderMismatch, MelEmbedder
from amg_engine.index.search import FaissSearcher, SearchConfig, gpu_cloneable, make_searcher
from amg_engine.index.store import Column, EmbeddingIndex, VectorFile, index_id, save_mapped

FP16_COS = 2.0**-11  # the largest change of a unit-vector cosine when one side is stored in float16


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The bundled index in memory, and memory-mapped copies in float32 and float16."""
    root = tmp_path_factory.mktemp("mapped")
    bundled = EmbeddingIndex.load(DEFAULT_INDEX_DIR)
    for dtype in ("float32", "float16"):
        save_mapped(bundled, root / dtype, dtype)
    return bundled, root


def test_mapped_index_gives_the_bundled_neighbours(mapped):
    bundled, root = mapped
    xq = EmbeddingIndex.load(HELDOUT_INDEX_DIR).vectors  # real queries: held-out clips, same embedder
    ref = bundled.searcher().search(xq, 5)
    m32, m16 = (EmbeddingIndex.load(root / d) for d in ("float32", "float16"))
    assert m16.vectors.dtype == torch.float16 and m16.precision == "float16" and m32.precision == "float32"
    assert m16.ids == bundled.ids and m16.captions == bundled.captions and m16.seconds == bundled.seconds
    # float32 mapped: the same values through the same product (one chunk): exact by construction
    got = m32.searcher().search(xq, 5)
    assert torch.equal(got.I, ref.I) and torch.equal(got.D, ref.D) and got.ids == ref.ids
    # float16, tie-aware: the top hit is one of the rows within the rounding of the best (the bundled
    # set holds exact duplicates, whose order top-k does not fix); cosines within the rounding
    scores = xq @ bundled.vectors.T  # [B, N]
    near = scores >= scores.max(dim=1, keepdim=True).values - 2 * FP16_COS
    assert near.sum(1).max() < len(bundled) / 4, "the test needs queries with few near-best rows"
    for chunk in (1 << 16, 7):  # one chunk, and a scan in chunks of 7 rows
        got = m16.searcher(SearchConfig(chunk=chunk)).search(xq, 5)
        assert near.gather(1, got.I[:, :1]).all()
        torch.testing.assert_close(got.D[:, 0], ref.D[:, 0], atol=FP16_COS, rtol=0)


def test_mapped_identity_is_the_stored_digest_with_the_precision(mapped, monkeypatch):
    from amg_engine import index

    bundled, root = mapped
    ids = {d: index_id(root / d) for d in ("float32", "float16")}
    assert ids["float32"] != ids["float16"] != index_id(DEFAULT_INDEX_DIR)  # precision is in the key

    def no_hashing(*a, **k):
        raise AssertionError("a memory-mapped index is never rehashed")

    monkeypatch.setattr(index.files, "sha256_stream", no_hashing)
    monkeypatch.setattr(index.files, "file_digest", no_hashing)
    monkeypatch.setattr("amg_engine.index.store.file_digest", no_hashing)
    assert index_id(root / "float16") == ids["float16"]
    assert len(EmbeddingIndex.load(root / "float16")) == len(bundled)


def test_column_reads_rows_on_demand():
    col = Column(pa.chunked_array([["a", "b"], ["c"]]))
    assert len(col) == 3 and col[2] == "c" and col[-1] == "c" and col[0:2] == ["a", "b"]
    assert col == ["a", "b", "c"] and col != ["a", "b"] and "b" in col and col.index("c") == 2
    with pytest.raises(IndexError):
        col[3]


# -- builds from precomputed embeddings -------------------------------------------------------------


def write_embeddings(path: Path, n: int, group: int = 100, info=None, seed: int = 0, **changes) -> np.ndarray:
    """A Parquet file of n unit vectors (the mel embedder's identity), row groups of ``group``."""
    info = MelEmbedder().info if info is None else info
    dim = MelEmbedder().info.dim if info is False else info.dim
    x = unit(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))).numpy()
    x = changes.get("vectors", x)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    meta = {"amg.embedder": info.to_json()} if info is not False else {}
    table = pa.table({
        "id": [f"c{i}" for i in range(n)], "caption": [f"clip {i}" for i in range(n)],
        "vector": vec, "seconds": [1.0 + i for i in range(n)],
    }).replace_schema_metadata(meta)  # fmt: skip
    pq.write_table(table, path, row_group_size=group)
    return x


def test_build_from_embeddings_resumes_after_a_kill(tmp_path, monkeypatch):
    import amg_engine.index.build as build

    x = write_embeddings(tmp_path / "e.parquet", 300)
    whole = build.build_from_embeddings(
        tmp_path / "e.parquet", tmp_path / "whole", batch_rows=40, progress=False
    )
    # float16 storage is numpy's round-to-nearest of the float32 source: the same cast, exact
    assert torch.equal(whole.vectors, torch.from_numpy(x.astype(np.float16)))
    assert whole.ids[299] == "c299" and whole.captions[0] == "clip 0" and whole.seconds[2] == 3.0
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == [
        "embedder.json", "index.json", "items.arrow", "vectors.npy"
    ]  # fmt: skip

    real, calls, kills = build._vectors_of, [], []

    def killed(batch, dim, first_row):
        calls.append(first_row)
        if first_row == 140 and not kills:  # the 2nd batch of the 2nd row group, once
            kills.append(first_row)
            raise KeyboardInterrupt("killed")
        return real(batch, dim, first_row)

    monkeypatch.setattr(build, "_vectors_of", killed)
    with pytest.raises(KeyboardInterrupt):
        build.build_from_embeddings(tmp_path / "e.parquet", tmp_path / "idx", batch_rows=40, progress=False)
    work = tmp_path / "idx" / ".build"
    assert json.loads((work / "progress.json").read_text())["rows"] == 100  # the first row group counted
    assert not (tmp_path / "idx" / "embedder.json").exists()  # not an index yet
    calls.clear()
    build.build_from_embeddings(tmp_path / "e.parquet", tmp_path / "idx", batch_rows=40, progress=False)
    assert calls[0] == 100  # resumed at the first unfinished row group
    assert not work.exists() and index_id(tmp_path / "idx") == index_id(tmp_path / "whole")
    for name in ("vectors.npy", "items.arrow"):
        assert (tmp_path / "idx" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_build_from_embeddings_refuses_what_the_engine_would(tmp_path):
    from amg_engine.index.build import build_from_embeddings

    info = MelEmbedder().info
    cases = {
        "no metadata": (dict(info=False), ValueError, "amg.embedder"),
        "another sample rate": (
            dict(info=type(info)(info.name, 16000, info.dim, info.checkpoint_hash)),
            EmbedderMismatch,
            "sample_rate",
        ),  # fmt: skip
        "not unit-norm": (dict(vectors=np.full((10, info.dim), 0.5, np.float32)), ValueError, "norm"),
    }
    for name, (changes, error, match) in cases.items():
        write_embeddings(tmp_path / f"{name}.parquet", 10, **changes)
        with pytest.raises(error, match=match):
            build_from_embeddings(tmp_path / f"{name}.parquet", tmp_path / name, progress=False)
        assert not (tmp_path / name / "embedder.json").exists()


def test_duplicate_or_missing_ids_are_refused_and_hash_collisions_are_not(monkeypatch):
    import amg_engine.index.build as build

    ids = [f"c{i}" for i in range(1000)]
    column = pa.chunked_array([ids[:300], ids[300:]])  # two chunks, as a file of two batches reads
    build.check_unique_ids(column, batch_rows=64)
    with pytest.raises(ValueError, match=r"duplicate ids: 'c17' at rows 17 and 999"):
        build.check_unique_ids(pa.chunked_array([ids[:999] + ["c17"]]), batch_rows=64)
    with pytest.raises(ValueError, match="row 500 of the source has no id"):
        build.check_unique_ids(pa.chunked_array([ids[:500] + [None] + ids[501:]]), batch_rows=64)
    # every id hashing alike: distinct ids still pass (compared as strings), a repeat is still found
    monkeypatch.setattr(build, "hash", lambda text: 7, raising=False)
    build.check_unique_ids(column, batch_rows=64)
    with pytest.raises(ValueError, match=r"'c5' at rows 5 and 400"):
        build.check_unique_ids(pa.chunked_array([ids[:400] + ["c5"] + ids[401:]]), batch_rows=64)


def test_cli_builds_from_embeddings(tmp_path, capsys):
    from amg_engine.index.cli import main

    write_embeddings(tmp_path / "e.parquet", 20)
    assert main(["build", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    assert main(["info", str(tmp_path / "idx")]) == 0
    assert "20 x 1024 (float16)" in capsys.readouterr().out


def _as_other_tools_write(path: Path, x: np.ndarray, vtype, meta: bool = True) -> None:
    """The embeddings as pandas, Spark or Hugging Face datasets write them: ``vector`` a plain list
    (of ``vtype``), ids as integers, and (meta=False) no amg.embedder metadata."""
    n = len(x)
    table = pa.table({
        "id": pa.array(range(n), pa.int64()), "caption": [f"clip {i}" for i in range(n)],
        "vector": pa.array(list(x), vtype),
    })  # fmt: skip
    if meta:
        table = table.replace_schema_metadata({"amg.embedder": MelEmbedder().info.to_json()})
    pq.write_table(table, path, row_group_size=7)


@pytest.mark.parametrize(
    "vtype",
    [pa.list_(pa.float32()), pa.large_list(pa.float64()), pa.list_(pa.float16())],
    ids=["list-float32", "large_list-float64", "list-float16"],
)
def test_build_from_embeddings_other_tools_wrote(tmp_path, vtype):
    """Plain lists of any float width give the index the fixed-size file gives (float64 values that are
    float32 values cast exactly, so the stored float16 is the same cast); integer ids become strings."""
    from amg_engine.index.build import build_from_embeddings

    x = write_embeddings(tmp_path / "fixed.parquet", 30)
    want = build_from_embeddings(tmp_path / "fixed.parquet", tmp_path / "fixed", progress=False)
    source = x.astype(np.float16) if vtype.value_type == pa.float16() else x
    _as_other_tools_write(tmp_path / "plain.parquet", source, vtype)
    got = build_from_embeddings(tmp_path / "plain.parquet", tmp_path / "plain", progress=False)
    assert torch.equal(got.vectors, want.vectors)
    assert got.ids[29] == "29" and got.captions[3] == "clip 3" and got.embedder == want.embedder


def test_build_from_embeddings_refuses_a_row_of_the_wrong_length(tmp_path):
    from amg_engine.index.build import build_from_embeddings

    x = list(write_embeddings(tmp_path / "e.parquet", 12))
    x[9] = x[9][:-1] / np.linalg.norm(x[9][:-1])  # unit-norm, one value short
    table = pa.table({"id": [f"c{i}" for i in range(12)], "caption": ["c"] * 12,
                      "vector": pa.array(x, pa.list_(pa.float32()))})  # fmt: skip
    pq.write_table(table.replace_schema_metadata({"amg.embedder": MelEmbedder().info.to_json()}),
                   tmp_path / "short.parquet", row_group_size=5)  # fmt: skip
    with pytest.raises(ValueError, match="row 9 has a vector of 1023 values; the embedder's dimension is"):
        build_from_embeddings(tmp_path / "short.parquet", tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx" / "embedder.json").exists()


def test_a_file_without_the_identity_is_built_with_the_named_embedder(tmp_path, capsys):
    """No amg.embedder metadata: refused unless --embedder names the embedder (its declared identity
    is then the index's); CLAP needs its checkpoint; a file whose metadata names another is refused."""
    from amg_engine.index.build import build_from_embeddings
    from amg_engine.index.cli import main

    x = write_embeddings(tmp_path / "meta.parquet", 16)
    _as_other_tools_write(tmp_path / "bare.parquet", x, pa.list_(pa.float32()), meta=False)
    with pytest.raises(ValueError, match="--embedder mel"):
        build_from_embeddings(tmp_path / "bare.parquet", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="--embedder clap needs --checkpoint"):
        build_from_embeddings(tmp_path / "bare.parquet", tmp_path / "b", progress=False, embedder="clap")
    with pytest.raises(ValueError, match="records embedder 'mel-pattern-v2', not 'laion-clap-htsat-tiny'"):
        build_from_embeddings(tmp_path / "meta.parquet", tmp_path / "c", progress=False, embedder="clap")
    assert main(["build", str(tmp_path / "bare.parquet"), "--out", str(tmp_path / "d"), "--embedder", "mel",
                 "--quiet"]) == 0  # fmt: skip
    built = EmbeddingIndex.load(tmp_path / "d")
    assert built.embedder == MelEmbedder().info and len(built) == 16
    assert main(["build", str(tmp_path / "bare.parquet"), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "--embedder mel|clap" in capsys.readouterr().err


# -- chunked scans and faiss --------------------------------------------------------------------------


def test_chunked_scan_is_the_twin_with_its_tie_rule():
    """Exact by construction: components in multiples of 1/4 and queries of norm 2 (four ±1 entries),
    so every product is an exact sum of multiples of 1/8 in any order; duplicated rows tie exactly."""
    from amg_engine.engine.guidance import scan_chunked
    from amg_engine.kernels.nn_search import nn_search_ref

    g = torch.Generator().manual_seed(0)
    xb = torch.randint(-1, 2, (50, 16), generator=g).float() / 4  # products below 1 but for the planted
    xq = torch.zeros(9, 16)
    for r in range(9):
        xq[r, torch.randperm(16, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    xb[3], xb[11] = xq[0] / 2, xq[1] / 2  # queries 0 and 1 best match rows 3 and 11 (product 1) ...
    xb[37], xb[45] = xb[3], xb[11]  # ... and their copies in later chunks: the lower row must win
    for dtype in (torch.float32, torch.float16):  # multiples of 1/4 are exact in float16
        want = nn_search_ref(xq, xb.to(dtype))
        for chunk in (1, 7, 16, 50, 64):
            got = scan_chunked(xq, xb.to(dtype), chunk)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, chunk)
        assert want[1][:2].tolist() == [3, 11]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_vector_file_reads_the_rows_a_memory_map_reads(tmp_path, dtype):
    """Positioned reads give the map's rows: slices (open, empty, negative, past the end) and integer
    arrays in any order with repeats, in the stored dtype; out-of-range rows are refused."""
    x = np.random.default_rng(0).standard_normal((1000, 24)).astype(dtype)
    np.save(tmp_path / "v.npy", x)
    f, m = VectorFile(tmp_path / "v.npy"), np.load(tmp_path / "v.npy", mmap_mode="r")
    assert f.shape == m.shape and f.dtype == m.dtype and len(f) == 1000
    for key in (slice(0, 1000), slice(17, 530), slice(990, 2000), slice(5, 5), slice(-10, None), slice(None)):
        got = f[key]
        assert got.dtype == m.dtype and np.array_equal(got, m[key]), key
    for rows in ([3, 1, 2, 2, 999, 0], [500], [], np.arange(100, 300), [-1, 7, 8, 9, 400]):
        assert np.array_equal(f[np.asarray(rows, dtype=np.int64)], m[np.asarray(rows, dtype=np.int64)]), rows
    with pytest.raises(IndexError):
        f[np.array([1000])]
    with pytest.raises(IndexError):
        f[0:10:2]


def test_faiss_over_a_mapped_index_reads_rows_not_the_map(tmp_path, monkeypatch):
    """make_searcher fills and re-scores faiss from the file (VectorFile), never by slicing the mapped
    tensor, and answers as a searcher given the vectors themselves does."""
    x = write_embeddings(tmp_path / "e.parquet", 3000, group=1000)
    from amg_engine.index.build import build_from_embeddings

    index = build_from_embeddings(tmp_path / "e.parquet", tmp_path / "idx", progress=False)
    assert isinstance(index.row_source(), VectorFile)
    assert EmbeddingIndex.load(DEFAULT_INDEX_DIR).row_source() is not None  # the in-memory layout: vectors
    config = SearchConfig(kind="faiss", factory="IVF8,PQ16", params={"nprobe": 4}, refine=10, cache=False)
    noise = torch.randn(40, x.shape[1], generator=torch.Generator().manual_seed(2))
    xq = unit(torch.from_numpy(x[:40]) + 0.02 * noise)
    want = FaissSearcher(index.vectors, "IVF8,PQ16", params={"nprobe": 4}, gpu=False, refine=10).search(xq, 3)
    touched = []
    real = FaissSearcher.__init__

    def spy(self, xb, *a, **k):
        touched.append(type(xb))
        real(self, xb, *a, **k)

    monkeypatch.setattr(FaissSearcher, "__init__", spy)
    got = make_searcher(index, config).search(xq, 3)
    assert touched == [VectorFile]
    assert torch.equal(got.I, want.I) and torch.equal(got.D, want.D)


def test_faiss_never_copies_the_index_to_float32(tmp_path):
    """A float16 index of 10^6 x 16 is 32 MB; a float32 copy 64 MB. Filling faiss chunk by chunk
    allocates 65,536-row float32 chunks (4.2 MB; the next may be made before the last is freed)."""
    import tracemalloc

    xb = unit(torch.randn(1_000_000, 16, generator=torch.Generator().manual_seed(0))).half()
    tracemalloc.start()
    FaissSearcher(xb.numpy(), "Flat", gpu=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16e6, f"{peak / 1e6:.1f} MB allocated while filling faiss: a copy of the whole index"


def test_faiss_gpu_refuses_what_its_cloner_cannot_take():
    assert (
        gpu_cloneable("Flat", 32) and gpu_cloneable("IVF16,PQ8", 32) and gpu_cloneable("PCA16,IVF4,Flat", 32)
    )
    assert not gpu_cloneable("HNSW32", 32) and not gpu_cloneable("IVF16,PQ8x4fs", 32)
    xb = unit(torch.randn(500, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="cannot go to the GPU"):
        FaissSearcher(xb, "HNSW32", gpu=True)
    with pytest.raises(ValueError, match="cannot go to the GPU"):
        make_searcher(
            EmbeddingIndex.load(DEFAULT_INDEX_DIR), SearchConfig(kind="faiss", factory="HNSW8", gpu=True)
        )


def test_audit_refuses_an_uncloneable_gpu_factory_before_any_work(tmp_path):
    from amg_engine.jobs.audit import AuditConfig, run_audit

    config = AuditConfig(search=SearchConfig(kind="faiss", factory="HNSW32", gpu=True))
    with pytest.raises(ValueError, match="cannot go to the GPU"):
        run_audit(tmp_path / "nothing-here", DEFAULT_INDEX_DIR, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("factory", ["IVF8,PQ16", "IVF8,PQ16x4fs"])  # 8-bit codes, 4-bit fast-scan codes
def test_faiss_structure_is_kept_with_a_mapped_index_and_refined_exactly(tmp_path, monkeypatch, factory):
    x = write_embeddings(tmp_path / "e.parquet", 2000, group=500)
    from amg_engine.index.build import build_from_embeddings

    index = build_from_embeddings(tmp_path / "e.parquet", tmp_path / "idx", progress=False)
    config = SearchConfig(kind="faiss", factory=factory, params={"nprobe": 8}, refine=20)
    xq = unit(
        torch.from_numpy(x[:50])
        + 0.01 * torch.randn(50, x.shape[1], generator=torch.Generator().manual_seed(1))
    )
    first = make_searcher(index, config).search(xq, 3)
    assert len(list((tmp_path / "idx" / "faiss").glob("*.faissindex"))) == 1

    def no_training(*a, **k):
        raise AssertionError("the kept structure is read, not rebuilt")

    monkeypatch.setattr(FaissSearcher, "__init__", no_training)
    again = make_searcher(EmbeddingIndex.load(tmp_path / "idx"), config).search(xq, 3)
    assert torch.equal(again.I, first.I) and torch.equal(again.D, first.D)
    # refined: the similarities are the exact products with the stored (float16) rows, in order
    exact = (xq[:, None, :] * index.vectors[first.I].float()).sum(-1)
    torch.testing.assert_close(first.D, exact, atol=1e-6, rtol=1e-6)
    assert (first.I[:, 0] == torch.arange(50)).float().mean() == 1.0  # near-copies found with nprobe = nlist


# -- the engine and the audit against a memory-mapped index --------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny assets' model, and their index in the in-memory layout and memory-mapped in float16."""
    assets = tiny_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("tiny-pair")
    index = EmbeddingIndex.load(assets / "index")
    EmbeddingIndex(torch.as_tensor(index.vectors).float().clone(), list(index.ids), list(index.captions),
                   [float(s) for s in index.seconds], index.embedder).save(root / "in-memory")  # fmt: skip
    save_mapped(index, root / "float16", "float16")
    return assets, root


def test_engine_run_against_a_mapped_index_finds_the_same_neighbours(tiny_pair, monkeypatch):
    """The AMG run's per-step neighbours and the final ones, in-memory float32 vs memory-mapped
    float16 scanned in chunks of 5 rows. The gates are compared only where no σ_t lies within the
    float16 rounding (plus the float32 drift of jobs_helpers.GATE_MARGIN) of λ_t."""
    from dataclasses import replace

    import amg_engine.engine.guidance as guidance
    from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
    from amg_engine.engine.engine import Engine, Request

    assets, root = tiny_pair
    real = guidance.scan_chunked
    monkeypatch.setattr(guidance, "scan_chunked", lambda xq, xb: real(xq, xb, 5))
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.55, lambda_max=0.65)
    s = SamplerConfig(sampler="dpmpp-2m-sde", steps=4, sigma_min=0.05, sigma_max=20.0)
    prompts = ["An acoustic drum loop, 90 bpm", "A warm synth pad playing a C major chord", "Rain"]
    reqs = [Request(f"r{i}", prompts[i % 3], 0.5 + 0.1 * i, 7 + i) for i in range(4)]
    runs = {}
    for name in ("in-memory", "float16"):
        engine = Engine(EngineConfig(replace(g), s), assets / "model", root / name)
        runs[name] = (engine.generate(reqs), engine.index_id)
    (mem, mem_id), (f16, f16_id) = runs["in-memory"], runs["float16"]
    assert mem_id != f16_id  # another precision, another resume key
    sims = [[t["similarity"] for t in r.trace] for r in mem]
    lams = [[t["lambda"] for t in r.trace] for r in mem]
    assert_gates_are_clear(sims, lams, margin=2 * FP16_COS)
    gates = [t["gate"] for r in mem for t in r.trace]
    assert any(gates) and not all(gates), "the test needs open and closed gates"
    for a, b in zip(mem, f16, strict=True):
        assert [t["neighbour"] for t in a.trace] == [t["neighbour"] for t in b.trace]
        assert [t["gate"] for t in a.trace] == [t["gate"] for t in b.trace]
        assert a.neighbour == b.neighbour
        assert a.final_similarity == pytest.approx(b.final_similarity, abs=2 * FP16_COS)


def test_audit_against_a_mapped_index_finds_the_same_neighbours(tiny_pair, tmp_path):
    from amg_engine.jobs.audit import AuditConfig, run_audit

    assets, root = tiny_pair
    audio = tmp_path / "audio"  # the tiny training set's own clips: each has itself as nearest clip
    train = pq.read_table(assets / "train" / "train.parquet").slice(0, 6).to_pylist()
    audio.mkdir()
    for row in train:
        shutil.copyfile(assets / "train" / row["path"], audio / f"{row['id']}.wav")  # a link out is refused
    tables = {}
    for name in ("in-memory", "float16"):
        config = AuditConfig(k=3, attributes=False, pairs=2)
        run_audit(audio, root / name, tmp_path / name, config, progress=False)
        tables[name] = pq.read_table(tmp_path / name / "audit.parquet").to_pylist()
    for a, b in zip(tables["in-memory"], tables["float16"], strict=True):
        assert a["status"] == b["status"] == "ok" and a["nearest_id"] == b["nearest_id"]
        assert a["similarity"] == pytest.approx(b["similarity"], abs=FP16_COS)
        gaps = np.diff(a["neighbour_similarities"])
        if (np.abs(gaps) > 2 * FP16_COS).all():  # the order of the k is fixed where no two are close
            assert a["neighbour_ids"] == b["neighbour_ids"]


def test_cli_audit_on_cuda_refuses_hnsw_before_any_work(tmp_path, capsys):
    from amg_engine.jobs.cli import main

    audio = tmp_path / "audio"
    audio.mkdir()
    args = [
        "audit", str(audio), "--out", str(tmp_path / "out"), "--search", "faiss", "--faiss-factory", "HNSW32",
        "--device", "cuda", "--faiss-nprobe", "4", "--faiss-refine", "10", "--no-attributes",
    ]  # fmt: skip
    assert main(args) == 2
    assert "cannot go to the GPU" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_audit_keeps_faiss_on_the_cpu_when_asked():
    """--device cuda sends faiss to the GPU (where a fast-scan factory is refused); --faiss-cpu keeps it
    on the CPU while the embedder and exact search go to the GPU."""
    from amg_engine.index.search import check_config
    from amg_engine.jobs.cli import audit_search_config, build_parser

    base = ["audit", "x", "--out", "y", "--search", "faiss", "--faiss-factory", "IVF16,PQ8x4fs",
            "--device", "cuda"]  # fmt: skip
    on_gpu = audit_search_config(build_parser().parse_args(base))
    assert on_gpu.gpu
    with pytest.raises(ValueError, match="--faiss-cpu"):
        check_config(on_gpu, 32)
    on_cpu = audit_search_config(build_parser().parse_args([*base, "--faiss-cpu"]))
    assert on_cpu.gpu is False
    check_config(on_cpu, 32)
    assert not audit_search_config(build_parser().parse_args(base[:-2])).gpu  # --device cpu


def test_exact_search_sharded_over_devices_equals_one_device():
    """Shards on a list of devices (here two "devices" that are both the CPU: the code path a list of
    GPUs takes, not run on GPUs here) merge to the single scan's result. Shard boundaries move the
    chunk boundaries, so the products may differ in the last bit: the top neighbour is compared
    exactly where the runner-up is more than 1e-4 below it, the top-5 similarities to 1e-6 (float32
    rounding of a 32-term dot product of unit vectors is below 1e-6)."""
    from amg_engine.index.search import ExactSearcher

    g = torch.Generator().manual_seed(0)
    xb, xq = unit(torch.randn(1000, 32, generator=g)).half(), unit(torch.randn(20, 32, generator=g))
    one = ExactSearcher(xb, chunk=64).search(xq, 5)
    clear = (one.D[:, 0] - one.D[:, 1]) > 1e-4
    assert clear.sum() >= 15, "the test needs queries without a near-tie for the top"
    for shards in (None, 3):
        many = ExactSearcher(xb, shards=shards, chunk=64, devices=["cpu", "cpu"]).search(xq, 5)
        assert len(ExactSearcher(xb, shards=shards, devices=["cpu", "cpu"]).shards) == (shards or 2)
        assert torch.equal(many.I[clear, 0], one.I[clear, 0])
        torch.testing.assert_close(many.D, one.D, atol=1e-6, rtol=0)
