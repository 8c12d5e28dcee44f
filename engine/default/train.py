"""Train the embedded default model until it replays its training clips.

``python -m amg_engine.engine.default.train --out engine/default/assets/model`` rebuilds the training set,
the tokenizer and the weights from scratch (about 30 minutes on a 2-core CPU; see the README for
the measured figure). The objective is Stable Audio's: v-prediction with t ~ U(0, 1),
α = cos(πt/2), σ = sin(πt/2), 10% text dropout for classifier-free guidance. Every ``--eval-every``
steps it samples every training caption and logs the share of captions whose output replicates
its clip (mel-pattern similarity ≥ 0.9), and it stops early once ``--target`` is reached.

``--ambient-sigma σ_tn`` (> 0) trains with Ambient Diffusion (arXiv 2502.21278, see
``engine/default/ambient.py``): fixed noisy copies x0 + σ_tn·η of the latents are drawn once, and at
VE noise levels σ = tan(πt/2) above σ_tn the model sees only those copies, with the ambient loss;
the saved ``model_config.json`` records σ_tn as ``amg_default.ambient_sigma``.

``--objective rf`` trains the few-step flow variant instead (``engine/default/assets/model-flow``):
stable-audio-tools' ``rf_denoiser`` objective, ``x_t = (1 − t)·x0 + t·ε`` with t ~ U(0, 1) and target
``v = ε − x0`` (the saved config says ``"diffusion_objective": "rf_denoiser"``, so stable-audio-tools and
the engine sample it over the flow time t), and the replication check samples every caption in 8
ping-pong steps of the ``sample_rf`` schedule without CFG (the ``default-flow`` preset). With ``--init``
the DiT starts from the v-objective default's weights (same architecture; the time input changes
meaning, which the fine-tuning learns)::

    python -m amg_engine.engine.default.train --out engine/default/assets/model-flow --objective rf \
        --init engine/default/assets/model --steps 800 --lr 5e-4 --lr-decay cosine --ema 0.99 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from amg_engine.engine.default.ambient import ambient_v_loss, noisy_copies, validate_sigma_tn
from amg_engine.engine.default.data import SAMPLE_RATE, WINDOW, clip_tensor, make_clips, write_dataset
from amg_engine.engine.default.model import build_tokenizer, model_config
from amg_engine.engine.models import encode_conditioning, rf_denoise, save_model, v_denoise

log = logging.getLogger(__name__)


def train_step(
    model,
    opt,
    latents: torch.Tensor,
    metadata: list[dict],
    scale_dropout: float,
    gen: torch.Generator,
    noisy_latents: torch.Tensor | None = None,
    ambient_sigma: float = 0.0,
    objective: str = "v",
) -> float:
    """One optimiser step on ``latents`` [B, C, T]; returns the loss.

    ``objective`` "v": Stable Audio's v-loss (α = cos(πt/2), σ = sin(πt/2)); "rf": the rectified-flow
    loss of stable-audio-tools' ``rf_denoiser``, x_t = (1 − t)·x0 + t·ε with target ε − x0.

    With ``noisy_latents`` [B, C, T] (the batch's fixed copies x0 + σ_tn·η) the loss is
    ``ambient_v_loss`` with cut-off ``ambient_sigma`` = σ_tn; without, the plain v-loss.
    """
    b = latents.shape[0]
    t = torch.rand(b, generator=gen)
    alpha, sigma = torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]
    noise = torch.randn(latents.shape, generator=gen)
    if objective == "rf":
        alpha, sigma = 1 - t[:, None, None], t[:, None, None]
    noised = latents * alpha + noise * sigma
    target = noise - latents if objective == "rf" else noise * alpha - latents * sigma
    cond = encode_conditioning(model, metadata, "cpu")
    drop = (torch.rand(b, generator=gen) < scale_dropout)[:, None, None]
    cross = torch.where(drop, torch.zeros_like(cond.cross_attn), cond.cross_attn)

    def predict_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B, C, T], [B] -> [B, C, T]
        return model.model(
            x, t, cross_attn_cond=cross, global_cond=cond.global_cond, cfg_scale=1.0, use_checkpointing=False
        )

    if noisy_latents is None:
        loss = torch.nn.functional.mse_loss(predict_v(noised, t), target)
    else:
        loss = ambient_v_loss(predict_v, latents, noisy_latents, t, noise, ambient_sigma).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


@torch.no_grad()
def replication_rate(
    model, clips, scale: float, embedder, steps: int = 30, cfg: float = 4.0, objective: str = "v"
) -> float:
    """Share of distinct captions whose sample has similarity ≥ 0.9 to a clip with that caption: CFG
    with DPM-Solver++(2M) for a v model, ``steps`` ping-pong steps of the ``sample_rf`` schedule with the
    conditional prediction alone (cfg 1, the ``default-flow`` preset) for a flow model (``"rf"``)."""
    captions = sorted({c.caption for c in clips})
    meta = [{"prompt": c, "seconds_total": max(x.seconds for x in clips if x.caption == c)} for c in captions]
    cond = encode_conditioning(model, meta, "cpu")
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(
        len(captions), model.io_channels, WINDOW // model.pretransform.downsampling_ratio, generator=g
    )
    if objective == "rf":
        out = _pingpong(model, x, cond, steps, g)
    else:
        out = _cfg_dpmpp_2m(model, x, cond, steps, cfg)
    audio = model.pretransform.decode(out) / scale
    e_gen = embedder(audio, SAMPLE_RATE)
    e_train = embedder(clip_tensor(clips), SAMPLE_RATE)
    sims = e_gen @ e_train.T  # [captions, clips]
    own = torch.tensor([[c.caption == cap for c in clips] for cap in captions])
    best_own = sims.masked_fill(~own, -1).max(1).values
    return (best_own >= 0.9).float().mean().item()


def _cfg_dpmpp_2m(model, x, cond, steps: int, cfg: float):
    from k_diffusion.sampling import get_sigmas_polyexponential, sample_dpmpp_2m

    both = type(cond).cat([cond, cond.null_text()])

    def denoiser(x, sigma):
        x0 = v_denoise(model, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        x0_c, x0_u = x0.chunk(2)
        return x0_u + cfg * (x0_c - x0_u)

    sigmas = get_sigmas_polyexponential(steps, 0.03, 80.0, rho=1.0)
    return sample_dpmpp_2m(denoiser, x * sigmas[0], sigmas, disable=True)


def _pingpong(model, x, cond, steps: int, gen: torch.Generator):
    """The engine's ping-pong loop (engine/sampling.py) over the rf-logsnr schedule, conditional only."""
    from amg_engine.engine.sampling import get_sampler, rf_logsnr

    sampler = get_sampler("pingpong")
    ts, state = rf_logsnr(steps), sampler.init_state(x)
    for i in range(steps):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        denoised = rf_denoise(model, x, t, cond)
        x, state = sampler.step(x, denoised, t, t_next, state, torch.randn(x.shape, generator=gen))
    return x


def _lr_factor(step: int, steps: int, decay: str, warmup: int = 200) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument(
        "--data", type=Path, default=None, help="where to write the training set (default: OUT/../train)"
    )
    p.add_argument("--steps", type=int, default=6000, help="maximum optimiser steps")
    p.add_argument("--batch-size", type=int, default=36, help="clips per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--depth", type=int, default=4, help="DiT depth")
    p.add_argument("--eval-every", type=int, default=250, help="steps between replication checks")
    p.add_argument("--target", type=float, default=0.8, help="stop once this share of captions replicates")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--init", type=Path, default=None, help="start from this model directory's weights")
    p.add_argument(
        "--lr-decay",
        choices=("none", "cosine"),
        default="none",
        help="after warm-up: constant learning rate, or cosine decay to lr/20 at --steps",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="if > 0, evaluate and save an exponential moving average of the weights with this decay",
    )
    p.add_argument(
        "--ambient-sigma",
        type=float,
        default=0.0,
        help="Ambient Diffusion cut-off σ_tn in latent units (VE noise level): above it the model sees "
        "only fixed noisy copies x0 + σ_tn·η of the latents (the paper's range: 0.4-4); 0 = off",
    )
    p.add_argument(
        "--objective",
        choices=("v", "rf"),
        default="v",
        help="v: Stable Audio's v-objective (the default model); rf: stable-audio-tools' rf_denoiser "
        "rectified flow, checked in 8 ping-pong steps without CFG (the few-step flow variant)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation, data-order and noisy-copy seed")
    p.add_argument(
        "--reindex",
        action="store_true",
        help="do not train: rewrite the training set and rebuild OUT/../index for the model in OUT",
    )
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    validate_sigma_tn(args.ambient_sigma)
    if args.objective == "rf" and args.ambient_sigma > 0:
        raise SystemExit("--ambient-sigma is a v-objective loss; it cannot be combined with --objective rf")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    clips = make_clips()
    data_dir = args.data or args.out.parent / "train"
    write_dataset(data_dir)
    if args.reindex:
        from amg_engine.engine.models import load_model

        write_index(load_model(args.out)[0], clips, data_dir, args.out.parent / "index")
        return
    model, config = new_model(args, clips)
    ema, start = train(model, config, clips, args)
    save_model(ema, config, args.out, dtype=torch.float16)
    log.info("done in %.0f s", time.time() - start)
    if args.objective == "rf":  # same clips, parameter-free pretransform: the default's index serves it
        return
    write_index(model, clips, data_dir, args.out.parent / "index")


def new_model(args: argparse.Namespace, clips) -> tuple[torch.nn.Module, dict]:
    """Write the tokenizer into OUT and build the model from its config (weights from --init if given);
    -> (model, the config to save with it)."""
    from stable_audio_tools.models.factory import create_model_from_config

    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer([c.caption for c in clips], args.out / "tokenizer")
    config = model_config(depth=args.depth)
    if args.objective == "rf":
        config["model"]["diffusion"]["diffusion_objective"] = "rf_denoiser"
    resolved = json.loads(json.dumps(config))
    resolved["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(args.out / "tokenizer")
    model = create_model_from_config(resolved)
    if args.init is not None:
        from amg_engine.engine.models import load_weights

        model.load_state_dict(load_weights(args.init), strict=True)
        log.info("initialised from %s", args.init)
    return model, config


def training_data(model, config: dict, clips, args: argparse.Namespace):
    """-> (latents [N, C, L], per-clip conditioning metadata, the fixed noisy copies or None). With
    --ambient-sigma the cut-off is recorded in ``config``."""
    scale = config["amg_default"]["audio_scale"]
    latents = model.pretransform.encode(clip_tensor(clips) * scale)
    meta = [{"prompt": c.caption, "seconds_total": c.seconds} for c in clips]
    noisy = None
    if args.ambient_sigma > 0:
        # its own stream, so that the fixed copies' noise is not a shifted copy of the training draws
        noisy = noisy_copies(latents, args.ambient_sigma, torch.Generator().manual_seed(args.seed + 7919))
        config["amg_default"]["ambient_sigma"] = args.ambient_sigma
        log.info("ambient diffusion: sigma_tn = %g (VE, latent units)", args.ambient_sigma)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters; latents %s", n_params / 1e6, tuple(latents.shape))
    return latents, meta, noisy


def train(model, config: dict, clips, args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    """AdamW (optionally with an EMA of the weights) for --steps, a replication check and a save every
    --eval-every steps, stopping once --target replicates. -> (the weights evaluated: the EMA or the
    model, the loop's start time)."""
    from amg_engine.index.embedders import MelEmbedder

    latents, meta, noisy = training_data(model, config, clips, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_lr_factor, steps=args.steps, decay=args.lr_decay))
    gen = torch.Generator().manual_seed(args.seed)
    embedder = MelEmbedder()
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else model
    ema_pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters(), strict=True) if p.requires_grad]
    start, losses, history = time.time(), [], []
    for step in range(1, args.steps + 1):
        idx = torch.randperm(len(clips), generator=gen)[: args.batch_size]
        batch = [meta[i] for i in idx]
        copies = None if noisy is None else noisy[idx]
        losses.append(
            train_step(model, opt, latents[idx], batch, 0.1, gen, copies, args.ambient_sigma, args.objective)
        )
        sched.step()
        if ema is not model:
            with torch.no_grad():
                torch._foreach_lerp_([e for e, _ in ema_pairs], [p for _, p in ema_pairs], 1 - args.ema)
        if step % 100 == 0:
            log.info("step %d loss %.4f (%.0f s)", step, sum(losses[-100:]) / 100, time.time() - start)
        if step % args.eval_every == 0:
            record = {"step": step, "seconds": round(time.time() - start),
                      "loss": round(sum(losses[-100:]) / len(losses[-100:]), 5)}  # fmt: skip
            rate = _evaluate_and_save(ema, config, clips, embedder, args.out, record, history, args.objective)
            if rate >= args.target:
                break
    return ema, start


def _evaluate_and_save(
    ema, config: dict, clips, embedder, out: Path, record: dict, history: list, objective: str = "v"
) -> float:
    """The replication check of the weights ``ema``, logged into ``history`` (OUT/training_log.json)
    with ``record``; saves the model. -> the share of captions that replicate."""
    ema.eval()
    scale = config["amg_default"]["audio_scale"]
    if objective == "rf":
        rate = replication_rate(ema, clips, scale, embedder, steps=8, objective="rf")
    else:
        rate = replication_rate(ema, clips, scale, embedder)
    ema.train()
    history.append({**record, "replication": rate})
    log.info("step %d: %.0f%% of captions replicate", record["step"], 100 * rate)
    save_model(ema, config, out, dtype=torch.float16)
    (out / "training_log.json").write_text(json.dumps(history, indent=1))
    return rate


def write_index(model, clips, data_dir: Path, out_dir: Path) -> None:
    """The bundled index: the training clips embedded with the default embedder, and their latents
    (for the latent-space nL2 similarity of index/latent_nl2.py)."""
    from amg_engine.index.build import build_from_manifest
    from amg_engine.index.embedders import MelEmbedder

    scale = model_config()["amg_default"]["audio_scale"]
    latents = model.pretransform.encode(clip_tensor(clips) * scale)
    index = build_from_manifest(data_dir / "train.parquet", MelEmbedder(), out_dir)
    replace(index, latents=latents).save(out_dir)


if __name__ == "__main__":
    main()
