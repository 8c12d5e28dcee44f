"""The batched AMG denoiser: one call per sampler step, every quantity per row.

Per step (σ shared, B rows):
1. one batched model call for [conditional; unconditional] (no autograd),
2. detector: decode the probe prediction, embed it, nearest training example on the device,
3. gate m = σ_t > λ_t per row,
4. only for rows whose gate is open: the neighbour-caption branch (if c2 > 0) and the
   dissimilarity gradient (if c3 > 0), by a backward pass through the model and the detector,
5. the fused combine (``kernels.guidance.amg_combine``) gives D, s1, s2, gate.

Skipping (4) for closed rows gives the same D as computing everything and multiplying by m = 0:
the combine selects rather than multiplies, so the unused rows never enter the result.

Host syncs: one per AMG step. After (3) the gate and the neighbour ids come to the host in one read
(``engine.transfer.host_read``); which rows get (4), which are warm and which are cold is decided
there, and the row indices go back to the device without blocking (``engine.transfer.to_device``).
Plain CFG and the transition strategy read nothing back.

The gradient needs the forward of (1)-(2) with autograd. Gates stay open for runs of steps, so the
rows whose gradient was needed at the previous step ("warm" rows) run (1)-(2) with autograd as their
own sub-batch, and if their gate is open again (4) is only the backward pass; the other rows run
without autograd, and a row whose gate opens without being warm runs the forward again with autograd
on the gated subset. Which rows are warm depends only on each row's own past gates, so a row's
result still does not depend on its batch-mates.

Cheaper variants (issue 29; GuidanceConfig.gradient, .cascade_*): with the detector gradient
(:meth:`AMGDenoiser.detector_grad`) the model never runs with autograd and (4)'s gradient is a
backward through the decoder and embedder only; with the cascade (:class:`Cascade`) (2) runs only for
the rows whose free signal ‖x0_c − x0_u‖ has flagged them, the others' gates stay closed, and the
flags come back in the step's one host read.

Memory: the autograd graphs of the gated path (the warm rows' forward, kept across the search, and
the forward + backward of the gradient) hold the activations of the model, the decoder and the
embedder for every row in them (for SAO 1.0, benchmarks/RESULTS.md, "What AMG costs on SAO 1.0").
With a :class:`GraphBudget` at most ``budget.rows()`` rows' graphs are held at once: the gradient
runs in micro-batches of that many rows, and only that many rows (the first gated ones) are kept
warm. Rows are independent, so this changes which rows share a model call and which reuse their
forward, not what any row computes (up to the float rounding of batched products, as any change of
batch composition).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.profiler import record_function

from amg_engine.engine.compile import cfg_branches
from amg_engine.engine.models import Conditioning
from amg_engine.engine.models import denoise as model_denoise
from amg_engine.engine.shards import index_rows, nearest
from amg_engine.engine.transfer import host_read, to_device


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
class Rows:
    """Row indices of a batch, on the host (where the step decides) and on the device (to index)."""

    host: torch.Tensor  # [n] int64 on the CPU
    dev: torch.Tensor  # [n] int64 on the batch's device

    @staticmethod
    def on(host: torch.Tensor, device: torch.device) -> Rows:
        return Rows(host, to_device(host, device))

    def __len__(self) -> int:
        return self.host.numel()


@dataclass(frozen=True)
class StepTrace:
    """What the detector saw at one step, per row ([B] tensors; empty trace when AMG is off)."""

    sim: torch.Tensor
    lam: torch.Tensor
    gate: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    neighbour: torch.Tensor
    # the free signal ‖x0_c − x0_u‖ (RMS per latent value) of each row, where the denoiser computes it
    signal: torch.Tensor | None = None


def free_signal(x0_c: torch.Tensor, x0_u: torch.Tensor) -> torch.Tensor:
    """‖x0_c − x0_u‖ per row as an RMS over its latent values, [B] float32: the text-conditional part of
    the CFG prediction, which Wen et al. (ICLR 2024) use to detect memorization; CFG computes both
    branches anyway, so it costs one reduction."""
    return (x0_c.float() - x0_u.float()).flatten(1).pow(2).mean(dim=1).sqrt()


def lambda_t(alpha_bar: torch.Tensor, lambda_min: float, lambda_max: float) -> torch.Tensor:
    """The parabolic threshold of the audio AMG code: λ_min + (λ_max − λ_min)·ᾱ²."""
    return lambda_min + (lambda_max - lambda_min) * alpha_bar**2


def combine_fn(device: torch.device, terms: bool = False) -> Callable:
    """The Triton combine on CUDA, its torch twin elsewhere (the interpreter is not a fast path).

    terms: the form with the gradient's coefficient and the caps' min_scale given
    (``kernels.guidance.combine_terms``, the flow models' step), not the published c3·√(1 − ᾱ) and 1."""
    from amg_engine.kernels import guidance as k

    if terms:
        return k.combine_terms if device.type == "cuda" else k.combine_terms_ref
    return k.amg_combine if device.type == "cuda" else k.amg_combine_ref


SCAN_CHUNK = 1 << 16  # index rows per CPU product: [65536, 512] float32 is 128 MiB


def search_fn(device: torch.device) -> Callable:
    """Nearest training row per query, (sim [B], idx [B]): the fused Triton search on CUDA (it reads
    float16/bfloat16 vectors as they are), else its twin over chunks of the index (:func:`scan_chunked`)."""
    from amg_engine.kernels.nn_search import nn_search

    return nn_search if device.type == "cuda" else scan_chunked


def scan_chunked(
    xq: torch.Tensor, xb: torch.Tensor, chunk: int = SCAN_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.nn_search_ref`` over xb [N, D] in chunks of ``chunk`` rows, merged on the device.

    For a memory-mapped float16 index the twin's float32 conversion then holds one chunk, not the index
    (10^7 x 512: 128 MiB instead of 20 GB). Same contract as the twin: the lowest index wins a tie
    (a later chunk replaces the best only when strictly better). No host synchronisation. Up to one
    chunk it is the twin itself, so a small index gives the twin's bits."""
    from amg_engine.kernels.nn_search import nn_search_ref

    if xb.shape[0] <= chunk:
        return nn_search_ref(xq, xb)
    best, arg = nn_search_ref(xq, xb[:chunk])
    for start in range(chunk, xb.shape[0], chunk):
        sim, idx = nn_search_ref(xq, xb[start : start + chunk])
        better = sim > best
        best, arg = torch.where(better, sim, best), torch.where(better, idx + start, arg)
    return best, arg


class SavedBytes:
    """Context: the bytes of the tensors autograd saves for backward inside the block (what a graph
    holds until its backward runs), each storage counted once, parameters left out (resident anyway).

    Conservative for a per-row figure: what does not scale with rows (an autocast copy of a weight,
    a constant buffer) is counted too. The transient memory of the backward pass itself is not."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            key = storage._cdata  # one storage, however many views of it are saved
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@dataclass
class GraphBudget:
    """How many gated rows' autograd graphs may be held at once (``EngineConfig.grad_memory_gib``).

    ``budget_bytes``: memory for the graphs of the gated path. ``row_bytes``: one row's graph, as
    declared (``EngineConfig.grad_row_gib``), or None: measured (:class:`SavedBytes`) on the first
    gradient forward of the batch, which then runs one row alone. Never fewer than one row."""

    budget_bytes: float
    row_bytes: float | None = None

    def __post_init__(self) -> None:
        for name in ("budget_bytes", "row_bytes"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}={v!r}: must be > 0")

    def rows(self) -> int:
        """Rows per micro-batch: as many whole rows as fit the budget, at least one."""
        if self.row_bytes is None:
            return 1  # not measured yet: the first micro-batch measures one row
        return max(1, int(self.budget_bytes // self.row_bytes))


@dataclass
class GuidedBatch:
    """What an AMG denoiser holds for one batch of rows, whatever the model's objective (v:
    :class:`AMGDenoiser`; rectified flow: engine/flow_guidance.py ``FlowAMGDenoiser``). Each subclass
    adds its options, ``denoise`` (one branch, maybe compiled; None: the model's own) among them.

    detector(x0 [B,C,L], rows) -> unit-norm embeddings [B, D]; it decodes and embeds.
    """

    model: torch.nn.Module
    cond: Conditioning
    uncond: Conditioning
    params: RowParams
    detector: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    index_vectors: torch.Tensor  # [N, D], or engine.shards.ShardedVectors over several devices
    # training indices [G] (a host tensor: the cache is keyed on the host) -> conditioning
    neighbour_cond: Callable[[torch.Tensor], Conditioning]

    def _denoise(self, x, noise_level, cond) -> torch.Tensor:
        """x0 of one branch at σ (v) or t (flow), through the subclass's ``denoise`` when it has one."""
        return (self.denoise or partial(model_denoise, self.model))(x, noise_level, cond)


@dataclass
class AMGDenoiser(GuidedBatch):
    """Callable ``(x [B,C,L], sigma [B]) -> (D [B,C,L], StepTrace | None)`` for one batch of rows."""

    amg: bool = True
    reference: bool = False
    lambda_min: float = 0.4
    lambda_max: float = 0.5

    branches: Callable | None = None  # (x, sigma, cond, uncond) -> (x0_c, x0_u), maybe compiled
    # the same two for the gated subset (any batch size, with autograd), maybe compiled dynamic
    gated_branches: Callable | None = None
    denoise: Callable | None = None  # (x, sigma, cond) -> x0, one branch
    # keep autograd on the forward of rows whose gate was open at the previous step (see _forward_split)
    reuse_forward: bool = True
    # the variants (GuidanceConfig.gradient, .cascade_threshold, .cascade_every; see Cascade)
    gradient: str = "full"
    cascade: Cascade | None = None
    # at most budget.rows() rows' autograd graphs at once (micro-batches); None: no split
    graph_budget: GraphBudget | None = None
    _warm: Rows | None = field(default=None, init=False, repr=False)  # [W] rows gated at the last step
    _step_probe: torch.Tensor | None = field(default=None, init=False, repr=False)  # detector gradient
    # this step's warm rows, their input with grad, their embeddings with grad (see _forward_split);
    # held here, not in a caller's frame, so that _gated_terms can free the graph once it is used
    _tape: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # which rows have the neighbour branch (c2 > 0) and the gradient (c3 > 0) on, on the host:
        # read once per batch, so that the per-step decisions need no further device reads
        if self.amg:
            self._terms_on = host_read(torch.stack([self.params.c2 > 0, self.params.c3 > 0]))  # [2, B]

    def _branches(self, x, sigma, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        return cfg_branches(self.model, x, sigma, cond, uncond)

    def _probe(self, x0_c, x0_u, cfg_scale) -> torch.Tensor:
        if self.reference:
            return x0_c  # the published code embeds the conditional prediction (quirk Q2)
        return x0_u + cfg_scale[:, None, None] * (x0_c - x0_u)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor):
        s0 = self.params.cfg_scale
        if not self.amg:
            with torch.no_grad(), record_function("amg/model"):
                x0_c, x0_u = (self.branches or self._branches)(x, sigma, self.cond, self.uncond)
            return x0_u + s0[:, None, None] * (x0_c - x0_u), None
        probed = None if self.cascade is None else self.cascade.rows(x.device)  # None: every row
        warm = self._warm if self.reuse_forward and self.gradient == "full" else None
        if warm is None or not len(warm):
            self._tape = None
            with torch.no_grad():
                rows = torch.arange(x.shape[0], device=x.device)
                x0_c, x0_u, emb = self._predict(
                    self.branches or self._branches, x, sigma, self.cond, self.uncond, rows, probed
                )
        else:
            x0_c, x0_u, emb, self._tape = self._forward_split(x, sigma, warm, probed)
        with torch.no_grad(), record_function("amg/search"):
            sim, nn = nearest(emb, self.index_vectors, search_fn(x.device))  # [B], [B]; no host sync
            signal = free_signal(x0_c, x0_u)  # [B]
            if probed is not None:  # rows whose detector did not run: no similarity, gate closed
                sim = torch.where(probed.mask, sim, torch.full_like(sim, float("nan")))
                nn = torch.where(probed.mask, nn, torch.full_like(nn, -1))
        if self.gradient == "detector":
            self._step_probe = self._probe(x0_c, x0_u, s0)
        alpha_bar = 1 / (1 + sigma.float() ** 2)
        lam = lambda_t(alpha_bar, self.lambda_min, self.lambda_max)
        # The step's one host sync: which gates are open (and the neighbours of those rows, whose
        # conditioning is looked up by training id) decides the work that follows; under the cascade
        # the same read brings which rows' free signal reached θ (their detector runs at the next step).
        read = [(sim > lam).long(), nn]
        if self.cascade is not None:
            read.append((signal >= self.cascade.threshold).long())
        gate_host, nn_host, *flag = host_read(torch.stack(read)).unbind(0)
        gated = gate_host.nonzero().squeeze(1)  # [G] on the host
        if self.cascade is not None:
            self.cascade.update(flag[0].bool())
        x0_n = torch.zeros_like(x0_c)
        grad = torch.zeros_like(x0_c)
        # the rows whose gradient is needed now are the warm rows of the next step
        self._warm = self._gated_terms(x, sigma, gated, nn, nn_host, x0_n, grad)
        combine = combine_fn(x.device)
        p = self.params
        with record_function("amg/combine"):
            d, s1, s2, gate = combine(x0_u, x0_c, x0_n, grad, sim, lam, alpha_bar, s0, p.c1, p.c2, p.c3)
        if probed is not None:
            s1, s2 = (torch.where(probed.mask, v, torch.zeros_like(v)) for v in (s1, s2))
        return d, StepTrace(sim, lam, gate, s1, s2, nn, signal)

    def _predict(self, branches, x, sigma, cond, uncond, rows, probed: Rows | Probed | None = None):
        """x0_c, x0_u and the detector's embedding of the probe for the batch rows ``rows`` (``x``,
        ``sigma``, ``cond``, ``uncond`` already those rows'); autograd as the caller's mode says.
        ``probed``: positions (among ``rows``) whose detector runs, the others' embeddings are zeros;
        None: every row's."""
        with record_function("amg/model"):
            x0_c, x0_u = branches(x, sigma, cond, uncond)
        with record_function("amg/decode+embed"):
            probe = self._probe(x0_c, x0_u, self.params.cfg_scale[rows])
            if probed is None:
                return x0_c, x0_u, self.detector(probe, rows)
            emb = probe.new_zeros((x.shape[0], self.index_vectors.shape[1]), dtype=torch.float32)
            if len(probed):
                emb[probed.dev] = self.detector(probe[probed.dev], rows[probed.dev]).float()
        return x0_c, x0_u, emb

    def _forward_split(self, x, sigma, warm, probed: Probed | None = None):
        """The model call and detector with the batch split in two: the ``warm`` rows (gate open with
        c3 > 0 at the previous step, so likely to need the gradient now) run with autograd and keep
        their graph, the others without. A warm row whose gate is open again then needs only the
        backward pass instead of a second forward. Returns x0_c, x0_u, emb (detached, all rows) and
        the tape (warm rows, their input with grad, their embeddings with grad). Under the cascade
        (``probed``) the warm rows are probed rows (their gate was open), the cold ones may not be."""
        branches = self.gated_branches or self._branches
        cold_mask = torch.ones(x.shape[0], dtype=torch.bool)  # host
        cold_mask[warm.host] = False
        cold, w = Rows.on(cold_mask.nonzero().squeeze(1), x.device), warm.dev
        with torch.enable_grad():
            xw = x[w].detach().requires_grad_(True)
            cw, uw, emb_w = self._predict(branches, xw, sigma[w], self.cond[w], self.uncond[w], w)
        x0_c, x0_u = torch.empty_like(x), torch.empty_like(x)
        emb = emb_w.new_empty((x.shape[0], emb_w.shape[1]))
        x0_c[w], x0_u[w], emb[w] = cw.detach(), uw.detach(), emb_w.detach()
        if len(cold):
            c = cold.dev
            sub = None if probed is None else probed.among(cold.host, x.device)
            with torch.no_grad():
                x0_c[c], x0_u[c], emb[c] = self._predict(
                    branches, x[c], sigma[c], self.cond[c], self.uncond[c], c, sub
                )
        return x0_c, x0_u, emb, (warm, xw, emb_w)

    def _gated_terms(self, x, sigma, gated, nn, nn_host, x0_n, grad) -> Rows | None:
        """Fill the neighbour prediction and the similarity gradient for the gated rows only (``gated``
        and ``nn_host`` on the host; every decision here is taken there); return the rows that needed
        the gradient (at most ``graph_budget.rows()`` of them, the first, under a budget)."""
        c2_on, c3_on = self._terms_on[:, gated]
        need_n = gated[c2_on]
        if need_n.numel():
            n = to_device(need_n, x.device)
            with torch.no_grad(), record_function("amg/neighbour"):
                x0_n[n] = self._denoise(x[n], sigma[n], self.neighbour_cond(nn_host[need_n]))
        need_g = gated[c3_on]
        if not need_g.numel():
            self._tape = None
            return None
        with record_function("amg/gradient"):
            cold = self._warm_grad(need_g, nn, grad)  # the warm rows' graph is freed here
            for part in self._micro_batches(cold):
                c = to_device(part, x.device)
                grad[c] = self.similarity_grad(x[c], sigma[c], c, nn[c])
        if self.graph_budget is not None:  # keep warm only as many rows as their graphs fit
            need_g = need_g[: self.graph_budget.rows()]
        return Rows.on(need_g, x.device)

    def _warm_grad(self, need_g, nn, grad) -> torch.Tensor:
        """The gradient of the warm rows in ``need_g`` (host) by the backward of this step's tape, which
        is then released; returns the rows of ``need_g`` left to compute (forward again with autograd)."""
        tape, self._tape = self._tape, None
        if tape is None:
            return need_g
        warm, xw, emb_w = tape
        hit = torch.isin(warm.host, need_g)  # [W] warm rows whose gradient is needed
        if hit.any():
            # rows are independent, so one backward of the masked sum gives each its own gradient
            sim_w = (emb_w.float() * index_rows(self.index_vectors, nn[warm.dev])).sum(dim=1)
            (g,) = torch.autograd.grad((sim_w * to_device(hit, grad.device)).sum(), xw)
            pos = to_device(hit.nonzero().squeeze(1), grad.device)
            grad[warm.dev[pos]] = g[pos]
        return need_g[~torch.isin(need_g, warm.host)]

    def _micro_batches(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        """``rows`` (host) in micro-batches of ``graph_budget.rows()`` (all at once without a budget),
        the size read again before each one (the first may measure a row's graph)."""
        start = 0
        while start < rows.numel():
            n = rows.numel() if self.graph_budget is None else self.graph_budget.rows()
            yield rows[start : start + n]
            start += n

    def similarity_grad(self, x, sigma, rows, nn) -> torch.Tensor:
        """∇_x σ_t for the given rows, with the neighbour held fixed (rows are independent). Its forward
        is timed as part of the gradient, so it does not go through the labelled ``_predict``.
        With ``gradient="detector"``: :meth:`detector_grad` of this step's probe, no model call."""
        if self.gradient == "detector":
            return self.detector_grad(self._step_probe[rows], sigma, rows, nn)
        budget = self.graph_budget
        measure = budget is not None and budget.row_bytes is None
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            cond, uncond = self.cond[rows], self.uncond[rows]
            with SavedBytes() if measure else nullcontext() as saved:
                if self.reference:
                    probe = self._denoise(x, sigma, cond)
                else:
                    x0_c, x0_u = (self.gated_branches or self._branches)(x, sigma, cond, uncond)
                    probe = self._probe(x0_c, x0_u, self.params.cfg_scale[rows])
                emb = self.detector(probe, rows)
            if measure:
                budget.row_bytes = max(1.0, saved.bytes / x.shape[0])
            sim = (emb.float() * index_rows(self.index_vectors, nn)).sum(dim=1)
            (g,) = torch.autograd.grad(sim.sum(), x)
        return g

    def detector_grad(self, probe, sigma, rows, nn) -> torch.Tensor:
        """∇_x σ_t through the decoder and embedder only: ᾱ·∇_{x0} σ_t at the probe x0 [b, C, L].

        ∂x0/∂x_t is taken as ᾱ·I, ᾱ = 1/(1+σ²) (VE, x = x0 + σε, σ_data = 1): the skip path c_skip(σ)
        of the v-parameterised denoiser (x0 = c_skip·x + c_out·v), and the exact Jacobian of the optimal
        denoiser E[x0 | x] for unit-variance Gaussian data (Cov[x0 | x]/σ²). What is dropped is the
        network's own ∂(c_out·v)/∂x: no backward through the model, and its forward runs without
        autograd. Rows are independent, so one backward of the sum gives each row its own gradient."""
        budget = self.graph_budget
        measure = budget is not None and budget.row_bytes is None  # its graph: decoder and embedder only
        with torch.enable_grad():
            p = probe.detach().requires_grad_(True)
            with SavedBytes() if measure else nullcontext() as saved:
                emb = self.detector(p, rows)
            if measure:
                budget.row_bytes = max(1.0, saved.bytes / p.shape[0])
            sim = (emb.float() * index_rows(self.index_vectors, nn)).sum(dim=1)
            (g,) = torch.autograd.grad(sim.sum(), p)
        return g.float() / (1 + sigma.float() ** 2)[:, None, None]


@dataclass(frozen=True)
class Probed:
    """The rows whose detector runs at a step under the cascade: a mask [B] on the device, and their
    positions on the host and the device (:class:`Rows`)."""

    mask: torch.Tensor  # [B] bool on the device
    rows: Rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dev(self) -> torch.Tensor:
        return self.rows.dev

    def among(self, subset: torch.Tensor, device: torch.device) -> Rows:
        """Positions, within the batch rows ``subset`` (host), of those probed."""
        hit = torch.isin(subset, self.rows.host)
        return Rows.on(hit.nonzero().squeeze(1), device)


@dataclass
class Cascade:
    """Which rows run the detector (decode, embed, search) at each step (GuidanceConfig.cascade_*).

    A row is *suspect* from the step after its free signal ‖x0_c − x0_u‖ (:func:`free_signal`) first
    reaches ``threshold``, and stays so (the signal is most telling at the first steps and falls with
    σ: on the default model its AUC for "this row would replicate" is 0.92 at σ = 80 and under 0.6 by
    σ = 1). A suspect row's detector runs at every step; every row's runs at step 0 (no signal is known
    yet) and at every ``every``-th step (0: never on that account). A row whose detector does not run
    has its gate closed: its step is the plain-CFG step. The decisions are taken on the host from the
    step's one host read (:meth:`update`), so they lag the signal by one step: reading it before the
    detector would be a second sync per step. Each row's decisions depend only on its own past, so
    batch invariance holds. θ = 0 makes every row suspect after step 0: full AMG.
    """

    threshold: float
    every: int = 0
    _step: int = field(default=0, init=False)
    _suspect: torch.Tensor | None = field(default=None, init=False)  # [B] bool, host

    def rows(self, device: torch.device) -> Probed | None:
        """This step's probed rows, or None when every row is probed (the method's own path)."""
        step, self._step = self._step, self._step + 1
        sus = self._suspect
        if step == 0 or (self.every and step % self.every == 0) or sus is None or bool(sus.all()):
            return None
        return Probed(to_device(sus, device), Rows.on(sus.nonzero().squeeze(1), device))

    def update(self, flagged: torch.Tensor) -> None:
        """After the step's host read: ``flagged`` [B] host bools, the rows whose signal reached θ."""
        self._suspect = flagged if self._suspect is None else self._suspect | flagged


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
