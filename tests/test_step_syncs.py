"""Host syncs in the denoising step, counted on the CPU.

On CUDA, reading a device value on the host (``.item()``, ``bool()``, ``nonzero``, boolean indexing,
``torch.equal``...) waits for the GPU. On a CPU-only machine nothing waits, so the test instruments
instead: a dispatch mode tags the tensors that would live on the device (the denoiser's inputs and
state, and everything computed from them) and records every op that reads a tagged tensor's values
on the host. ``engine.transfer.host_read`` is the one deliberate read: the
AMG step makes exactly one per step (the gate and the neighbour ids, one copy), plain CFG none, and
nothing else in the step reads the device. ``benchmarks/gpu_check.py`` checks the same on a GPU with
``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
from jobs_helpers import tiny_assets
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from amg_engine.engine import guidance
from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
from amg_engine.engine.engine import Engine, Request

aten = torch.ops.aten
# ops whose result the host needs before it can go on (a device -> host copy and a wait on CUDA)
HOST_READS = {
    aten.nonzero, aten._local_scalar_dense, aten.is_nonzero, aten.masked_select, aten.equal,
    aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.repeat_interleave, aten.allclose,
}  # fmt: skip
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_}  # a boolean index is a nonzero


class DeviceReads(TorchDispatchMode):
    """Records host reads of values of 'device' tensors (tagged per tensor object) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.device_tensors = WeakTensorKeyDictionary()
        self.reads: list[str] = []

    def tag(self, obj, on_device: bool = True) -> None:
        for t in tree_leaves(obj):
            if isinstance(t, torch.Tensor):
                if on_device:
                    self.device_tensors[t] = True
                else:
                    self.device_tensors.pop(t, None)

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.device_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        from_device = any(self.on_device(t) for t in leaves)
        packet = func.overloadpacket
        bool_index = packet in BOOL_INDEXED and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1])
        )
        if from_device and (packet in HOST_READS or bool_index):
            self.reads.append(str(func))
        out = func(*args, **kwargs)
        # outputs live where their inputs do (a factory, with no tensor input, counts as the host's:
        # the dispatcher fills in its device either way, so a device factory is missed, never invented)
        self.tag(out, from_device)
        return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory)


def _engine(assets, **guidance_changes) -> Engine:
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.55, lambda_max=0.65)
    s = SamplerConfig(sampler="dpmpp-2m-sde", steps=6, sigma_min=0.05, sigma_max=20.0)
    return Engine(EngineConfig(replace(g, **guidance_changes), s), assets / "model", assets / "index")


def _count(engine: Engine, reqs, monkeypatch, module=guidance, denoiser=None):
    """(explicit host reads per call of the denoiser, implicit device reads) over one engine.sample.
    ``module``: where the step's denoiser and its ``host_read`` and ``to_device`` live, ``denoiser`` its
    class (default ``module.AMGDenoiser``; engine/flow_guidance.py's ``FlowAMGDenoiser`` for flow models)."""
    denoiser = denoiser or module.AMGDenoiser
    mode, explicit, calls = DeviceReads(), [], []
    real_read, real_call = module.host_read, denoiser.__call__

    def counted_read(t):
        explicit.append(tuple(t.shape))
        out = real_read(t).clone()
        mode.tag(out, on_device=False)
        return out

    def to_device(t, device):  # on CPU .to() returns the same tensor: copy it so the tags can differ
        out = t.clone()
        mode.tag(out)
        return out

    def step(self, x, sigma):
        mode.tag((x, sigma, [getattr(self, f.name) for f in fields(self) if f.init and f.name != "model"]))
        mode.tag(self.params.__dict__)
        calls.append(len(explicit))
        with mode:
            return real_call(self, x, sigma)

    monkeypatch.setattr(module, "host_read", counted_read)
    monkeypatch.setattr(module, "to_device", to_device)
    monkeypatch.setattr(denoiser, "__call__", step)
    _, traces = engine.sample(reqs)
    per_call = [b - a for a, b in zip(calls, [*calls[1:], len(explicit)], strict=True)]
    return per_call, mode.reads, traces


def _requests(n: int) -> list[Request]:
    prompts = ["An acoustic drum loop, 90 bpm", "A warm synth pad playing a C major chord", "Rain"]
    return [Request(f"r{i}", prompts[i % 3], 0.5 + 0.1 * i, 7 + i) for i in range(n)]


def test_amg_step_reads_the_device_once(assets, monkeypatch):
    engine = _engine(assets)
    reqs = _requests(6)
    engine.sample(reqs)  # fills the neighbour-conditioning cache; the counted run then hits it
    per_call, implicit, traces = _count(engine, reqs, monkeypatch)
    gates = torch.stack([t.gate for t in traces])  # [steps, B]
    assert gates.any() and not gates.all(), "the test needs open and closed gates"
    assert (gates[1:] & gates[:-1]).any(), "the test needs warm rows (gated at consecutive steps)"
    assert per_call == [1] * engine.config.sampler.steps  # the gate + neighbours, one copy per step
    assert implicit == [], f"host reads of device values inside the step: {implicit}"


def test_plain_cfg_step_reads_nothing(assets, monkeypatch):
    engine = _engine(assets, amg=False)
    per_call, implicit, _ = _count(engine, _requests(3), monkeypatch)
    assert per_call == [0] * engine.config.sampler.steps and implicit == []


def test_the_instrument_sees_a_sync(assets, monkeypatch):
    """The counter can fail: a step that branches on a device value is caught."""
    engine = _engine(assets)
    real = guidance.search_fn

    def search_with_a_sync(device):
        def search(xq, xb):
            sim, nn = real(device)(xq, xb)
            if bool((sim > 2).any()):  # a host read of a device value
                raise AssertionError("unreachable: similarities are at most 1")
            return sim, nn

        return search

    monkeypatch.setattr(guidance, "search_fn", search_with_a_sync)
    _, implicit, _ = _count(engine, _requests(2), monkeypatch)
    assert len(implicit) == engine.config.sampler.steps


def test_amg_step_over_a_chunked_float16_memory_map_reads_the_device_once(assets, tmp_path, monkeypatch):
    """The CPU's chunked scan of a memory-mapped float16 index (5 rows a chunk here) merges on the
    device: still the one host read per step."""
    from amg_engine.index.store import EmbeddingIndex, save_mapped

    save_mapped(EmbeddingIndex.load(assets / "index"), tmp_path / "idx", "float16")
    real = guidance.scan_chunked
    monkeypatch.setattr(guidance, "scan_chunked", lambda xq, xb: real(xq, xb, 5))
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.55, lambda_max=0.65)
    s = SamplerConfig(sampler="dpmpp-2m-sde", steps=6, sigma_min=0.05, sigma_max=20.0)
    engine = Engine(EngineConfig(g, s), assets / "model", tmp_path / "idx")
    assert engine.index.vectors.dtype == torch.float16 and len(engine.index) > 5
    reqs = _requests(4)
    engine.sample(reqs)
    per_call, implicit, traces = _count(engine, reqs, monkeypatch)
    assert torch.stack([t.gate for t in traces]).any()
    assert per_call == [1] * engine.config.sampler.steps and implicit == []


@pytest.mark.parametrize(
    "variant",
    [
        {"gradient": "detector"},
        {"cascade_threshold": 0.5},
        {"cascade_threshold": 0.5, "gradient": "detector"},
    ],
)
def test_variant_steps_read_the_device_once(assets, monkeypatch, variant):
    """The cheaper variants (issue 29) keep the one host read per step: the cascade's free signal comes
    back in the gate's read and decides the next step's detector rows."""
    engine = _engine(assets, **variant)
    reqs = _requests(6)
    engine.sample(reqs)
    per_call, implicit, traces = _count(engine, reqs, monkeypatch)
    assert torch.stack([t.gate for t in traces]).any(), "the test needs open gates"
    if "cascade_threshold" in variant:
        ran = ~torch.isnan(torch.stack([t.sim for t in traces]))
        assert not ran.all(), "the test needs rows whose detector the cascade skips"
    assert per_call == [1] * engine.config.sampler.steps
    assert implicit == [], f"host reads of device values inside the step: {implicit}"
