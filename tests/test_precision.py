"""EngineConfig.precision: validated, part of the resume key, applied locally, and what bf16 changes.

The bf16 checks run on this CPU under ``torch.autocast("cpu", bfloat16)`` on the bundled default
model (real trained weights, preset ``default-model``), through the functions of
``benchmarks/precision_agreement.py``, which measures the same figures on 32 prompts (README).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from amg_engine.engine.config import PRESETS, EngineConfig
from amg_engine.engine.precision import PRECISIONS, Precision, default_precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import precision_agreement as agreement  # noqa: E402

# bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3 per rounded matmul/conv output). Through
# the DiT, CFG (s0 = 4 scales x0_c − x0_u) and 30 sampler steps, the final latents of the default
# model move by 0.6% of their norm in the median and 2.1% at most over 32 prompts (this CPU). The
# bound leaves 2.5x that for other CPUs and prompts; a wrong cast (fp16 overflow, a dropped term,
# garbage) moves them by O(1).
PLAIN_CFG_REL = 5e-2
# The detector's similarity on the same latents, bf16 against fp32: |difference| at most 5.1e-3 over
# 960 row-steps (median 3e-4). A gate can only differ where σ_t is that close to λ_t; bound 2e-2.
SIM_RESOLUTION = 2e-2
# Share of row-steps (teacher-forced: same latents) whose gate agrees with fp32: 100% of 960 measured.
GATE_AGREEMENT = 0.98


def test_precision_is_validated_and_resolved_from_the_device():
    with pytest.raises(ValueError, match="precision='bfloat16'.*fp32.*bf16"):
        EngineConfig(precision="bfloat16")
    assert EngineConfig().resolved_precision == "fp32"
    assert EngineConfig(device="cuda").resolved_precision == "bf16"
    assert EngineConfig(device="cuda", precision="tf32").resolved_precision == "tf32"
    assert default_precision("cuda:1") == "bf16" and default_precision("cpu") == "fp32"
    with pytest.raises(ValueError, match="choose one of"):
        Precision("int8", "cpu")


def test_precision_is_part_of_the_resume_key():
    base = PRESETS["default-model"]
    hashes = {p: replace(base, precision=p).config_hash() for p in PRECISIONS}
    assert len(set(hashes.values())) == len(PRECISIONS)
    # unset: the device's default, resolved (tests/test_resume_key.py, issue 26 item 4)
    assert base.config_hash() == hashes["fp32"]
    assert replace(base, device="cuda").config_hash() == hashes["bf16"]


def _tf32_getters() -> dict:
    """Every TF32 setting as PyTorch answers it: the legacy getters (which inductor's autotuning and
    k-diffusion read) and the per-backend ``fp32_precision`` ones. A getter that raises answers its error."""
    getters = {
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
        "matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
        "conv.fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
    }
    out = {}
    for name, get in getters.items():
        try:
            out[name] = get()
        except RuntimeError as e:  # torch ≥ 2.9: "you have used mix of the legacy and new APIs"
            out[name] = RuntimeError(str(e)[:80])
    return out


def _tf32_state() -> dict:
    """What the settings mean: the legacy getters' answers, and whether each new one says TF32 (it says
    "ieee" where it said "none" before once the legacy flag was set and restored: the same meaning)."""
    got = _tf32_getters()
    return {k: (v == "tf32" if k.endswith("fp32_precision") else v) for k, v in got.items()}


@pytest.mark.parametrize("name", ["fp32", "tf32", "bf16"])
def test_tf32_flags_are_set_locally_and_restored(name):
    """Precision.flags sets the CUDA TF32 modes only inside its block (settable without a GPU)."""
    before = _tf32_state()
    with pytest.raises(RuntimeError, match="inside"), Precision(name, "cuda").flags():
        assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is (name == "tf32")
        raise RuntimeError("inside")  # restored on the way out of an exception too
    assert _tf32_state() == before
    with Precision("tf32", "cpu").flags():  # no CUDA flags on a CPU engine
        assert _tf32_state() == before


@pytest.mark.parametrize("name", PRECISIONS)
def test_every_tf32_getter_answers_inside_the_flags(name):
    """Precision.flags uses one of PyTorch's two TF32 APIs, so both kinds of getter keep answering inside
    it, in agreement with the precision, and answer as before after it (settable without a GPU)."""
    before = _tf32_state()
    assert not any(isinstance(v, Exception) for v in before.values()), before
    tf32 = name == "tf32"
    with Precision(name, "cuda").flags():
        inside = _tf32_getters()
    assert not any(isinstance(v, Exception) for v in inside.values()), inside
    assert inside["float32_matmul_precision"] == ("high" if tf32 else "highest")
    assert inside["matmul.allow_tf32"] is inside["cudnn.allow_tf32"] is tf32
    assert (inside["matmul.fp32_precision"] == "tf32") is (inside["conv.fp32_precision"] == "tf32") is tf32
    assert _tf32_state() == before


class _CudaFlagsOnCpu(Precision):
    """A CPU engine's precision whose flags are CUDA's (they can be set and read on a machine without one)."""

    def flags(self):
        return Precision(self.name, "cuda").flags()


def test_every_tf32_getter_answers_inside_the_sampling_loop(engines, reqs, monkeypatch):
    """Where k-diffusion and inductor read them: inside the engine's step loop, under each precision's
    flags (the model's autocast stays the CPU one)."""
    import amg_engine.engine.engine as engine_mod

    e32, _ = engines
    seen, real = [], engine_mod.record_function
    monkeypatch.setattr(
        engine_mod, "record_function", lambda label: seen.append(_tf32_getters()) or real(label)
    )
    fast = replace(e32.config, sampler=replace(e32.config.sampler, steps=2))
    with agreement.with_config(e32, fast):
        for name in PRECISIONS:
            monkeypatch.setattr(e32, "precision", _CudaFlagsOnCpu(name, "cpu"))
            seen.clear()
            e32.sample(reqs[:1])
            assert len(seen) == 2, name
            for got in seen:
                assert not any(isinstance(v, Exception) for v in got.values()), (name, got)
                assert got["matmul.allow_tf32"] is (name == "tf32"), (name, got)


def test_autocast_applies_only_inside_the_wrapped_call():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    assert Precision("bf16", "cpu").wrap(lin)(x).dtype == torch.bfloat16
    assert Precision("fp16", "cpu").wrap(lin)(x).dtype == torch.float16
    assert Precision("fp32", "cpu").wrap(lin) is lin
    assert lin(x).dtype == torch.float32  # nothing left switched on


@pytest.fixture(scope="module")
def engines():
    return agreement.engines("bf16")


@pytest.fixture(scope="module")
def reqs():
    return agreement.requests(4)


def test_bf16_plain_cfg_is_close_to_fp32(engines, reqs):
    figures = agreement.plain_cfg(*engines, reqs)
    assert figures["finite"]
    assert figures["max_rel"] <= PLAIN_CFG_REL, figures
    assert figures["max_rel"] > 0  # it did run in bf16


def test_bf16_gates_agree_with_fp32_and_guidance_stays_fp32(engines, reqs):
    e32, low = engines
    figures = agreement.teacher_forced(e32, low, reqs)
    assert figures["finite"] and figures["row_steps"] == len(reqs) * e32.config.sampler.steps
    assert figures["share"] >= GATE_AGREEMENT, figures
    assert 0 < figures["max_abs_sim_diff"] <= SIM_RESOLUTION, figures
    latents, traces = low.sample(reqs[:2])
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert all(t.sim.dtype == t.lam.dtype == t.s1.dtype == torch.float32 for t in traces)
    assert any(t.gate.any() for t in traces), "the gradient path must have run"
    (out,) = low.generate(reqs[:1])
    assert out.audio.dtype == torch.float32 and out.error is None  # audio files are written from it


def test_bf16_batch_invariance(engines, reqs):
    """What holds in bf16 when a row is sampled alone instead of in a batch.

    Plain CFG: the model calls see other batch shapes, whose bf16 products may round differently on
    other hardware (on this CPU they were bit-identical), so at most the bf16-vs-fp32 bound. AMG: the
    similarity gradient is a bf16 backward pass through sub-batches whose composition depends on the
    batch, and c3 = 6000 scales its rounding; rows end up to 12% apart (relative L2, 3 rows of 32 on
    this CPU) with the same gates, where fp32 agrees to 1e-4; bound 0.3, where another row's latents
    are of order 1 away. A gate may flip only where σ_t is within the similarity's
    bf16 resolution of λ_t, after which the row follows another trajectory.
    """
    _, low = engines
    batch, traces = low.sample(reqs)
    plain = agreement.plain(low)
    for i in (0, 3):
        alone, t1 = low.sample([reqs[i]])
        gates_b = torch.stack([t.gate[i] for t in traces])
        gates_1 = torch.stack([t.gate[0] for t in t1])
        flips = (gates_b != gates_1).nonzero()
        if len(flips):
            step = int(flips[0])
            assert abs(float(t1[step].sim[0] - t1[step].lam[0])) <= SIM_RESOLUTION
        else:
            assert agreement.rel_diff(batch[i : i + 1], alone).item() <= 0.3
    with agreement.with_config(low, plain):
        batch, _ = low.sample(reqs)
        for i in (0, 3):
            alone, _ = low.sample([reqs[i]])
            assert agreement.rel_diff(batch[i : i + 1], alone).item() <= PLAIN_CFG_REL
