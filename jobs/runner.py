"""One batch of manifest rows in, one result row per input row out; the same code runs locally and in
a Ray actor. And the circuit breaker that stops a run whose engine keeps failing.

:meth:`BatchRunner.run_batch` re-checks every row against the loaded engine (window, text encoder,
the row's overrides), splits the valid rows into groups that share their overrides, runs each group
on an engine *view* (the same loaded model, the configuration overridden), writes each ok row's
audio, then writes one result shard for the whole batch. Nothing raises for a bad row or a failing
group: the rows are recorded with status ``error``. Under a release gate (:mod:`jobs.gate`) a record
may carry its row's previous attempt; the row runs with its attempt's seed and c3, and its result is
``ok`` (cleared), ``retry`` (another attempt to come) or ``rejected`` (the last attempt did not clear).

:class:`CircuitBreaker` watches the batches' outcomes (see its docstring): after ``limit``
consecutive batches of one worker failed in the engine it raises :class:`CircuitOpen`, which the job
turns into a stopped run (results kept, a message naming the error, exit code 3).
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from amg_engine.engine.config import EngineConfig
from amg_engine.jobs.gate import Attempts, ReleaseGate, attempt_of
from amg_engine.jobs.manifest import Limits, Overrides, Row, check_row, duration_problem, token_problem
from amg_engine.jobs.results import (
    OutputUnavailable,
    ResultStore,
    base_result,
    encode_audio,
    error_result,
    now,
    write_audio,
)

log = logging.getLogger(__name__)

AUDIO_FORMATS = ("flac", "wav")
AUDIO_WRITERS = 4  # threads writing a batch's audio files (libsndfile and file I/O release the GIL)
# what a gated row's result carries of its kept attempt when a later attempt did not beat it
KEPT_OUTPUTS = ("audio_path", "audio_bytes", "audio_mtime_ns", "audio_sha256", "final_similarity",
                "max_similarity", "neighbour_id", "neighbour_caption", "guided_steps", "trace_similarity",
                "trace_lambda", "trace_gate", "trace_s1", "trace_s2", "trace_neighbour_id")  # fmt: skip


class CircuitOpen(RuntimeError):
    """The run stopped: its engine failed on too many consecutive batches (:class:`CircuitBreaker`)."""


class WorkerLost(RuntimeError):
    """A batch whose worker died every time it ran it (raised in place of running it again)."""


@dataclass
class BatchOutcome:
    """What became of one batch. ``failure``: the engine's error when it raised on every group of the
    batch (else None); ``pending``: then the batch's shard, written but not yet published."""

    ok: int
    errors: int
    failure: str | None = None
    pending: Path | None = None
    first_row: int | None = None  # the batch's first manifest position, for messages
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)
    worker: str = "local"

    def count(self, counts: dict[str, int]) -> None:
        counts["ok"], counts["error"] = counts["ok"] + self.ok, counts["error"] + self.errors


def engine_view(engine, config: EngineConfig):
    """``engine`` with another configuration, sharing the loaded model, index and caches."""
    if config == engine.config:
        return engine
    view = copy.copy(engine)
    view.config = config
    return view


class BatchRunner:
    def __init__(self, engine, store: ResultStore, schema: pa.Schema, audio_format: str = "flac",
                 gate: ReleaseGate | None = None) -> None:  # fmt: skip
        """``gate``: the release gate with its threshold resolved (:meth:`ReleaseGate.resolve`), or None."""
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio format {audio_format!r}: choose one of {AUDIO_FORMATS}")
        if gate is not None and gate.max_similarity is None:
            raise ValueError("the release gate's threshold is unset: pass gate.resolve(threshold)")
        self.engine, self.store, self.schema, self.audio_format = engine, store, schema, audio_format
        self.gate = gate
        self.limits = Limits.from_engine(engine)
        self._hashes: dict[Overrides, str] = {}

    def config_hash(self, overrides: Overrides) -> str:
        if overrides not in self._hashes:
            self._hashes[overrides] = overrides.config_hash(self.engine.config)
        return self._hashes[overrides]

    def _ids(self) -> dict[str, str | None]:
        gate = None if self.gate is None else self.gate.key
        return dict(model_id=self.engine.model_id, index_id=self.engine.index_id, gate=gate)

    def run(self, records: list[tuple]) -> list[dict[str, Any]]:
        """``records``: (manifest position, row values), or under a release gate (position, values,
        the row's previous attempt's result or None). Returns the result rows (also written as a
        shard)."""
        outcome = self.run_batch(records)
        if outcome.pending is not None:
            self.store.publish(outcome.pending)
        return outcome.results

    def run_batch(self, records: list[tuple], forced: str | None = None) -> BatchOutcome:
        """Like :meth:`run`, but a batch that failed in the engine is written as a *pending* shard for a
        :class:`CircuitBreaker` to publish or discard. ``forced``: fail every engine call with this
        message instead of running it (a batch that keeps killing its worker, see jobs.ray_run)."""
        priors = {rec[0]: rec[2] for rec in records if len(rec) > 2}
        results, groups = self._check([rec[:2] for rec in records])
        calls: dict[tuple, list[Row]] = {}  # rows of one engine call: overrides and attempt's c3 scale
        for overrides, group in groups.items():
            for r in group:
                scale = 1.0 if self.gate is None else self.gate.c3_scale(attempt_of(priors.get(r.index)))
                calls.setdefault((overrides, scale), []).append(r)
        failures, superseded = [], set()
        for (overrides, _), group in calls.items():
            rows, failure, files = self._generate(group, overrides, forced, priors)
            results += rows
            failures += [failure] if failure else []
            superseded |= files
        failed = bool(calls) and len(failures) == len(calls)
        pending = None
        if failed:
            pending = self.store.write_pending(results, self.schema)
        else:
            self.store.write_part(results, self.schema)
        for p in superseded:  # earlier attempts' files: the shard that no longer names them is out
            p.unlink(missing_ok=True)
        ok = sum(r["status"] == "ok" for r in results)
        first = min((rec[0] for rec in records), default=None)
        return BatchOutcome(ok, len(results) - ok, failures[-1] if failed else None, pending, first, results)

    def _check(self, records) -> tuple[list[dict[str, Any]], dict[Overrides, list[Row]]]:
        """Error results for bad rows, and the good rows grouped by their overrides.

        The Ray driver checks rows without the text encoder and the model's shortest clip, so those
        checks are repeated here; a row they fail keeps its key (config hash, seconds, seed) so that
        the merge finds its result.
        """
        untokenized = replace(self.limits, count_tokens=None, max_tokens=None, min_seconds=0.0)
        rows = [check_row(values, position, untokenized) for position, values in records]
        ids, base = self._ids(), self.engine.config
        errors = [self._failed(r, r.error, None, config_hash=r.config_hash(base), **ids)
                  for r in rows if r.error]  # fmt: skip
        groups: dict[Overrides, list[Row]] = {}
        for r in (r for r in rows if r.error is None):
            if err := token_problem(r.prompt, self.limits) or duration_problem(r.seconds, self.limits):
                config, cfg_hash = r.config(self.engine.config), self.config_hash(r.overrides)
                errors.append(self._failed(r, f"row {r.index}: {err}", config, config_hash=cfg_hash, **ids))
            else:
                groups.setdefault(r.overrides, []).append(r)
        return errors, groups

    def _generate(self, rows: list[Row], overrides: Overrides, forced: str | None = None,
                  priors: dict[int, dict | None] | None = None):  # fmt: skip
        """-> (result rows, the engine's error as "Type: message" if it raised on the group, else None,
        files of earlier attempts that the result rows no longer name, to delete once they are written).
        Under a release gate the rows share their attempt's c3 scale (run_batch groups them so)."""
        from amg_engine.engine.engine import Request

        gate, priors = self.gate, priors or {}
        attempts = [attempt_of(priors.get(r.index)) for r in rows]
        config = overrides.apply(self.engine.config)
        if gate is not None:
            config = gate.config(config, attempts[0])
        seeds = [gate.seed(r.seed, k) if gate else r.seed for r, k in zip(rows, attempts, strict=True)]
        encoded: dict[int, bytes] = {}  # under the gate: each clip's file bytes, encoded once
        common = dict(config_hash=self.config_hash(overrides), **self._ids())
        start = time.perf_counter()
        try:
            if forced:
                raise WorkerLost(forced)
            requests = [Request(r.id, r.prompt, r.seconds, seed) for r, seed in zip(rows, seeds, strict=True)]
            view = engine_view(self.engine, config)
            # under the gate the engine leaves the similarity to _as_written: each clip is embedded once
            outs = view.generate(requests) if gate is None else view.generate(requests, measure=False)
            if gate is not None:
                outs, encoded = self._as_written(outs)
        except Exception as e:  # a failing batch is recorded row by row; the run goes on
            log.exception("engine failed on the batch of rows %s", [r.index for r in rows])
            timing = (time.perf_counter() - start) / len(rows)
            failure = f"{type(e).__name__}: {e}"
            failed = [self._interrupted(r, priors.get(r.index), f"row {r.index}: engine failed on its batch: "
                                        f"{failure}", config, timing, common) for r in rows]  # fmt: skip
            return failed, failure, set()
        timing = (time.perf_counter() - start) / len(rows)

        def finish(k: int) -> tuple[dict[str, Any], set[Path]]:
            r, g = rows[k], outs[k]
            prior = priors.get(r.index)
            if gate is None or (g.error and prior is None):
                return self._finished(r, g, config, timing, common), set()
            if g.error:
                return self._interrupted(r, prior, f"row {r.index}: {g.error}", config, timing, common), set()
            return self._gated(r, g, config, timing, common, prior, seeds[k], encoded[k])

        with ThreadPoolExecutor(min(AUDIO_WRITERS, len(rows))) as pool:  # encoding and file creation overlap
            done = list(pool.map(finish, range(len(rows))))
        return [out for out, _ in done], None, {p for _, files in done for p in files}

    def _finished(self, row: Row, g, config: EngineConfig, timing: float, common: dict,
                  rel: Path | None = None, encoded: bytes | None = None) -> dict[str, Any]:  # fmt: skip
        """The result of a generated row: its audio written to ``rel`` (default ``audio/<id>``);
        ``encoded``: its file bytes, if already encoded."""
        if g.error:
            return self._failed(row, f"row {row.index}: {g.error}", config, timing=timing, **common)
        rel = rel or Path("audio") / f"{row.id}.{self.audio_format}"
        try:
            audio, rate = g.audio.numpy(), self.engine.sample_rate
            f = write_audio(self.store.dir / rel, audio, rate, self.store.tag, encoded)
        except OSError as e:  # a full disk, a read-only or lost folder: the run's fault, it stops
            raise OutputUnavailable(self.store.dir / rel, e) from e
        except Exception as e:  # the audio cannot be encoded: this row fails, the run goes on
            log.exception("could not write %s", rel)
            msg = f"row {row.index}: could not write {rel}: {type(e).__name__}: {e}"
            return self._failed(row, msg, config, timing=timing, **common)
        out = base_result(row.index, row.values, _inputs_used(row, config))
        out.update(status="ok", error=None, audio_path=str(rel), audio_bytes=f.size,
                   audio_mtime_ns=f.mtime_ns, audio_sha256=f.sha256, timing=timing, finished_at=now(),
                   **common)  # fmt: skip
        out.update(self._outputs(g))
        return out

    def _gated(self, row: Row, g, config: EngineConfig, timing: float, common: dict,
               prior: dict | None, seed: int, encoded: bytes) -> tuple[dict, set[Path]]:  # fmt: skip
        """One attempt's result under the release gate (module docstring of jobs.gate), and the row's
        files it no longer names (earlier attempts), to delete once the result is written."""
        verdict = self.gate.judge(Attempts.of(prior), seed, float(g.final_similarity), timing)
        if verdict.status != "ok":  # nothing of a row at or above τ is among the released files
            for fmt in AUDIO_FORMATS:
                (self.store.audio / f"{row.id}.{fmt}").unlink(missing_ok=True)
        if verdict.fresh:  # this attempt is released, or the best so far: write its audio
            rel = None  # released: audio/<id>
            if verdict.status != "ok":
                self.store.rejected.mkdir(exist_ok=True)
                rel = Path("rejected") / self._attempt_file(row.id, verdict.keep).name
            out = self._finished(row, g, config, timing, common, rel, encoded)
            if out["status"] != "ok":  # its audio could not be written: the attempts so far stay
                return self._interrupted(row, prior, out["error"], config, timing, common), set()
        else:  # an earlier attempt stays the best: its outputs and file, this attempt's bookkeeping
            out = self._carried(row, prior, verdict.keep, timing, common)
        out.update(verdict.attempts.columns(), status=verdict.status, error=None)
        mine = {self._attempt_file(row.id, j) for j in range(1, self.gate.max_attempts + 1)}
        return out, mine - {self.store.dir / out["audio_path"]}

    def _carried(self, row: Row, prior: dict, keep: int, timing: float, common: dict) -> dict[str, Any]:
        """A result carrying attempt ``keep``'s outputs and file from ``prior`` (the row's previous
        result), its inputs and manifest position from ``row`` (the manifest may have moved it)."""
        config = self.gate.config(row.config(self.engine.config), keep)
        out = base_result(row.index, row.values, _inputs_used(row, config))
        out.update({k: prior[k] for k in KEPT_OUTPUTS}, timing=timing, finished_at=now(), **common)
        return out

    def _interrupted(self, row: Row, prior: dict[str, Any] | None, message: str, config: EngineConfig,
                     timing: float, common: dict) -> dict[str, Any]:  # fmt: skip
        """An error result for a row whose attempt failed (the engine raised, its audio was non-finite
        or could not be written). Under the gate, a row with earlier attempts keeps them and its best
        attempt's file: ``--retry-failed`` continues with the next attempt."""
        before = Attempts.of(prior)
        if before.best is None:
            return self._failed(row, message, config, timing=timing, **common)
        log.warning("%s", message)
        out = self._carried(row, prior, before.best, timing, common)
        out.update(before.columns(), status="error", error=message)
        return out

    def _as_written(self, outs: list) -> tuple[list, dict[int, bytes]]:
        """``outs`` with each clip's final similarity and neighbour measured on its file as it will be
        written (16-bit PCM), by the audit's measure (:meth:`engine.engine.Engine.measure_files`:
        read as ``amg audit`` reads it, embedded in float32 whatever the run's precision), a few rows
        per embedder call: what the release gate judges is the file it releases, measured as ``amg
        audit`` measures it. Also each clip's file bytes (by position in ``outs``), written as they are."""
        from amg_engine.engine.engine import FINAL_DECODE_ROWS

        outs, ok = list(outs), [k for k, g in enumerate(outs) if not g.error]
        rate = self.engine.sample_rate
        encoded = {k: encode_audio(outs[k].audio.numpy(), rate, self.audio_format) for k in ok}
        for a in range(0, len(ok), FINAL_DECODE_ROWS):
            chunk = ok[a : a + FINAL_DECODE_ROWS]
            sims, nns = self.engine.measure_files([encoded[k] for k in chunk])
            for k, sim, nn in zip(chunk, sims, nns, strict=True):
                outs[k] = replace(outs[k], final_similarity=sim, neighbour=nn)
        return outs, encoded

    def _attempt_file(self, row_id: str, attempt: int) -> Path:
        return self.store.rejected / f"{row_id}-a{attempt}.{self.audio_format}"

    def _outputs(self, g) -> dict[str, Any]:
        ids, captions = self.engine.index.ids, self.engine.index.captions
        sims = [float(s["similarity"]) for s in g.trace]  # NaN where no detector ran (transition strategy)
        seen = [s for s in sims if s == s]
        return dict(
            final_similarity=float(g.final_similarity), max_similarity=max(seen) if seen else None,
            neighbour_id=ids[g.neighbour], neighbour_caption=captions[g.neighbour],
            guided_steps=sum(bool(s["gate"]) for s in g.trace), trace_similarity=sims,
            trace_lambda=[float(s["lambda"]) for s in g.trace], trace_gate=[bool(s["gate"]) for s in g.trace],
            trace_s1=[float(s["s1"]) for s in g.trace], trace_s2=[float(s["s2"]) for s in g.trace],
            trace_neighbour_id=[ids[n] if (n := int(s["neighbour"])) >= 0 else None for s in g.trace],
        )  # fmt: skip

    def _failed(self, row: Row, message: str, config: EngineConfig | None, **fields: Any) -> dict[str, Any]:
        log.warning("%s", message)
        if row.error is None:  # a valid (safe, unique) id: an older run's audio no longer matches its result
            for fmt in AUDIO_FORMATS:
                (self.store.audio / f"{row.id}.{fmt}").unlink(missing_ok=True)
        out = error_result(row, message, **fields)
        if config is not None:
            out.update(_inputs_used(row, config))
        return out


def carried(result: dict[str, Any]) -> dict[str, Any]:
    """What a gated row's next attempt needs of its result (its id, attempts and kept attempt's
    outputs), in plain JSON types: what a Ray driver and its actors pass between rounds."""
    keys = ("id", *KEPT_OUTPUTS, "attempt_seeds", "attempt_similarities", "attempt_seconds")
    return {k: result[k] for k in keys}


def _inputs_used(row: Row, config: EngineConfig) -> dict[str, Any]:
    g, s = config.guidance, config.sampler
    return dict(id=row.id, prompt=row.prompt, seconds=row.seconds, seed=row.seed,
                negative_prompt=row.overrides.negative_prompt, cfg_scale=g.cfg_scale, steps=s.steps,
                sampler=s.sampler, c1=g.c1, c2=g.c2, c3=g.c3)  # fmt: skip


class CircuitBreaker:
    """Stops a run after ``limit`` consecutive failed batches of one worker (0: never).

    A batch *fails* when the engine raised on it as a whole (on every group of rows it ran): that is
    what a systematic failure looks like (out of memory, a kernel that does not compile, a missing
    file, a lost device). Bad rows do not count: validation errors, too-long prompts and rows whose
    audio came out non-finite are recorded row by row, and a batch that ran anything successfully, or
    held only bad rows, ends a streak or leaves it as it was. Streaks are counted per worker (a Ray
    actor), so one broken device among many still stops the run.

    A failed batch's shard is held back (written, not published) while its streak is open: the next
    success of that worker, or the end of the run, publishes it (its rows become error rows, which
    ``--retry-failed`` regenerates). When a streak reaches ``limit``, every held shard is discarded
    and :class:`CircuitOpen` is raised: those rows have no result, so a rerun of the same command
    regenerates them, while every row finished before stays done.
    """

    def __init__(self, store: ResultStore, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"--max-failed-batches {limit}: need ≥ 0 (0 never stops a run)")
        self.store, self.limit = store, limit
        self._streaks: dict[str, list[BatchOutcome]] = {}

    def record(self, outcome: BatchOutcome) -> None:
        if outcome.failure is None:
            self._publish(self._streaks.pop(outcome.worker, []))
            return
        if self.limit == 0:
            self._publish([outcome])
            return
        streak = self._streaks.setdefault(outcome.worker, [])
        streak.append(outcome)
        if len(streak) >= self.limit:
            message = self._message(streak)
            for held in self._streaks.values():
                for b in held:
                    b.pending.unlink(missing_ok=True)
            self._streaks.clear()
            raise CircuitOpen(message)

    def close(self) -> None:
        """The run ended normally: publish every held shard."""
        for held in self._streaks.values():
            self._publish(held)
        self._streaks.clear()

    def _publish(self, outcomes: list[BatchOutcome]) -> None:
        for b in outcomes:
            if b.pending is not None:
                self.store.publish(b.pending)

    def _message(self, streak: list[BatchOutcome]) -> str:
        where = "" if streak[-1].worker == "local" else f" on worker {streak[-1].worker}"
        errors = list(dict.fromkeys(b.failure for b in streak))
        also = f" (earlier in the streak: {'; '.join(errors[:-1])})" if len(errors) > 1 else ""
        rows = sum(b.ok + b.errors for b in streak)
        return (
            f"stopped: {len(streak)} batches in a row failed in the engine{where}: {errors[-1]}{also}. "
            f"Rows finished before are kept; fix the cause and rerun the same command to resume "
            f"(the {rows} rows of those batches will be generated again). "
            "--max-failed-batches sets how many failed batches in a row stop a run (0: never)."
        )
