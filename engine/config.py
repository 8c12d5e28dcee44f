"""Frozen, validated configuration: one dataclass per concern, named presets, a graph key."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

MODES = ("reference", "corrected")
STRATEGIES = ("amg", "transition")
GRADIENTS = ("full", "detector")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _finite(name: str, value: float) -> None:
    _check(
        isinstance(value, int | float) and math.isfinite(value), f"{name}={value!r}: must be a finite number"
    )


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance plus Anti-Memorization Guidance (Chen et al. 2024; Messina et al. 2025).

    D = x0_u + (s0 − m·s1)(x0_c − x0_u) − m·s2·(x0_N − x0_u) − m·c3·√(1−ᾱ)·∇_x σ_t, per row, with
    s1 = clamp(c1·σ_t, 0, s0−1), s2 = clamp(c2·σ_t, 0, s0−s1−1), m = 1[σ_t > λ_t] and
    λ_t = λ_min + (λ_max − λ_min)·ᾱ², ᾱ = 1/(1+σ²). ``amg=False`` is plain CFG (m ≡ 0, no detector).

    mode ``corrected`` (default): Stable Audio's own unconditional branch (text zeroed, timing kept),
    the detector embeds the CFG-guided prediction, audio reaches the embedder at its true rate with
    per-row peak normalisation; with the gate closed the step is exactly the plain-CFG step.
    mode ``reference``: the published code's semantics, quirks included (zero-text zero-timing
    unconditional, detector on the conditional prediction, model-rate audio fed to the embedder as if
    at the embedder's rate), so its thresholds mean what the paper's mean.
    """

    amg: bool = True
    mode: Literal["reference", "corrected"] = "corrected"
    # "amg": Anti-Memorization Guidance (above). "transition": Jain et al. (CVPR 2025) — guidance
    # scale ``scale_before`` until a transition point detected online from ‖x0_c − x0_u‖, then cfg_scale.
    strategy: Literal["amg", "transition"] = "amg"
    scale_before: float = 1.0
    cfg_scale: float = 7.0
    c1: float = 6.0  # despecification
    c2: float = 6.0  # caption deduplication
    c3: float = 1000.0  # dissimilarity
    lambda_min: float = 0.4
    lambda_max: float = 0.5
    # the smallest prompt scale s0 − s1 − s2 despecification and caption deduplication may leave: 1 as
    # published (s1 ≤ s0 − 1, so at cfg_scale 1 both are off); 0 lets them reach the unconditional
    # prediction, which few-step flow models sampled without CFG need (engine/flow_guidance.py). Only
    # the flow models' combine reads it: on a v model it must stay 1.
    min_scale: float = 1.0
    # Cheaper variants of AMG (issue 29; README, "Cheaper AMG"). gradient "full": ∇_x σ_t by a backward
    # pass through the model, decoder and embedder (the method). "detector": through the decoder and
    # embedder only, with ∂x0/∂x_t taken as ᾱ·I (the denoiser's skip path c_skip = 1/(1+σ²)): no
    # backward through the model and no model forward with autograd.
    gradient: Literal["full", "detector"] = "full"
    # The cascade: None runs the detector for every row at every step (the method). θ ≥ 0 runs it for a
    # row from the step after its free signal ‖x0_c − x0_u‖ (RMS per latent value, computed by CFG
    # anyway) first reaches θ, at step 0, and at every ``cascade_every``-th step (0: never on that
    # account); elsewhere the row's gate stays closed (engine/guidance.Cascade). θ = 0 is full AMG.
    # ``amg calibrate`` measures θ for a model and stores it beside it (cascade.json).
    cascade_threshold: float | None = None
    cascade_every: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"mode={self.mode!r}: choose one of {MODES}")
        self._check_variants()
        _check(self.strategy in STRATEGIES, f"strategy={self.strategy!r}: choose one of {STRATEGIES}")
        for name in ("cfg_scale", "c1", "c2", "c3", "lambda_min", "lambda_max", "scale_before"):
            _finite(name, getattr(self, name))
        _check(
            self.cfg_scale >= 1,
            f"cfg_scale={self.cfg_scale}: must be ≥ 1 (AMG caps s1 + s2 at cfg_scale − 1)",
        )
        for name in ("c1", "c2", "c3"):
            _check(
                getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be ≥ 0 (0 turns the term off)"
            )
        _finite("min_scale", self.min_scale)
        _check(
            0 <= self.min_scale <= min(1.0, self.cfg_scale),
            f"min_scale={self.min_scale}: need 0 ≤ min_scale ≤ 1 (1: the published caps; 0: despecification "
            "may reach the unconditional prediction)",
        )
        _check(
            -1 <= self.lambda_min <= self.lambda_max <= 1,
            f"lambda_min={self.lambda_min}, lambda_max={self.lambda_max}: "
            "need -1 ≤ lambda_min ≤ lambda_max ≤ 1",
        )

    def _check_variants(self) -> None:
        _check(self.gradient in GRADIENTS, f"gradient={self.gradient!r}: choose one of {GRADIENTS}")
        t, k = self.cascade_threshold, self.cascade_every
        if t is not None:
            _finite("cascade_threshold", t)
            _check(t >= 0, f"cascade_threshold={t}: must be ≥ 0 (0 runs the detector at every step)")
        _check(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0,
            f"cascade_every={k!r}: need an integer ≥ 0 (0: the detector runs on the free signal alone)",
        )
        _check(
            t is not None or k == 0,
            f"cascade_every={k}: only with a cascade; set cascade_threshold too (e.g. 0.0)",
        )
        if self.is_variant:
            _check(
                self.amg and self.strategy == "amg",
                f"gradient={self.gradient!r}, cascade_threshold={t!r}: variants of AMG need amg=True and "
                "strategy='amg' (the transition strategy and plain CFG run no detector)",
            )

    @property
    def is_variant(self) -> bool:
        """A cheaper variant of AMG (detector gradient or cascade) rather than the method itself."""
        return self.gradient != "full" or self.cascade_threshold is not None


@dataclass(frozen=True)
class SamplerConfig:
    """The sampler, its schedule and its noise. ``schedule`` fixes the time variable (engine/sampling.py):
    "polyexponential" and "karras" run over the VE sigma of v-objective models, "rf-logsnr" over the
    flow time t of rectified-flow models (stable-audio-tools' ``sample_rf``; ``sigma_max`` is then t's
    start, in (0, 1], and ``sigma_min``, ``rho`` are unused). The sampler must run in that variable."""

    sampler: str = "dpmpp-3m-sde"
    schedule: str = "polyexponential"
    steps: int = 100
    sigma_min: float = 0.3
    sigma_max: float = 500.0
    rho: float = 1.0
    # SDE samplers' noise: "gaussian" (i.i.d. per row and step, cheap) or "brownian" (k-diffusion's
    # Brownian tree, as stable-audio-tools samples; reproduces generate_diffusion_cond row by row).
    noise: Literal["gaussian", "brownian"] = "gaussian"

    def __post_init__(self) -> None:
        from amg_engine.engine.sampling import SAMPLERS, SCHEDULE_SPACE, SCHEDULES, check_space

        _check(
            self.noise in ("gaussian", "brownian"), f"noise={self.noise!r}: choose 'gaussian' or 'brownian'"
        )
        _check(self.sampler in SAMPLERS, f"sampler={self.sampler!r}: choose one of {sorted(SAMPLERS)}")
        _check(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: choose one of {sorted(SCHEDULES)}")
        _check(
            isinstance(self.steps, int) and 2 <= self.steps <= 10_000, f"steps={self.steps!r}: need 2..10000"
        )
        for name in ("sigma_min", "sigma_max", "rho"):
            _finite(name, getattr(self, name))
        _check(
            0 < self.sigma_min < self.sigma_max, f"sigma range ({self.sigma_min}, {self.sigma_max}) is empty"
        )
        if SCHEDULE_SPACE[self.schedule] == "t":
            _check(
                self.sigma_max <= 1,
                f"sigma_max={self.sigma_max}: schedule {self.schedule!r} starts the flow time t in (0, 1]; "
                "use 1.0 (pure noise)",
            )
        check_space(self.sampler, self.schedule)
        _check(
            not (self.noise == "brownian" and SCHEDULE_SPACE[self.schedule] == "t"),
            f"noise='brownian' on schedule {self.schedule!r}: k-diffusion's Brownian tree is over sigma; "
            "flow samplers draw fresh gaussian noise (noise='gaussian', as stable-audio-tools does)",
        )


@dataclass(frozen=True)
class EngineConfig:
    guidance: GuidanceConfig = GuidanceConfig()
    sampler: SamplerConfig = SamplerConfig()
    batch_size: int = 16
    device: str = "cpu"
    compile: bool = False  # torch.compile the model calls and the sampler step (slow to compile on CPU)
    # rows gated at the previous step keep autograd on their forward, so the gradient needs only the
    # backward pass (same outputs; off recomputes the forward for every gated row)
    reuse_forward: bool = True
    # numeric precision of the model calls, decoder and embedder (engine/precision.py): fp32, tf32,
    # bf16 or fp16; None: the device's default, bf16 on CUDA and fp32 elsewhere
    precision: str | None = None
    # where the training index's vectors live for the per-step search: "" the engine's device alone;
    # "all" every visible CUDA device; or a list such as "cuda:0,cuda:1" (engine/shards.py). Same
    # neighbours wherever they live, so it is not part of the resume key.
    index_devices: str = ""
    # memory (GiB) for the autograd graphs of the gated path: the similarity gradient runs in
    # micro-batches, and rows are kept warm (reuse_forward), only as many rows at once as fit.
    # None: no split (every gated row in one call). A budget below one row still computes one row.
    grad_memory_gib: float | None = None
    # one row's graph (GiB), e.g. from benchmarks/bench_amg_cost.py; None: measured on the first
    # gradient forward of each batch (bytes autograd saves for one row), which then runs one row alone
    grad_row_gib: float | None = None

    def __post_init__(self) -> None:
        from amg_engine.engine.precision import PRECISIONS

        for name in ("grad_memory_gib", "grad_row_gib"):
            v = getattr(self, name)
            _check(
                v is None or (isinstance(v, int | float) and math.isfinite(v) and v > 0),
                f"{name}={v!r}: need a positive number of GiB, or None",
            )
        _check(
            self.grad_row_gib is None or self.grad_memory_gib is not None,
            f"grad_row_gib={self.grad_row_gib}: it sizes the gradient's micro-batches under a memory "
            "budget; set grad_memory_gib too (or leave both unset: no split)",
        )

        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size={self.batch_size!r}: need a positive integer",
        )
        _check(
            self.precision is None or self.precision in PRECISIONS,
            f"precision={self.precision!r}: choose one of {PRECISIONS}, or None for the device's "
            "default (bf16 on CUDA, fp32 on CPU)",
        )
        _check(
            isinstance(self.index_devices, str),
            f"index_devices={self.index_devices!r}: give a string, '' (the engine's device), 'all' or "
            "a comma-separated list such as 'cuda:0,cuda:1'",
        )

    @property
    def resolved_precision(self) -> str:
        """The precision the engine runs in: the configured one, else the device's default."""
        from amg_engine.engine.precision import default_precision

        return self.precision or default_precision(self.device)

    def config_hash(self) -> str:
        """Identity of the configuration fields that change outputs: with the model's and the index's
        own ids (``model_id``, ``index_id``) and each row's inputs, it keys resumable results.

        The precision is the one the engine runs in (:attr:`resolved_precision`: an unset one is the
        device's default, bf16 on CUDA and fp32 elsewhere), so a run resumed on another device, or
        planned on one and run on another, does not mix precisions under one key; it is left out
        when fp32, so fp32 results (all those written before the field existed) keep their hash.
        The device itself is left out: it changes outputs through the precision, else by rounding.
        """
        d = asdict(self)
        d.pop("device")
        d.pop("compile")
        d.pop("reuse_forward")  # same outputs either way
        d.pop("grad_memory_gib")  # micro-batches: same outputs, as batch_size
        d.pop("grad_row_gib")
        d.pop("batch_size")  # outputs are batch-invariant by design
        d.pop("precision")
        d.pop("index_devices")  # placement only: the shards' merged answer is the single search's
        if self.guidance.min_scale == 1.0:  # the published caps: the hash of every config before the field
            d["guidance"].pop("min_scale")
        g = d["guidance"]  # the variants' fields only where set, so the method's keys stay as they were
        for name, default in (("gradient", "full"), ("cascade_threshold", None), ("cascade_every", 0)):
            if g[name] == default:
                g.pop(name)
        if self.resolved_precision != "fp32":
            d["precision"] = self.resolved_precision
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Named presets. "default-model" is tuned for the embedded default model and its mel embedder;
# the SAO 1.0 presets are the published settings (amg-reference.md §2). "sao-small" is Stable Audio
# Open Small's own sampling (rf_denoiser objective, stable-audio-tools' sample_rf t schedule, ping-pong,
# 8 steps, no CFG), AMG off; "sao-small-amg" the same with AMG as engine/flow_guidance.py defines it on a
# flow model (CLAP thresholds of sao-demo, caps down to the unconditional prediction). "default-flow" is
# the bundled few-step flow variant of the default model (engine/default/assets/model-flow).
PRESETS: dict[str, EngineConfig] = {
    "default-model": EngineConfig(
        GuidanceConfig(cfg_scale=4.0, c1=3.0, c2=3.0, c3=6000.0, lambda_min=0.6, lambda_max=0.75),
        SamplerConfig(sampler="dpmpp-2m", steps=30, sigma_min=0.03, sigma_max=80.0),
    ),
    "sao-paper": EngineConfig(
        GuidanceConfig(
            mode="reference", cfg_scale=7.0, c1=6.0, c2=6.0, c3=1000.0, lambda_min=0.4, lambda_max=0.5
        ),
        SamplerConfig(noise="brownian"),  # as stable-audio-tools' dpmpp-3m-sde samples
    ),
    "sao-demo": EngineConfig(
        GuidanceConfig(
            mode="reference", cfg_scale=7.0, c1=4.0, c2=3.0, c3=100.0, lambda_min=0.7, lambda_max=0.8
        ),
        SamplerConfig(noise="brownian"),
    ),
    "sao-small": EngineConfig(
        GuidanceConfig(amg=False, cfg_scale=1.0),
        # sigma_max: t starts at 1 (pure noise); sigma_min is unused by the rf-logsnr schedule
        SamplerConfig(sampler="pingpong", schedule="rf-logsnr", steps=8, sigma_min=0.01, sigma_max=1.0),
    ),
    "sao-small-amg": EngineConfig(
        GuidanceConfig(
            cfg_scale=1.0, c1=0.5, c2=0.5, c3=100.0, lambda_min=0.7, lambda_max=0.8, min_scale=0.0
        ),
        SamplerConfig(sampler="pingpong", schedule="rf-logsnr", steps=8, sigma_min=0.01, sigma_max=1.0),
    ),
    "default-flow": EngineConfig(
        GuidanceConfig(
            cfg_scale=1.0, c1=0.5, c2=0.5, c3=20000.0, lambda_min=0.6, lambda_max=0.75, min_scale=0.0
        ),
        SamplerConfig(sampler="pingpong", schedule="rf-logsnr", steps=8, sigma_min=0.01, sigma_max=1.0),
    ),
}


def with_overrides(config: EngineConfig, **guidance) -> EngineConfig:
    """A copy with some guidance fields replaced (None values are ignored)."""
    changes = {k: v for k, v in guidance.items() if v is not None}
    return replace(config, guidance=replace(config.guidance, **changes))
