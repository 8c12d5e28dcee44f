"""The batched AMG denoiser: one call per sampler step, every quantity per row.

Per step (σ shared, B rows):
1. one batched model call for [conditional; unconditional] (no autograd),
2. detector: decode the probe prediction, embed it, nearest training example on the device,
3. gate m = σ_t > λ_t per row,
4. only for rows whose gate is open: the neighbour-caption branch (if c2 > 0) and the
   dissimilarity gradient (if c3 > 0), recomputed with autograd on the gated subset,
5. the fused combine (``kernels.guidance.amg_combine``) gives D, s1, s2, gate.

Skipping (4) for closed rows gives the same D as computing everything and multiplying by m = 0:
the combine selects rather than multiplies, so the unused rows never enter the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.profiler import record_function

from engine.compile import cfg_branches
from engine.models import Conditioning, v_denoise


@dataclass(frozen=True)
class RowParams:
    """Per-row guidance parameters, all [B] float32 on the device."""

    cfg_scale: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    c3: torch.Tensor

    def __getitem__(self, idx) -> RowParams:
        return RowParams(self.cfg_scale[idx], self.c1[idx], self.c2[idx], self.c3[idx])


@dataclass(frozen=True)
class StepTrace:
    """What the detector saw at one step, per row ([B] tensors; empty trace when AMG is off)."""

    sim: torch.Tensor
    lam: torch.Tensor
    gate: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    neighbour: torch.Tensor


def lambda_t(alpha_bar: torch.Tensor, lambda_min: float, lambda_max: float) -> torch.Tensor:
    """The parabolic threshold of the audio AMG code: λ_min + (λ_max − λ_min)·ᾱ²."""
    return lambda_min + (lambda_max - lambda_min) * alpha_bar**2


def combine_fn(device: torch.device) -> Callable:
    """The Triton combine on CUDA, its torch twin elsewhere (the interpreter is not a fast path)."""
    from kernels.guidance import amg_combine, amg_combine_ref

    return amg_combine if device.type == "cuda" else amg_combine_ref


def search_fn(device: torch.device) -> Callable:
    """Nearest training row per query, (sim [B], idx [B]): the fused Triton search on CUDA, else its twin."""
    from kernels.nn_search import nn_search, nn_search_ref

    return nn_search if device.type == "cuda" else nn_search_ref


@dataclass
class AMGDenoiser:
    """Callable ``(x [B,C,L], sigma [B]) -> (D [B,C,L], StepTrace | None)`` for one batch of rows.

    detector(x0 [B,C,L], rows) -> unit-norm embeddings [B, D]; it decodes and embeds.
    """

    model: torch.nn.Module
    cond: Conditioning
    uncond: Conditioning
    params: RowParams
    detector: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    index_vectors: torch.Tensor  # [N, D]
    neighbour_cond: Callable[[torch.Tensor], Conditioning]  # training indices [G] -> conditioning
    amg: bool = True
    reference: bool = False
    lambda_min: float = 0.4
    lambda_max: float = 0.5

    branches: Callable | None = None  # (x, sigma, cond, uncond) -> (x0_c, x0_u), maybe compiled

    def _branches(self, x, sigma, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        return cfg_branches(self.model, x, sigma, cond, uncond)

    def _probe(self, x0_c, x0_u, cfg_scale) -> torch.Tensor:
        if self.reference:
            return x0_c  # the published code embeds the conditional prediction (quirk Q2)
        return x0_u + cfg_scale[:, None, None] * (x0_c - x0_u)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor):
        s0 = self.params.cfg_scale
        with torch.no_grad(), record_function("amg/model"):
            x0_c, x0_u = (self.branches or self._branches)(x, sigma, self.cond, self.uncond)
        if not self.amg:
            return x0_u + s0[:, None, None] * (x0_c - x0_u), None
        rows = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            with record_function("amg/decode+embed"):
                emb = self.detector(self._probe(x0_c, x0_u, s0), rows)
            with record_function("amg/search"):
                sim, nn = search_fn(x.device)(emb, self.index_vectors)  # [B], [B]; no host sync
        alpha_bar = 1 / (1 + sigma.float() ** 2)
        lam = lambda_t(alpha_bar, self.lambda_min, self.lambda_max)
        gated = (sim > lam).nonzero().squeeze(1)  # host sync: the gated subset decides the work
        x0_n = torch.zeros_like(x0_c)
        grad = torch.zeros_like(x0_c)
        if gated.numel():
            self._gated_terms(x, sigma, gated, nn, x0_n, grad)
        combine = combine_fn(x.device)
        p = self.params
        with record_function("amg/combine"):
            d, s1, s2, gate = combine(x0_u, x0_c, x0_n, grad, sim, lam, alpha_bar, s0, p.c1, p.c2, p.c3)
        return d, StepTrace(sim, lam, gate, s1, s2, nn)

    def _gated_terms(self, x, sigma, gated, nn, x0_n, grad) -> None:
        """Fill the neighbour prediction and the similarity gradient for the gated rows only."""
        p = self.params[gated]
        need_n = gated[p.c2 > 0]
        if need_n.numel():
            with torch.no_grad(), record_function("amg/neighbour"):
                x0_n[need_n] = v_denoise(
                    self.model, x[need_n], sigma[need_n], self.neighbour_cond(nn[need_n])
                )
        need_g = gated[p.c3 > 0]
        if need_g.numel():
            with record_function("amg/gradient"):
                grad[need_g] = self.similarity_grad(x[need_g], sigma[need_g], need_g, nn[need_g])

    def similarity_grad(self, x, sigma, rows, nn) -> torch.Tensor:
        """∇_x σ_t for the given rows, with the neighbour held fixed (rows are independent)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            cond, uncond = self.cond[rows], self.uncond[rows]
            if self.reference:
                probe = v_denoise(self.model, x, sigma, cond)
            else:
                x0_c, x0_u = self._branches(x, sigma, cond, uncond)
                probe = self._probe(x0_c, x0_u, self.params.cfg_scale[rows])
            emb = self.detector(probe, rows)
            sim = (emb.float() * self.index_vectors[nn]).sum(dim=1)
            (g,) = torch.autograd.grad(sim.sum(), x)
        return g


@dataclass
class TransitionDenoiser:
    """Guidance switched on at a transition point detected online (Jain et al., CVPR 2025).

    "CFG inside the attraction basin may cause memorization": before the transition point (TP) a row
    is sampled with scale ``scale_before`` (1 = conditional only, no CFG; < 0 = opposite guidance),
    from the TP on with the normal CFG scale. The TP is detected per row from d_j = ‖x0_c − x0_u‖
    (computed anyway, so it costs nothing): the first step j ≥ 2 with d_j > d_{j−1} < d_{j−2}, the
    first local minimum of d, seen one step late. All state is per-row tensors: no host sync.
    No detector runs: the trace's similarity, λ and neighbour are NaN, NaN and −1; its ``gate`` marks
    the steps still before the TP (guidance modified).
    """

    model: torch.nn.Module
    cond: Conditioning
    uncond: Conditioning
    cfg_scale: torch.Tensor  # [B]
    scale_before: float = 1.0
    branches: Callable | None = None

    def __post_init__(self) -> None:
        b = self.cfg_scale.shape[0]
        self._d = torch.full((2, b), float("nan"), device=self.cfg_scale.device)  # d_{j-1}, d_{j-2}
        self._passed = torch.zeros(b, dtype=torch.bool, device=self.cfg_scale.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor):
        with torch.no_grad():
            x0_c, x0_u = (self.branches or partial(cfg_branches, self.model))(
                x, sigma, self.cond, self.uncond
            )
        d = (x0_c - x0_u).float().flatten(1).norm(dim=1)  # [B]
        d1, d2 = self._d
        self._passed = self._passed | ((d > d1) & (d2 > d1))  # NaN history compares False
        self._d = torch.stack([d, d1])
        w = torch.where(self._passed, self.cfg_scale, torch.full_like(self.cfg_scale, self.scale_before))
        out = x0_u + w[:, None, None] * (x0_c - x0_u)
        nan, zeros = torch.full_like(d, float("nan")), torch.zeros_like(d)
        trace = StepTrace(nan, nan, ~self._passed, zeros, zeros, torch.full_like(d, -1, dtype=torch.long))
        return out, trace
