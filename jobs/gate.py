"""The release gate: no output whose similarity to the training set is at or above τ leaves a run.

    amg generate MANIFEST --out DIR --max-similarity [τ] [--max-attempts N] [--escalate F]

AMG lowers similarity; it bounds nothing. The gate does: a row whose final similarity (the finished
clip's embedding against its nearest training clip, ``final_similarity``) is at or above τ is
generated again, up to N attempts in all. Attempt k ≥ 2 uses a seed derived from the row's seed and k
(:meth:`ReleaseGate.seed`) and, with ``--escalate F``, the dissimilarity scale c3 multiplied by
F^(k−1). A row that clears is ``ok`` (its audio in ``audio/``); a row that never clears is
``rejected``: its best attempt (lowest similarity) is kept in ``rejected/`` and never in ``audio/``,
so every file under ``audio/`` is below τ. Between attempts a row's newest result has status
``retry`` (its best attempt so far, in ``rejected/``): a run killed mid-retry resumes with the next
attempt, keeping the earlier ones. An attempt that fails (the engine raised on its batch, its audio
was non-finite or could not be written) makes the row an ``error`` that keeps its attempts so far and
its best one's file; ``--retry-failed`` continues with the next attempt. A row's attempts are its
only state between attempts (:class:`Attempts`, recorded in its result row), and
:meth:`ReleaseGate.judge` is the one transition: attempts so far + a new attempt's similarity ->
released, retried or rejected, and which attempt's file the row keeps (:class:`Verdict`).

Retries are batched: rows that failed an attempt are gathered, across batches, into full batches of
the rows sharing their overrides and c3 scale (:class:`RetryQueue`); only what is left at the end of
a run runs in smaller batches. The gate (τ, N, F) is part of every result row's resume key (column
``gate``), so another gate regenerates every row.

With ``--no-amg`` this is the generate-and-filter baseline; ``amg ablate`` measures both.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from amg_engine.engine.config import EngineConfig

SIMILARITY_RANGE = (-1.0, 1.0)  # cosine similarity of unit embeddings, every embedder's output


@dataclass(frozen=True)
class ReleaseGate:
    """τ (None: the index embedder's replication threshold, set by :meth:`resolve`), N attempts in all,
    c3 escalation F per attempt."""

    max_similarity: float | None = None
    max_attempts: int = 3
    escalate: float = 1.0

    def __post_init__(self) -> None:
        t, lo, hi = self.max_similarity, *SIMILARITY_RANGE
        if t is not None and not (isinstance(t, int | float) and not isinstance(t, bool) and lo < t <= hi):
            raise ValueError(
                f"--max-similarity {t!r}: give a cosine similarity in ({lo:g}, {hi:g}] (the embedders' "
                "range; at -1 nothing could be released), e.g. 0.9 (mel) or 0.5 (CLAP)"
            )
        n = self.max_attempts
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"--max-attempts {n!r}: need an integer ≥ 1 (1: no regeneration, filter only)")
        f = self.escalate
        if not (isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f) and f > 0):
            raise ValueError(f"--escalate {f!r}: need a finite factor > 0 (1: the same c3 at every attempt)")

    def resolve(self, threshold: float) -> ReleaseGate:
        """This gate with τ set: its own, else ``threshold`` (the index embedder's)."""
        return self if self.max_similarity is not None else replace(self, max_similarity=float(threshold))

    @property
    def key(self) -> str:
        """The gate's part of the resume key (a resolved gate)."""
        if self.max_similarity is None:
            raise ValueError("resolve the gate's threshold first (ReleaseGate.resolve)")
        return f"tau={self.max_similarity!r};attempts={self.max_attempts};escalate={float(self.escalate)!r}"

    def releases(self, similarity: float) -> bool:
        """The clip may leave the run: its similarity is below τ (a NaN never is)."""
        return similarity < self.max_similarity

    @staticmethod
    def seed(seed: int, attempt: int) -> int:
        """Attempt 1 uses the row's seed; attempt k ≥ 2 a seed in [0, 2**63) derived from (seed, k)."""
        if attempt == 1:
            return seed
        digest = hashlib.sha256(f"amg-release-gate:{seed}:{attempt}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & (2**63 - 1)

    def c3_scale(self, attempt: int) -> float:
        return float(self.escalate) ** (attempt - 1)

    def config(self, config: EngineConfig, attempt: int) -> EngineConfig:
        """The engine configuration of ``attempt``: c3 × F^(attempt−1)."""
        scale = self.c3_scale(attempt)
        if scale == 1.0:
            return config
        return replace(config, guidance=replace(config.guidance, c3=config.guidance.c3 * scale))

    def judge(self, before: Attempts, seed: int, similarity: float, seconds: float) -> Verdict:
        """What becomes of a row whose attempts so far are ``before`` when its next attempt (``seed``,
        ``seconds``) measures ``similarity``: released, retried or rejected, and which attempt's file
        and outputs its result carries (:class:`Verdict`)."""
        after = before.add(seed, similarity, seconds)
        if self.releases(similarity):
            return Verdict("ok", after.count, after)
        return Verdict("rejected" if after.count >= self.max_attempts else "retry", after.best, after)


@dataclass(frozen=True)
class Attempts:
    """A row's attempts under the gate, oldest first: each one's seed, similarity (the gate's measure of
    its file) and seconds. It is all the state a row has between attempts: a result row records it
    (:meth:`columns`) and :meth:`of` reads it back, so a rerun continues where a run stopped."""

    seeds: tuple[int, ...] = ()
    similarities: tuple[float, ...] = ()
    seconds: tuple[float, ...] = ()

    @classmethod
    def of(cls, result: dict[str, Any] | None) -> Attempts:
        """The attempts a result row records (None, or a row without attempts: none yet)."""
        if result is None or not result.get("attempt_seeds"):
            return cls()
        return cls(tuple(result["attempt_seeds"]), tuple(result["attempt_similarities"]),
                   tuple(result["attempt_seconds"]))  # fmt: skip

    @property
    def count(self) -> int:
        return len(self.seeds)

    @property
    def next(self) -> int:
        """The number of the next attempt (1 for a row not tried yet)."""
        return self.count + 1

    @property
    def best(self) -> int | None:
        """The attempt with the lowest similarity (the earliest of equals; NaN above every number), or
        None before the first."""
        if not self.seeds:
            return None
        order = [(math.isnan(s), 0.0 if math.isnan(s) else s, j) for j, s in enumerate(self.similarities)]
        return min(order)[2] + 1

    def add(self, seed: int, similarity: float, seconds: float) -> Attempts:
        return Attempts((*self.seeds, seed), (*self.similarities, float(similarity)),
                        (*self.seconds, float(seconds)))  # fmt: skip

    def columns(self) -> dict[str, Any]:
        """The result row's record of the attempts (columns attempts, attempt_seeds, ...)."""
        return dict(
            attempts=self.count, attempt_seeds=list(self.seeds),
            attempt_similarities=list(self.similarities), attempt_seconds=list(self.seconds),
        )  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on a row after an attempt: ``status`` ok (released), retry or rejected;
    ``keep``: the attempt whose file and outputs the row's result carries (the released one, else the
    best so far); ``attempts``: the row's attempts, this one included."""

    status: str
    keep: int
    attempts: Attempts

    @property
    def fresh(self) -> bool:
        """The kept attempt is the one just made (its audio is to be written), not an earlier one."""
        return self.keep == self.attempts.count


def attempt_of(prior: dict[str, Any] | None) -> int:
    """The attempt a row is at, given its previous attempt's result row (None: the first)."""
    return 1 if prior is None else len(prior.get("attempt_seeds") or ()) + 1


class RetryQueue:
    """Rows waiting for their next attempt, gathered into batches of rows that can share an engine
    call: the same overrides and the same c3 scale (with F = 1, every attempt shares it)."""

    def __init__(self, gate: ReleaseGate, batch_size: int) -> None:
        self.gate, self.batch_size = gate, batch_size
        self._pools: OrderedDict[tuple, deque] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(p) for p in self._pools.values())

    def add(self, row, prior: dict[str, Any]) -> None:
        key = (row.overrides, self.gate.c3_scale(attempt_of(prior)))
        self._pools.setdefault(key, deque()).append((row, prior))

    def full(self) -> list | None:
        """A full batch, if a pool holds one (the lowest c3 scale first)."""
        for key in sorted(self._pools, key=lambda k: k[1]):
            if len(self._pools[key]) >= self.batch_size:
                return self._take(key)
        return None

    def drain(self) -> list | None:
        """The largest batch left (at the end of a run), or None when empty."""
        if not self._pools:
            return None
        return self._take(max(self._pools, key=lambda k: len(self._pools[k])))

    def _take(self, key) -> list:
        pool = self._pools[key]
        out = [pool.popleft() for _ in range(min(self.batch_size, len(pool)))]
        if not pool:
            del self._pools[key]
        return out


def schedule(fresh: Iterator[list], queue: RetryQueue | None) -> Iterator[list]:
    """Batches to run: full batches of retries as soon as they are gathered, the fresh batches, then
    what is left of the retries. ``fresh`` yields lists of (row, prior); rows that need another attempt
    are added to ``queue`` by the caller between batches (the generator reads it lazily)."""
    for batch in fresh:
        yield batch
        while queue is not None and (full := queue.full()):
            yield full
    while queue is not None and (left := queue.drain()):
        yield left
