"""The engine: a loaded model, its detector and index, and batched generation with AMG.

``Engine.generate(requests)`` runs one batch: every row has its own prompt, duration and seed, the
noise of a row comes from its own generator (so a row's output does not depend on its batch-mates),
and guidance is gated per row. It returns one :class:`Generated` per request; a row whose latents
turn non-finite is flagged, its batch-mates are unaffected.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from amg_engine.engine.compile import compiled_branches, compiled_denoise, maybe_compile
from amg_engine.engine.cond_cache import ConditioningCache
from amg_engine.engine.config import EngineConfig
from amg_engine.engine.flow_guidance import FlowAMGDenoiser
from amg_engine.engine.guidance import (
    AMGDenoiser,
    Cascade,
    GraphBudget,
    RowParams,
    StepTrace,
    TransitionDenoiser,
    search_fn,
)
from amg_engine.engine.models import (
    DEFAULT_MODEL_DIR,
    OBJECTIVE_SPACE,
    Conditioning,
    check_model_files,
    diffusion_objective,
    encode_conditioning,
    load_model,
    model_id,
)
from amg_engine.engine.precision import Precision
from amg_engine.engine.sampling import SCHEDULE_SPACE, SCHEDULES, BrownianRowNoise, RowNoise, get_sampler
from amg_engine.engine.shards import ShardedVectors, nearest, resolve_devices
from amg_engine.index.clip import input_span, prepare_clips
from amg_engine.index.embedders import replication_threshold

log = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = Path(__file__).parent / "default" / "assets" / "index"


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str
    seconds: float
    seed: int


@dataclass
class Generated:
    request: Request
    audio: torch.Tensor  # [C, T] at the model's sample rate, trimmed to the request's duration
    final_similarity: float
    neighbour: int  # index row of the nearest training example of the final audio
    trace: list[dict] = field(default_factory=list)  # per step: sim, lam, gate, s1, s2, neighbour
    error: str | None = None


# Latent frames decoded past the last one the embedder sees. A convolutional decoder's output near a
# cut depends on frames beyond it: for the Oobleck VAE of SAO 1.0 (tests/test_sao.py) the last frame
# of a cut decode differs from the full decode by ~0.6 with no margin, ~5e-5 with 8 frames and
# ~3e-7 with 16. Parameter-free pretransforms (patched) are exactly local.
DECODE_MARGIN_FRAMES = 16


# The final decode: rows decoded together (its memory is that of a few rows: SAO's Oobleck decoder
# ends in 128-channel activations at the audio rate, 1.1 GB per fp32 tensor for a full 47.5 s window),
# and the time chunks of the autoencoder's own chunked decode for long latents (stable-audio-tools'
# defaults; half the overlap, trimmed at each inner edge, is DECODE_MARGIN_FRAMES).
FINAL_DECODE_ROWS = 4
VAE_CHUNK_FRAMES = 128
VAE_OVERLAP_FRAMES = 2 * DECODE_MARGIN_FRAMES


def decode_margin(pretransform) -> int:
    """Extra latent frames to decode so that a cut decode equals the full decode where it is used."""
    return 0 if type(pretransform).__name__ == "PatchedPretransform" else DECODE_MARGIN_FRAMES


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model_dir=DEFAULT_MODEL_DIR,
        index_dir=DEFAULT_INDEX_DIR,
        embedder_checkpoint=None,
        trust_checkpoint: bool = False,
    ):
        """``embedder_checkpoint``: weights of a learned embedder (LAION-CLAP) the index was built with.
        ``trust_checkpoint``: allow checkpoints that need full unpickling (they can run code).

        The cheap checks come first (the index, the embedder's identity against it, the model's files),
        so bad input fails before gigabytes of weights are read.
        """
        from amg_engine.index.embedders import check_embedder, load_embedder
        from amg_engine.index.store import EmbeddingIndex, index_id

        self.config = config
        self.device = torch.device(config.device)
        index = EmbeddingIndex.load(index_dir)
        check_embedder(index.embedder, embedder_checkpoint)
        objective = diffusion_objective(check_model_files(model_dir))
        check_objective(config, objective)  # before the weights are read
        self.model, self.model_config = load_model(model_dir, self.device, trust_checkpoint)
        self.objective = objective
        self.sample_rate = self.model_config["sample_rate"]
        self.window = self.model_config["sample_size"]
        self.audio_scale = self.model_config.get("amg_default", {}).get("audio_scale", 1.0)
        devices = resolve_devices(config.index_devices, self.device)
        if devices == (self.device,):
            self.index = index.to(self.device)
            self.search_vectors = self.index.vectors  # what the step searches: [N, D] on the device
        else:  # the index stays where it is (mapped on the host); its rows go to the devices in shards
            self.index = index
            self.search_vectors = ShardedVectors.split(index.vectors, devices, self.device)
        self.embedder = load_embedder(index.embedder, embedder_checkpoint, trust_checkpoint).to(self.device)
        self.replication_threshold = replication_threshold(index.embedder)
        self.model_id, self.index_id = model_id(model_dir), index_id(index_dir)
        self._nbr_cache = ConditioningCache(self._encode_training_captions, max_items=4096)
        self.precision = Precision(config.resolved_precision, self.device.type)
        self._branches = compiled_branches(self.model, config.compile, precision=self.precision)
        self._gated_branches = compiled_branches(
            self.model, config.compile, dynamic=True, precision=self.precision
        )
        self._denoise = compiled_denoise(self.model, config.compile, precision=self.precision)
        self._steps: dict[str, object] = {}  # sampler name -> (compiled) step function

    # -- audio side -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Audio [B, C, T], float32 whatever the precision the decoder ran in."""
        with self.precision.autocast():  # the decoder runs in the engine's precision
            audio = self.model.pretransform.decode(latents)
        return audio.float() / self.audio_scale

    def lengths(self, seconds: list[float]) -> torch.Tensor:
        """Samples of each clip at the model's rate, as the final trim cuts them: round(seconds·rate)."""
        return torch.tensor([round(s * self.sample_rate) for s in seconds], device=self.device)

    def embed(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The embedding of each clip (index/clip.py): audio [B, C, T] at the model's rate, each row's
        first ``lengths`` [B] samples. The same definition as the index build and the audit."""
        return self._embed(audio, self.sample_rate, lengths)

    def _embed(self, audio: torch.Tensor, rate: int, lengths: torch.Tensor) -> torch.Tensor:
        """index/clip.py embed_clips with the embedder in the engine's precision: the clip is prepared in
        float32, the embedder runs under the precision's autocast, the embedding comes back float32
        (as the similarity and the gate are)."""
        e = self.embedder
        x = prepare_clips(audio, rate, lengths, e.sample_rate, e.window, e.fill)
        with self.precision.autocast():
            emb = e.embed_window(x)
        return emb.float()

    def nearest(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[list[float], list[int]]:
        """Each clip's similarity to its nearest training clip, and that clip's index row: audio
        [B, C, T] at the model's rate, each row's first ``lengths`` [B] samples (:meth:`embed`)."""
        with torch.no_grad(), self.precision.flags():
            sim, nn = nearest(self.embed(audio, lengths), self.search_vectors, search_fn(self.device))
        return sim.tolist(), nn.tolist()

    def detector(self, seconds: list[float], reference: bool):
        """detect(x0 [b, C, L], rows [b]) -> embeddings [b, D] of the rows' decoded predictions."""
        if reference:
            return self._reference_detector(seconds)
        lengths, ds = self.lengths(seconds), self.model.pretransform.downsampling_ratio
        span = input_span(self.sample_rate, self.embedder.sample_rate, self.embedder.window)
        frames = math.ceil(min(max(round(s * self.sample_rate) for s in seconds), span) / ds)
        margin = decode_margin(self.model.pretransform)

        def detect(x0: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # decode only the latent frames the embedder can see, plus the decoder's receptive field
            audio = self.decode(x0[..., : frames + margin])[..., : frames * ds]
            return self.embed(audio, lengths[rows])

        return detect

    def _reference_detector(self, seconds: list[float]):
        """The published cut (quirks Q2/Q3): each row's first ⌊seconds·rate⌋ // ds latent frames (at least
        one) decoded, mono, taken as audio at the embedder's own rate, fitted to its window."""
        ds, win = self.model.pretransform.downsampling_ratio, self.embedder.window
        cuts = [max(1, int(s * self.sample_rate) // ds) for s in seconds]
        # past the window only the frames it sees are decoded, plus the decoder's receptive field
        decoded = [min(c, math.ceil(win / ds) + decode_margin(self.model.pretransform)) for c in cuts]
        lengths = torch.tensor([c * ds for c in cuts], device=self.device)
        rate = self.embedder.sample_rate

        def detect(x0: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            picked = rows.tolist()  # a host sync, reference mode only: rows of one cut share a decode
            groups: dict[int, list[int]] = {}
            for j, r in enumerate(picked):
                groups.setdefault(decoded[r], []).append(j)
            if len(groups) == 1:  # the usual case: one duration per batch
                audio = self.decode(x0[..., : next(iter(groups))])[..., :win]
            else:  # rows decoded at their own cut, zero-padded to one buffer (lengths mask the rest)
                parts = {f: self.decode(x0[g, :, :f])[..., :win] for f, g in groups.items()}
                width = max(a.shape[-1] for a in parts.values())
                audio = x0.new_zeros(x0.shape[0], next(iter(parts.values())).shape[1], width)
                for f, g in groups.items():
                    audio[g, :, : parts[f].shape[-1]] = parts[f]
            return self._embed(audio, rate, lengths[rows])

        return detect

    # -- conditioning ------------------------------------------------------------------------------
    def _encode_training_captions(self, rows: list[int]) -> list[Conditioning]:
        """Conditioning of training rows' captions with the neighbour's own duration (quirk Q8)."""
        meta = [{"prompt": self.index.captions[i], "seconds_total": self._seconds(i)} for i in rows]
        with torch.no_grad():
            enc = encode_conditioning(self.model, meta, self.device)
        return [enc[j : j + 1].clone() for j in range(len(rows))]  # copies: a view would pin the batch

    def _seconds(self, row: int) -> float:
        """A training clip's duration; an index of precomputed embeddings may not know it (None): then
        the model's window, the longest clip the conditioning describes."""
        s = self.index.seconds[row]
        return self.window / self.sample_rate if s is None or s != s else float(s)

    def _neighbour_cond(self, idx: torch.Tensor) -> Conditioning:
        """Conditioning of training rows' captions, from a bounded LRU cache keyed by index row."""
        return Conditioning.cat(self._nbr_cache.get(idx))

    # -- generation --------------------------------------------------------------------------------
    def generate(self, requests: list[Request], measure: bool = True) -> list[Generated]:
        """One batch: sample, decode, measure the final similarity, trim each row to its duration.
        ``measure`` False: no final similarity (NaN, neighbour -1), for a caller that measures the
        file it writes itself (the release gate, :meth:`measure_files`): each clip is embedded once."""
        latents, traces = self.sample(requests)
        return self._finish(requests, latents, traces, measure)

    def measure_files(self, files: list[bytes]) -> tuple[list[float], list[int]]:
        """The audit's measure of audio files given as their bytes (``amg audit``, jobs/audit.py): each
        file read as the audit reads one (index.build.read_clip), embedded in float32 with TF32 off
        whatever the engine's precision (index.clip.embed_windows), searched exactly over the index
        (index.search.ExactSearcher, the audit's default). -> (similarity, index row) per file."""
        import io

        from amg_engine.index.build import read_clip
        from amg_engine.index.clip import embed_windows
        from amg_engine.index.search import ExactSearcher

        windows = torch.stack([read_clip(io.BytesIO(f), self.embedder)[0] for f in files])  # [B, window]
        with Precision("fp32", self.device.type).flags():
            e = embed_windows(self.embedder, windows.to(self.device))
            res = ExactSearcher(self.index.vectors, ids=self.index.ids).search(e, 1)
        return res.D[:, 0].tolist(), res.I[:, 0].tolist()

    def sample(self, requests: list[Request]) -> tuple[torch.Tensor, list[StepTrace]]:
        """Final latents [B, C, L] and the per-step traces (empty without a detector), undecoded."""
        g = self.config.guidance
        check_objective(self.config, self.objective)  # a view (jobs/runner.engine_view) may swap it
        b = len(requests)
        with torch.no_grad():
            meta = [{"prompt": r.prompt, "seconds_total": r.seconds} for r in requests]
            cond = encode_conditioning(self.model, meta, self.device)
        if not g.amg and g.cfg_scale == 1:  # no guidance: the conditional branch alone, one forward
            return self._sample(ConditionalDenoiser(cond, self._denoise), requests)
        reference = g.mode == "reference"
        uncond = cond.zeros_like() if (reference and g.amg) else cond.null_text()
        full = lambda v: torch.full((b,), float(v), device=self.device)  # noqa: E731
        if g.amg and g.strategy == "transition":
            s0 = full(g.cfg_scale)
            denoiser = TransitionDenoiser(
                self.model, cond, cond.null_text(), s0, g.scale_before, self._branches
            )
            return self._sample(denoiser, requests)
        if OBJECTIVE_SPACE[self.objective] == "t" and g.amg:
            return self._sample(self._flow_denoiser(cond, uncond, full, requests), requests)
        denoiser = AMGDenoiser(
            self.model, cond, uncond, RowParams(full(g.cfg_scale), full(g.c1), full(g.c2), full(g.c3)),
            self.detector([r.seconds for r in requests], reference), self.search_vectors,
            self._neighbour_cond,
            amg=g.amg, reference=reference, lambda_min=g.lambda_min, lambda_max=g.lambda_max,
            branches=self._branches, gated_branches=self._gated_branches, denoise=self._denoise,
            reuse_forward=self.config.reuse_forward, gradient=g.gradient,
            cascade=None if g.cascade_threshold is None else Cascade(g.cascade_threshold, g.cascade_every),
            graph_budget=graph_budget(self.config),
        )  # fmt: skip
        return self._sample(denoiser, requests)

    def _flow_denoiser(self, cond, uncond, full, requests) -> FlowAMGDenoiser:
        """AMG on a rectified-flow model (engine/flow_guidance.py), the corrected detector."""
        g = self.config.guidance
        params = RowParams(full(g.cfg_scale), full(g.c1), full(g.c2), full(g.c3))
        return FlowAMGDenoiser(
            self.model, cond, uncond, params, self.detector([r.seconds for r in requests], False),
            self.search_vectors, self._neighbour_cond, lambda_min=g.lambda_min, lambda_max=g.lambda_max,
            min_scale=g.min_scale, denoise=self._denoise,
        )  # fmt: skip

    def _sample(self, denoiser: AMGDenoiser, requests: list[Request]):
        s = self.config.sampler
        sampler = get_sampler(s.sampler)
        schedule = SCHEDULES[s.schedule](s.steps, s.sigma_min, s.sigma_max, s.rho)  # [steps + 1], host
        # the device copy feeds the step; the host copy feeds the noise source (no device reads)
        sigmas, host_sigmas = schedule.to(self.device), schedule.tolist()
        shape = (self.model.io_channels, self.window // self.model.pretransform.downsampling_ratio)
        rows = RowNoise([r.seed for r in requests], shape, device=self.device)
        # VE: x = σ_max·ε. Flow: x = ε at t[0] whatever t[0] is, as stable-audio-tools' sample_rf starts
        # (exact for t[0] = 1; only init audio, not supported here, is mixed in below 1)
        x = rows.initial() if SCHEDULE_SPACE[s.schedule] == "t" else rows.initial() * sigmas[0]
        draw = self._noise_source(rows, x, host_sigmas) if sampler.uses_noise else None
        if s.sampler not in self._steps:
            self._steps[s.sampler] = maybe_compile(sampler.step, self.config.compile)
        step = self._steps[s.sampler]
        state = sampler.init_state(x)
        b, traces = len(requests), []
        with self.precision.flags():
            for i in range(s.steps):
                sigma, sigma_next = sigmas[i].expand(b), sigmas[i + 1].expand(b)
                denoised, trace = denoiser(x, sigma)
                last = i == s.steps - 1  # the final step (to sigma = 0) uses no noise
                noise = torch.zeros_like(x) if draw is None or last else draw(*host_sigmas[i : i + 2])
                with record_function("sampler/step"):
                    x, state = step(x, denoised, sigma, sigma_next, state, noise)
                if trace is not None:
                    traces.append(trace)
        return x, traces

    def _noise_source(self, rows: RowNoise, x: torch.Tensor, sigmas):
        """noise(sigma, sigma_next) for SDE samplers; ``sigmas`` the schedule (host floats keep the
        Brownian tree's queries off the device)."""
        if self.config.sampler.noise == "brownian":
            return BrownianRowNoise(rows, x, sigmas[-2], sigmas[0])  # tree over [sigma_min, sigma_max]
        return lambda sigma, sigma_next: rows.draw()

    def _finish(self, requests, latents, traces: list[StepTrace], measure: bool = True) -> list[Generated]:
        """Decode, embed and search ``FINAL_DECODE_ROWS`` rows at a time (the final decode's memory
        is that of a few rows, whatever the batch size), trim each row to its duration. ``measure``
        False: no embedding and search (similarity NaN, neighbour -1)."""
        per_step = _stack_traces(traces)
        out = []
        for a in range(0, len(requests), FINAL_DECODE_ROWS):
            rows = slice(a, a + FINAL_DECODE_ROWS)
            with torch.no_grad(), self.precision.flags():
                audio = self.decode_final(latents[rows], [r.seconds for r in requests[rows]])
                finite = torch.isfinite(audio).flatten(1).all(dim=1).tolist()
                lengths = self.lengths([r.seconds for r in requests[rows]])
                if measure:
                    sim, nn = self.nearest(torch.nan_to_num(audio), lengths)
                else:
                    sim, nn = [math.nan] * len(finite), [-1] * len(finite)
            longest = min(audio.shape[-1], round(max(r.seconds for r in requests[rows]) * self.sample_rate))
            audio = audio[..., :longest].cpu()  # one copy to the host per chunk
            for j, r in enumerate(requests[rows]):
                n = min(longest, round(r.seconds * self.sample_rate))
                trace = [{k: v[a + j] for k, v in step.items()} for step in per_step]
                err = None if finite[j] else "non-finite audio (latents diverged); row discarded"
                out.append(Generated(r, audio[j, :, :n].clone(), sim[j], nn[j], trace, err))
        return out

    def decode_final(self, latents: torch.Tensor, seconds: list[float]) -> torch.Tensor:
        """Audio [B, C, L·ds] of latents [B, C, L]: decoded up to the longest duration in ``seconds``
        plus the decoder's margin (DECODE_MARGIN_FRAMES), zeros after it, so the embedder gets the
        same input as from a full decode. Long decodes go through the autoencoder's own chunked decode
        (``decode_audio(chunked=True)``, stable-audio-tools) where it has one."""
        ds = self.model.pretransform.downsampling_ratio
        length = latents.shape[-1]
        frames = min(length, math.ceil(max(seconds) * self.sample_rate / ds))
        cut = latents[..., : min(length, frames + decode_margin(self.model.pretransform))]
        audio = self._decode_chunked(cut) if self._can_chunk(cut) else self.decode(cut)
        return torch.nn.functional.pad(audio[..., : frames * ds], (0, (length - frames) * ds))

    def _can_chunk(self, latents: torch.Tensor) -> bool:
        pt = self.model.pretransform
        decode_audio = getattr(getattr(pt, "model", None), "decode_audio", None)
        return (
            latents.shape[-1] > 2 * VAE_CHUNK_FRAMES
            and decode_audio is not None
            and "chunked" in inspect.signature(decode_audio).parameters
            and not getattr(pt, "model_half", False)
        )

    def _decode_chunked(self, latents: torch.Tensor) -> torch.Tensor:
        """``decode`` through the autoencoder's overlapping-chunk decode (what AutoencoderPretransform
        .decode does with chunked=True: scale, decode_audio), in the engine's precision."""
        pt = self.model.pretransform
        with self.precision.autocast():
            audio = pt.model.decode_audio(
                latents * pt.scale, chunked=True, chunk_size=VAE_CHUNK_FRAMES, overlap=VAE_OVERLAP_FRAMES
            )
        return audio.float() / self.audio_scale


def check_objective(config: EngineConfig, objective: str) -> None:
    """``ValueError`` unless ``config`` can sample a model of this diffusion objective: the schedule must
    run in the model's time variable; AMG on a flow model runs in mode "corrected" only, and ``min_scale``
    below 1 only there (engine/flow_guidance.py)."""
    space = OBJECTIVE_SPACE[objective]
    schedule = config.sampler.schedule
    if SCHEDULE_SPACE[schedule] != space:
        fits = sorted(n for n, v in SCHEDULE_SPACE.items() if v == space)
        hint = " (e.g. --preset sao-small)" if space == "t" else ""
        raise ValueError(
            f"the model's diffusion_objective is {objective!r}, sampled over {_SPACE[space]}, but schedule "
            f"{schedule!r} runs over {_SPACE[SCHEDULE_SPACE[schedule]]}: use schedule "
            f"{' or '.join(fits)}{hint}"
        )
    g = config.guidance
    if space == "t" and g.amg and g.strategy == "amg" and g.mode == "reference":
        raise ValueError(
            f"mode 'reference' reproduces the published code on a v-objective model; a rectified-flow model "
            f"(diffusion_objective {objective!r}) is guided in mode 'corrected' (engine/flow_guidance.py): "
            "use --mode corrected, or --preset default-flow / sao-small-amg"
        )
    if (
        space == "t"
        and g.amg
        and g.strategy == "amg"
        and (g.gradient != "full" or g.cascade_threshold is not None)
    ):
        raise ValueError(
            f"the cheaper variants of AMG (gradient={g.gradient!r}, cascade_threshold="
            f"{g.cascade_threshold!r}) are defined for v-objective models; a rectified-flow model "
            f"(diffusion_objective {objective!r}) runs the method itself (engine/flow_guidance.py): "
            "drop --gradient and --cascade"
        )
    if space == "t" and g.amg and g.strategy == "amg" and config.grad_memory_gib is not None:
        raise ValueError(
            f"grad_memory_gib={config.grad_memory_gib}: the gated path's micro-batches are the v-objective "
            f"denoiser's; a rectified-flow model (diffusion_objective {objective!r}) computes its gated rows "
            "in one call: drop --grad-memory-gib (and --grad-row-gib), or lower --batch-size"
        )
    if space == "sigma" and g.min_scale != 1:
        raise ValueError(
            f"min_scale={g.min_scale}: only the flow models' combine lowers the caps below the published "
            "s0 − 1; on a v-objective model leave min_scale at 1"
        )


def graph_budget(config: EngineConfig) -> GraphBudget | None:
    """The gated path's memory budget of ``config`` (``grad_memory_gib``, ``grad_row_gib``), or None."""
    if config.grad_memory_gib is None:
        return None
    row = None if config.grad_row_gib is None else config.grad_row_gib * 2**30
    return GraphBudget(config.grad_memory_gib * 2**30, row)


_SPACE = {"sigma": "the VE noise level sigma", "t": "the flow time t"}


@dataclass
class ConditionalDenoiser:
    """``(x, sigma) -> (x0 of the conditional branch, None)``: the denoiser when there is no guidance at
    all (AMG off, cfg_scale 1), one model forward per step where CFG's combine would need two (its
    result, x0_u + 1·(x0_c − x0_u), equals x0_c up to rounding; stable-audio-tools' DiT also skips the
    unconditional pass at cfg_scale 1)."""

    cond: Conditioning
    denoise: Callable[..., torch.Tensor]  # (x, sigma, cond) -> x0, maybe compiled

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor):
        with torch.no_grad(), record_function("amg/model"):
            return self.denoise(x, sigma, self.cond), None


def _stack_traces(traces: list[StepTrace]) -> list[dict[str, list]]:
    """Move the per-step traces to the host once, at the end of the batch."""
    out = []
    for t in traces:
        out.append({
            "similarity": t.sim.float().cpu().tolist(),
            "lambda": t.lam.float().cpu().tolist(),
            "gate": t.gate.bool().cpu().tolist(),
            "s1": t.s1.float().cpu().tolist(),
            "s2": t.s2.float().cpu().tolist(),
            "neighbour": t.neighbour.cpu().tolist(),
        })  # fmt: skip
        if t.signal is not None:
            out[-1]["signal"] = t.signal.float().cpu().tolist()
    return out
