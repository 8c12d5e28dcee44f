"""`amg audit`: per-file neighbours, error rows, resumability, statistics and the offline report."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from engine.engine import DEFAULT_INDEX_DIR
from index.store import EmbeddingIndex
from jobs import audit as audit_mod
from jobs.audit import AuditConfig, items_from_source, run_audit, similarity_stats

TRAIN = DEFAULT_INDEX_DIR.parent / "train"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Nine training clips (with sidecar prompts), one of them at another gain, and a corrupt file."""
    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    rows = pq.read_table(TRAIN / "train.parquet").to_pylist()
    for r in rows[:: len(rows) // 8][:8]:
        shutil.copy(TRAIN / r["path"], src / f"{r['id']}.flac")
        (src / f"{r['id']}.txt").write_text(r["caption"])
    x, sr = sf.read(TRAIN / rows[13]["path"], dtype="float32")
    sf.write(src / "sub" / "quiet.wav", 0.3 * x, sr)
    (src / "broken.flac").write_bytes(b"not audio at all")
    return src


def _run(source, out, **kw):
    cfg = AuditConfig(**{"batch_size": 4, "pairs": 3, **kw})
    return run_audit(source, DEFAULT_INDEX_DIR, out, cfg, train_audio=TRAIN / "train.parquet", progress=False)


def test_every_file_gets_a_row_and_neighbours_match_brute_force(folder, tmp_path):
    summary = _run(folder, tmp_path / "out", k=3)
    rows = pq.read_table(tmp_path / "out" / "audit.parquet").to_pylist()
    assert len(rows) == 10 and summary.n_ok == 9 and summary.n_error == 1
    broken = next(r for r in rows if r["id"] == "broken.flac")
    assert broken["status"] == "error" and "broken.flac" in broken["error"] and broken["similarity"] is None
    index = EmbeddingIndex.load(DEFAULT_INDEX_DIR)
    for r in rows:
        if r["status"] != "ok":
            continue
        assert len(r["neighbour_ids"]) == 3 and r["neighbour_similarities"] == sorted(
            r["neighbour_similarities"], reverse=True
        )
        if r["id"].startswith("clip-"):  # a training clip finds itself (or an exact copy) at ≈ 1
            assert r["neighbour_similarities"][0] > 0.999
            own = index.vectors[index.ids.index(r["id"].removesuffix(".flac"))]
            top = index.vectors[index.ids.index(r["nearest_id"])]
            assert torch.allclose(own, top, atol=1e-5)
            assert r["prompt"] == index.captions[index.ids.index(r["id"].removesuffix(".flac"))]
    quiet = next(r for r in rows if r["id"] == "sub/quiet.wav")
    assert quiet["nearest_id"] == index.ids[13] or quiet["neighbour_similarities"][0] > 0.99


def test_summary_statistics_agree_with_the_rows(folder, tmp_path):
    summary = _run(folder, tmp_path / "out", thresholds=(0.95, 0.5))
    sims = np.array([r["similarity"] for r in pq.read_table(tmp_path / "out" / "audit.parquet").to_pylist()
                     if r["status"] == "ok"])  # fmt: skip
    assert summary.thresholds == [0.5, 0.9, 0.95]  # the mel embedder's own 0.9 is added
    assert summary.generated == similarity_stats(sims, summary.thresholds)
    assert summary.generated["share_at_or_above"]["0.95"] == pytest.approx((sims >= 0.95).mean())
    assert sum(summary.histogram["generated"]) == 9
    assert summary.fad is not None and summary.fad >= 0 and summary.kad is not None
    # the exact duplicates of the training set give a background maximum of 1
    assert summary.background["n"] == 36 and summary.background["max"] > 0.999
    top = [p["similarity"] for p in summary.top_pairs]
    assert top == sorted(top, reverse=True) and top[0] == pytest.approx(sims.max())
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_ok"] == 9


def test_results_are_independent_of_the_batch_size(folder, tmp_path):
    a = _run(folder, tmp_path / "a", batch_size=3)
    b = _run(folder, tmp_path / "b", batch_size=10)
    ra = pq.read_table(tmp_path / "a" / "audit.parquet").to_pylist()
    rb = pq.read_table(tmp_path / "b" / "audit.parquet").to_pylist()
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x["nearest_id"] == y["nearest_id"] or x["status"] == "error"
        if x["status"] == "ok":
            assert x["similarity"] == pytest.approx(y["similarity"], abs=1e-5)
    assert a.fad == pytest.approx(b.fad, rel=1e-6) and a.kad == pytest.approx(b.kad, rel=1e-6)


def test_an_interrupted_audit_resumes_without_redoing_finished_batches(folder, tmp_path, monkeypatch):
    real, calls = audit_mod._embed_batch, []

    def crash_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(audit_mod, "_embed_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, tmp_path / "out")
    parts = tmp_path / "out" / "parts"
    done = sorted(parts.glob("part-*.parquet"))
    assert len(done) == 2 and not list(parts.glob("*.tmp*"))
    stamps = {p: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(audit_mod, "_embed_batch", real)
    calls.clear()
    counted = []
    monkeypatch.setattr(audit_mod, "_embed_batch", lambda *a, **k: counted.append(1) or real(*a, **k))
    summary = _run(folder, tmp_path / "out")
    assert len(counted) == 1  # 10 files in batches of 4: only the third batch was left
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    ids = pq.read_table(tmp_path / "out" / "audit.parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 10 and summary.n_files == 10


def test_another_input_in_the_same_folder_is_refused_not_mixed(folder, tmp_path):
    _run(folder, tmp_path / "out")
    (folder / "extra.flac").write_bytes((folder / "sub" / "quiet.wav").read_bytes())
    with pytest.raises(ValueError, match="items_sha256.*--restart"):
        _run(folder, tmp_path / "out")
    assert _run(folder, tmp_path / "out2").n_files == 11


def test_results_parquet_source_keeps_ok_rows_and_prompts(tmp_path):
    rows = pq.read_table(TRAIN / "train.parquet").to_pylist()[:3]
    (tmp_path / "run" / "audio").mkdir(parents=True)
    for r in rows:
        shutil.copy(TRAIN / r["path"], tmp_path / "run" / "audio" / f"{r['id']}.flac")
    table = pa.table({
        "id": ["a", "b", "c"], "prompt": [r["caption"] for r in rows], "status": ["ok", "error", "ok"],
        "audio_path": [f"audio/{rows[0]['id']}.flac", None, f"audio/{rows[2]['id']}.flac"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "run" / "results.parquet")
    items = items_from_source(tmp_path / "run" / "results.parquet")
    assert [i.id for i in items] == ["a", "c"] and items[1].prompt == rows[2]["caption"]
    with pytest.raises(ValueError, match="audio_path"):
        pq.write_table(pa.table({"id": ["x"]}), tmp_path / "bad.parquet")
        items_from_source(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="folder of audio"):
        items_from_source(tmp_path / "x.csv")


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="k=0"):
        AuditConfig(k=0)
    with pytest.raises(ValueError, match="thresholds"):
        AuditConfig(thresholds=(1.5,))


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.audio, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "audio":
            self.audio.append(a)
        if tag == "img":
            self.images.append(a)


def test_report_is_self_contained_with_playable_pairs(folder, tmp_path):
    summary = _run(folder, tmp_path / "out")
    page = _Page()
    page.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    assert "script" not in page.tags and "link" not in page.tags  # nothing to fetch, nothing to run
    assert len(page.audio) == 2 * len(summary.top_pairs) == 6  # audited file and its training clip
    for a in page.audio:
        assert a["src"].startswith("data:audio/flac;base64,")
        x, sr = sf.read(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert sr > 0 and len(x) > 0 and np.abs(x).max() > 0
    assert page.images[0]["src"].startswith("data:image/png;base64,")
    assert (tmp_path / "out" / "similarity.png").stat().st_size > 1000


CHROMIUM = Path(__file__).resolve().parent.parent / ".cache" / "chromium" / "chromium.json"


def _chromium() -> dict:
    """The headless Chromium `make browser` fetched (executable and flags), or skip."""
    pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: run `make browser` (needs node and the npm registry)")
    spec = json.loads(CHROMIUM.read_text())
    if not Path(spec["executable"]).exists():
        pytest.skip(f"{spec['executable']} is gone: delete {CHROMIUM.parent} and run `make browser`")
    return spec


def test_report_renders_in_headless_chromium(folder, tmp_path):
    """The report opens offline in a real browser: it renders, the players and the histogram load, and
    the console shows no error."""
    from playwright.sync_api import sync_playwright

    spec = _chromium()
    _run(folder, tmp_path / "out")
    errors, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=spec["executable"], args=spec["args"], headless=True)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url[:60]))
        page.goto((tmp_path / "out" / "report.html").as_uri())
        page.wait_for_load_state("load")
        assert page.title() == "Memorization audit"
        assert page.locator("table#pairs tr.pair").count() == 3
        assert page.locator("table#stats tr").count() >= 5
        assert page.locator("img#histogram").evaluate("i => i.complete && i.naturalWidth") > 100
        players = page.locator("audio")
        assert players.count() == 6
        for k in range(players.count()):  # each player loads its inline FLAC and knows its duration
            duration = players.nth(k).evaluate(
                "a => new Promise(r => { a.preload = 'auto'; a.onloadedmetadata = () => r(a.duration); "
                "a.onerror = () => r(-1); a.load(); })"
            )
            assert duration > 0.5, k
        browser.close()
    assert errors == [] and failed == []


def test_clap_score_is_the_cosine_with_the_prompts_text_embedding(folder, tmp_path):
    """The prompt-adherence plumbing, with a stand-in text encoder in the index's embedding space."""
    index = EmbeddingIndex.load(DEFAULT_INDEX_DIR)
    by_caption = dict(zip(index.captions, index.vectors, strict=False))
    calls = []

    def text_embedder(texts):  # a caption's "text embedding": its training clip's audio embedding
        calls.append(list(texts))
        return torch.stack([by_caption[t] for t in texts])

    cfg = AuditConfig(batch_size=4, pairs=2)
    summary = run_audit(folder, DEFAULT_INDEX_DIR, tmp_path / "out", cfg, text_embedder=text_embedder,
                        progress=False)  # fmt: skip
    rows = pq.read_table(tmp_path / "out" / "audit.parquet").to_pylist()
    for r in rows:
        if r["status"] == "ok" and r["prompt"]:
            assert r["clap_score"] == pytest.approx(1.0, abs=1e-4)  # a training clip vs its own caption
        else:
            assert r["clap_score"] is None  # no prompt (sub/quiet.wav has no sidecar) or unreadable
    assert all("" not in batch for batch in calls)
    assert summary.clap_score["n"] == 8 and summary.clap_score["mean"] == pytest.approx(1.0, abs=1e-4)


def test_a_search_that_finds_no_neighbour_is_not_the_last_clip(folder, tmp_path, monkeypatch):
    """FAISS answers -1 (with similarity -3.4e38) where an approximate index finds fewer than k: those
    slots are dropped, and a file with none at all has no nearest clip and no similarity, instead of
    "the last training clip at -3.4e38"; the statistics leave it out and count it."""
    from index.search import SearchResult

    class Sparse:  # finds one neighbour for the first file of a batch, none for the others
        def __init__(self, index, config):
            self.index = index

        def search(self, xq, k=1):
            d = torch.full((xq.shape[0], k), -3.4e38)
            i = torch.full((xq.shape[0], k), -1, dtype=torch.long)
            sims = xq @ self.index.vectors.T
            d[0, 0], i[0, 0] = sims[0].max(), sims[0].argmax()
            return SearchResult(d, i, self.index.ids)

    monkeypatch.setattr(audit_mod, "make_searcher", Sparse)
    summary = _run(folder, tmp_path / "out", k=3)
    rows = [r for r in pq.read_table(tmp_path / "out" / "audit.parquet").to_pylist() if r["status"] == "ok"]
    found = [r for r in rows if r["nearest_id"] is not None]
    assert 0 < len(found) < len(rows)
    for r in rows:
        assert len(r["neighbour_ids"]) == len(r["neighbour_similarities"]) <= 1
        assert (r["similarity"] is None) == (r["nearest_id"] is None) == (r["neighbour_ids"] == [])
    assert summary.n_no_neighbour == len(rows) - len(found) and summary.generated["n"] == len(found)
    assert summary.generated["mean"] > -1  # no -3.4e38 leaked into the statistics
