"""`amg audit`: per-file neighbours, error rows, resumability, statistics and the offline report."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from amg_engine.engine.engine import DEFAULT_INDEX_DIR
from amg_engine.index.store import EmbeddingIndex
from amg_engine.jobs import audit as audit_mod
from amg_engine.jobs.audit import AuditConfig, items_from_source, run_audit, similarity_stats

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


def _by_id(path: Path) -> dict:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def test_a_reaudit_into_the_same_folder_measures_the_files_as_they_are_now(folder, tmp_path, monkeypatch):
    """Replace one file by another training clip, and another by audio of the same size with its
    modification time put back (as ``cp -p`` or ``rsync -t`` leave it): the rerun into the same folder
    re-embeds the batches that hold them, and only those, and reports what a fresh audit reports; the
    attribute rows follow the new audio."""
    from amg_engine.jobs import adherence

    monkeypatch.setattr(audit_mod, "_distances", lambda *a: (None, None))  # not what is tested: saves 10 s
    _run(folder, tmp_path / "out", pairs=0)
    train = pq.read_table(TRAIN / "train.parquet").to_pylist()
    loop = next(r for r in train if r["caption"] == "An electronic drum loop, 135 bpm")
    shutil.copy(TRAIN / loop["path"], folder / "clip-000.flac")  # batch 0 (of 3, 4 files each)
    quiet = folder / "sub" / "quiet.wav"  # batch 2
    st = quiet.stat()
    frames = sf.info(quiet).frames
    x, sr = sf.read(TRAIN / train[20]["path"], dtype="float32", frames=frames, fill_value=0.0)
    sf.write(quiet, 0.3 * x, sr)  # as many frames, the same format: the same size
    os.utime(quiet, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert quiet.stat().st_size == st.st_size and quiet.stat().st_mtime_ns == st.st_mtime_ns
    real, calls = audit_mod._embed_batch, []
    monkeypatch.setattr(audit_mod, "_embed_batch", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    real_row, checked = adherence._row, []
    monkeypatch.setattr(adherence, "_row", lambda it, t: checked.append(it.id) or real_row(it, t))
    _run(folder, tmp_path / "out", pairs=0)
    assert sorted(it.id for batch in calls for it in batch) == [
        "broken.flac",
        "clip-000.flac",
        "clip-004.flac",
        "clip-008.flac",
        "clip-028.flac",
        "sub/quiet.wav",
    ]
    assert checked == ["clip-000.flac"]  # the other parsed prompts' files did not change
    _run(folder, tmp_path / "fresh", pairs=0, attributes=False)
    again, fresh = _by_id(tmp_path / "out" / "audit.parquet"), _by_id(tmp_path / "fresh" / "audit.parquet")
    assert again["clip-000.flac"]["nearest_id"] == loop["id"]
    for i, r in fresh.items():
        assert again[i]["nearest_id"] == r["nearest_id"] and again[i]["status"] == r["status"], i
        if r["status"] == "ok":
            assert again[i]["similarity"] == pytest.approx(r["similarity"], abs=1e-5), i
    attrs = _by_id(tmp_path / "out" / "attributes.parquet")
    assert attrs["clip-000.flac"]["est_bpm"] == pytest.approx(135, rel=0.04)  # was the 90 bpm loop's
    assert attrs["clip-000.flac"]["tempo"] is False  # its prompt still asks for 90 bpm


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


def _outside_world(tmp_path: Path) -> Path:
    """A folder beside the audited one holding private audio (a training clip: it would show at ≈ 1)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    clip = pq.read_table(TRAIN / "train.parquet").to_pylist()[5]
    shutil.copy(TRAIN / clip["path"], secret / "private.flac")
    (secret / "private.txt").write_text("a private caption")
    return secret


def _generic(rows: list[dict], ids: list[str], paths: list[str]) -> set[str]:
    """The errors of ``ids`` with each row's own path taken out: one text means nothing told them apart."""
    by_id = {r["id"]: r for r in rows}
    return {by_id[i]["error"].replace(p, "<path>") for i, p in zip(ids, paths, strict=True)}


def test_a_results_file_cannot_make_the_audit_read_outside_its_folder(tmp_path):
    """Paths of a results file resolve inside its folder, symlinks followed, or the row is an error that
    reads the same whether the file exists or not; a missing file and one that cannot be read (a folder
    under an audio name) read the same too; nothing outside is read or put in the report."""
    secret = _outside_world(tmp_path)
    run = tmp_path / "run"
    (run / "audio" / "folder.flac").mkdir(parents=True)
    rows = pq.read_table(TRAIN / "train.parquet").to_pylist()
    shutil.copy(TRAIN / rows[0]["path"], run / "audio" / "ok.flac")
    (run / "audio" / "link.flac").symlink_to(secret / "private.flac")
    (run / "audio" / "dangling.flac").symlink_to(secret / "nothing.flac")
    paths = {
        "ok": "audio/ok.flac",
        "abs": str(secret / "private.flac"), "abs-missing": str(secret / "nothing.flac"),
        "up": "../secret/private.flac", "up-missing": "../secret/nothing.flac",
        "link": "audio/link.flac", "dangling": "audio/dangling.flac",
        "missing": "audio/missing.flac", "unreadable": "audio/folder.flac",
    }  # fmt: skip
    table = pa.table({"id": list(paths), "audio_path": list(paths.values()), "status": ["ok"] * len(paths),
                      "prompt": ["An acoustic drum loop, 90 bpm"] * len(paths)})  # fmt: skip
    pq.write_table(table, run / "results.parquet")
    summary = _run(run / "results.parquet", tmp_path / "out")
    out = pq.read_table(tmp_path / "out" / "audit.parquet").to_pylist()
    assert summary.n_ok == 1 and [r["id"] for r in out if r["status"] == "ok"] == ["ok"]
    outside = ["abs", "abs-missing", "up", "up-missing", "link", "dangling"]
    for there, not_there in [("abs", "abs-missing"), ("up", "up-missing"), ("link", "dangling")]:
        assert len(_generic(out, [there, not_there], [paths[there], paths[not_there]])) == 1
    assert len(_generic(out, ["missing", "unreadable"], [paths["missing"], paths["unreadable"]])) == 1
    assert all(
        "private" not in r["error"] and "nothing" not in r["error"]
        for r in out
        if r["id"] in ("link", "dangling")
    )  # fmt: skip; where a link points is not told either
    attributes = pq.read_table(tmp_path / "out" / "attributes.parquet").to_pylist()
    assert [r["id"] for r in attributes if r["status"] == "ok"] == ["ok"]
    assert {r["error"] for r in attributes if r["id"] in outside} <= {r["error"] for r in out}
    page = _Page()
    page.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    assert len(page.audio) == 2  # the one audited pair: ok.flac and its training clip


def test_a_folder_audit_does_not_follow_links_out_of_the_folder(folder, tmp_path):
    """A symlink (and a prompt sidecar linked) leaving the folder is an error row with no prompt; a link
    that stays inside is audited like any file."""
    secret = _outside_world(tmp_path)
    (folder / "leak.flac").symlink_to(secret / "private.flac")
    (folder / "leak.txt").symlink_to(secret / "private.txt")
    (folder / "gone.flac").symlink_to(secret / "nothing.flac")
    (folder / "again.flac").symlink_to(folder / "clip-000.flac")
    summary = _run(folder, tmp_path / "out", pairs=0)
    rows = _by_id(tmp_path / "out" / "audit.parquet")
    assert rows["leak.flac"]["status"] == rows["gone.flac"]["status"] == "error"
    assert rows["leak.flac"]["prompt"] == "" and rows["leak.flac"]["similarity"] is None
    assert len(_generic(list(rows.values()), ["leak.flac", "gone.flac"], ["leak.flac", "gone.flac"])) == 1
    assert rows["again.flac"]["status"] == "ok" and rows["again.flac"]["nearest_id"] == "clip-000"
    assert summary.n_ok == 10 and summary.n_error == 3  # the 9 files, the inside link; broken and 2 links


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
    spectrograms = [i for i in page.images if i.get("class") == "spectrogram"]
    assert len(spectrograms) == len(summary.top_pairs)  # one figure per pair: audited | training clip
    for img in spectrograms:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_pair_spectrograms_share_one_time_axis():
    from amg_engine.jobs.report import pair_figure

    sr = 8000
    t = np.arange(sr) / sr
    short, long = np.sin(2 * np.pi * 440 * t[: sr // 2]), np.sin(2 * np.pi * 880 * t)
    fig = pair_figure((short.astype(np.float32), sr), (long.astype(np.float32), sr))
    a, b = fig.axes
    assert a.get_shared_x_axes().joined(a, b) and a.get_shared_y_axes().joined(a, b)
    assert a.get_xlim() == b.get_xlim() and a.get_xlim()[1] >= 0.99  # both span the longer clip's second
    assert pair_figure((short.astype(np.float32), sr), None).axes[1].texts  # "audio not available"


def _mismatched(folder: Path) -> Path:
    """A drum loop under a prompt at another tempo class and kit: two misses the audit must find."""
    rows = pq.read_table(TRAIN / "train.parquet").to_pylist()
    loop = next(r for r in rows if r["caption"] == "An acoustic drum loop, 90 bpm")
    shutil.copy(TRAIN / loop["path"], folder / "mismatch.flac")
    (folder / "mismatch.txt").write_text("An electronic drum loop, 135 bpm")
    return folder


def test_attribute_adherence_is_checked_per_file_and_summed_per_attribute(folder, tmp_path):
    from amg_engine.engine.default.attributes import ATTRIBUTES, parse_prompt

    summary = _run(_mismatched(folder), tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "attributes.parquet").to_pylist()
    prompts = {p.stem: p.read_text() for p in folder.glob("*.txt")}
    parsed = {f"{k}.flac" for k, v in prompts.items() if parse_prompt(v) is not None}
    assert {r["id"] for r in rows} == parsed  # textures, unparsed prompts and no prompt: no row
    miss = next(r for r in rows if r["id"] == "mismatch.flac")
    assert miss["tempo"] is False and miss["instrument"] is False and miss["pitch"] is None
    assert miss["target_bpm"] == 135 and miss["est_bpm"] == pytest.approx(90, rel=0.04)
    a = summary.adherence
    for name in ATTRIBUTES:
        checks = [r[name] for r in rows if r["status"] == "ok" and r[name] is not None]
        assert a[name] == {"n": len(checks), "hits": sum(checks), "share": sum(checks) / len(checks)}
    assert a["all"]["n"] == sum(a[n]["n"] for n in ATTRIBUTES) and a["files"] == len(rows)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["adherence"] == a
    assert 'id="adherence"' in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert _run(folder, tmp_path / "off", attributes=False).adherence is None


def test_heldout_fad_is_the_fad_against_that_index(folder, tmp_path):
    from amg_engine.engine.default.heldout import HELDOUT_INDEX_DIR

    cfg = AuditConfig(batch_size=4, pairs=1, attributes=False)
    both = run_audit(folder, DEFAULT_INDEX_DIR, tmp_path / "a", cfg, heldout_dir=HELDOUT_INDEX_DIR,
                     progress=False)  # fmt: skip
    only = run_audit(folder, DEFAULT_INDEX_DIR, tmp_path / "b", cfg, reference_dir=HELDOUT_INDEX_DIR,
                     progress=False)  # fmt: skip
    plain = run_audit(folder, DEFAULT_INDEX_DIR, tmp_path / "c", cfg, progress=False)
    # the same moments and sample against the same vectors, through the same function: equal exactly
    assert (both.fad_heldout, both.kad_heldout) == (only.fad, only.kad)
    assert (both.fad, both.kad) == (plain.fad, plain.kad) and plain.fad_heldout is None
    assert both.fad_heldout != both.fad


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


@pytest.mark.integration
def test_report_renders_in_headless_chromium(folder, tmp_path):
    """The report opens offline in a real browser: it renders, the players, the histogram and the pairs'
    spectrograms load, and the console shows no error."""
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
        spectrograms = page.locator("img.spectrogram")
        assert spectrograms.count() == 3
        for k in range(3):  # each pair's side-by-side spectrograms decode and are drawn
            assert spectrograms.nth(k).evaluate("i => i.complete && i.naturalWidth") > 300
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
    from amg_engine.index.search import SearchResult

    class Sparse:  # finds one neighbour for the first file of a batch, none for the others
        def __init__(self, index, config, device=None):
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
