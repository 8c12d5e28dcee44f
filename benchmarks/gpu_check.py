"""The prepared GPU check: kernels compiled for real, and the throughput figures of SAO 1.0.

    python3 benchmarks/gpu_check.py --out DIR              # one GPU: under 8 minutes
    python3 benchmarks/gpu_check.py --dry-run --out DIR    # CPU, tiny shapes (the test suite runs it)

Before importing anything of the project it installs the wheels in ``.whl/`` (fetched here by
``benchmarks/fetch_gpu_wheels.py``; the GPU machine has no registry) into a temporary folder. Then,
each section within a time budget (a section whose estimate does not fit what is left is skipped and
recorded as such), writing ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` after every section, so a
run stopped at any point leaves its results so far:

- env: the GPU, versions, a measured bf16 matmul rate (8192³) and device-copy bandwidth;
- kernels: ``nn_search`` (B up to 64, index up to 10^6 × 512, fp32 and bf16) and ``amg_combine``
  (B up to 64 × 64 × 1024, contiguous and strided) compiled by Triton, each against its torch twin,
  and nn_search's time against matmul + top-k;
- sao: Stable Audio Open 1.0 from the shipped config with random weights (T5 of t5-base's size,
  HTSAT-tiny CLAP in the 630k layout, a random index), 10 s clips; plain CFG at batch 1, 8, 32 in
  fp32 (TF32 off, the stable-audio-tools path) and bf16, eager and compiled; AMG (corrected mode)
  with the gate forced closed (λ = 1) and open (λ = −1); the published-style baseline
  (engine/reference.py: batch 1, every term every step), all in the same precision. Each is timed at
  two step counts, so a step's cost and the per-batch cost separate, and scaled to 100 steps;
- figures: clips/hour, s/step, DiT FLOP/s against the measured bf16 rate, AMG ÷ plain CFG, engine ÷
  published-style, bf16 ÷ fp32, compile ÷ eager, peak memory, host syncs per step
  (``torch.cuda.set_sync_debug_mode``); batch invariance (a row alone vs in a batch of 16);
- kernel tests: ``tests/test_kernels.py`` with ``TRITON_INTERPRET=0`` on the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_check")

# Budget (seconds) and each section's estimate on one H200; a section runs only if its estimate fits.
BUDGET_S = 450  # of the 8-minute target, leaving time to start Python and install the wheels
GPU_SHAPES = dict(
    nn=[(b, n) for n in (10_000, 100_000, 1_000_000) for b in (1, 16, 64)],
    nn_dim=512,
    combine=[(b, 64, 1024) for b in (1, 8, 32, 64)],
    batches=(1, 8, 32),
    amg_batch=8,
    invariance_batch=16,
    invariance_steps=4,
    index_size=100_000,
    steps=(2, 4),
    clip_s=10.0,
    warmup=True,  # compiles a compiled engine; loads kernels, cuBLAS handles and caches
)
DRY_SHAPES = dict(
    nn=[(3, 300)],
    nn_dim=64,
    combine=[(2, 4, 300)],
    batches=(1,),
    amg_batch=1,
    invariance_batch=2,
    invariance_steps=2,
    index_size=64,
    steps=(2, 3),
    clip_s=1.0,
    warmup=False,  # nothing compiles in the dry run
)


def install_wheels(folder: Path) -> list[str]:
    """pip-install every wheel in ``folder`` (no index, no dependencies) and put them on sys.path."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return []
    target = Path(tempfile.gettempdir()) / "amg-gpu-check-site"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *map(str, wheels),
    ]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    return [w.name for w in wheels]


def import_checkout() -> None:
    """Make ``import amg_engine`` this checkout, installed or not (the GPU machine has no install):
    a link named ``amg_engine`` to the repository root, in a temporary folder put first on
    ``sys.path`` and on ``PYTHONPATH`` (for the kernel tests' subprocess)."""
    tag = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"amg-engine-checkout-{tag}"
    folder.mkdir(exist_ok=True)
    link = folder / "amg_engine"
    if not link.is_symlink():
        try:
            link.symlink_to(ROOT, target_is_directory=True)
        except FileExistsError:  # another process made it between the check and here
            pass
    sys.path[:0] = [str(folder), str(ROOT / "benchmarks")]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])


class Report:
    """The JSON document and its markdown table, rewritten after every section."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.start, self.budget = out, time.perf_counter(), budget_s
        self.doc = {"dry_run": dry_run, "budget_s": budget_s, "sections": {}, "figures": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def run(self, name: str, estimate_s: float, fn, *args):
        """fn(*args), recorded (a dict result in full) as ok or error; 'skipped' when the estimate
        does not fit what is left. Returns fn's result (None if skipped or failed)."""
        if estimate_s > self.left():
            rec = {"status": "skipped", "reason": f"estimate {estimate_s:.0f} s > {self.left():.0f} s left"}
            self._record(name, rec)
            return None
        t0 = time.perf_counter()
        try:
            result = fn(*args)
            rec = {"status": "ok", **(result if isinstance(result, dict) else {})}
        except Exception as exc:  # a failed section is a row of the report, the rest still runs
            result, rec = (
                None,
                {"status": "error", "error": repr(exc), "trace": traceback.format_exc()[-3000:]},
            )
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self._record(name, rec)
        return result

    def _record(self, name: str, rec: dict) -> None:
        self.doc["sections"][name] = rec
        self.doc["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        log.info("%s: %s (%.1f s left)", name, rec["status"], self.left())
        self.write()

    def write(self) -> None:
        """Both files, each replaced whole: a check killed mid-write leaves the previous section's."""
        from amg_engine.index.files import atomic_write

        doc, table = json.dumps(self.doc, indent=1, default=str), markdown(self.doc)
        atomic_write(self.out / "gpu_check.json", lambda p: Path(p).write_text(doc))
        atomic_write(self.out / "gpu_check.md", lambda p: Path(p).write_text(table))


# ------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, reps: int = 10, warmup: int = 3) -> float:
    """Median time of fn() in ms (triton.testing.do_bench on CUDA, perf_counter elsewhere)."""
    import statistics

    import torch

    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def section_env(device: str, dry: bool) -> dict:
    import torch
    import triton

    rec = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        device=device,
        host=platform.node(),
    )
    n = 512 if dry else 8192
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).bfloat16() for _ in range(2))  # random, not zeros
    ms = median_ms(lambda: a @ b, device)
    rec["bf16_matmul_tflops"] = 2 * n**3 / ms / 1e9
    if torch.device(device).type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
        rec["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
        src = torch.empty(256 * 2**20, device=device)
        dst = torch.empty_like(src)
        rec["copy_gbps"] = 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src), device) / 1e6
    return rec


# ------------------------------------------------------------------------------------------ kernels


def check_nn(device: str, shapes: dict) -> dict:
    """nn_search (kernel) against its twin at the engine's shapes, and against matmul + top-k."""
    import torch

    rows = [_nn_case(device, dtype, b, n, shapes["nn_dim"]) for dtype in (torch.float32, torch.bfloat16)
            for b, n in shapes["nn"]]  # fmt: skip
    ok = all(r["max_sim_diff"] <= 1e-4 and r["same_index"] for r in rows)
    return dict(ok=ok, atol=1e-4, rows=rows)


def _nn_case(device, dtype, b: int, n: int, d: int) -> dict:
    import torch
    import torch.nn.functional as F

    from amg_engine.kernels.nn_search import nn_search_ref

    g = torch.Generator(device=device).manual_seed(n + b)
    xb = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)  # [N, D] unit rows
    xq = torch.randn(b, d, generator=g, device=device).to(dtype)
    sim, idx = torch.ops.amg.nn_search(xq, xb)
    ref_sim, ref_idx = nn_search_ref(xq, xb)
    top2 = (F.normalize(xq.float(), dim=1) @ xb.float().T).topk(min(2, n), dim=1).values
    clear = (top2[:, 0] - top2[:, -1]) > 1e-4  # no near-tie: the index must match
    t_kernel = median_ms(lambda: torch.ops.amg.nn_search(xq, xb), device)
    t_topk = median_ms(lambda: (F.normalize(xq, dim=1) @ xb.T).topk(1, dim=1), device)
    return dict(
        dtype=str(dtype).removeprefix("torch."), B=b, N=n, max_sim_diff=(sim - ref_sim).abs().max().item(),
        same_index=bool(torch.equal(idx[clear], ref_idx[clear])), kernel_ms=t_kernel,
        matmul_topk_ms=t_topk, speedup_vs_matmul_topk=t_topk / t_kernel,
    )  # fmt: skip


def check_combine(device: str, shapes: dict) -> dict:
    """amg_combine (kernel) against its twin, contiguous and strided latents, gates mixed."""
    rows = [
        _combine_case(device, *bct, layout)
        for bct in shapes["combine"]
        for layout in ("contiguous", "strided")
    ]
    return dict(ok=all(r["max_rel_diff"] <= 1e-6 and r["gates_equal"] for r in rows), rtol=1e-6, rows=rows)


def _combine_case(device, b: int, c: int, t: int, layout: str) -> dict:
    import torch

    from amg_engine.kernels.guidance import amg_combine_ref

    g = torch.Generator(device=device).manual_seed(b)
    if layout == "contiguous":
        lat = [torch.randn(b, c, t, generator=g, device=device) for _ in range(4)]
    else:  # channels-last views
        lat = [torch.randn(b, t, c, generator=g, device=device).transpose(1, 2) for _ in range(4)]
    lat[3].mul_(1e-3)  # gradients are small next to the predictions
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g, device=device)  # noqa: E731
    rows = (u(0, 1), u(0.3, 0.7), u(0, 1), u(1, 8), u(0, 10), u(0, 10), u(0, 1000))  # gates mixed
    out, ref = torch.ops.amg.amg_combine(*lat, *rows), amg_combine_ref(*lat, *rows)
    t_kernel = median_ms(lambda: torch.ops.amg.amg_combine(*lat, *rows), device)
    t_twin = median_ms(lambda: amg_combine_ref(*lat, *rows), device)
    gbytes = 5 * b * c * t * 4 / 1e9  # four latents read (an upper bound: closed rows skip two), D written
    rel = ((out[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
    return dict(
        B=b, C=c, T=t, layout=layout, max_rel_diff=rel,
        gates_equal=bool(torch.equal(out[3], ref[3])), kernel_ms=t_kernel, twin_ms=t_twin,
        speedup_vs_twin=t_twin / t_kernel, gbps=gbytes / t_kernel * 1e3,
    )  # fmt: skip


def section_kernel_tests(timeout_s: float) -> dict:
    """tests/test_kernels.py on the GPU with compiled kernels (TRITON_INTERPRET=0)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return dict(ok=False, timed_out=True, tail=tail.decode() if isinstance(tail, bytes) else tail)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    return dict(ok=run.returncode == 0, returncode=run.returncode, summary=summary, tail=run.stdout[-3000:])


# -------------------------------------------------------------------------------------- SAO 1.0


class Sao:
    """Random-weight SAO 1.0 assets (benchmarks/sao_assets.py) and one engine per (precision, compile)."""

    def __init__(self, root: Path, device: str, shapes: dict, dry: bool) -> None:
        import sao_assets

        t0 = time.perf_counter()
        self.assets = sao_assets.write_assets(root, tiny=dry, index_size=shapes["index_size"])
        self.model = sao_assets.build_model(self.assets["config"], device)
        self.device, self.shapes, self.engines = device, shapes, {}
        self.build_s = time.perf_counter() - t0

    def engine(self, precision: str, compile: bool = False):
        import sao_assets

        from amg_engine.engine.config import PRESETS
        from amg_engine.engine.engine import Engine

        key = (precision, compile)
        if key not in self.engines:
            base = PRESETS["sao-paper"]
            cfg = replace(
                base,
                device=self.device,
                precision=precision,
                compile=compile,
                guidance=replace(base.guidance, mode="corrected"),
            )
            with sao_assets.engine_with_model(self.model, self.assets["config"]):
                self.engines[key] = Engine(
                    cfg, self.assets["model_dir"], self.assets["index_dir"], self.assets["clap"]
                )
        return self.engines[key]

    def requests(self, n: int, seed: int = 0):
        from amg_engine.engine.engine import Request

        caps = self.assets["captions"]
        return [Request(f"r{i}", caps[i % len(caps)], self.shapes["clip_s"], seed + i) for i in range(n)]

    def info(self) -> dict:
        n_params = sum(p.numel() for p in self.model.parameters())
        dit = sum(p.numel() for p in self.model.model.parameters())
        return dict(
            build_s=self.build_s,
            params=n_params,
            dit_params=dit,
            window_samples=self.assets["config"]["sample_size"],
            index_size=self.shapes["index_size"],
        )


def guidance_for(engine, amg: bool, lam: float | None = None):
    g = engine.config.guidance
    if not amg:
        return replace(g, amg=False)
    return replace(g, amg=True, mode="corrected", lambda_min=lam, lambda_max=lam)


def _run(engine, reqs, guidance, steps: int, fn=None):
    """engine.generate (or fn(engine)) with this guidance and step count; (seconds, output)."""
    saved = engine.config
    engine.config = replace(
        saved, guidance=guidance, batch_size=len(reqs), sampler=replace(saved.sampler, steps=steps)
    )
    try:
        sync(engine.device)
        t0 = time.perf_counter()
        out = fn(engine) if fn else engine.generate(reqs)
        sync(engine.device)
        return time.perf_counter() - t0, out
    finally:
        engine.config = saved


def timed(engine, reqs, guidance, steps: tuple[int, int], fn=None, warmup: bool = True) -> dict:
    """Warm-up (compiles a compiled engine), then two step counts: s/step and the per-batch cost."""
    import torch

    warm = _run(engine, reqs, guidance, steps[0], fn)[0] if warmup else None
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_a, out = _run(engine, reqs, guidance, steps[0], fn)
    t_b, out = _run(engine, reqs, guidance, steps[1], fn)
    per_step = (t_b - t_a) / (steps[1] - steps[0])
    if per_step <= 0:  # timing noise at tiny sizes: fall back to the longer run's average
        per_step = t_b / steps[1]
    fixed = max(0.0, t_a - steps[0] * per_step)
    t100 = fixed + 100 * per_step
    rec = dict(
        batch=len(reqs),
        warmup_s=warm,
        s_per_step=per_step,
        fixed_s=fixed,
        s_per_batch_100_steps=t100,
        clips_per_hour=3600 * len(reqs) / t100,
        times_s=[t_a, t_b],
        steps=list(steps),
    )
    if cuda:
        rec["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if isinstance(out, list) and out and getattr(out[0], "trace", None):  # AMG runs: gates per step
        rec["gate_open_share"] = sum(sum(s["gate"] for s in g.trace) for g in out) / max(
            1, sum(len(g.trace) for g in out)
        )
    return rec


def dit_flops(engine, req) -> float:
    """FLOPs of one CFG model call (conditional + unconditional) for one clip, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from amg_engine.engine.models import encode_conditioning

    m = engine.model
    with torch.no_grad():
        cond = encode_conditioning(m, [{"prompt": req.prompt, "seconds_total": req.seconds}], engine.device)
        x = torch.randn(
            1, m.io_channels, engine.window // m.pretransform.downsampling_ratio, device=engine.device
        )
        with FlopCounterMode(display=False) as counter:
            engine._branches(x, torch.tensor([1.0], device=engine.device), cond, cond.null_text())
    return float(counter.get_total_flops())


def section_plain(sao: Sao, precision: str, compile: bool, batch: int) -> dict:
    engine = sao.engine(precision, compile)
    rec = timed(
        engine,
        sao.requests(batch),
        guidance_for(engine, amg=False),
        sao.shapes["steps"],
        warmup=sao.shapes["warmup"],
    )
    rec.update(precision=precision, compile=compile)
    return rec


def section_amg(sao: Sao, lam: float) -> dict:
    engine = sao.engine("bf16")
    reqs, shapes = sao.requests(sao.shapes["amg_batch"]), sao.shapes
    rec = timed(engine, reqs, guidance_for(engine, True, lam), shapes["steps"], warmup=shapes["warmup"])
    rec.update(precision="bf16", lam=lam, gate="closed" if lam >= 1 else "open")
    rec["syncs_per_step"] = syncs_per_step(
        engine, sao.requests(sao.shapes["amg_batch"]), guidance_for(engine, True, lam)
    )
    return rec


def syncs_per_step(engine, reqs, guidance) -> float | None:
    """Synchronising CUDA calls per step (torch.cuda.set_sync_debug_mode, difference of two runs)."""
    import warnings

    import torch

    if engine.device.type != "cuda":
        return None
    counts = []
    for steps in (2, 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _run(engine, reqs, guidance, steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchronizing" in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / 2


def section_published(sao: Sao) -> dict:
    from amg_engine.engine.reference import published_amg

    engine = sao.engine("bf16")
    req = sao.requests(1)
    rec = timed(
        engine,
        req,
        guidance_for(engine, True, -1.0),
        (2, 3),
        fn=lambda e: published_amg(e, req[0]),
        warmup=sao.shapes["warmup"],
    )
    rec.update(precision="bf16", note="batch 1, 3 forwards + full decode + embedding + backward every step")
    return rec


def section_invariance(sao: Sao) -> dict:
    """A row alone vs the same row in a batch (bf16, AMG corrected, λ at the batch's median σ_t)."""
    import torch

    engine = sao.engine("bf16")
    reqs = sao.requests(sao.shapes["invariance_batch"], seed=100)
    steps = sao.shapes["invariance_steps"]
    _, (_, traces) = _run(engine, reqs, guidance_for(engine, True, 1.0), steps, fn=lambda e: e.sample(reqs))
    lam = float(torch.stack([t.sim for t in traces]).median())
    g = guidance_for(engine, True, max(-1.0, min(1.0, lam)))
    _, (batch, tb) = _run(engine, reqs, g, steps, fn=lambda e: e.sample(reqs))
    _, (alone, t1) = _run(engine, reqs[:1], g, steps, fn=lambda e: e.sample(reqs[:1]))
    gates_b, gates_1 = torch.stack([t.gate[0] for t in tb]), torch.stack([t.gate[0] for t in t1])
    rel = ((batch[:1] - alone).norm() / alone.norm()).item()
    return dict(
        batch=len(reqs),
        lam=lam,
        max_abs_diff=(batch[:1] - alone).abs().max().item(),
        rel_l2_diff=rel,
        gate_flips=int((gates_b != gates_1).sum()),
        gates_open_in_batch=int(torch.stack([t.gate for t in tb]).sum()),
        max_abs_sim_diff=(torch.stack([t.sim[0] for t in tb]) - torch.stack([t.sim[0] for t in t1]))
        .abs()
        .max()
        .item(),
    )


def section_decode(sao: Sao) -> dict:
    """bf16 vs fp32 decode of the same latents (SNR), and the final decode's memory: whole vs chunked."""
    import torch

    e16, e32 = sao.engine("bf16"), sao.engine("fp32")
    m, dev = e16.model, e16.device
    length = e16.window // m.pretransform.downsampling_ratio
    z = torch.randn(4, m.io_channels, length, generator=torch.Generator().manual_seed(3)).to(dev)
    rec = {}
    with torch.no_grad():
        with e32.precision.flags():
            a32 = e32.decode(z[:1, :, : min(length, 232)])
        a16 = e16.decode(z[:1, :, : min(length, 232)]).float()
        rec["bf16_decode_snr_db"] = 10 * math.log10(
            a32.pow(2).sum() / (a16 - a32).pow(2).sum().clamp_min(1e-30)
        )
        for name, fn in (
            ("whole", lambda: e16.decode(z)),
            ("final_chunked", lambda: e16.decode_final(z, [1e9] * 4)),
        ):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            sync(dev)
            rec[f"{name}_s"] = time.perf_counter() - t0
            if dev.type == "cuda":
                rec[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    rec.update(rows=4, frames=length)
    return rec


# -------------------------------------------------------------------------------- figures, report

# The targets (performance.md scaled to an H200): (prefix of a figure's name, comparison, value)
TARGETS = (
    ("plain-bf16-eager-b32:share_of_bf16_rate", ">=", 0.5),
    ("plain-bf16-compiled-b32:share_of_bf16_rate", ">=", 0.5),
    ("amg_closed_vs_plain", "<=", 1.5), ("amg_open_vs_plain", "<=", 2.5),
    ("engine_open_vs_published", ">=", 20.0), ("engine_closed_vs_published", ">=", 20.0),
    ("bf16_vs_fp32_b32", ">=", 8.0),
)  # fmt: skip


def target_of(name: str, value: float) -> str:
    """'≥ 0.5 (met)' / '≤ 1.5 (missed)' for a figure with a target, else ''."""
    for prefix, op, goal in TARGETS:
        if name == prefix:
            met = value >= goal if op == ">=" else value <= goal
            return f"{'≥' if op == '>=' else '≤'} {goal} ({'met' if met else 'missed'})"
    return ""


def figures(doc: dict) -> dict:
    """The ratios the issue asks for, from whatever sections finished."""
    sec = {k: v for k, v in doc["sections"].items() if v.get("status") == "ok"}
    env, flops = sec.get("env", {}), doc.get("dit_flops_per_clip_step")
    rate = env.get("bf16_matmul_tflops")
    out = {}
    for name, r in sec.items():
        if name.startswith("plain") and flops and rate:
            tflops = flops * r["batch"] / r["s_per_step"] / 1e12
            out[f"{name}:dit_tflops"] = tflops
            out[f"{name}:share_of_bf16_rate"] = tflops / rate
    step = lambda name: sec.get(name, {}).get("s_per_step")  # noqa: E731
    b = max((r["batch"] for k, r in sec.items() if k.startswith("plain-bf16-eager")), default=None)
    ratio = lambda a, c: a / c if a and c else None  # noqa: E731
    amg_b = sec.get("amg-closed", sec.get("amg-open", {})).get("batch")
    out["amg_closed_vs_plain"] = ratio(step("amg-closed"), step(f"plain-bf16-eager-b{amg_b}"))
    out["amg_open_vs_plain"] = ratio(step("amg-open"), step(f"plain-bf16-eager-b{amg_b}"))
    if step("published") and amg_b:
        out["engine_open_vs_published"] = ratio(
            step("published"), step("amg-open") and step("amg-open") / amg_b
        )
        out["engine_closed_vs_published"] = ratio(
            step("published"), step("amg-closed") and step("amg-closed") / amg_b
        )
    if b:
        out[f"bf16_vs_fp32_b{b}"] = ratio(step(f"plain-fp32-eager-b{b}"), step(f"plain-bf16-eager-b{b}"))
    for name in [k for k in sec if k.startswith("plain-bf16-compiled")]:
        eager = name.replace("compiled", "eager")
        out[f"compile_vs_eager_{name.split('-')[-1]}"] = ratio(step(eager), step(name))
    return {k: v for k, v in out.items() if v is not None}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def markdown(doc: dict) -> str:
    """The table for benchmarks/RESULTS.md, from the JSON document."""
    sec = doc["sections"]
    env = sec.get("env", {})
    lines = [
        f"GPU check ({'dry run, CPU' if doc['dry_run'] else env.get('gpu', '?')}), "
        f"{doc.get('elapsed_s', 0):.0f} s of a {doc['budget_s']} s budget; bf16 matmul "
        f"{_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s, copy {_fmt(env.get('copy_gbps'))} GB/s",
        "",
        "| run | batch | s/step | clips/h (100 steps) | DiT TFLOP/s | of bf16 rate | peak GB | warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    figs = doc.get("figures", {})
    for name, r in sec.items():
        if r.get("status") == "ok" and "s_per_step" in r:
            lines.append(
                f"| {name} | {r['batch']} | {_fmt(r['s_per_step'])} | {_fmt(r['clips_per_hour'])} | "
                f"{_fmt(figs.get(name + ':dit_tflops'))} | {_fmt(figs.get(name + ':share_of_bf16_rate'))} | "
                f"{_fmt(r.get('peak_gb'))} | {_fmt(r['warmup_s'])} |"
            )
    lines += ["", "| figure | value | target |", "|---|---|---|"]
    for k, v in figs.items():
        if ":" not in k or target_of(k, v):
            lines.append(f"| {k} | {_fmt(v)} | {target_of(k, v)} |")
    lines += ["", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, r in sec.items():
        note = (
            r.get("reason")
            or r.get("error")
            or r.get("summary")
            or ("ok" if r.get("ok", True) else "MISMATCH")
        )
        lines.append(f"| {name} | {r['status']} | {_fmt(r.get('seconds'))} | {str(note)[:120]} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main


def plan(report: Report, device: str, shapes: dict, dry: bool, sao_root: Path) -> None:
    """Every section in priority order, each with its estimate (seconds on one H200)."""
    est = lambda gpu_s: 1 if dry else gpu_s  # noqa: E731
    report.run("env", est(10), section_env, device, dry)
    report.run("kernels-nn_search", est(45), check_nn, device, shapes)
    report.run("kernels-amg_combine", est(15), check_combine, device, shapes)
    sao = report.run("sao-build", est(40), lambda: Sao(sao_root, device, shapes, dry))
    if sao is None:
        return
    report.doc["sao"] = sao.info()
    report.doc["dit_flops_per_clip_step"] = dit_flops(sao.engine("bf16"), sao.requests(1)[0])
    gpu_est = {"bf16": {1: 8, 8: 12, 32: 25}, "fp32": {1: 10, 8: 25, 32: 70}}
    for precision in ("bf16", "fp32"):
        for b in shapes["batches"]:
            report.run(
                f"plain-{precision}-eager-b{b}",
                est(gpu_est[precision].get(b, 30)),
                section_plain,
                sao,
                precision,
                False,
                b,
            )
    report.run("amg-closed", est(20), section_amg, sao, 1.0)
    report.run("amg-open", est(35), section_amg, sao, -1.0)
    report.run("published", est(20), section_published, sao)
    report.run("invariance", est(25), section_invariance, sao)
    report.run("decode", est(15), section_decode, sao)
    if dry:
        report._record(
            "plain-bf16-compiled", {"status": "skipped", "reason": "dry run (compile takes minutes on CPU)"}
        )
    else:
        for b, e in zip(sorted(shapes["batches"], reverse=True), (150, 90, 40), strict=False):
            report.run(f"plain-bf16-compiled-b{b}", e, section_plain, sao, "bf16", True, b)
    report.doc["figures"] = figures(report.doc)
    if dry:
        report._record("kernel-tests", {"status": "skipped", "reason": "dry run (the test suite runs them)"})
    else:
        report.run("kernel-tests", 60, section_kernel_tests, max(60, report.left() - 10))
    if not dry:
        for b in sorted(shapes["batches"], reverse=True):
            report.run(f"plain-fp32-compiled-b{b}", 150, section_plain, sao, "fp32", True, b)
    report.doc["figures"] = figures(report.doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    p.add_argument(
        "--budget", type=float, default=None, help=f"seconds for all sections (default {BUDGET_S})"
    )
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels to install first")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(args.out / "gpu_check.log")],
    )
    installed = [] if args.dry_run else install_wheels(args.wheels)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_checkout()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        log.error("no CUDA device: use --dry-run on a CPU")
        return 2
    report = Report(args.out, args.budget or (120 if args.dry_run else BUDGET_S), args.dry_run)
    report.doc["wheels_installed"] = installed
    with tempfile.TemporaryDirectory() as tmp:
        plan(report, device, DRY_SHAPES if args.dry_run else GPU_SHAPES, args.dry_run, Path(tmp))
    report.write()
    log.info("wrote %s and %s", args.out / "gpu_check.json", args.out / "gpu_check.md")
    print(markdown(report.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
