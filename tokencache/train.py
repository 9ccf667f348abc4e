"""Training the digits testbed backbones (``tokencache train-backbone``).

The objective is each model's official one: DiT's ADM loss (ε-MSE + the learned-range
variance's VB term, uniform t over 1000 steps, labels dropped with p = 0.1 for CFG); MDT adds
its masked-latent objective, the same loss on a forward with a random fraction of tokens masked
and restored by the side-interpolater, and MDTv2 weights the MSE by min(SNR, 5)/SNR.

What makes it work on a 2-core CPU in minutes is the recipe, not the objective: min-SNR-5
weighting for both families, a large peak learning rate (1e-2) on small batches (32: a step's
cost is linear in the batch here, so more, smaller steps buy more progress per second), a short
linear warm-up then cosine decay, and an EMA whose decay ramps up as (1 + n)/(10 + n) so that
the averaged weights are useful after a few hundred steps. ``TESTBED_RECIPES`` holds it per
preset.
Training is deterministic given the seed and the thread count (fixed step count, seeded data
order and noise); on another CPU the float rounding differs from the first step on, which is why
the testbed's trained weights ship with the package (:mod:`tokencache.weights`). The checkpoint
is DiT's training format: {"model", "ema", "opt", "args"} (or only {"ema", "args"}), with the
model's constructor keywords in ``args["model_config"]``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from tokencache.data.digits import load_digits_dataset
from tokencache.diffusion import create_diffusion
from tokencache.io import write_atomic
from tokencache.models.registry import create_model


#: Steps, batch and peak lr per testbed preset: each trains in under 5 minutes on one core of the
#: reference 2-core CPU, and ≥ 90% of its DDIM-20/DDPM-40 samples at CFG 3 are read as their class
#: by the digits CNN (docs/testbed.md). MDTv2 takes fewer steps: each runs two forwards.
TESTBED_RECIPES = {
    "DiT-digits": {"steps": 1000, "batch_size": 32, "lr": 1e-2},
    "MDTv2-digits": {"steps": 600, "batch_size": 32, "lr": 1e-2},
}


@dataclass
class TrainConfig:
    """Settings of one backbone training run (defaults: DiT-digits' testbed recipe)."""

    model: str = "DiT-digits"
    overrides: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 60
    min_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0: no clipping); keeps lr 1e-2 stable across seeds
    ema_max_decay: float = 0.999
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    loss_weighting: str = "min_snr"  # "official" (DiT: uniform, MDTv2: min-SNR-5) or "min_snr" for both


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr_fraction·lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """EMA decay (1 + n)/(10 + n), capped at ``ema_max_decay``: short memory early on."""
    return min(cfg.ema_max_decay, (1 + step) / (10 + step))


def min_snr_weight(diffusion, t: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """MDTv2's ε-loss weight min(SNR_t, k)/SNR_t, SNR_t = ᾱ_t/(1 − ᾱ_t)."""
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)[t.cpu()]
    snr = abar / (1 - abar)
    return (torch.clamp(snr, max=k) / snr).float().to(t.device)


def backbone_loss(model, diffusion, x0, y, t, weighting: str = "official") -> torch.Tensor:
    """The family's training loss for one batch (mean over the batch).

    ``weighting="official"``: DiT's uniform ε-MSE, MDTv2's min-SNR-5; ``"min_snr"``: min-SNR-5
    for every family (Hang et al.'s weighting converges several times faster, which is what a
    minutes-long CPU budget needs).
    """
    if weighting not in ("official", "min_snr"):
        raise ValueError(f"unknown loss weighting {weighting!r}: use 'official' or 'min_snr'")
    family = model.config["family"]
    terms = diffusion.training_losses(model, x0, t, model_kwargs={"y": y})
    use_min_snr = family == "MDTv2" or weighting == "min_snr"
    weight = min_snr_weight(diffusion, t) if use_min_snr else 1.0
    if family == "DiT":
        return (weight * terms["mse"] + terms["vb"]).mean()
    masked = diffusion.training_losses(model, x0, t, model_kwargs={"y": y, "enable_mask": True})
    return (weight * terms["mse"] + terms["vb"]).mean() + (weight * masked["mse"] + masked["vb"]).mean()


def check_config(cfg: TrainConfig) -> None:
    """Every mistake in ``cfg`` that can be found without training, as one ValueError line."""
    from tokencache.models.registry import resolve

    if cfg.steps < 1 or cfg.batch_size < 1 or not math.isfinite(cfg.lr) or cfg.lr <= 0 or not cfg.grad_clip >= 0:
        raise ValueError("--steps and --batch-size must be ≥ 1, --lr > 0 and --grad-clip ≥ 0")
    if cfg.loss_weighting not in ("official", "min_snr"):
        raise ValueError(f"unknown loss weighting {cfg.loss_weighting!r}: use 'official' or 'min_snr'")
    _, kw = resolve(cfg.model, **cfg.overrides)  # unknown model or keyword
    if (kw.get("in_channels"), kw.get("input_size"), kw.get("num_classes")) != (1, 8, 10):
        raise ValueError(f"{cfg.model}: the digits testbed needs in_channels=1, input_size=8, num_classes=10 "
                         f"(use a *-digits preset, or --set in_channels=1 input_size=8 num_classes=10)")


def train_backbone(cfg: TrainConfig, out: str | os.PathLike, progress: bool = True, log=None,
                   ema_only: bool = False) -> dict:
    """Train ``cfg.model`` on the digits train split; write the checkpoint atomically to ``out``.

    The checkpoint is DiT's training format ``{"model", "ema", "opt", "args"}``, or with
    ``ema_only`` just ``{"ema", "args"}`` (what sampling uses; the shipped testbed weights).
    ``args`` holds the model's constructor keywords, the training settings and the final loss,
    nothing time-dependent: the same training writes the same bytes. Returns a summary (steps,
    seconds, final loss).
    """
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_digits_dataset("train")
    model = create_model(cfg.model, **cfg.overrides)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    losses, start = [], time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.model}", disable=not progress, unit="step")
    for step in bar:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=order)
        t = torch.randint(diffusion.num_timesteps, (cfg.batch_size,), generator=order)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = backbone_loss(model, diffusion, data.images[idx], data.labels[idx], t, cfg.loss_weighting)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        with torch.no_grad():
            decay = ema_decay_at(step, cfg)
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if log is not None and step % 100 == 0:
            log.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr_at(step, cfg),
                                  "grad_norm": float(grad_norm)}) + "\n")
    seconds = time.perf_counter() - start
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    # the checkpoint holds nothing that depends on the clock or the machine's speed, so the same
    # training gives the same bytes (and sha256) every time; the time is in the returned summary
    checkpoint = {"ema": ema.state_dict(),
                  "args": {"model_config": model.config, "train": asdict(cfg),
                           "summary": {"steps": cfg.steps, "final_loss": final_loss}}}
    if not ema_only:
        checkpoint = {"model": model.state_dict(), **checkpoint, "opt": opt.state_dict()}
    write_atomic(out, checkpoint, format="torch")
    return {"steps": cfg.steps, "seconds": round(seconds, 1), "final_loss": final_loss}
