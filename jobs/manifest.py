"""Reading and validating a Parquet prompt manifest.

Manifest schema (one row per clip to generate; column order does not matter):

=============== ====== ==========================================================================
column          type   meaning
=============== ====== ==========================================================================
id              string required; unique (also ignoring case); a safe file name: 1–128 letters,
                       digits, ``.``, ``_``, ``-``, starting with a letter or digit
prompt          string required; non-empty; at most the text conditioner's ``max_length`` tokens
                       (counted as the encoder sees them, with T5's end-of-text token): longer is
                       an error, not a silent cut
seconds         float  duration in [one latent frame, model window]; default: the model's window
seed            int    in [0, 2**63); default: derived from the id, so reruns are reproducible
negative_prompt string must be empty or null: the engine has no negative-prompt branch yet
cfg_scale       float  per-row classifier-free guidance scale s0 (≥ 1)
steps           int    per-row sampler steps (2–10000)
sampler         string per-row sampler: dpmpp-3m-sde, dpmpp-2m-sde, dpmpp-2m or euler; on a flow
                       model (rf_denoiser) pingpong or euler
c1, c2, c3      float  per-row AMG scales (≥ 0; 0 turns a term off)
(others)        any    carried through unchanged to the results
=============== ====== ==========================================================================

Rows that share ``cfg_scale, steps, sampler, c1, c2, c3, negative_prompt`` are batched together and
run with the run's configuration overridden by those values.

A null optional value means "use the run's setting". Numbers must be finite; an integer column may
hold integral floats (``30.0``), nothing else (no strings, no booleans). Any numeric Arrow type is read
by its value: signed and unsigned integers of every width, half, single and double floats, and
decimals (DuckDB writes ``0.5 + 0.5 * x`` as ``DECIMAL(22,1)``), so ``seconds`` may be ``1.0`` as a
decimal and ``seed`` ``7`` as a ``uint8``; a refused value's message names its column's type where
that is not int64, double or string.
Column names the results use for outputs (``status``, ``error``, ``row``, ...) are reserved.

A manifest that cannot be used as a whole (unreadable, a required column missing, a reserved or
repeated column name) is refused with :class:`ManifestError` naming the problem. A bad *row* never
stops the run: it becomes a result row with status ``error`` and a message ``row <k>: <problem>``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from amg_engine.engine.config import EngineConfig, with_overrides

REQUIRED = ("id", "prompt")
OVERRIDES = ("cfg_scale", "steps", "sampler", "c1", "c2", "c3", "negative_prompt")
OPTIONAL = ("seconds", "seed", *OVERRIDES)
PLAIN_TYPES = ("int64", "double", "string", "large_string", "bool")  # not named in messages
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the whole id: use fullmatch
NEGATIVE_PROMPT_UNSUPPORTED = (
    "negative_prompt is not supported yet (the engine has no negative-prompt branch); "
    "leave the column empty or drop it"
)


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, a required column missing, ...)."""


@dataclass(frozen=True)
class Overrides:
    """A row's per-row engine settings (None: the run's setting). Rows sharing them share a batch."""

    cfg_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None
    c1: float | None = None
    c2: float | None = None
    c3: float | None = None
    negative_prompt: str | None = None

    def apply(self, base: EngineConfig) -> EngineConfig:
        """``base`` with these overrides; raises ValueError (naming the value) if the result is invalid."""
        cfg = with_overrides(base, cfg_scale=self.cfg_scale, c1=self.c1, c2=self.c2, c3=self.c3)
        sampler = {k: v for k, v in (("steps", self.steps), ("sampler", self.sampler)) if v is not None}
        return replace(cfg, sampler=replace(cfg.sampler, **sampler)) if sampler else cfg

    def config_hash(self, base: EngineConfig) -> str:
        """The configuration part of a row's resume key: the hash of ``base`` with these overrides
        (holding the precision ``base``'s device resolves). The one place it is computed: by the
        planner (a Ray driver plans with its actors' configuration) and by the workers that write it."""
        return self.apply(base).config_hash()


@dataclass(frozen=True)
class Limits:
    """What a row is checked against: the model's window, its text encoder, the run's configuration."""

    max_seconds: float
    base: EngineConfig
    max_tokens: int | None = None
    count_tokens: Callable[[str], int] | None = field(default=None, compare=False)
    min_seconds: float = 0.0  # the shortest clip the model can produce and the embedder measure

    @classmethod
    def from_engine(cls, engine) -> Limits:
        """Limits of a loaded engine; the token check only where the prompt conditioner has a tokenizer."""
        conds = getattr(getattr(engine.model, "conditioner", None), "conditioners", {})  # a ModuleDict
        cond = conds["prompt"] if "prompt" in conds else None
        tok, max_len = getattr(cond, "tokenizer", None), getattr(cond, "max_length", None)
        count = None
        if tok is not None and isinstance(max_len, int):
            # as the conditioner tokenizes (special tokens included: T5 appends </s>), so a prompt that
            # fits here is never cut by the encoder's max_length truncation
            count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
        window = engine.window / engine.sample_rate
        return cls(window, engine.config, max_len if count else None, count, min_seconds(engine))


def min_seconds(engine) -> float:
    """The shortest clip a row may ask for: one latent frame of the model (its autoencoder's
    downsampling ratio, in samples), and at least one sample at the embedder's rate, so that the
    clip's audio is not empty and its similarity is measured. Shorter is an error row."""
    ds = getattr(getattr(getattr(engine, "model", None), "pretransform", None), "downsampling_ratio", 1)
    rate = getattr(getattr(engine, "embedder", None), "sample_rate", None) or engine.sample_rate
    samples = max(int(ds), math.ceil(engine.sample_rate / rate))
    return samples / engine.sample_rate


@dataclass(frozen=True)
class Row:
    index: int  # position in the manifest
    values: dict[str, Any]  # every input column, as read
    id: str | None
    prompt: str | None
    seconds: float | None  # effective duration (default filled in); None when the row is bad
    seed: int | None  # effective seed; None when the row is bad
    overrides: Overrides | None  # None when an override has the wrong type
    error: str | None  # "row <k>: <problem>", or None

    def config(self, base: EngineConfig) -> EngineConfig:
        return self.overrides.apply(base)

    def config_hash(self, base: EngineConfig) -> str | None:
        """Hash of the configuration the row runs (or would run) with; None if its overrides are invalid."""
        try:
            return self.overrides.config_hash(base) if self.overrides is not None else None
        except ValueError:
            return None


def read_manifest(path: str | Path):
    """The manifest as a ``pyarrow.Table``, its columns checked (see the module docstring)."""
    import pyarrow.parquet as pq

    from amg_engine.jobs.results import RESERVED

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        table = pq.ParquetFile(path).read() if path.is_file() else pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise ManifestError(f"manifest {path} is not a readable Parquet file: {e}") from e
    names = table.column_names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks required column(s) {missing}; it has {names}. "
            "A manifest needs `id` and `prompt` (optional: `seconds`, `seed`, overrides)."
        )
    repeated = sorted({c for c in names if names.count(c) > 1})
    reserved = [c for c in names if c in RESERVED]
    if repeated or reserved:
        raise ManifestError(
            f"manifest {path}: column name(s) {repeated or reserved} "
            f"{'repeated' if repeated else 'reserved for result columns'}; rename them"
        )
    return table


def default_seed(row_id: str) -> int:
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "little")


# -- per-value checks: each returns (value, None) or (None, problem) --------------------------------
# ``typ``: the column's Arrow type where the manifest's schema is known, named in the problem.
def _plain(v: Any) -> Any:
    """A number of any Arrow numeric type as Python's: decimals and numpy scalars become ``int`` (exactly,
    where integral: a DECIMAL(38,0) seed keeps every digit) or ``float``; anything else is unchanged."""
    if isinstance(v, bool):
        return v
    if isinstance(v, Decimal):
        return int(v) if v.is_finite() and v == v.to_integral_value() else float(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _shown(name: str, v: Any, typ: str | None) -> str:
    """``name value`` as a message shows it, with the column's type when known."""
    value = str(v) if isinstance(v, Decimal) else repr(v)
    return f"{name} {value}" + (f" ({typ})" if typ else "")


def _number(name: str, v: Any, typ: str | None = None) -> tuple[float | None, str | None]:
    if v is None:
        return None, None
    x = _plain(v)
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None, f"{_shown(name, v, typ)} is not a finite number"
    return float(x), None


def _integer(name: str, v: Any, typ: str | None = None) -> tuple[int | None, str | None]:
    if v is None:
        return None, None
    x = _plain(v)
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        return None, f"{_shown(name, v, typ)} is not an integer"
    return x, None


def _text(name: str, v: Any, typ: str | None = None) -> tuple[str | None, str | None]:
    if v is None or isinstance(v, str):
        return v, None
    return None, f"{_shown(name, v, typ)} is not text"


_KIND = {"cfg_scale": _number, "c1": _number, "c2": _number, "c3": _number, "steps": _integer,
         "sampler": _text, "negative_prompt": _text}  # fmt: skip


def _id_problem(rid: Any) -> str | None:
    if not isinstance(rid, str):
        return f"id {rid!r} is not text"
    if not SAFE_ID.fullmatch(rid):
        return (
            f"id {rid!r} is not a safe file name (1–128 letters, digits, '.', '_', '-', starting with "
            "a letter or digit; no separators, spaces or control characters)"
        )
    return None


def _prompt_problem(prompt: Any, limits: Limits) -> str | None:
    if not isinstance(prompt, str):
        return f"prompt {prompt!r} is not text"
    if not prompt.strip():
        return "prompt is empty"
    return token_problem(prompt, limits)


def token_problem(prompt: str, limits: Limits) -> str | None:
    """Too many tokens for the text encoder (an error rather than silent truncation), or None."""
    if limits.count_tokens is None or limits.max_tokens is None:
        return None
    n = limits.count_tokens(prompt)
    if n <= limits.max_tokens:
        return None
    return (
        f"prompt has {n} tokens but the text encoder reads at most {limits.max_tokens} (special tokens "
        "such as T5's end-of-text included; the rest would be cut off silently); shorten the prompt"
    )


def _seconds(v: Any, limits: Limits, typ: str | None = None) -> tuple[float | None, str | None]:
    sec, err = _number("seconds", v, typ)
    if err or sec is None:
        return (None, err) if err else (limits.max_seconds, None)
    if not 0 < sec <= limits.max_seconds:
        return None, f"seconds {sec:g} is outside (0, {limits.max_seconds:g}], the model's window"
    if err := duration_problem(sec, limits):
        return None, err
    return sec, None


def duration_problem(seconds: float, limits: Limits) -> str | None:
    """Shorter than the model's shortest clip (:func:`min_seconds`), or None."""
    if seconds >= limits.min_seconds:
        return None
    return (f"seconds {seconds:g} is shorter than one latent frame of the model ({limits.min_seconds:g} "
            "s), the shortest clip it can generate and its similarity be measured")  # fmt: skip


def _seed(v: Any, rid: str, typ: str | None = None) -> tuple[int | None, str | None]:
    seed, err = _integer("seed", v, typ)
    if err:
        return None, f"{_shown('seed', v, typ)} is not a non-negative integer"
    if seed is None:
        return default_seed(rid), None
    if not 0 <= seed < 2**63:
        return None, f"seed {seed} is not a non-negative integer below 2**63"
    return seed, None


def _overrides(
    v: dict[str, Any], limits: Limits, types: dict[str, str]
) -> tuple[Overrides | None, str | None]:
    """The row's overrides (None if a value has the wrong type) and the first problem with them."""
    vals = {}
    for name in OVERRIDES:
        vals[name], err = _KIND[name](name, v.get(name), types.get(name))
        if err:
            return None, err
    ov = Overrides(**vals)
    if ov.negative_prompt and ov.negative_prompt.strip():
        return ov, NEGATIVE_PROMPT_UNSUPPORTED
    return ov, _override_problem(ov, limits.base)


@functools.lru_cache(maxsize=1024)
def _override_problem(ov: Overrides, base: EngineConfig) -> str | None:
    """Whether ``base`` accepts ``ov`` (a manifest repeats a few override sets over many rows)."""
    try:
        ov.apply(base)
    except ValueError as e:  # the config's own message names the value and the allowed range
        return str(e)
    return None


def check_row(v: dict[str, Any], index: int, limits: Limits, types: dict[str, str] | None = None) -> Row:
    """Row-local checks (everything but duplicate ids); the first problem found is reported. ``types``:
    column name -> its Arrow type, named in the problems where given."""
    types = types or {}
    ov, ov_err = _overrides(v, limits, types)
    bad = lambda err: Row(index, v, _as_id(v), None, None, None, ov, f"row {index}: {err}")  # noqa: E731
    if err := _id_problem(v.get("id")) or _prompt_problem(v.get("prompt"), limits):
        return bad(err)
    seconds, err = _seconds(v.get("seconds"), limits, types.get("seconds"))
    if err:
        return bad(err)
    seed, err = _seed(v.get("seed"), v["id"], types.get("seed"))
    if err or ov_err:
        return bad(err or ov_err)
    return Row(index, v, v["id"], v["prompt"], seconds, seed, ov, None)


def _as_id(v: dict[str, Any]) -> str | None:
    rid = v.get("id")
    return rid if isinstance(rid, str) else None


def validate(records: list[dict[str, Any]], limits: Limits | float, schema=None) -> list[Row]:
    """One :class:`Row` per record, in order. Ids are compared ignoring case (audio files must not
    collide on case-insensitive file systems); the first use of an id is kept, later ones are errors.

    ``limits`` may be a bare window length in seconds (the default engine configuration, no token check);
    ``schema``: the manifest's Arrow schema, whose column types the problems name (where a type is not
    one a value's own text shows: int64, double, string).
    """
    if not isinstance(limits, Limits):
        limits = Limits(float(limits), EngineConfig())
    types = {} if schema is None else {f.name: str(f.type) for f in schema if str(f.type) not in PLAIN_TYPES}
    rows, first = [], {}
    for i, v in enumerate(records):
        row = check_row(v, i, limits, types)
        if row.error is None:
            key = row.id.casefold()
            if key in first:
                j, other = first[key]
                same = "" if other == row.id else f" ({other!r} differs only in case)"
                row = replace(row, seconds=None, seed=None,
                              error=f"row {i}: duplicate id {row.id!r}{same}; row {j} keeps it")  # fmt: skip
            else:
                first[key] = (i, row.id)
        rows.append(row)
    return rows
