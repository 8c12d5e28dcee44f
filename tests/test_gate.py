"""The release gate (jobs/gate.py): no clip at or above τ is released, attempts are batched, recorded
and resumed; its settings are validated and key the results.

Most tests use a stub engine whose similarity is written into its audio (a constant of half the
similarity), so the gate's measure of the file as written reads it back; the last one runs the
default model and recomputes every released file's similarity from the file itself.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from jobs_helpers import FAST_FLAGS, PROMPTS, FakeEngine, tiny_assets, write_manifest

from amg_engine.jobs.cli import main
from amg_engine.jobs.gate import ReleaseGate, RetryQueue
from amg_engine.jobs.generate import JobConfig, run_generate

TAU = 0.6
PCM = 2 / 2**15  # a similarity read back from 16-bit audio is this close to the stub's (two steps)


class GateEngine(FakeEngine):
    """A :class:`FakeEngine` whose row ``id`` has similarity ``sims[id][k-1]`` at attempt k (the
    attempt read from the request's seed), else ``default``; its audio is that similarity / 2, and
    :meth:`measure_files` reads it back. ``stop_at``: the generate call (0-based) that raises
    KeyboardInterrupt, as a kill there would stop the run."""

    def __init__(self, config=None, sims=None, seeds=None, default=0.3, stop_at=None, max_attempts=8,
                 raise_calls=()):  # fmt: skip
        super().__init__(config, raise_calls=raise_calls)
        self.device = torch.device("cpu")
        self.sims, self.default, self.stop_at = sims or {}, default, stop_at
        self.attempt = {ReleaseGate.seed(s, k): k for s in seeds.values() for k in range(1, max_attempts + 1)}
        self.requests: list[list[tuple[str, int]]] = []  # (id, attempt) of each call that ran

    def generate(self, requests, measure=True):
        from amg_engine.engine.engine import Generated

        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt("killed")
        self.calls.append([r.id for r in requests])
        self.configs.append(self.config)
        if len(self.calls) - 1 in self.raise_calls:
            raise RuntimeError(self.failure)
        self.requests.append([(r.id, self.attempt[r.seed]) for r in requests])
        out = []
        for r in requests:
            k = self.attempt[r.seed]
            sims = self.sims.get(r.id, [])
            sim = sims[k - 1] if k <= len(sims) else self.default
            audio = torch.full((1, round(r.seconds * self.sample_rate)), sim / 2)
            out.append(Generated(r, audio, sim, 0, [], None))
        return out

    def measure_files(self, files):
        from amg_engine.jobs.results import decode_audio

        sims = [2 * float(decode_audio(f).mean()) for f in files]
        return sims, [1] * len(sims)


def manifest(path, n):
    ids = [f"row-{i:03d}" for i in range(n)]
    seeds = {rid: 1000 + i for i, rid in enumerate(ids)}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    write_manifest(path, {"id": ids, "prompt": prompts, "seconds": [0.25] * n, "seed": list(seeds.values())})
    return path, seeds


def results(out):
    return {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}


# Rows failing 0, 1, 2 and 3 attempts of 3; a rejected row's best attempt is its second.
FAILS = [[], [0.9], [0.8, 0.7], [0.95, 0.7, 0.9]]


def plan_sims(n):
    return {f"row-{i:03d}": FAILS[i % 4] + [0.2 + 0.01 * (i % 7)] for i in range(n)}


def test_attempts_are_recorded_and_nothing_at_or_above_tau_is_released(tmp_path):
    m, seeds = manifest(tmp_path / "m.parquet", 20)
    sims, out = plan_sims(20), tmp_path / "out"
    engine = GateEngine(sims=sims, seeds=seeds)
    summary = run_generate(m, out, engine, JobConfig(progress=False, gate=ReleaseGate(TAU, 3)))
    res = results(out)
    for rid, r in res.items():
        fails = len(FAILS[int(rid[-3:]) % 4])
        k = min(fails + 1, 3)
        assert r["attempts"] == k and r["gate"] == ReleaseGate(TAU, 3).key
        assert r["attempt_seeds"] == [ReleaseGate.seed(seeds[rid], j) for j in range(1, k + 1)]
        assert np.allclose(r["attempt_similarities"], sims[rid][:k], atol=PCM)
        assert len(r["attempt_seconds"]) == k and r["seed"] == seeds[rid]  # the key keeps the row's seed
        if fails < 3:
            assert r["status"] == "ok" and r["audio_path"] == f"audio/{rid}.flac"
            assert r["final_similarity"] < TAU and abs(r["final_similarity"] - sims[rid][fails]) <= PCM
        else:
            assert r["status"] == "rejected" and r["audio_path"] == f"rejected/{rid}-a2.flac"  # the best
            assert abs(r["final_similarity"] - 0.7) <= PCM
    released = {p.stem for p in (out / "audio").iterdir()}
    assert released == {rid for rid, r in res.items() if r["status"] == "ok"}
    assert sorted(p.name for p in (out / "rejected").iterdir()) == sorted(
        f"{rid}-a2.flac" for rid, r in res.items() if r["status"] == "rejected"
    )  # one file per rejected row; the ok rows' failed attempts are gone
    assert (summary.released, summary.rejected, summary.errors) == (15, 5, 0)
    assert summary.attempt_histogram == {1: 5, 2: 5, 3: 10}
    assert summary.row_generations == 5 + 10 + 30 and summary.generations_per_released == 45 / 15
    printed = "\n".join(summary.lines())
    assert "15 released, 5 rejected" in printed and "1: 5, 2: 5, 3: 10" in printed and "3.00" in printed


def test_retries_are_gathered_into_full_batches(tmp_path):
    n, bs = 40, 8  # 5 fresh batches; 30 rows fail their first attempt, 20 their second: 90 attempts
    m, seeds = manifest(tmp_path / "m.parquet", n)
    engine = GateEngine(sims=plan_sims(n), seeds=seeds)
    run_generate(m, tmp_path / "out", engine, JobConfig(progress=False, gate=ReleaseGate(TAU, 3)))
    sizes = [len(c) for c in engine.requests]
    assert sum(sizes) == 10 * 1 + 10 * 2 + 20 * 3  # every attempt ran once: 10 rows of 1, 10 of 2, 20 of 3
    assert all(s <= bs for s in sizes)
    # short batches only at the end of the run: each runs every row left, so at most one per attempt
    # after the first (N - 1); the rest are full
    short = [s for s in sizes if s < bs]
    assert len(short) <= 2 and len(sizes) <= math.ceil(sum(sizes) / bs) + 2
    assert any(len({k for _, k in call}) > 1 for call in engine.requests)  # attempts share batches


def test_escalation_scales_c3_and_keeps_attempts_apart(tmp_path):
    m, seeds = manifest(tmp_path / "m.parquet", 12)
    engine = GateEngine(sims=plan_sims(12), seeds=seeds)
    run_generate(m, tmp_path / "out", engine, JobConfig(progress=False, gate=ReleaseGate(TAU, 3, 2.0)))
    c3 = engine.config.guidance.c3
    for call, config in zip(engine.requests, engine.configs, strict=True):
        (k,) = {k for _, k in call}  # one c3 per engine call, so one attempt
        assert config.guidance.c3 == c3 * 2.0 ** (k - 1)
    res = results(tmp_path / "out")
    assert {r["c3"] for r in res.values() if r["attempts"] == 2 and r["status"] == "ok"} == {2 * c3}


def test_a_run_killed_mid_retry_resumes_without_losing_or_redoing_attempts(tmp_path):
    m, seeds = manifest(tmp_path / "m.parquet", 24)
    sims, gate = plan_sims(24), ReleaseGate(TAU, 3)
    whole = GateEngine(sims=sims, seeds=seeds)
    run_generate(m, tmp_path / "whole", whole, JobConfig(progress=False, gate=gate))
    first = whole.requests
    retry_call = next(i for i, call in enumerate(first) if any(k > 1 for _, k in call))
    out = tmp_path / "out"
    killed = GateEngine(sims=sims, seeds=seeds, stop_at=retry_call + 1)  # after a retry batch ran
    with pytest.raises(KeyboardInterrupt):
        run_generate(m, out, killed, JobConfig(progress=False, gate=gate))
    shards = [r for p in (out / "results").glob("part-*.parquet") for r in pq.read_table(p).to_pylist()]
    assert any(r["status"] == "retry" for r in shards)  # killed between two attempts of some rows
    again = GateEngine(sims=sims, seeds=seeds)
    summary = run_generate(m, out, again, JobConfig(progress=False, gate=gate))
    done = sorted(x for c in killed.requests + again.requests for x in c)
    assert done == sorted(x for c in first for x in c)  # each attempt once, none lost or repeated
    want, got = results(tmp_path / "whole"), results(out)
    for rid, w in want.items():
        g = got[rid]
        assert (g["status"], g["attempts"], g["attempt_seeds"], g["audio_path"]) == (
            w["status"], w["attempts"], w["attempt_seeds"], w["audio_path"]
        )  # fmt: skip
    assert summary.reused > 0 and summary.rejected == 6
    assert sorted(p.name for p in (out / "rejected").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "rejected").iterdir()
    )
    rerun = run_generate(m, out, GateEngine(sims=sims, seeds=seeds), JobConfig(progress=False, gate=gate))
    assert rerun.generated == 0


def test_the_gate_is_part_of_the_resume_key(tmp_path):
    m, seeds = manifest(tmp_path / "m.parquet", 6)
    out = tmp_path / "out"

    def run(gate):
        engine = GateEngine(sims=plan_sims(6), seeds=seeds)
        run_generate(m, out, engine, JobConfig(progress=False, gate=gate))
        return sum(len(c) for c in engine.requests)

    assert run(None) == 6
    assert run(ReleaseGate(TAU)) > 6 and run(ReleaseGate(TAU)) == 0  # a gate regenerates, then resumes
    for other in (ReleaseGate(0.65), ReleaseGate(TAU, 4), ReleaseGate(TAU, 3, 1.5), None):
        assert run(other) > 0  # τ, N and F each key the rows


def test_the_default_threshold_is_the_index_embedders(tmp_path):
    m, seeds = manifest(tmp_path / "m.parquet", 4)
    engine = GateEngine(sims={"row-000": [0.95, 0.85]}, seeds=seeds)  # 0.9: the stub index's threshold
    summary = run_generate(m, tmp_path / "out", engine, JobConfig(progress=False, gate=ReleaseGate()))
    assert summary.gate == ReleaseGate(0.9).key and results(tmp_path / "out")["row-000"]["attempts"] == 2


@pytest.mark.parametrize(
    "kw, problem",
    [
        (dict(max_similarity=1.5), "--max-similarity 1.5"),
        (dict(max_similarity=-1.0), "--max-similarity -1.0"),
        (dict(max_attempts=0), "--max-attempts 0"),
        (dict(max_attempts=2.5), "--max-attempts 2.5"),
        (dict(escalate=0.0), "--escalate 0.0"),
        (dict(escalate=float("nan")), "--escalate nan"),
    ],
)
def test_bad_gate_settings_are_named(kw, problem):
    with pytest.raises(ValueError, match=problem.replace(".", r"\.")):
        ReleaseGate(**kw)


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--max-similarity", "2"], "--max-similarity 2.0"),
        (["--max-similarity", "--max-attempts", "0"], "--max-attempts 0"),
        (["--max-similarity", "0.5", "--escalate", "-1"], "--escalate -1.0"),
        (["--escalate", "2"], "give --max-similarity"),
    ],
)
def test_bad_gate_flags_exit_2_and_write_nothing(tmp_path, capsys, flags, problem):
    m, _ = manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "out"
    assert main(["generate", str(m), "--out", str(out), *FAST_FLAGS, *flags]) == 2
    assert problem in capsys.readouterr().err and not out.exists()


def test_seeds_of_attempts():
    assert ReleaseGate.seed(7, 1) == 7
    later = [ReleaseGate.seed(7, k) for k in range(2, 50)] + [ReleaseGate.seed(8, 2)]
    assert len(set(later)) == len(later) and all(0 <= s < 2**63 and s != 7 for s in later)


def test_retry_queue_keeps_escalated_attempts_apart():
    from amg_engine.jobs.manifest import Overrides

    class R:
        def __init__(self, i):
            self.index, self.overrides = i, Overrides()

    q = RetryQueue(ReleaseGate(0.5, 4, 2.0), batch_size=2)
    prior = lambda k: {"attempt_seeds": [0] * k}  # noqa: E731
    q.add(R(0), prior(1))
    q.add(R(1), prior(2))
    assert q.full() is None  # attempts 2 and 3 have different c3: not one batch
    q.add(R(2), prior(1))
    assert [r.index for r, _ in q.full()] == [0, 2] and len(q) == 1


def test_on_the_default_model_every_released_file_is_below_tau(tmp_path, tmp_path_factory):
    """The gate judges the file it writes: each released file, read back and embedded as ``amg audit``
    does, is below τ, with and without AMG (--no-amg: generate-and-filter)."""
    import soundfile as sf

    from amg_engine.index.clip import embed_clips
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import EmbeddingIndex

    assets = tiny_assets(tmp_path_factory)
    n = 12
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    m = write_manifest(tmp_path / "m.parquet", {"id": [f"r{i}" for i in range(n)], "seconds": [0.5] * n,
                                                "prompt": prompts})  # fmt: skip
    index = EmbeddingIndex.load(assets / "index")
    embedder = MelEmbedder()
    for name, extra in (("amg", []), ("no-amg", ["--no-amg"])):
        out = tmp_path / name
        argv = ["generate", str(m), "--out", str(out), "--model", str(assets / "model"), "--index",
                str(assets / "index"), *FAST_FLAGS]  # fmt: skip
        assert main([*argv, *extra]) == 0
        sims = [r["final_similarity"] for r in results(out).values()]
        tau = float(np.quantile(sims, 0.5))  # half the rows at or above τ at their first attempt
        out_gate = tmp_path / f"{name}-gate"
        argv[3] = str(out_gate)
        assert main([*argv, *extra, "--max-similarity", str(tau), "--max-attempts", "3"]) == 0
        res = results(out_gate)
        assert {r["status"] for r in res.values()} <= {"ok", "rejected"}
        assert sum(r["attempts"] > 1 for r in res.values()) >= n // 3  # the gate did regenerate rows
        for rid, r in res.items():
            released = out_gate / "audio" / f"{rid}.flac"
            assert released.exists() == (r["status"] == "ok")
            if r["status"] == "ok":
                audio, rate = sf.read(released, dtype="float32", always_2d=True)
                x = torch.from_numpy(audio.T.copy())[None]
                e = embed_clips(embedder, x, rate, torch.tensor([x.shape[-1]]))
                assert float((e @ index.vectors.T).max()) < tau
            else:
                assert min(r["attempt_similarities"]) >= tau and (out_gate / r["audio_path"]).exists()


def test_a_rerun_after_a_row_is_inserted_at_the_top_finishes_each_row_once(tmp_path):
    """Ids are the resume key, so rows may move: a run stopped between attempts, resumed with a new
    row at the top of its manifest, finishes every row with each attempt run once, and every result
    names the row's position in the manifest it was finished with (issue 26, item 1)."""
    from collections import Counter

    m, seeds = manifest(tmp_path / "m.parquet", 16)
    # odd rows: attempt 2 the best so far, attempt 3 worse (the earlier attempt stays), attempt 4 clears
    sims = {rid: [0.95, 0.7, 0.9, 0.2] if i % 2 else [] for i, rid in enumerate(seeds)}
    gate, out = ReleaseGate(TAU, 4), tmp_path / "out"
    killed = GateEngine(sims=sims, seeds=seeds, stop_at=3)  # two fresh batches, attempt 2, then killed
    with pytest.raises(KeyboardInterrupt):
        run_generate(m, out, killed, JobConfig(progress=False, gate=gate))
    ids, table = ["row-new", *seeds], pq.read_table(m)
    write_manifest(m, {"id": ids, "prompt": [PROMPTS[5], *table["prompt"].to_pylist()],
                       "seconds": [0.25] * 17, "seed": [5, *seeds.values()]})  # fmt: skip
    again = GateEngine(sims=sims, seeds={**seeds, "row-new": 5})
    summary = run_generate(m, out, again, JobConfig(progress=False, gate=gate))
    attempts = Counter(x for c in killed.requests + again.requests for x in c)
    assert set(attempts.values()) == {1}  # no attempt ran twice
    assert {rid: max(k for i, k in attempts if i == rid) for rid in ids} == {
        rid: 4 if rid in sims and sims[rid] else 1 for rid in ids
    }
    res = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in res] == ids and [r["row"] for r in res] == list(range(17))
    assert {r["status"] for r in res} == {"ok"} and (summary.released, summary.retrying) == (17, 0)
    assert all(r["attempts"] == len(r["attempt_seeds"]) == len(r["attempt_similarities"]) for r in res)
    assert list((out / "rejected").iterdir()) == []  # the kept attempts went with their rows' release


def test_a_retry_batch_failing_in_the_engine_keeps_its_rows_attempts(tmp_path):
    """The engine raises on a batch of second attempts: those rows are errors that keep their first
    attempt (its record and its file in rejected/), and --retry-failed continues at attempt 2
    (issue 26, item 5)."""
    m, seeds = manifest(tmp_path / "m.parquet", 8)
    sims = {rid: [0.95, 0.7, 0.2] if i % 2 else [] for i, rid in enumerate(seeds)}
    gate, out = ReleaseGate(TAU, 3), tmp_path / "out"
    failing = GateEngine(sims=sims, seeds=seeds, raise_calls=(1,))  # the batch of second attempts
    summary = run_generate(m, out, failing, JobConfig(progress=False, gate=gate))
    res = results(out)
    odd = [rid for rid in seeds if sims[rid]]
    assert summary.errors == 4 and {res[rid]["status"] for rid in odd} == {"error"}
    for rid in odd:
        r = res[rid]
        assert "engine failed" in r["error"] and r["attempts"] == 1 and r["attempt_seeds"] == [seeds[rid]]
        assert r["audio_path"] == f"rejected/{rid}-a1.flac" and (out / r["audio_path"]).exists()
    assert sorted(p.name for p in (out / "rejected").iterdir()) == sorted(f"{rid}-a1.flac" for rid in odd)
    rerun = GateEngine(sims=sims, seeds=seeds)
    assert run_generate(m, out, rerun, JobConfig(progress=False, gate=gate)).generated == 0  # errors stay
    summary = run_generate(m, out, rerun, JobConfig(progress=False, gate=gate, retry_failed=True))
    assert sorted(x for c in rerun.requests for x in c) == sorted((rid, k) for rid in odd for k in (2, 3))
    res = results(out)
    assert summary.released == 8 and all(res[rid]["attempt_seeds"] == [
        ReleaseGate.seed(seeds[rid], k) for k in (1, 2, 3)] for rid in odd)  # fmt: skip
    assert list((out / "rejected").iterdir()) == []


def test_the_attempt_history_state_machine():
    """ReleaseGate.judge: released at the first attempt below τ, else retried until N, keeping the
    lowest similarity so far (the earliest of equals, NaN never); Attempts round-trips a result row."""
    from amg_engine.jobs.gate import Attempts

    gate, none = ReleaseGate(0.5, 3), Attempts()
    assert none.best is None and none.next == 1 and Attempts.of(None) == none
    v = gate.judge(none, 11, float("nan"), 1.0)
    assert (v.status, v.keep, v.fresh) == ("retry", 1, True)  # a NaN is kept only while it is all there is
    v = gate.judge(v.attempts, 12, 0.8, 1.0)
    assert (v.status, v.keep, v.fresh) == ("retry", 2, True)
    w = gate.judge(v.attempts, 13, 0.8, 1.0)
    assert (w.status, w.keep, w.fresh) == ("rejected", 2, False)  # a tie: the earlier attempt stays
    assert gate.judge(v.attempts, 13, 0.49, 1.0).status == "ok"
    assert gate.judge(v.attempts, 13, 0.5, 1.0).status == "rejected"  # at τ is not below it
    assert Attempts.of(w.attempts.columns()) == w.attempts and w.attempts.columns()["attempts"] == 3
    assert w.attempts.seeds == (11, 12, 13) and Attempts.of({"attempt_seeds": None}) == none


def test_under_bf16_the_gate_records_the_audits_measure_of_each_file(tmp_path, tmp_path_factory, monkeypatch):
    """The gate judges a file by the audit's measure, in float32 whatever the run's precision: with
    bf16 (autocast on the CPU, as on CUDA by default), every released and every kept rejected file
    audits at the similarity its row records; and each clip is embedded once, by that measure (the
    engine's own final measure does not run under the gate) (issue 26, item 3)."""
    from amg_engine.engine.engine import Engine
    from amg_engine.index.embedders import load_embedder
    from amg_engine.index.store import EmbeddingIndex
    from amg_engine.jobs.audit import AuditConfig, embed_all, items_from_source

    assets = tiny_assets(tmp_path_factory)
    n = 8
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    m = write_manifest(tmp_path / "m.parquet", {"id": [f"r{i}" for i in range(n)], "seconds": [0.5] * n,
                                                "prompt": prompts})  # fmt: skip
    argv = ["generate", str(m), "--model", str(assets / "model"), "--index", str(assets / "index"),
            *FAST_FLAGS, "--precision", "bf16"]  # fmt: skip
    nearest, measured, real_nearest, real_measure = [], [], Engine.nearest, Engine.measure_files
    monkeypatch.setattr(Engine, "nearest", lambda self, a, n: nearest.append(1) or real_nearest(self, a, n))
    monkeypatch.setattr(
        Engine, "measure_files", lambda self, x: measured.append(len(x)) or real_measure(self, x)
    )
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert nearest and not measured  # without the gate the engine measures the final audio
    tau = float(np.quantile([r["final_similarity"] for r in results(tmp_path / "plain").values()], 0.5))
    out, nearest[:] = tmp_path / "gated", []
    assert main([*argv, "--out", str(out), "--max-similarity", str(tau), "--max-attempts", "2"]) == 0
    res = results(out)
    assert not nearest and sum(measured) == sum(r["attempts"] for r in res.values())  # once per clip
    assert {r["status"] for r in res.values()} == {"ok", "rejected"}  # both kinds of file are checked
    index = EmbeddingIndex.load(assets / "index")
    embedder, audited = load_embedder(index.embedder), {}
    for source, name in ((out / "results.parquet", "a"), (out / "rejected", "b")):  # the audit's measure
        parts = embed_all(items_from_source(source), index, embedder, tmp_path / name, AuditConfig(),
                          progress=False)  # fmt: skip
        for r in pq.read_table(parts).to_pylist():
            audited[r["id"] if name == "a" else f"rejected/{r['id']}"] = r["similarity"]
    for rid, r in res.items():
        measured = audited[rid if r["status"] == "ok" else r["audio_path"]]
        # the same function on the same file, in float32 on one CPU: equal up to the rounding of other
        # batch compositions in the embedder's matrix products (≲ 1e-6; bf16 would be ~1e-3 off)
        assert r["final_similarity"] == pytest.approx(measured, abs=1e-5), rid
        assert r["final_similarity"] == min(r["attempt_similarities"]) or r["status"] == "ok"
