"""``clusca``: ClusCa, cluster-driven feature caching (Zheng et al., 2025; Shenyi-Z/Cache4Diffusion @
91a1949fcc88acab46547f0b5f295f5de2df2870, ``dit/clusca-dit/``).

The official DiT code's rules, file:line at that commit (paths under ``dit/clusca-dit/``; s = the
respaced step index ``current['step']``, counting down from T−1 at the first step to 0):

* **Schedule** — TaylorSeer's (``cache_functions/cal_type.py`` 8–27, once per forward,
  ``models.py`` 378): ``first_enhance = 2`` (``cache_functions/cache_init.py`` 21); full iff
  s > T − 3 or ``cache_counter == interval − 1`` (``force_scheduler.py`` 6 sets the threshold to
  N); a full step zeroes the counter and appends s to ``activated_steps`` (initially ``[49]``,
  ``cache_init.py`` 26, inert); every other step is a ClusCa step (``cluster_num > 0``,
  ``cache_init.py`` 28). Full at k = 0, 1, 1 + N, 1 + 2N, …
* **Full step** (``models.py`` 130–158): every branch computed; each pre-gate output refreshes
  its Taylor factors (``taylor_utils/__init__.py`` 5–23, the factors emptied at s = T − 1,
  46–47). **Then, at the last block** (``models.py`` 160–161, block 27 hard-coded), K-means on
  that block's output (the residual stream after its MLP residual):
* **K-means** (``cluster_utils/__init__.py`` 7–14, ``cluster_utils/Kmeans.py`` 11–34): K =
  ``cluster_num`` clusters, L1 distance (``torch.cdist(p=1)``), at most 100 iterations; starts
  from the previous full step's centroids (warm start, ``cluster_utils/__init__.py`` 9–12), the
  first time from K tokens drawn by ``randint(0, N, (B, K))`` (``Kmeans.py`` 34); an iteration
  assigns each token to its nearest centroid (first on ties) and moves each centroid to the mean
  of its tokens (an empty cluster: 0 / 1e-8, the zero centroid); it stops when
  ``allclose(C, C', rtol=1e-4)`` (atol 1e-8), keeping C; after 100 iterations C = C'.
* **ClusCa step, attention** (``models.py`` 202–205): always the Taylor forecast
  ``taylor_formula(F_attn, s − activated[−1])``, re-gated.
* **ClusCa step, MLP** (``models.py`` 207–220): one token per cluster drawn by ``rand((B, N))``
  once per block (``cache_functions/select_fresh_tokens.py`` 3–17: the member with the largest
  draw; an empty cluster's row is all −inf and argmax gives token 0); the MLP recomputed for those
  K tokens of x *after the forecast attention residual* (``cache_cutfresh.py`` 6–27); the fresh
  outputs scattered into the MLP's F_0 **in place** (``update_cache.py`` 2–12: the change persists
  into later ClusCa steps and into the next full step's differences); with γ =
  ``propagation_ratio`` > 0 (``models.py`` 211–214, ``update_cache.py`` 14–50) each cluster's
  float32 *sum* of fresh outputs (k = 1; the mean for k > 1) spread to all its tokens,
  F_0 ← spread·γ + F_0·(1 − γ); then the Taylor forecast over the updated factors (217–220).

Official setting (``sample.py`` 101–120): DiT-XL/2 256², cfg 1.5, 50 steps (DDPM unless
``--ddim-sample``), N = 4 (``--interval``), O = 4 (``--max-order``), K = 16 (``--cluster-num``),
γ = 0.0 (``--propagation-ratio``; ``sample_ddp.py`` 194 uses 0.005), k = 1 (``--k``).
Official quirks kept: ``--cluster-method`` is never read (K-means with random init always,
``cluster_utils/__init__.py`` 10), so it is not a parameter; ``--k`` only switches the
propagation between the sum (k = 1) and the mean (k > 1) — one token per cluster is always
recomputed; an empty cluster gets the zero centroid (``empty_cluster="official"``; the
alternative ``"keep"`` keeps its previous centroid) and recomputes token 0; K-means runs on every
full step, the last step's too.

What is ours:

* **Per sample.** The official draws come from the global generator over the whole batch and
  its K-means stops when the whole batch has converged. Here every random draw of a sample comes
  from its own stream, derived from its ``(seed, index)`` generator's seed (``sample_seeds``;
  outside :func:`~tokencache.sampling.generate`, from the sample's position in the batch, seed
  0): the sample's CFG rows draw in row order, ``(rows, K)`` once and ``(rows, N)`` per ClusCa
  block, all through :meth:`ClusCa.draw` (a test replaces it to feed recorded draws). Each row's
  K-means stops when that row has converged (the official rule applied to a batch of one row).
* Any depth (block L − 1 is the last block in execution order; MDTv2 too); ``first_enhance`` and
  the K-means limits are parameters with the official values.

Overhead counters (per batch row): ``kmeans_values`` — N·K·D per K-means iteration (the L1
distances and the centroid update: 3 MAC-equivalents per value); ``token_draws`` — N per ClusCa
block (masking and argmax over K·N: K each); ``propagation_values`` — N·D per block with γ > 0
(3); ``derivative_values``/``taylor_terms`` as TaylorSeer (2 each). The K-means stopping test is
read on the host once per iteration (``host_sync``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from tokencache.baselines._taylor import full_steps, refresh_factors, taylor_forecast
from tokencache.cache import COMPUTE_NO_STORE, CacheMethod, Forecast, Subset, param, register_method, sampling_steps
from tokencache.sampling import sample_seed

#: ``cache_init.py`` 26: the hard-coded first entry of ``activated_steps`` (inert)
OFFICIAL_ACTIVATED_STEPS = (49,)
#: mixed with a sample's seed to give ClusCa's own stream (so the sampler's noise stream is untouched)
STREAM_TAG = 0xC1C5CA
EMPTY_CLUSTERS = ("official", "keep")


def kmeans_rows(x: torch.Tensor, centroids: torch.Tensor, clusters: int, max_iter: int, rtol: float,
                empty: str, to_host):
    """Lloyd iterations in L1 per row of x (B, N, D) from ``centroids`` (B, K, D), each row stopping alone.

    Returns (labels (B, N), centroids (B, K, D), row-iterations summed over rows).
    """
    centroids = centroids.clone()
    labels = torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)
    active = torch.arange(x.shape[0], device=x.device)
    work = 0
    for _ in range(max_iter):
        xa, ca = x.index_select(0, active), centroids.index_select(0, active)
        assigned = torch.cdist(xa, ca, p=1).argmin(dim=-1)
        members = F.one_hot(assigned, num_classes=clusters).type_as(x)
        sizes = members.sum(dim=1) + 1e-8
        moved = torch.bmm(members.transpose(1, 2), xa) / sizes.unsqueeze(-1)
        if empty == "keep":
            moved = torch.where(sizes.unsqueeze(-1) < 0.5, ca, moved)
        labels.index_copy_(0, active, assigned)
        converged = torch.isclose(ca, moved, rtol=rtol, atol=1e-8).flatten(1).all(dim=1)
        centroids.index_copy_(0, active, torch.where(converged.view(-1, 1, 1), ca, moved))
        work += int(active.numel())
        done = to_host(converged)
        active = active[torch.tensor([not d for d in done], device=x.device)]
        if active.numel() == 0:
            break
    return labels, centroids, work


def select_per_cluster(labels: torch.Tensor, weights: torch.Tensor, clusters: int) -> torch.Tensor:
    """One token per cluster (B, K): the member with the largest weight; an empty cluster → token 0."""
    ids = torch.arange(clusters, device=labels.device).view(1, -1, 1)
    inside = labels.unsqueeze(1) == ids
    masked = torch.where(inside, weights.unsqueeze(1), torch.full((), -float("inf"), device=weights.device))
    return masked.argmax(dim=2)


@dataclass(frozen=True)
class ClusCaPlan:
    full: list  # full[k]: step k computes everything (and clusters block L−1's output)


@dataclass
class ClusCaState:
    activated_steps: list = field(default_factory=lambda: list(OFFICIAL_ACTIVATED_STEPS))
    factors: dict = field(default_factory=dict)  # (block, branch) → [F_0, F_1, …]
    labels: Optional[torch.Tensor] = None  # (B, N) cluster of each token of block L−1's output
    centroids: Optional[torch.Tensor] = None  # (B, K, D)
    rows_per_sample: int = 1
    streams: Optional[list] = None  # one torch.Generator per sample


@register_method
@dataclass
class ClusCa(CacheMethod):
    """ClusCa: TaylorSeer's schedule; between full steps the MLP recomputes one token per K-means cluster."""

    name = "clusca"
    host_sync = True
    State = ClusCaState
    noop = {"interval": 1}
    search_space = {"interval": (3, 4, 5, 6)}  # N; official 4 (K = 16 clusters)
    interval: int = param(4, "N: a full step every N steps after the warm-up (--interval 4)", min=1)
    max_order: int = param(4, "O: highest Taylor order (--max-order 4)", min=0)
    clusters: int = param(16, "K: clusters of block L−1's output (--cluster-num 16)", min=1)
    propagation_ratio: float = param(0.0, "γ: share of the cluster's fresh output spread to its tokens "
                                          "(sample.py 0.0; sample_ddp.py 0.005)", min=0.0, max=1.0)
    tokens_per_cluster: int = param(1, "k (--k 1): only switches the propagation from the sum (1) to the mean (>1)",
                                    min=1)
    first_enhance: int = param(2, "full steps at the start (official: 2, hard-coded)", min=1)
    kmeans_iterations: int = param(100, "K-means iteration limit (official: 100)", min=1)
    kmeans_rtol: float = param(1e-4, "K-means stops when allclose(C, C', rtol) (official: 1e-4)", min=0.0)
    empty_cluster: str = param("official", "an empty cluster: official = the zero centroid; keep = its previous "
                                           "centroid", choices=EMPTY_CLUSTERS)

    def plan_for(self, info):
        # TaylorSeer's once-per-step counter (clusca-dit cal_type.py 8–27)
        return ClusCaPlan(full_steps(info.num_steps, self.interval, self.first_enhance))

    def resolved(self):
        out = self.params()
        if self.plan is not None:
            out["full_steps"] = sum(self.plan.full)
        return out

    def overhead_macs(self, shape):
        return {"kmeans_values": 3, "token_draws": self.clusters, "propagation_values": 3,
                "derivative_values": 2, "taylor_terms": 2}

    # ------------------------------------------------------------------ randomness

    def draw(self, kind: str, size: int, rows: int) -> torch.Tensor:
        """The method's random draws for the batch, (B, size) on the CPU: ``kind`` "init" — token
        indices ``randint(0, N, ·)`` (size K) — or "select" — weights ``rand(·)`` (size N).

        Sample i (rows i, i + S, … of a batch of S samples) draws (rows, size) from its own
        stream in row order. Replace this function to feed given draws.
        """
        state = self.state
        samples = len(state.streams)
        n = self.info.num_tokens
        parts = []
        for g in state.streams:
            if kind == "init":
                parts.append(torch.randint(0, n, (rows, size), generator=g))
            else:
                parts.append(torch.rand((rows, size), generator=g))
        return torch.stack(parts, dim=1).reshape(rows * samples, size)

    def _streams(self, batch: int, rows: int) -> list:
        samples = batch // rows
        seeds = self.sample_seeds
        if seeds is None:
            seeds = tuple(sample_seed(0, i) for i in range(samples))
        if len(seeds) != samples:
            raise RuntimeError(f"clusca: {len(seeds)} sample seeds for a batch of {samples} samples")
        return [torch.Generator().manual_seed(sample_seed(s, STREAM_TAG)) for s in seeds]

    # ------------------------------------------------------------------ hooks

    def begin_step(self, step):
        if self.plan.full[step]:
            self.state.activated_steps.append(step.countdown)

    def block_action(self, step, block, inputs):
        if block == 0 and step == 0:
            self.state.rows_per_sample = inputs.rows_per_sample
        return None

    def branch_action(self, step, block, branch):
        if self.plan.full[step]:
            return COMPUTE_NO_STORE
        state = self.state
        factors = state.factors[(block, branch)]
        x = step.countdown - state.activated_steps[-1]
        self.count("taylor_terms", len(factors) * factors[0][0].numel())
        if branch == "attn":
            return Forecast(taylor_forecast(factors, x))
        weights = self.draw("select", self.info.num_tokens, state.rows_per_sample).to(state.labels.device)
        tokens = select_per_cluster(state.labels, weights, self.clusters)
        self.count("token_draws", self.info.num_tokens)
        return Subset(tokens, finish=lambda fresh: self._refresh(block, tokens, fresh, x))

    def _refresh(self, block, tokens, fresh, x):
        """The fresh tokens into F_0 (in place), the optional propagation, the forecast (``models.py`` 209–220)."""
        state = self.state
        factors = state.factors[(block, "mlp")]
        first = factors[0]
        first.scatter_(1, tokens.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]), fresh)
        if self.propagation_ratio > 0.0:
            rows, _, width = first.shape
            owner = state.labels.gather(1, tokens)
            total = torch.zeros(rows, self.clusters, width, device=first.device)
            total.scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, width), fresh.float())
            per_cluster = total
            if self.tokens_per_cluster > 1:
                count = torch.zeros(rows, self.clusters, device=first.device)
                count.scatter_add_(1, owner, torch.ones(owner.shape, device=first.device))
                per_cluster = total / count.unsqueeze(-1).clamp(min=1e-6)
            spread = per_cluster.gather(1, state.labels.unsqueeze(-1).expand(-1, -1, width))
            first = spread * self.propagation_ratio + first * (1 - self.propagation_ratio)
            factors[0] = first
            self.count("propagation_values", first[0].numel())
        return taylor_forecast(factors, x)

    def observe(self, step, block, branch, *, x, output, attention, rows):
        T, s, state = step.num_steps, step.countdown, self.state
        key = (block, branch)
        old = [] if s == T - 1 else state.factors.get(key, [])
        gap = state.activated_steps[-1] - state.activated_steps[-2]
        new = refresh_factors(old, output.clone(), gap, s, T, self.max_order, self.first_enhance)
        state.factors[key] = new
        self.count("derivative_values", (len(new) - 1) * output[0].numel())

    def observe_block(self, step, block, output):
        if block != self.info.block_count - 1 or not self.plan.full[step]:
            return
        state = self.state
        if state.centroids is None:
            state.streams = self._streams(output.shape[0], state.rows_per_sample)
            index = self.draw("init", self.clusters, state.rows_per_sample).to(output.device)
            state.centroids = output[torch.arange(output.shape[0], device=output.device)[:, None], index]
        state.labels, state.centroids, work = kmeans_rows(output, state.centroids, self.clusters,
                                                         self.kmeans_iterations, self.kmeans_rtol,
                                                         self.empty_cluster, self.to_host)
        per_iteration = self.info.num_tokens * self.clusters * int(output.shape[2])
        self.count("kmeans_values", round(work * per_iteration / int(output.shape[0])))
