"""Shared test helpers: a tiny random-weight engine, a fast fake engine, manifests.

Not a conftest: imported by name (``tests/`` is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig

PROMPTS = [
    "An acoustic drum loop, 90 bpm",
    "A warm synth pad playing a C major chord",
    "Wind howling outside",
    "An electronic drum loop, 150 bpm",
    "A marimba arpeggio in A minor, 100 bpm",
    "Rain falling on a window",
]

# Few, cheap steps: a 200-row run takes seconds on one CPU core.
FAST_FLAGS = ["--steps", "3", "--sampler", "dpmpp-2m", "--batch-size", "8", "--quiet"]


def fast_config(**guidance) -> EngineConfig:
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.0, lambda_max=0.2)
    g = GuidanceConfig(**{**g.__dict__, **guidance})
    return EngineConfig(g, SamplerConfig(sampler="dpmpp-2m", steps=3, sigma_min=0.05, sigma_max=20.0), 8)


def make_tiny_assets(root: Path) -> Path:
    """A tiny model of the default architecture (random weights) and an index of the training clips.

    Used by tests/test_engine.py and the jobs tests. Returns ``root``, holding ``model/`` and ``index/``.
    """
    from stable_audio_tools.models.factory import create_model_from_config

    from amg_engine.engine.default.data import write_dataset
    from amg_engine.engine.default.model import build_tokenizer, model_config
    from amg_engine.engine.models import save_model
    from amg_engine.index.build import build_from_manifest
    from amg_engine.index.embedders import MelEmbedder

    manifest = write_dataset(root / "train")
    captions = pq.read_table(manifest).column("caption").to_pylist()
    build_tokenizer(captions, root / "model" / "tokenizer")
    config = model_config(depth=1, heads=2, embed=64, cond_dim=64)
    resolved = json.loads(json.dumps(config))
    resolved["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(
        root / "model" / "tokenizer"
    )
    torch.manual_seed(0)
    model = create_model_from_config(resolved)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.08)
    save_model(model, config, root / "model")
    build_from_manifest(manifest, MelEmbedder(), root / "index")
    return root


def tiny_assets(tmp_path_factory) -> Path:
    """:func:`make_tiny_assets` once per test session (shared by the test modules that need it)."""
    root = tmp_path_factory.getbasetemp() / "tiny-jobs-assets"
    if not (root / "index" / "embedder.json").exists():
        make_tiny_assets(root)
    return root


# Gates are exact comparisons σ_t > λ_t, but σ_t itself differs by float32 rounding between code
# paths, batch compositions, thread counts or processes (≲ 1e-5 on these tiny models). Comparing gates
# across two such runs is only sound when no σ_t lies that close to λ_t: assert the margin first.
GATE_MARGIN = 1e-4


def assert_gates_are_clear(sims, lams, margin: float = GATE_MARGIN) -> None:
    """Every σ_t is at least ``margin`` away from its λ_t (nested lists or tensors, same shape), so
    rounding cannot flip a gate and the gates of two runs may be compared exactly."""
    gap = (torch.as_tensor(sims, dtype=torch.float64) - torch.as_tensor(lams, dtype=torch.float64)).abs()
    assert gap.min() > margin, f"a σ_t lies {gap.min():.2g} from λ_t: pick thresholds with a clear margin"


def write_manifest(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def good_manifest(path: Path, n: int, start: int = 0) -> Path:
    ids = [f"row-{i:04d}" for i in range(start, start + n)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(start, start + n)]
    return write_manifest(path, {"id": ids, "prompt": prompts, "seconds": [0.5] * n})


# -- a fake engine with the Engine interface that returns silence at once --------------------------
@dataclass
class _Index:
    ids: list[str] = field(default_factory=lambda: ["clip-000", "clip-001"])
    captions: list[str] = field(default_factory=lambda: ["a drum loop", "a synth pad"])


@dataclass
class _Embedder:
    replication_threshold: float = 0.9


class _Tokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


class _Conditioner:
    tokenizer = _Tokenizer()
    max_length = 16


class _Conditioners:
    conditioners = {"prompt": _Conditioner()}


class _Model:
    conditioner = _Conditioners()


class FakeEngine:
    """Same interface as :class:`engine.engine.Engine`; silence, a fixed trace, no model.

    ``fail_ids``: requests whose id is listed come back with ``Generated.error`` (non-finite audio);
    ``raise_on``: a batch containing one of these ids raises, as an engine failure would;
    ``raise_calls``: the generate calls (0-based) that raise ``failure``, e.g. ``range(2, 10**9)`` for
    an engine that breaks for good at its third batch (a systematic failure).
    """

    def __init__(self, config: EngineConfig | None = None, fail_ids=(), raise_on=(), raise_calls=(),
                 failure="CUDA out of memory. Tried to allocate 2.00 GiB"):  # fmt: skip
        self.config = config or fast_config()
        self.window, self.sample_rate = 8192, 8000
        self.index, self.embedder, self.model = _Index(), _Embedder(), _Model()
        self.model_id, self.index_id = "fake:000000000000", "fake-index:000000000000"
        self.replication_threshold = 0.9
        self.fail_ids, self.raise_on, self.raise_calls = set(fail_ids), set(raise_on), raise_calls
        self.failure = failure
        self.calls: list[list[str]] = []  # ids of each generate call (shared with engine views)
        self.configs: list[EngineConfig] = []  # the configuration each call ran with

    def generate(self, requests, measure=True):
        from amg_engine.engine.engine import Generated

        ids = [r.id for r in requests]
        self.calls.append(ids)
        self.configs.append(self.config)
        if self.raise_on & set(ids):
            raise RuntimeError("engine exploded")
        if len(self.calls) - 1 in self.raise_calls:
            raise RuntimeError(self.failure)
        steps = self.config.sampler.steps
        trace = [dict(similarity=0.5, gate=True, s1=0.1, s2=0.2, neighbour=1, **{"lambda": 0.4})] * steps
        out = []
        for r in requests:
            audio = torch.zeros(1, round(r.seconds * self.sample_rate))
            err = "non-finite audio (latents diverged); row discarded" if r.id in self.fail_ids else None
            out.append(Generated(r, audio, 0.5, 0, list(trace), err))
        return out


class RecordingEngine(FakeEngine):
    """A :class:`FakeEngine` for Ray actors: each call appends ``begin|end pid time ids`` lines to
    ``log_dir/calls-<pid>.txt`` and takes ``delay`` seconds; a batch holding ``kill_id`` SIGKILLs its
    process (only the first time when ``kill_once``, else every time)."""

    def __init__(self, config, log_dir, delay=0.0, kill_id=None, kill_once=True, **kw):
        super().__init__(config, **kw)
        self.log_dir, self.delay, self.kill_id, self.kill_once = Path(log_dir), delay, kill_id, kill_once

    def _note(self, what: str, ids: list[str]) -> None:
        import os
        import time

        with open(self.log_dir / f"calls-{os.getpid()}.txt", "a") as f:
            f.write(f"{what} {os.getpid()} {time.time()} {','.join(ids)}\n")

    def generate(self, requests, measure=True):
        import os
        import signal
        import time

        ids = [r.id for r in requests]
        self._note("begin", ids)
        marker = self.log_dir / "killed"
        if self.kill_id in ids and not (self.kill_once and marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        out = super().generate(requests, measure)
        self._note("end", ids)
        return out


class GatedRecordingEngine(RecordingEngine):
    """A :class:`RecordingEngine` for the release gate: row ``id`` measures ``sims[id][k-1]`` at attempt
    k (read from the request's seed, given the rows' ``seeds``), else 0.3; its audio is that similarity
    / 2 and :meth:`measure_files` reads it back. Calls are logged as ``id@k``; the batch holding
    attempt ``kill_attempt`` of ``kill_id`` SIGKILLs its process, the first time only."""

    def __init__(self, config, log_dir, sims, seeds, kill_id=None, kill_attempt=None, delay=0.0):
        from amg_engine.jobs.gate import ReleaseGate

        super().__init__(config, log_dir, delay)
        self.sims, self.kill = sims, (kill_id, kill_attempt)
        self.attempt = {ReleaseGate.seed(s, k): k for s in seeds.values() for k in range(1, 9)}

    def generate(self, requests, measure=True):
        import os
        import signal
        import time

        from amg_engine.engine.engine import Generated

        calls = [(r.id, self.attempt[r.seed]) for r in requests]
        self._note("begin", [f"{i}@{k}" for i, k in calls])
        marker = self.log_dir / "killed"
        if self.kill in calls and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        out = []
        for r, (_, k) in zip(requests, calls, strict=True):
            sims = self.sims.get(r.id, [])
            sim = sims[k - 1] if k <= len(sims) else 0.3
            out.append(Generated(r, torch.full((1, round(r.seconds * self.sample_rate)), sim / 2), sim, 0))
        self._note("end", [f"{i}@{k}" for i, k in calls])
        return out

    def measure_files(self, files):
        from amg_engine.jobs.results import decode_audio

        sims = [2 * float(decode_audio(f).mean()) for f in files]
        return sims, [1] * len(sims)


@dataclass(frozen=True)
class FakeSpec:
    """Stands in for :class:`jobs.ray_run.EngineSpec`: each Ray actor loads a :class:`RecordingEngine`;
    ``raise_calls="all"``: every call raises; ``barrier``: an actor's load waits (up to 2 minutes)
    until that many actors have loaded, so that on a loaded machine none starts the work alone."""

    config: EngineConfig
    log_dir: str
    delay: float = 0.0
    kill_id: str | None = None
    kill_once: bool = True
    raise_calls: tuple | str = ()
    barrier: int = 0
    gate: tuple | None = None  # (sims, seeds, kill_attempt): a GatedRecordingEngine

    def load(self):
        import os
        import time

        (Path(self.log_dir) / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while len(list(Path(self.log_dir).glob("ready-*"))) < self.barrier and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.gate is not None:
            sims, seeds, kill_attempt = self.gate
            return GatedRecordingEngine(self.config, self.log_dir, sims, seeds, self.kill_id, kill_attempt,
                                        self.delay)  # fmt: skip
        calls = range(10**9) if self.raise_calls == "all" else self.raise_calls
        return RecordingEngine(self.config, self.log_dir, self.delay, self.kill_id, self.kill_once,
                               raise_calls=calls)  # fmt: skip

    def window_seconds(self) -> float:
        return 8192 / 8000

    def ids(self):
        from amg_engine.jobs.generate import RunIds

        return RunIds("fake:000000000000", "fake-index:000000000000", 0.9)


def engine_calls(log_dir: Path) -> list[dict]:
    """Every call a :class:`RecordingEngine` began: pid, ids, begin and end times (end None: it never
    finished, e.g. its process was killed)."""
    calls, open_calls = [], {}
    lines = sorted((float(t), what, int(pid), ids) for p in Path(log_dir).glob("calls-*.txt")
                   for what, pid, t, ids in (ln.split(" ") for ln in p.read_text().splitlines()))  # fmt: skip
    for t, what, pid, ids in lines:
        if what == "begin":
            open_calls[pid] = dict(pid=pid, ids=ids.split(","), begin=t, end=None)
            calls.append(open_calls[pid])
        else:
            open_calls.pop(pid)["end"] = t
    return calls


def hash_as_before_the_new_fields(cfg) -> str:
    """``cfg.config_hash()`` as computed before this session's fields existed: the fields that key
    results then (placement and batching left out as always), none of the ones added since (index
    placement, the gradient's memory budget, the flow models' min_scale, the cheaper variants). A
    config that leaves the new fields at their defaults must keep this hash, so old results resume."""
    import hashlib
    import json
    from dataclasses import asdict

    d = asdict(cfg)
    for k in ("device", "compile", "reuse_forward", "batch_size", "precision"):  # never in the key
        d.pop(k)
    for k in ("index_devices", "grad_memory_gib", "grad_row_gib"):  # added since
        d.pop(k)
    for k in ("min_scale", "gradient", "cascade_threshold", "cascade_every"):  # added since
        d["guidance"].pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
