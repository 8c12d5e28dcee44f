"""What one AMG step costs on the Stable Audio Open 1.0 architecture (random weights), part by part.

    python benchmarks/bench_amg_cost.py                          # CPU: 32-frame window, batch 1 and 2
    python benchmarks/bench_amg_cost.py --frames 16 --reps 2 --batches 1

SAO 1.0 from the shipped config with random weights (benchmarks/sao_assets.py: the 1.06 B-parameter
DiT, the Oobleck VAE, a T5 encoder of t5-base's size, a LAION-CLAP HTSAT-tiny audio branch, a random
index), over a window shortened to ``--frames`` latent frames (SAO's is 1024), each clip as long as the
window. Every part is the engine's own code (engine.engine.Engine, engine.guidance.AMGDenoiser), timed
at each batch size with the parts interleaved, ``--reps`` times (median), after one warm-up:

- cfg: the [conditional; unconditional] model call without autograd (the step's main call);
- decode: the Oobleck decode of the detector's cut (Engine.detector: the frames the embedder sees
  plus the decoder's margin; the bench checks that decode + embed give the detector's own output);
- embed: the CLAP embedding of that audio (Engine.embed; CLAP always sees its 10 s window);
- search: the nearest training row over the index (engine.guidance.search_fn);
- neighbour: the neighbour-caption branch (one model branch, the c2 term of a gated row);
- grad: the similarity gradient through everything (AMGDenoiser.similarity_grad: the CFG call with
  autograd, decode, embed, backward to x), and apart its forward (grad_fwd, what a warm row runs
  instead of cfg + decode + embed) and its backward (grad_bwd, all a warm row adds);
- det_grad: the gradient through the detector alone: decode + embed with autograd on the probe x0
  and the backward to it, no backward through the denoiser.

Each is printed with its ratio to a cfg call of the same batch size timed just before it (the load
of a shared machine moves by minutes). Memory per row of the
gated path: the bytes autograd saves for backward in the gradient's forward (engine.guidance.SavedBytes,
what a warm row holds across the step and what ``EngineConfig.grad_memory_gib`` budgets), split into
denoiser and detector, and the peak RSS growth over one similarity_grad call (``/proc/self`` VmHWM
after ``clear_refs``, heap trimmed first: the transient peak of the backward included).

Then the projection to SAO's full window (1024 DiT frames, the detector's 216 + 16 frames of a
47.55 s clip): the model moved to the meta device, each part's FLOPs counted
(torch.utils.flop_counter) at the bench's window and at the full one, each part's time scaled by its
FLOP ratio (same FLOP rate per part: an estimate), and the graph bytes per row at the full window in
float32 and bfloat16 (the modules cast on the meta device: activations only; autocast adds one bf16
copy of the weights per micro-batch). One JSON line goes to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_common  # noqa: E402
import sao_assets  # noqa: E402

FULL_FRAMES = 1024  # SAO 1.0's window: 2,097,152 samples at 44.1 kHz, downsampling 2048
PARTS = ("cfg", "decode", "embed", "search", "neighbour", "grad", "grad_fwd", "grad_bwd", "det_grad")
SIGMA = 1.0  # a noise level inside the gated range of the sao-paper preset


# ------------------------------------------------------------------------------------------- setup


def build(root: Path, frames: int, index_size: int, device: str, tiny: bool = False):
    """Assets, the random model and an Engine on them, with the window cut to ``frames`` latent frames
    (``tiny``: every width shrunk, benchmarks/sao_assets.py; for the test that keeps this bench alive)."""
    from amg_engine.engine.config import PRESETS
    from amg_engine.engine.engine import Engine

    assets = sao_assets.write_assets(root, tiny=tiny, index_size=index_size)
    config = dict(assets["config"], sample_size=2048 * frames)
    model = sao_assets.build_model(config, device)
    base = PRESETS["sao-paper"]
    cfg = replace(base, device=device, precision="fp32", guidance=replace(base.guidance, mode="corrected"))
    with sao_assets.engine_with_model(model, config):
        engine = Engine(cfg, assets["model_dir"], assets["index_dir"], assets["clap"])
    return engine, assets["captions"]


class Step:
    """One batch's inputs and the engine's pieces, built as Engine.sample builds them."""

    def __init__(self, engine, captions: list[str], b: int, frames: int) -> None:
        from amg_engine.engine.guidance import AMGDenoiser, RowParams
        from amg_engine.engine.models import encode_conditioning

        self.engine, dev = engine, engine.device
        seconds = frames * 2048 / engine.sample_rate  # each clip as long as the window
        meta = [{"prompt": captions[i], "seconds_total": seconds} for i in range(b)]
        with torch.no_grad():
            self.cond = encode_conditioning(engine.model, meta, dev)
        self.uncond = self.cond.null_text()
        g = engine.config.guidance
        full = lambda v: torch.full((b,), float(v), device=dev)  # noqa: E731
        self.detect = engine.detector([seconds] * b, reference=False)
        params = RowParams(full(g.cfg_scale), full(g.c1), full(g.c2), full(g.c3))
        self.den = AMGDenoiser(
            engine.model, self.cond, self.uncond, params,
            self.detect, engine.index.vectors, engine._neighbour_cond,
            lambda_min=g.lambda_min, lambda_max=g.lambda_max, branches=engine._branches,
            gated_branches=engine._gated_branches, denoise=engine._denoise,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(b)
        self.x = (torch.randn(b, engine.model.io_channels, frames, generator=gen) * SIGMA).to(dev)
        self.sigma = torch.full((b,), SIGMA, device=dev)
        self.rows = torch.arange(b, device=dev)
        self.lengths = engine.lengths([seconds] * b)
        # the detector's cut, as Engine.detector computes it (checked against it in check())
        from amg_engine.engine.engine import decode_margin
        from amg_engine.index.clip import input_span

        self.ds = engine.model.pretransform.downsampling_ratio
        span = input_span(engine.sample_rate, engine.embedder.sample_rate, engine.embedder.window)
        self.det_frames = math.ceil(min(round(seconds * engine.sample_rate), span) / self.ds)
        self.margin = decode_margin(engine.model.pretransform)
        with torch.no_grad():
            x0_c, x0_u = self.cfg()
            self.probe = self.den._probe(x0_c, x0_u, self.den.params.cfg_scale)
            self.audio = self.decode(self.probe)
            self.emb = self.embed(self.audio)
            self.nn = self.search()[1]
        self.nn_host = self.nn.cpu()

    # the parts, each the engine's own call
    def cfg(self):
        with torch.no_grad():
            return self.engine._branches(self.x, self.sigma, self.cond, self.uncond)

    def decode(self, probe):
        return self.engine.decode(probe[..., : self.det_frames + self.margin])[
            ..., : self.det_frames * self.ds
        ]

    def embed(self, audio):
        return self.engine.embed(audio, self.lengths)

    def search(self):
        from amg_engine.engine.guidance import search_fn

        with torch.no_grad():
            return search_fn(self.engine.device)(self.emb, self.engine.index.vectors)

    def neighbour(self):
        with torch.no_grad():
            return self.engine._denoise(self.x, self.sigma, self.engine._neighbour_cond(self.nn_host))

    def grad(self):
        return self.den.similarity_grad(self.x, self.sigma, self.rows, self.nn)

    def grad_fwd(self):
        """The forward of the gradient with autograd, as a warm row runs it (AMGDenoiser._forward_split)."""
        with torch.enable_grad():
            xg = self.x.detach().requires_grad_(True)
            _, _, emb = self.den._predict(
                self.den.gated_branches, xg, self.sigma, self.cond, self.uncond, self.rows
            )
        return xg, emb

    def grad_bwd(self, tape):
        xg, emb = tape
        sim = (emb.float() * self.engine.index.vectors[self.nn]).sum(dim=1)
        return torch.autograd.grad(sim.sum(), xg)[0]

    def det_grad(self):
        with torch.enable_grad():
            p = self.probe.detach().requires_grad_(True)
            emb = self.detect(p, self.rows)
            sim = (emb.float() * self.engine.index.vectors[self.nn]).sum(dim=1)
            return torch.autograd.grad(sim.sum(), p)[0]

    def check(self) -> None:
        """decode + embed here are the detector's own cut and calls: same ops, same inputs, same bits."""
        with torch.no_grad():
            if not torch.equal(self.emb, self.detect(self.probe, self.rows)):
                raise RuntimeError("the bench's decode + embed differ from Engine.detector: update the bench")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_parts(step: Step) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of each part, once (the caller interleaves batch sizes and repeats), and of the cfg call
    run just before each part: on a shared machine whose load moves by minutes, a part's ratio to the
    cfg call next to it is steadier than to one timed minutes away."""
    parts = {
        "decode": lambda: torch.no_grad()(step.decode)(step.probe),
        "embed": lambda: torch.no_grad()(step.embed)(step.audio),
        "search": step.search,
        "neighbour": step.neighbour,
        "grad": step.grad,
        "grad_fwd": None,  # with grad_bwd below: the tape must live between the two
        "det_grad": step.det_grad,
    }
    out, cfg = {"cfg": timed(step.cfg)}, {}
    cfg["cfg"] = out["cfg"]
    for name, fn in parts.items():
        trim_heap()
        cfg[name] = timed(step.cfg)
        if fn is not None:
            out[name] = timed(fn)
            continue
        t0 = time.perf_counter()
        tape = step.grad_fwd()
        out["grad_fwd"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        step.grad_bwd(tape)
        out["grad_bwd"] = time.perf_counter() - t0
        cfg["grad_bwd"] = cfg["grad_fwd"]
        del tape
    return out, cfg


# ------------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc): without it the resident set of this process ratchets
    up over the parts' large, differently sized activations (a run was killed at 24 GB on a 24 GB
    machine shared with other jobs)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss_growth(fn) -> float | None:
    """Bytes the resident set grew to at its peak during ``fn()`` (Linux: VmHWM reset by clear_refs;
    freed heap returned to the OS first so that reused pages do not hide growth). None elsewhere."""
    trim_heap()
    try:
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    fn()
    return (_status_kib("VmHWM") - before) * 1024.0


def graph_bytes(step: Step, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Bytes autograd saves for backward: the gradient's whole forward, and its detector part alone;
    ``autocast``: under torch.autocast to that type (the engine's bf16 precision: float32 weights, and
    float32 wherever an op promotes, e.g. a bf16 activation times a float32 parameter)."""
    from contextlib import nullcontext

    from amg_engine.engine.guidance import SavedBytes

    ctx = nullcontext() if autocast is None else torch.autocast(step.engine.device.type, dtype=autocast)
    with ctx, SavedBytes() as whole:
        tape = step.grad_fwd()
    del tape
    with ctx, torch.enable_grad(), SavedBytes() as det:
        p = step.probe.detach().requires_grad_(True)
        emb = step.detect(p, step.rows)
    del emb
    return {"graph": whole.bytes, "graph_detector": det.bytes, "graph_denoiser": whole.bytes - det.bytes}


# ----------------------------------------------------------------------------- full-window projection


def meta_counts(engine, captions, frames: int, dtype: torch.dtype) -> dict[str, dict]:
    """FLOPs of each part and graph bytes for one row at ``frames``, the modules already on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from amg_engine.engine.guidance import SavedBytes

    step = MetaStep(engine, captions, frames, dtype)
    out = {}
    for name in ("cfg", "decode", "embed", "neighbour", "grad", "det_grad"):
        with FlopCounterMode(display=False) as counter:
            getattr(step, name)()
        out[name] = {"flops": float(counter.get_total_flops())}
    with SavedBytes() as whole:
        step.grad_fwd()
    with SavedBytes() as det:
        step.det_fwd()
    out["graph"] = {"bytes": whole.bytes, "detector": det.bytes, "denoiser": whole.bytes - det.bytes}
    return out


class MetaStep(Step):
    """A one-row Step on the meta device: shapes only (FLOPs and saved bytes, no arithmetic)."""

    def __init__(self, engine, captions, frames: int, dtype: torch.dtype) -> None:
        from amg_engine.engine.engine import decode_margin
        from amg_engine.engine.models import Conditioning
        from amg_engine.index.clip import input_span

        self.engine, self.dtype = engine, dtype
        m = engine.model
        seconds = frames * 2048 / engine.sample_rate
        meta = lambda t: None if t is None else torch.empty(t.shape, dtype=dtype, device="meta")  # noqa: E731
        c = engine._bench_cond  # conditioning of one row, computed before the move to meta
        self.cond = Conditioning(meta(c.cross_attn), meta(c.global_cond))
        self.uncond = self.cond.null_text()
        self.x = torch.empty(1, m.io_channels, frames, dtype=dtype, device="meta")
        self.sigma = torch.empty(1, dtype=dtype, device="meta")
        self.ds = m.pretransform.downsampling_ratio
        span = input_span(engine.sample_rate, engine.embedder.sample_rate, engine.embedder.window)
        self.det_frames = math.ceil(min(round(seconds * engine.sample_rate), span) / self.ds)
        self.margin = decode_margin(m.pretransform)
        self.lengths = torch.tensor([round(seconds * engine.sample_rate)], device="meta")
        self.index = torch.empty(1, 512, dtype=dtype, device="meta")

    def cfg(self):
        from amg_engine.engine.compile import cfg_branches

        with torch.no_grad():
            return cfg_branches(self.engine.model, self.x, self.sigma, self.cond, self.uncond)

    def _model_fwd(self):
        from amg_engine.engine.compile import cfg_branches

        x0_c, x0_u = cfg_branches(self.engine.model, self.x, self.sigma, self.cond, self.uncond)
        return x0_u + 7.0 * (x0_c - x0_u)

    def _detect(self, probe):
        # the detector's cut, calls unwrapped: Engine.decode/embed cast to float32, which meta
        # bfloat16 must not
        audio = self.engine.model.pretransform.decode(probe[..., : self.det_frames + self.margin])
        audio = audio[..., : self.det_frames * self.ds] / self.engine.audio_scale
        from amg_engine.index.clip import prepare_clips

        e = self.engine.embedder
        clips = prepare_clips(audio, self.engine.sample_rate, None, e.sample_rate, e.window, "zeros")
        return e.embed_window(clips.to(self.dtype))

    def decode(self):
        with torch.no_grad():
            return self.engine.model.pretransform.decode(self.x[..., : self.det_frames + self.margin])

    def embed(self):
        from amg_engine.index.clip import input_span

        e = self.engine.embedder
        n = input_span(self.engine.sample_rate, e.sample_rate, e.window)
        with torch.no_grad():
            return e.embed_window(torch.empty(1, e.window, dtype=self.dtype, device="meta")), n

    def neighbour(self):
        from amg_engine.engine.models import denoise

        with torch.no_grad():
            return denoise(self.engine.model, self.x, self.sigma, self.cond)

    def grad_fwd(self):
        with torch.enable_grad():
            self.x.requires_grad_(True)
            emb = self._detect(self._model_fwd())
        return emb

    def grad(self):
        emb = self.grad_fwd()
        (emb * self.index).sum().backward()
        self.x.grad = None

    def det_fwd(self):
        with torch.enable_grad():
            p = torch.empty(self.x.shape, dtype=self.dtype, device="meta", requires_grad=True)
            return self._detect(p), p

    def det_grad(self):
        emb, p = self.det_fwd()
        (emb * self.index).sum().backward()


def project(engine, captions, frames: int) -> dict:
    """FLOPs and graph bytes at the bench's window and at SAO's full one, on the meta device."""
    m = engine.model
    with torch.no_grad():
        from amg_engine.engine.models import encode_conditioning

        full_s = FULL_FRAMES * 2048 / engine.sample_rate
        engine._bench_cond = encode_conditioning(m, [{"prompt": captions[0], "seconds_total": full_s}], "cpu")
    m.to("meta")
    engine.embedder.to("meta")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        m.to(dtype)
        engine.embedder.to(dtype)
        name = str(dtype).removeprefix("torch.")
        out[name] = {f: meta_counts(engine, captions, f, dtype) for f in (frames, FULL_FRAMES)}
    return out


# -------------------------------------------------------------------------------------------- main


def measure(engine, captions, frames: int, batches: list[int], reps: int) -> list[dict]:
    """Median seconds of every part per batch size (interleaved), graph bytes and peak RSS growth."""
    steps = {b: Step(engine, captions, b, frames) for b in batches}
    for s in steps.values():
        s.check()
        if reps:
            time_parts(s)  # warm-up (allocator, neighbour-caption cache)
    times = {b: {k: [] for k in PARTS} for b in batches}
    cfgs = {b: {k: [] for k in PARTS} for b in batches}  # the cfg call next to each part
    for _ in range(reps):  # interleaved: every batch size and part in each repetition
        for b, s in steps.items():
            parts, next_cfg = time_parts(s)
            for k, v in parts.items():
                times[b][k].append(v)
                cfgs[b][k].append(next_cfg[k])
    rows = []
    for b, s in steps.items():
        t = times[b]
        med = {k: statistics.median(v) for k, v in t.items()} if reps else None
        # each part ÷ the cfg call timed just before it (time_parts)
        per_rep = {k: [v / c for v, c in zip(t[k], cfgs[b][k], strict=True)] for k in PARTS}
        ratio = {k: statistics.median(v) for k, v in per_rep.items()} if reps else None
        trim_heap()
        mem = graph_bytes(s)
        if b == batches[0]:  # one batch size gives the ratio the projection needs; at batch 2 on
            # the CPU, bf16 autocast grew this process past 23 GB and the OOM killer ended it (twice)
            trim_heap()
            mem["bf16_autocast"] = graph_bytes(s, torch.bfloat16)
        mem["peak_rss_growth"] = peak_rss_growth(s.grad)
        row = {"batch": b, "s": med, "ratio": ratio, "all_s": t, "all_cfg": cfgs[b], "all_ratio": per_rep}
        rows.append({**row, "bytes": mem})
        print_row(b, med, per_rep, mem)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=32, help="latent frames of the shortened window (SAO: 1024)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes (rows)")
    p.add_argument(
        "--reps", type=int, default=3, help="timed repetitions per batch size (median); 0: memory only"
    )
    p.add_argument("--index-size", type=int, default=100_000, help="random index vectors (512-d)")
    p.add_argument("--tiny", action="store_true", help="tiny widths (a smoke run: the figures mean nothing)")
    p.add_argument("--no-project", action="store_true", help="skip the meta-device full-window projection")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON-lines log")
    p.add_argument(
        "--report", action="store_true", help="print the tables of the last record in --out and exit"
    )
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out))
        return 0
    if args.frames < 1 or args.reps < 0 or min(args.batches) < 1:
        p.error("--frames and --batches need positive integers, --reps one ≥ 0")
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amg-cost-") as tmp:
        engine, captions = build(Path(tmp), args.frames, args.index_size, "cpu", args.tiny)
        build_s = time.perf_counter() - t0
        name = "SAO 1.0 (tiny widths)" if args.tiny else "SAO 1.0"
        print(f"{name}, random weights, CPU ({torch.get_num_threads()} threads), window {args.frames} "
              f"frames, fp32; built in {build_s:.0f} s; load {load[0]:.1f}", flush=True)  # fmt: skip
        rows = measure(engine, captions, args.frames, args.batches, args.reps)
        projection = None if args.no_project else project(engine, captions, args.frames)
    if projection:
        print_projection(rows, projection, args.frames)
        projection["bf16_autocast_full"] = autocast_estimate(rows, projection, args.frames)
    record = {
        "bench": "amg_cost", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": "cpu",
        **bench_common.environment("cpu"), "load": list(load), "load_end": list(os.getloadavg()),
        "frames": args.frames, "tiny": args.tiny, "index_size": args.index_size, "sigma": SIGMA,
        "reps": args.reps, "threads": torch.get_num_threads(), "build_s": build_s, "rows": rows,
        "projection": projection,
    }  # fmt: skip
    bench_common.append_record(args.out, record)
    return 0


def print_row(b: int, med: dict | None, per_rep: dict, mem: dict) -> None:
    print(f"\nbatch {b}: part | median s | ÷ the cfg call just before it: median [min, max]")
    for k in PARTS if med else ():
        r = per_rep[k]
        print(f"  {k:10s} {med[k]:8.3f} {statistics.median(r):7.2f}x [{min(r):.2f}, {max(r):.2f}]")
    gib = 2**30
    ac = mem.get("bf16_autocast")
    if ac:
        print(
            f"  graph per row under bf16 autocast: {ac['graph'] / b / gib:.3f} GiB "
            f"(denoiser {ac['graph_denoiser'] / b / gib:.3f}, detector {ac['graph_detector'] / b / gib:.3f})"
        )
    rss = mem["peak_rss_growth"]
    per = {k: mem[k] / b / gib for k in ("graph", "graph_denoiser", "graph_detector")}
    print(f"  graph per row: {per['graph']:.3f} GiB (denoiser {per['graph_denoiser']:.3f}, "
          f"detector {per['graph_detector']:.3f}); peak RSS growth of similarity_grad per row: "
          f"{'n/a' if rss is None else f'{rss / b / gib:.3f} GiB'}", flush=True)  # fmt: skip


def autocast_estimate(rows: list[dict], proj: dict, frames: int) -> dict[str, float]:
    """One row's graph at the full window under bf16 autocast (bytes): the meta count of the modules
    cast to bf16, part by part (denoiser, detector) times the ratio autocast ÷ cast measured on the real
    tensors at the bench's window (autocast keeps float32 weights and promotes where they meet bf16)."""
    b = rows[0]["batch"]
    measured = rows[0]["bytes"]["bf16_autocast"]
    short, full = proj["bfloat16"][frames]["graph"], proj["bfloat16"][FULL_FRAMES]["graph"]
    out = {}
    for part in ("denoiser", "detector"):
        out[part] = full[part] * (measured[f"graph_{part}"] / b) / max(1, short[part])
    out["bytes"] = out["denoiser"] + out["detector"]
    return out


def print_projection(rows: list[dict], proj: dict, frames: int) -> None:
    """Per row (the first batch size's ratios): FLOPs at the full window ÷ the CFG call's, each part's
    CPU time ÷ the CFG call's scaled by their FLOP ratios, and the graph per row (meta count)."""
    fp32, gib = proj["float32"], 2**30
    short, full = fp32[frames], fp32[FULL_FRAMES]
    first = rows[0]
    b, ratio = first["batch"], first["ratio"]
    print(f"\nprojection to the full window ({FULL_FRAMES} frames), one row, fp32:")
    print("  part       | FLOPs ÷ cfg | FLOP ratio full/bench | CPU time scaled ÷ cfg")
    cfg_scale = full["cfg"]["flops"] / short["cfg"]["flops"]
    for k in ("cfg", "decode", "embed", "search", "neighbour", "grad", "det_grad"):
        f = full[k]["flops"] if k in full else 0.0
        scale = full[k]["flops"] / short[k]["flops"] if k in full else 1.0
        t = f"{ratio[k] * scale / cfg_scale:8.2f}" if ratio else "     n/a"
        print(f"  {k:10s} | {f / full['cfg']['flops']:11.3f} | {scale:21.1f} | {t}")
    m = first["bytes"]
    g = short["graph"]
    print(
        f"  graph per row at the bench's window: measured {m['graph'] / b / gib:.3f} GiB, meta count "
        f"{g['bytes'] / gib:.3f} GiB (detector {m['graph_detector'] / b / gib:.3f} "
        f"vs {g['detector'] / gib:.3f})"
    )
    for name in ("float32", "bfloat16"):
        g = proj[name][FULL_FRAMES]["graph"]
        print(
            f"  graph per row at the full window, {name} (modules cast): {g['bytes'] / gib:.2f} GiB "
            f"(denoiser {g['denoiser'] / gib:.2f}, detector {g['detector'] / gib:.2f})"
        )
    e = autocast_estimate(rows, proj, frames)
    print(
        f"  graph per row at the full window, bf16 autocast (the engine's bf16): {e['bytes'] / gib:.2f} GiB "
        f"(denoiser {e['denoiser'] / gib:.2f}, detector {e['detector'] / gib:.2f})"
    )


def report(log: Path) -> str:
    """Markdown tables (benchmarks/RESULTS.md) of the last amg_cost record in ``log``."""
    import json

    recs = [json.loads(line) for line in Path(log).read_text().splitlines() if '"amg_cost"' in line]
    if not recs:
        raise SystemExit(f"no amg_cost record in {log}")
    r, gib = recs[-1], 2**30
    out = [
        f"record {r['time']}, commit {r['git_sha'][:7]}{' (dirty)' if r['git_dirty'] else ''}, "
        f"{r['frames']}-frame window, {r['reps']} repetitions, load {r['load'][0]:.1f} at the start, "
        f"{r['load_end'][0]:.1f} at the end",
        "",
        "| part | "
        + " | ".join(f"b={row['batch']}: s (median) | ÷ cfg [min, max]" for row in r["rows"])
        + " |",
        "|---|" + "---|---|" * len(r["rows"]),
    ]
    for k in PARTS:
        cells = []
        for row in r["rows"]:
            a = row["all_ratio"][k]
            cells.append(f"{row['s'][k]:.2f} | {statistics.median(a):.2f} [{min(a):.2f}, {max(a):.2f}]")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    out += ["", "| per row | " + " | ".join(f"b={row['batch']}" for row in r["rows"]) + " |"]
    out.append("|---|" + "---|" * len(r["rows"]))
    for label, get in (
        ("graph, fp32 (GiB)", lambda m: m["graph"]),
        ("of which detector", lambda m: m["graph_detector"]),
        ("graph, bf16 autocast", lambda m: m["bf16_autocast"]["graph"] if "bf16_autocast" in m else math.nan),
        ("peak RSS growth of similarity_grad", lambda m: m["peak_rss_growth"] or float("nan")),
    ):
        cells = [f"{get(row['bytes']) / row['batch'] / gib:.3f}" for row in r["rows"]]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    proj = r.get("projection")
    if proj:
        f32 = proj["float32"]
        short, full = f32[str(r["frames"])], f32[str(FULL_FRAMES)]
        out += ["", "| part (one row) | FLOPs ÷ cfg at 1024 frames | FLOPs at 1024 ÷ at the bench's window |"]
        out.append("|---|---|---|")
        for k in ("cfg", "decode", "embed", "neighbour", "grad", "det_grad"):
            ratio = full[k]["flops"] / full["cfg"]["flops"]
            out.append(f"| {k} | {ratio:.3f} | {full[k]['flops'] / short[k]['flops']:.1f} |")
        out.append("")
        out.append(
            f"cfg call at 1024 frames: {full['cfg']['flops'] / 1e12:.2f} TFLOP (one row, both branches)"
        )
        for name in ("float32", "bfloat16"):
            g = proj[name][str(FULL_FRAMES)]["graph"]
            out.append(f"graph per row at 1024 frames, {name} (modules cast): "
                       f"{g['bytes'] / gib:.2f} GiB "
                       f"(denoiser {g['denoiser'] / gib:.2f}, "
                       f"detector {g['detector'] / gib:.2f})")  # fmt: skip
        e = proj.get("bf16_autocast_full")
        if e:
            out.append(f"graph per row at 1024 frames, bf16 autocast (estimate): "
                       f"{e['bytes'] / gib:.2f} GiB "
                       f"(denoiser {e['denoiser'] / gib:.2f}, "
                       f"detector {e['detector'] / gib:.2f})")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
