"""TokenCache v2 (``tokencache:version=2``): the input-dependent Cache Predictor (a helper module of
``tokencache.py``, not a method) and what v1 and v2 share in the predictor's fit.

The v2 abstract (arXiv 2409.18523v2) says one Cache Predictor "hierarchically" decides which
tokens to prune and reuse, "allocating pruning ratio to each block", and at which steps to
cache; its method text is not public, so the following is ours, built to that description:

* an input-dependent predictor α = σ(head(block(z, c))) ∈ [0, 1]^{L×N}: one transformer block
  (initialised as a copy of the backbone's first block; +1/L of the backbone's block
  parameters, 3.57% for DiT-XL/2) on the backbone's own block-0 input z (patch embedding of
  x_t plus position) and conditioning c (timestep and label) — ``model.embed(x, t, y)``, or
  ``inputs.x`` / ``inputs.c`` at block 0 while sampling —, then a linear head to one score per
  (block, token); it runs on every P-step and its MACs are counted (``predictor``);
* training: the relaxation of v1 with the per-sample α as the blend weights, loss = output error
  relative to caching everything + λ·mean(α) (the L1 cost on the keep-weights); the backbone
  frozen;
* per-block ratios from one global ratio r (``global_ratio``, default ρ·β, the share v1 reuses):
  over the calibration samples, the mean α of each (step, block, token); on each P-step the
  (1 − r)·L·N largest of these are "update", which fixes how many tokens each block recomputes
  (the same for every sample, so a batch computes alike); each sample then recomputes its own
  highest-α tokens in each block;
* full steps from the predictor's statistics: as many I-steps as v1's TPRR would place (equal
  cost), at step 0 and at uniform percentiles of the cumulative mean α over the steps (more
  I-steps where the predictor wants more recomputed); ``i_steps=tprr`` keeps v1's schedule;
* ``last_blocks`` K (default 0): the last K blocks are never cached — on P-steps they compute every
  token — as a description of v2 says; its value is not published. The update share 1 − r still
  counts over all L·N pairs (the same work, so the same cost as K = 0), the K blocks' N tokens
  each taken from it first (where they need more, the other blocks reuse everything);
* not done: LoRA (reported only by secondary notes).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from tokencache.cache import COMPUTE, REUSE, Blend, CacheMethod, fit_relaxation, sample_batches
from tokencache.models.layers import Linear


def first_block(model: nn.Module) -> nn.Module:
    """The backbone's first transformer block in execution order (its copy starts the predictor)."""
    from tokencache.metrics.flops import execution_blocks

    return execution_blocks(model)[0]


class InputPredictor(nn.Module):
    """v2's Cache Predictor: α = σ(head(block(z, c))) per (token, block), from the block-0 input z and c."""

    def __init__(self, block: nn.Module, blocks: int, hidden: int):
        super().__init__()
        self.block = block
        self.head = Linear(hidden, blocks)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # α = ½ everywhere at the start

    @classmethod
    def for_model(cls, model: nn.Module) -> "InputPredictor":
        from tokencache.metrics.flops import model_shape

        return cls(copy.deepcopy(first_block(model)), int(model.block_count),
                   model_shape(model).hidden).to(next(model.parameters()).device)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, N, D), c (B, D) → α (B, L, N) in [0, 1]."""
        return torch.sigmoid(self.head(self.block(z, c))).transpose(1, 2)


def tensors_of(predictor: InputPredictor) -> dict:
    return {f"predictor.{k}": v for k, v in predictor.state_dict().items()}


def load_predictor_network(model: nn.Module, tensors: dict) -> InputPredictor:
    predictor = InputPredictor.for_model(model)
    state = {k[len("predictor."):]: v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor.load_state_dict(state)
    return predictor.eval().requires_grad_(False)


def predictor_macs(shape) -> int:
    """One predictor forward per row: a full transformer block on N tokens and the N·D·L head."""
    from tokencache.metrics.flops import attention_branch_macs, block_fixed_macs, mlp_branch_macs

    n = shape.tokens
    block = attention_branch_macs(shape, n) + mlp_branch_macs(shape, n) + block_fixed_macs(shape, skip=False)
    return int(block + n * shape.hidden * shape.depth)


def percentile_steps(step_mass: torch.Tensor, count: int) -> list[bool]:
    """I-steps: step 0 and the first steps where the cumulative mass reaches j/count, j = 1…count−1.

    Steps already chosen are skipped to the next free one, so exactly ``count`` steps are full.
    """
    num_steps = len(step_mass)
    count = max(1, min(count, num_steps))
    cumulative = torch.cumsum(step_mass.double().clamp_min(0), 0)
    cumulative = cumulative / cumulative[-1] if cumulative[-1] > 0 else torch.linspace(1 / num_steps, 1, num_steps)
    full = [False] * num_steps
    full[0] = True
    for j in range(1, count):
        step = int(torch.searchsorted(cumulative, torch.tensor(j / count, dtype=torch.float64)))
        while step < num_steps and full[step]:
            step += 1
        if step == num_steps:
            step = next(s for s in range(num_steps) if not full[s])
        full[step] = True
    return full


def block_budget(mean_alpha: torch.Tensor, global_ratio: float, last_blocks: int = 0) -> list[int]:
    """Tokens each block recomputes when a share ``global_ratio`` of the (block, token) pairs is reused.

    ``mean_alpha`` (L, N): round((1 − r)·L·N) pairs are "update"; the last K blocks (``last_blocks``)
    take all N of theirs, the rest go to the highest-α pairs of blocks 0…L−K−1. Returns the count per block.
    """
    blocks, tokens = mean_alpha.shape
    cached = blocks - last_blocks
    update = max(0, round((1 - global_ratio) * blocks * tokens) - last_blocks * tokens)
    order = torch.argsort(mean_alpha[:cached].flatten(), descending=True, stable=True)[:update]
    return torch.bincount(order // tokens, minlength=cached).tolist() + [tokens] * last_blocks


def plan(info, tensors: dict, tprr_full: list, i_steps: Optional[str], ratio: float, last_blocks: int = 0):
    """(network, full, keep): the loaded predictor, the I-steps (at α percentiles unless ``i_steps=tprr``),
    tokens recomputed per (P-step, block) from the global ratio r, the last K blocks never cached."""
    if not 0 <= last_blocks < info.block_count:
        raise ValueError(f"tokencache: last_blocks = {last_blocks} must leave at least one of the model's "
                         f"{info.block_count} blocks to cache")
    network = load_predictor_network(info.model, tensors)
    mean_alpha = tensors["mean_alpha"].float()
    full = tprr_full
    if (i_steps or "predictor") == "predictor":
        full = percentile_steps(mean_alpha.mean(dim=(1, 2)), sum(tprr_full))
    keep = {(t, l): k for t in range(info.num_steps) if not full[t]
            for l, k in enumerate(block_budget(mean_alpha[t], ratio, last_blocks))}
    return network, full, keep


@torch.no_grad()
def mean_alpha_over(model, predictor, trajectories, batch_size: int) -> torch.Tensor:
    """Mean α over the calibration samples (and their CFG rows), per (step, block, token)."""
    device = next(model.parameters()).device
    out = []
    for step in range(len(trajectories.x)):
        total = 0
        for index in sample_batches(trajectories.num_samples, batch_size, device):
            total = total + predictor(*model.embed(*trajectories.rows(step, index))).sum(dim=0)
        out.append(total / (trajectories.num_samples * trajectories.x[step].shape[1]))
    return torch.stack(out).cpu()


def random_tensors(model, sampler, generator) -> dict:
    """A random head and mean α (timing only: the tokens computed are set by the ratios and the schedule)."""
    predictor = InputPredictor.for_model(model)
    with torch.no_grad():
        predictor.head.weight.copy_(torch.randn(predictor.head.weight.shape, generator=generator) * 0.01)
    steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
    return {**tensors_of(predictor), "mean_alpha": torch.rand(steps, blocks, tokens, generator=generator)}
