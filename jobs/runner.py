"""One batch of manifest rows in, one result row per input row out; the same code runs locally and in
a Ray actor.

:meth:`BatchRunner.run` re-checks every row against the loaded engine (window, text encoder, the
row's overrides), splits the valid rows into groups that share their overrides, runs each group on
an engine *view* (the same loaded model, the configuration overridden), writes each ok row's audio,
then writes one result shard for the whole batch. Nothing raises for a bad row or a failing group:
the rows are recorded with status ``error``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine.config import EngineConfig
from jobs.manifest import Limits, Overrides, Row, check_row, token_problem
from jobs.results import ResultStore, base_result, error_result, now, write_audio

log = logging.getLogger(__name__)

AUDIO_FORMATS = ("flac", "wav")


def engine_view(engine, config: EngineConfig):
    """``engine`` with another configuration, sharing the loaded model, index and caches."""
    if config == engine.config:
        return engine
    view = copy.copy(engine)
    view.config = config
    return view


class BatchRunner:
    def __init__(self, engine, store: ResultStore, schema: pa.Schema, audio_format: str = "flac") -> None:
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio format {audio_format!r}: choose one of {AUDIO_FORMATS}")
        self.engine, self.store, self.schema, self.audio_format = engine, store, schema, audio_format
        self.limits = Limits.from_engine(engine)
        self._hashes: dict[Overrides, str] = {}

    def config_hash(self, overrides: Overrides) -> str:
        if overrides not in self._hashes:
            self._hashes[overrides] = overrides.apply(self.engine.config).config_hash()
        return self._hashes[overrides]

    def _ids(self) -> dict[str, str]:
        return dict(model_id=self.engine.model_id, index_id=self.engine.index_id)

    def run(self, records: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """``records``: (manifest position, row values). Returns the result rows (also written as a shard)."""
        results, groups = self._check(records)
        for overrides, group in groups.items():
            results += self._generate(group, overrides)
        self.store.write_part(results, self.schema)
        return results

    def _check(self, records) -> tuple[list[dict[str, Any]], dict[Overrides, list[Row]]]:
        """Error results for bad rows, and the good rows grouped by their overrides.

        The Ray driver checks rows without the text encoder, so the token check is repeated here; a row
        it fails keeps its key (config hash, seconds, seed) so that the merge finds its result.
        """
        untokenized = replace(self.limits, count_tokens=None, max_tokens=None)
        rows = [check_row(values, position, untokenized) for position, values in records]
        ids, base = self._ids(), self.engine.config
        errors = [self._failed(r, r.error, None, config_hash=r.config_hash(base), **ids)
                  for r in rows if r.error]  # fmt: skip
        groups: dict[Overrides, list[Row]] = {}
        for r in (r for r in rows if r.error is None):
            if err := token_problem(r.prompt, self.limits):
                config, cfg_hash = r.config(self.engine.config), self.config_hash(r.overrides)
                errors.append(self._failed(r, f"row {r.index}: {err}", config, config_hash=cfg_hash, **ids))
            else:
                groups.setdefault(r.overrides, []).append(r)
        return errors, groups

    def _generate(self, rows: list[Row], overrides: Overrides) -> list[dict[str, Any]]:
        from engine.engine import Request

        config = overrides.apply(self.engine.config)
        common = dict(config_hash=self.config_hash(overrides), **self._ids())
        start = time.perf_counter()
        try:
            outs = engine_view(self.engine, config).generate(
                [Request(r.id, r.prompt, r.seconds, r.seed) for r in rows]
            )
        except Exception as e:  # a failing batch is recorded row by row; the run goes on
            log.exception("engine failed on the batch of rows %s", [r.index for r in rows])
            timing = (time.perf_counter() - start) / len(rows)
            return [self._failed(r, f"row {r.index}: engine failed on its batch: {type(e).__name__}: {e}",
                                 config, timing=timing, **common) for r in rows]  # fmt: skip
        timing = (time.perf_counter() - start) / len(rows)
        return [self._finished(r, g, config, timing, common) for r, g in zip(rows, outs, strict=True)]

    def _finished(self, row: Row, g, config: EngineConfig, timing: float, common: dict) -> dict[str, Any]:
        if g.error:
            return self._failed(row, f"row {row.index}: {g.error}", config, timing=timing, **common)
        rel = Path("audio") / f"{row.id}.{self.audio_format}"
        try:
            st = write_audio(self.store.dir / rel, g.audio.numpy(), self.engine.sample_rate, self.store.tag)
        except Exception as e:  # e.g. a full disk: this row fails, the run goes on
            log.exception("could not write %s", rel)
            msg = f"row {row.index}: could not write {rel}: {type(e).__name__}: {e}"
            return self._failed(row, msg, config, timing=timing, **common)
        out = base_result(row.index, row.values, _inputs_used(row, config))
        out.update(status="ok", error=None, audio_path=str(rel), audio_bytes=st.st_size,
                   audio_mtime_ns=st.st_mtime_ns, timing=timing, finished_at=now(), **common)  # fmt: skip
        out.update(self._outputs(g))
        return out

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


def _inputs_used(row: Row, config: EngineConfig) -> dict[str, Any]:
    g, s = config.guidance, config.sampler
    return dict(id=row.id, prompt=row.prompt, seconds=row.seconds, seed=row.seed,
                negative_prompt=row.overrides.negative_prompt, cfg_scale=g.cfg_scale, steps=s.steps,
                sampler=s.sampler, c1=g.c1, c2=g.c2, c3=g.c3)  # fmt: skip
