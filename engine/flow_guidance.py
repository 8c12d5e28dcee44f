"""AMG on rectified-flow models sampled in a few ping-pong steps (Stable Audio Open Small's kind).

**The time variable.** A rectified-flow model (stable-audio-tools' ``rf_denoiser``) is trained on the
interpolant ``x_t = (1 − t)·x0 + t·ε`` and predicts ``v = ε − x0``, so ``x̂0 = x_t − t·v``. Dividing by
``1 − t`` gives ``x_t/(1 − t) = x0 + (t/(1 − t))·ε``: the flow state is the VE state of k-diffusion at

    σ(t) = t / (1 − t),            x_ve = x_t / (1 − t),

scaled. With ``r(t) = √((1 − t)² + t²)`` it is also ``r`` times the VP state ``√ᾱ·x0 + √(1 − ᾱ)·ε`` at

    ᾱ(t) = (1 − t)² / r²,          √(1 − ᾱ(t)) = t / r,

which is the ``ᾱ = 1/(1 + σ²)`` of the published code at ``σ = t/(1 − t)``. So the threshold keeps its
definition, ``λ_t = λ_min + (λ_max − λ_min)·ᾱ(t)²`` (:func:`flow_alpha_bar`), and the gate still compares
the detector's similarity of the x0 prediction with it.

**The gradient scale.** The published dissimilarity term moves the x0 estimate by
``−c3·√(1 − ᾱ)·∇_{x_ve} σ_t``. The engine differentiates through the flow model, i.e. with respect to
``x_t``; since ``x_ve = x_t/(1 − t)``, ``∇_{x_ve} = (1 − t)·∇_{x_t}``, so the same move is

    Δx0 = −c3 · t(1 − t)/r · ∇_{x_t} σ_t           (:func:`flow_grad_scale`).

For the same prediction and detector this is *exactly* the published update, whichever variable the
model is written in (tests/test_flow_amg.py checks it by autograd in both coordinates). It vanishes at
t = 1 (the first ping-pong step, where x̂0 does not depend on where on the noise the state is) and peaks
at 0.35·c3 for t = 0.5.

**Where the guidance enters a step that re-noises.** The ping-pong step throws ``x`` away:
``x_next = (1 − t_next)·D + t_next·ε_fresh``. The guidance is applied to ``D`` (the x0 estimate) before the
re-noise, as on the VE samplers. Guiding the velocity instead is the same thing: the step reads the
velocity only through ``D = x − t·v``, so a guided velocity ``v' = v − Δx0/t`` gives ``D' = D + Δx0`` and the
identical next state; there is one choice, not two. What differs from a VE sampler is the memory: a
guided ``D`` reaches the next step only through ``(1 − t_next)·D'``, and the fresh noise re-randomises the
rest, so a correction is not accumulated across steps as in DPM-Solver's ``x``; the last step (t_next = 0)
returns ``D'`` itself, so the final correction lands in the output unattenuated.

**Without an unconditional pass.** Few-step flow models are sampled with ``cfg_scale = 1``: one forward a
step. The published caps ``s1 ≤ s0 − 1`` and ``s2 ≤ s0 − s1 − 1`` would switch despecification and caption
deduplication off there. ``min_scale`` (GuidanceConfig) is the smallest prompt scale ``s0 − s1 − s2`` the
two may leave: 1 as published, 0 to let them reach the unconditional prediction. They then need an
unconditional forward (and deduplication the neighbour caption's), which is run only for the rows whose
gate is open and whose term is on; the gradient costs one more forward with autograd and its backward,
for the same rows. So each term is switched by its scale (c1, c2, c3 = 0: off, nothing computed) and a
row whose gate stays closed costs one forward plus the detector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from amg_engine.engine.guidance import GuidedBatch, StepTrace, combine_fn, lambda_t, search_fn
from amg_engine.engine.shards import index_rows, nearest
from amg_engine.engine.transfer import host_read, to_device

__all__ = ["FlowAMGDenoiser", "flow_alpha_bar", "flow_grad_scale", "flow_sigma"]


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """The VE noise level of flow time t: σ = t/(1 − t) (inf at t = 1)."""
    return t / (1 - t)


def flow_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) = (1 − t)²/((1 − t)² + t²) = 1/(1 + σ(t)²), finite at t = 1 (where it is 0)."""
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def flow_grad_scale(t: torch.Tensor) -> torch.Tensor:
    """The coefficient of ∇_{x_t}σ_t in the x0 move: √(1 − ᾱ(t))·(1 − t) = t(1 − t)/√((1 − t)² + t²)."""
    return t * (1 - t) / ((1 - t) ** 2 + t**2).sqrt()


def _col(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None]


@dataclass
class FlowAMGDenoiser(GuidedBatch):
    """Callable ``(x [B,C,L], t [B]) -> (D [B,C,L], StepTrace)``: AMG for a rectified-flow model.

    Per step: the conditional forward (and the unconditional one for rows with cfg_scale ≠ 1), the
    detector on the probe (the CFG-guided prediction; the conditional one at cfg_scale 1), the nearest
    training row, the gate on λ(ᾱ(t)), one host read of the gates; then, for the open rows only, the
    unconditional forward (c1 or c2 on, cfg_scale 1), the neighbour caption's forward (c2 on) and the
    similarity gradient (c3 on, forward with autograd and backward); the combine with the flow
    coefficient c3·t(1 − t)/r and ``min_scale`` (``combine_fn(device, terms=True)``: the fused kernel
    on CUDA, ``kernels.guidance.combine_terms_ref`` elsewhere). Rows are
    independent: a row's result does not depend on its batch-mates.
    """

    lambda_min: float = 0.4
    lambda_max: float = 0.5
    min_scale: float = 0.0
    denoise: Callable | None = None  # (x, t, cond) -> x0, one branch, maybe compiled

    def __post_init__(self) -> None:
        p = self.params
        # per row, on the host once per batch: c1, c2, c3 on; an unconditional pass needed at every step
        self._on = host_read(torch.stack([p.c1 > 0, p.c2 > 0, p.c3 > 0, p.cfg_scale != 1]))  # [4, B]

    def _fill_uncond(self, x, t, x0_u, rows: torch.Tensor) -> None:
        """x0_u of the host row indices ``rows`` (no autograd)."""
        if rows.numel():
            r = to_device(rows, x.device)
            with torch.no_grad(), record_function("amg/uncond"):
                x0_u[r] = self._denoise(x[r], t[r], self.uncond[r])

    def _probe(self, x0_c, x0_u, s0) -> torch.Tensor:
        return x0_u + _col(s0) * (x0_c - x0_u)

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        c1_on, c2_on, c3_on, cfg_on = self._on
        p = self.params
        with torch.no_grad():
            with record_function("amg/model"):
                x0_c = self._denoise(x, t, self.cond)
            x0_u = x0_c.clone()  # rows at cfg_scale 1 without a term that needs it: u = c (plain D = x0_c)
            self._fill_uncond(x, t, x0_u, cfg_on.nonzero().squeeze(1))
            with record_function("amg/decode+embed"):
                rows = torch.arange(x.shape[0], device=x.device)
                emb = self.detector(self._probe(x0_c, x0_u, p.cfg_scale), rows)
            with record_function("amg/search"):
                sim, nn = nearest(emb, self.index_vectors, search_fn(x.device))  # [B], [B]
        tf = t.float()
        lam = lambda_t(flow_alpha_bar(tf), self.lambda_min, self.lambda_max)
        gate_host, nn_host = host_read(torch.stack([(sim > lam).long(), nn])).unbind(0)  # the one sync
        open_ = gate_host.bool()
        self._fill_uncond(x, t, x0_u, (open_ & (c1_on | c2_on) & ~cfg_on).nonzero().squeeze(1))
        x0_n, grad = torch.zeros_like(x0_c), torch.zeros_like(x0_c)
        need_n = (open_ & c2_on).nonzero().squeeze(1)
        if need_n.numel():
            n = to_device(need_n, x.device)
            with torch.no_grad(), record_function("amg/neighbour"):
                x0_n[n] = self._denoise(x[n], t[n], self.neighbour_cond(nn_host[need_n]))
        need_g = (open_ & c3_on).nonzero().squeeze(1)
        if need_g.numel():
            g = to_device(need_g, x.device)
            with record_function("amg/gradient"):
                grad[g] = self.similarity_grad(x[g], t[g], g, nn[g], bool(cfg_on[need_g].any()))
        coef = p.c3 * flow_grad_scale(tf)
        with record_function("amg/combine"):
            d, s1, s2, gate = combine_fn(x.device, terms=True)(
                x0_u, x0_c, x0_n, grad, sim, lam, coef, p.cfg_scale, p.c1, p.c2, self.min_scale
            )
        return d, StepTrace(sim, lam, gate, s1, s2, nn)

    def similarity_grad(self, x, t, rows, nn, cfg: bool) -> torch.Tensor:
        """∇_{x_t} of the similarity of the rows' probes to their neighbours (held fixed), per row;
        ``cfg``: some of the rows have cfg_scale ≠ 1, so the probe needs the unconditional branch."""
        s0 = self.params.cfg_scale[rows]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x0_c = self._denoise(x, t, self.cond[rows])
            probe = x0_c
            if cfg:  # the guided prediction, as the detector saw it
                probe = self._probe(x0_c, self._denoise(x, t, self.uncond[rows]), s0)
            emb = self.detector(probe, rows)
            sim = (emb.float() * index_rows(self.index_vectors, nn)).sum(dim=1)
            (g,) = torch.autograd.grad(sim.sum(), x)
        return g
