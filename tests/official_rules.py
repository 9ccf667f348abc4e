"""Independent transcriptions of the official caching codes' scheduling rules, for the peer tests.

Written from the official repositories at pinned commits, in their own terms (the respaced step
index ``i`` counting down from T−1, per-block ``cal_type``, ``cache_dic`` state), not from this
project's implementation. Each function returns what the official code would compute for a
sampling run; the tests compare it with what the engine recorded.

* ToCa — Shenyi-Z/ToCa @ e84096ffd85af4540a6a1f64e3334e428e1b7377, ``DiT-ToCa/``
* FORA — prathebaselva/FORA @ acde628eb1c9605015542c91040c401919369487, ``src/``
* Learning-to-Cache — horseee/learning-to-cache @ d6cc7817842e1353b8d902af263bab030b8478da, ``DiT/``
* TaylorSeer — Shenyi-Z/TaylorSeer @ 288776dfd0cbb6e201c654c31cd22139f848a6cf, ``TaylorSeer-DiT/``
* DuCa — Shenyi-Z/DuCa @ 0a7151b7bfea3822295e8d29f26cd2e10756670c, ``DuCa-DiT/``
* First-Block Cache — huggingface/diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951,
  ``src/diffusers/hooks/first_block_cache.py``; cache-dit — vipshop/cache-dit @
  f86744af7daa0f569fe4324e73e3e50cebf70f4c, ``src/cache_dit/caching/``
* TeaCache — ali-vilab/TeaCache @ 7c10efc4702c6b619f47805f7abe4a7a08085aa0,
  ``eval/teacache/experiments/latte.py``
* ClusCa, SpeCa — Shenyi-Z/Cache4Diffusion @ 91a1949fcc88acab46547f0b5f295f5de2df2870,
  ``dit/clusca-dit/``, ``dit/speca-dit/``
* MagCache — Zehong-Ma/MagCache @ df81cb181776c2c61477c08e1d21f87fda1cd938 and diffusers @
  58eb52c0803ea9af3abec60841c2a093bdf1f951, ``src/diffusers/hooks/mag_cache.py``
* DuCa's ``cache_type='kv-norm'`` (DuCa pin above); Δ-DiT (arXiv 2406.01125, no official code)

The First-Block Cache and TeaCache transcriptions are whole forwards (hooks, or a replacement of
the model's forward as the official integrations do), run on a batch of one sample, where the
official batch-wide decision is that sample's decision.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ ToCa


def toca_official(num_steps: int, num_blocks: int, num_tokens: int, fresh_ratio: float = 0.07,
                  fresh_threshold: int = 3, ratio_scheduler: str = "ToCa-ddim50", attention_maps=None,
                  soft_fresh_weight: float = 0.25):
    """What ``DiT-ToCa`` does per (step, block): its type, and the MLP tokens it recomputes.

    Transcribed from the official code:

    * ``diffusion/gaussian_diffusion.py`` 680–694 / 499–513: ``current['step'] = i`` for
      i = T−1 … 0; ``cache_init.py`` 26: ``fresh_threshold`` (N).
    * ``models.py`` 351–353: every block runs ``block(x, c, current, cache_dic)``; 132:
      ``cal_type`` at the start of *every block*.
    * ``cal_type.py`` 6–17: first step (i == T−1) uses ``fresh_threshold``, every other step
      ``cal_threshold``; full iff ``i % interval == 0`` or the first step; else ``ToCa``.
    * ``models.py`` 148–158: a full block calls ``force_init`` after attention and after the MLP;
      ``force_init.py`` 8–12: counters of (layer, module) to 0, and for layer 0
      ``force_scheduler``; ``force_scheduler.py`` 6–19: ``cal_threshold`` =
      ``torch.round(N / torch.tensor(1 + w − 2w·i/T))``, w = 0.4 (0 if R == 0), = 2 for
      i in range(int(0.2T), int(0.4T)) when R != 0.
    * ``models.py`` 182–190: a ToCa block reuses attention and calls ``cache_cutfresh`` for the
      MLP; ``cache_cutfresh.py`` 17–33: ratio from ``fresh_ratio_scheduler``, clamped as a
      tensor, ``topk = int(ratio * N)``, counters + 1, chosen counters = 0;
      ``fresh_ratio_scheduler.py`` 40–73 (layer / 27 → layer / (L − 1)).
    * ``score_evaluate.py`` 26–32 and 64–70, ``scores.py`` 12, ``cache_cutfresh.py`` 21–25 and
      52–82: score = normalize(attn_map.sum(dim=1)) + λ·counter / N, the 2×2 cell maxima get
      +0.6 × their score, descending argsort, the first ``topk``.

    ``attention_maps`` (optional): a function (k, layer) → the head-averaged (B, N, N) map of
    that block's last full computation; with it the chosen MLP tokens are returned too.

    Returns ``(types, mlp_tokens, chosen)``: types[k][l] in {"full", "ToCa"} for sampling step
    k = T−1−i; mlp_tokens[k][l] the MLP tokens computed (N on full blocks); chosen[(k, l)] the
    (B, topk) token indices of ToCa blocks when ``attention_maps`` is given.
    """
    cache_dic = {"fresh_threshold": fresh_threshold, "fresh_ratio": fresh_ratio, "cal_threshold": None,
                 "cache_index": {}, "attn_map": {}}
    current = {"num_steps": num_steps}
    types = [[None] * num_blocks for _ in range(num_steps)]
    mlp_tokens = [[None] * num_blocks for _ in range(num_steps)]
    chosen = {}
    for i in range(num_steps - 1, -1, -1):
        current["step"] = i
        k = num_steps - 1 - i
        for layer in range(num_blocks):
            current["layer"] = layer
            # cal_type.py
            first_step = current["step"] == current["num_steps"] - 1
            fresh_interval = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
            current["type"] = "full" if (current["step"] % fresh_interval == 0) or first_step else "ToCa"
            types[k][layer] = current["type"]
            if current["type"] == "full":
                for module in ("attn", "mlp"):
                    cache_dic["cache_index"][(layer, module)] = 0
                    if layer == 0:  # force_init → force_scheduler
                        w = 0.0 if cache_dic["fresh_ratio"] == 0 else 0.4
                        step_factor = torch.tensor(1 + w - 2 * w * current["step"] / current["num_steps"])
                        threshold = torch.round(cache_dic["fresh_threshold"] / step_factor)
                        if (current["step"] in range(int(num_steps * 0.2), int(num_steps * 0.4))
                                and cache_dic["fresh_ratio"] != 0):
                            threshold = 2
                        cache_dic["cal_threshold"] = threshold
                if attention_maps is not None:
                    cache_dic["attn_map"][layer] = attention_maps(k, layer)
                mlp_tokens[k][layer] = num_tokens
                continue
            # cache_cutfresh for the MLP (fresh_ratio_scheduler, then the clamp as a tensor)
            ratio = _toca_fresh_ratio(ratio_scheduler, fresh_ratio, i, num_steps, layer, num_blocks)
            ratio = torch.clamp(torch.tensor(ratio), 0.0, 1.0)
            topk = int(ratio * num_tokens)
            mlp_tokens[k][layer] = topk
            if attention_maps is not None:
                counter = cache_dic["cache_index"][(layer, "mlp")]
                score = F.normalize(cache_dic["attn_map"][layer].sum(dim=1), dim=1, p=2)
                score = score + soft_fresh_weight * torch.as_tensor(counter).float() / fresh_threshold
                score = _local_selection_with_bonus(score, 0.6, 2)
                indices = score.argsort(dim=-1, descending=True)
                fresh = indices[:, :topk]
                counter = torch.as_tensor(counter) + torch.zeros(score.shape, dtype=torch.int)
                counter = counter + 1
                counter.scatter_(1, fresh, torch.zeros_like(fresh, dtype=torch.int))
                cache_dic["cache_index"][(layer, "mlp")] = counter
                chosen[(k, layer)] = fresh
    return types, mlp_tokens, chosen


def _toca_fresh_ratio(schedule, fresh_ratio, step, num_steps, layer, num_blocks):
    """``fresh_ratio_scheduler.py`` 12–13 and 40–73, with /27 written as /(L − 1); module = mlp."""
    if schedule == "constant":
        return fresh_ratio
    step_weight, layer_weight = {"ToCa-ddim50": (2.0, -0.2), "ToCa-ddpm250": (0.4, 0.8)}[schedule]
    step_factor = 1 + step_weight - 2 * step_weight * step / num_steps
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / (num_blocks - 1)
    module_weight, module_time_weight = 2.5, 0.6
    module_factor = 1 + module_time_weight * module_weight
    return fresh_ratio * layer_factor * step_factor * module_factor


def _local_selection_with_bonus(score, bonus_ratio, grid_size=2):
    """``cache_cutfresh.py`` 52–82: the best token of each grid cell gets + bonus × its score."""
    batch_size, num_tokens = score.shape
    image_size = int(num_tokens ** 0.5)
    block_size = grid_size * grid_size
    reshaped = score.view(batch_size, image_size // grid_size, grid_size, image_size // grid_size, grid_size)
    reshaped = reshaped.permute(0, 1, 3, 2, 4).contiguous().view(batch_size, -1, block_size)
    max_scores, max_indices = reshaped.max(dim=-1, keepdim=True)
    mask = torch.zeros_like(reshaped)
    mask.scatter_(-1, max_indices, 1)
    reshaped = reshaped + (mask * max_scores * bonus_ratio)
    modified = reshaped.view(batch_size, image_size // grid_size, image_size // grid_size, grid_size, grid_size)
    return modified.permute(0, 1, 3, 2, 4).contiguous().view(batch_size, num_tokens)


# ------------------------------------------------------------------------------------------ FORA


def fora_official(num_steps: int, cache_threshold: int = 3) -> list[bool]:
    """Full steps of FORA: ``src/models.py`` 139–143 (``boost_infer_static``): with ``step`` the
    respaced index i (``gaussian_diffusion.py`` 517, i = T−1 … 0), full iff
    ``step == int(numstep − 1) or step % int(cache_threshold) == 0``. Indexed by sampling step k."""
    return [(i == int(num_steps - 1)) or (i % int(cache_threshold) == 0) for i in range(num_steps - 1, -1, -1)]


# ------------------------------------------------------------------------------- Learning-to-Cache


def l2c_official(num_steps: int, router_probs: torch.Tensor, thres: float) -> list[list[tuple[bool, bool]]]:
    """Which (attention, MLP) branches each block computes, per sampling step k.

    ``DiT/models/dynamic_models.py``: 196–198 ``reset(start_timestep)`` sets ``cur_timestep =
    T − 1`` (``sample_ddp.py`` 154 passes T); 298–299 an odd ``cur_timestep`` clears the reused
    features (a full step); 304–309 a branch is reused iff a feature is stored and its index
    (2·block attention, 2·block+1 MLP) is not in ``rank[router_idx]``; 251–253 ``rank`` holds,
    for even router indices only, ``STE.apply(router(), thres).nonzero()``;
    ``router_models.py`` 154–155 STE is ``(σ(w) > thres)``; 317 ``cur_timestep −= 1``.
    ``router_idx`` is the respaced index of the step's timestep (292), equal to ``cur_timestep``.
    At odd T the first step (i = T − 1, even) finds no stored feature and computes everything;
    the official code then indexes a ``rank`` it never filled (T − 1 is routed) — here the step
    simply computes, as the engine does.
    """
    plan, stored = [], False
    for cur in range(num_steps - 1, -1, -1):
        if cur % 2 == 1:
            stored = False
        blocks = []
        for block in range(router_probs.shape[1]):
            computed = []
            for branch in range(2):
                active = (not stored) or bool(router_probs[cur, block, branch] > thres)
                computed.append(active)
            blocks.append(tuple(computed))
        plan.append(blocks)
        stored = True
    return plan


# ------------------------------------------------------------------------------------ TaylorSeer
# Shenyi-Z/TaylorSeer @ 288776dfd0cbb6e201c654c31cd22139f848a6cf, ``TaylorSeer-DiT/``


def taylorseer_official(num_steps: int, num_blocks: int, interval: int = 4, max_order: int = 4, features=None):
    """What ``TaylorSeer-DiT`` does per step, and the forecasts it would make from given outputs.

    Transcribed from the official code:

    * ``diffusion/gaussian_diffusion.py`` 688–693 / 508–513: ``cache_init`` once per loop, then
      ``current['step'] = i`` for i = T−1 … 0; ``cache_functions/cache_init.py`` 18–26:
      ``interval``, ``max_order``, ``first_enhance = 2``, ``cache_counter = 0``,
      ``activated_steps = [49]``.
    * ``models.py`` 324–327: ``cal_type`` once per forward, then every block; ``cal_type.py``
      6–18: full iff i > T − first_enhance − 1 or ``cache_counter == interval − 1`` (counter to 0,
      i appended to ``activated_steps``), else the counter + 1 and the type ``'Taylor'``.
    * ``models.py`` 143–154: a full block, per module ('attn', then 'mlp'):
      ``taylor_cache_init`` (``taylor_utils/__init__.py`` 46–47: the module's dict emptied at
      i == T−1), then ``derivative_approximation`` of the module's output (5–23).
    * ``models.py`` 174–178: a Taylor block adds ``taylor_formula`` of each module (25–38).

    ``features``: a function (k, layer, module) → that module's pre-gate output at full sampling
    step k; a zero stand-in when omitted (the schedule does not depend on it).

    Returns ``(types, held, forecasts)``: types[k] in {"full", "Taylor"} for sampling step
    k = T−1−i; held[k] the number of Taylor factors of each (layer, module) after step k;
    forecasts[(k, layer, module)] the tensor ``taylor_formula`` returns on a Taylor step.
    """
    import math

    if features is None:
        def features(k, layer, module):
            return torch.zeros(1)
    cache = {-1: {j: {} for j in range(num_blocks)}}
    cache_dic = {"cache": cache, "interval": interval, "max_order": max_order, "first_enhance": 2,
                 "cache_counter": 0}
    current = {"num_steps": num_steps, "activated_steps": [49]}
    types, held, forecasts = [], [], {}
    for i in range(num_steps - 1, -1, -1):
        current["step"] = i
        k = num_steps - 1 - i
        # cal_type.py
        first_steps = current["step"] > current["num_steps"] - cache_dic["first_enhance"] - 1
        if first_steps or cache_dic["cache_counter"] == cache_dic["interval"] - 1:
            current["type"] = "full"
            cache_dic["cache_counter"] = 0
            current["activated_steps"].append(current["step"])
        else:
            cache_dic["cache_counter"] += 1
            current["type"] = "Taylor"
        types.append(current["type"])
        for layer in range(num_blocks):
            current["layer"] = layer
            for module in ("attn", "mlp"):
                current["module"] = module
                if current["type"] == "full":
                    if current["step"] == current["num_steps"] - 1:  # taylor_cache_init
                        cache[-1][layer][module] = {}
                    # derivative_approximation
                    gap = current["activated_steps"][-1] - current["activated_steps"][-2]
                    old = cache[-1][layer][module]
                    new = {0: features(k, layer, module)}
                    for order in range(cache_dic["max_order"]):
                        if old.get(order) is not None and \
                                current["step"] < current["num_steps"] - cache_dic["first_enhance"] + 1:
                            new[order + 1] = (new[order] - old[order]) / gap
                        else:
                            break
                    cache[-1][layer][module] = new
                else:
                    # taylor_formula
                    x = current["step"] - current["activated_steps"][-1]
                    factors = cache[-1][layer][module]
                    output = 0
                    for order in range(len(factors)):
                        output += (1 / math.factorial(order)) * factors[order] * (x ** order)
                    forecasts[(k, layer, module)] = output
        held.append(len(cache[-1][0]["attn"]))
    return types, held, forecasts


# ------------------------------------------------------------------------------------------ DuCa
# Shenyi-Z/DuCa @ 0a7151b7bfea3822295e8d29f26cd2e10756670c, ``DuCa-DiT/``


def duca_official(num_steps: int, num_blocks: int, num_tokens: int, fresh_ratio: float = 0.05,
                  fresh_threshold: int = 3, ratio_scheduler: str = "ToCa", attention_maps=None,
                  soft_fresh_weight: float = 0.25, value_vectors=None):
    """What ``DuCa-DiT`` does per (step, block): its type, the MLP tokens it recomputes, which ones.

    Transcribed from the official code:

    * ``diffusion/gaussian_diffusion.py`` 688–693 / 508–513: ``current['step'] = i`` for
      i = T−1 … 0; ``cache_functions/cache_init.py`` 21–30.
    * ``models.py`` 194: ``cal_type`` at the start of *every block*; ``cal_type.py`` 6–21: the
      interval is ``fresh_threshold`` at the first step, else ``cal_threshold``;
      ``i % interval == 0`` or the first step → 'full'; ``(i % interval) % 2 == 1`` → 'ToCa';
      otherwise 'aggressive'.
    * ``models.py`` 218–229: a full block calls ``force_init`` after the attention and after the
      MLP; ``force_init.py`` 8–9: that (layer, module)'s counters to 0 and ``force_scheduler``
      for *every* layer; ``force_scheduler.py`` 6–19: ``cal_threshold`` =
      ``torch.round(N / torch.tensor(1 + w − 2w·i/T))``, w = 0.4 (0 if R == 0), = 2 for i in
      range(int(0.2T), int(0.4T)) when R != 0. The head-averaged map is kept (221).
    * ``models.py`` 259–266: a ToCa block reuses the attention and calls ``cache_cutfresh`` for
      the MLP; ``cache_cutfresh.py`` 17–33: ``fresh_ratio_scheduler``, the clamp as a tensor,
      the score (``score_evaluate.py`` 64–70, ``scores.py`` 11: normalize(map.sum(dim=1)) +
      λ·(counter.float() / N)), ``local_selection_with_bonus(score, 0.8, 2)`` (52–82), a
      descending argsort, ``topk = int(ratio * N)``, counters + 1 and the chosen ones 0;
      ``fresh_ratio_scheduler.py`` 12–13 and 38–54 (layer / 27 → layer / (L − 1)).
    * ``models.py`` 345–353: an aggressive block computes nothing; block 27 (L − 1) replaces x
      by ``cache['noise']``, the output of block 27 stored after every block 27.

    ``attention_maps`` (optional): (k, layer) → the head-averaged (B, N, N) map of that full block.
    ``value_vectors`` (optional, ``cache_type='kv-norm'``): (k, layer) → the value heads (B, H, N, d)
    of that full block's attention; the score is then :func:`duca_kv_norm_score` (``attention.py``
    44–47 keeps ``v_norm`` per attention call, ``scores.py`` 25–32).

    Returns ``(types, mlp_tokens, chosen)``: types[k][l] in {"full", "ToCa", "aggressive"} for
    sampling step k = T−1−i; mlp_tokens[k][l] the MLP tokens computed (N full, 0 aggressive);
    chosen[(k, l)] the (B, topk) tokens of ToCa blocks when ``attention_maps`` is given.
    """
    cache_dic = {"fresh_threshold": fresh_threshold, "fresh_ratio": fresh_ratio, "cache_index": {},
                 "attn_map": {}, "soft_fresh_weight": soft_fresh_weight}
    current = {"num_steps": num_steps}
    types = [[None] * num_blocks for _ in range(num_steps)]
    mlp_tokens = [[None] * num_blocks for _ in range(num_steps)]
    chosen = {}
    for i in range(num_steps - 1, -1, -1):
        current["step"] = i
        k = num_steps - 1 - i
        for layer in range(num_blocks):
            current["layer"] = layer
            # cal_type.py
            first_step = current["step"] == current["num_steps"] - 1
            interval = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
            if current["step"] % interval == 0 or first_step:
                current["type"] = "full"
            elif (current["step"] % interval) % 2 == 1:
                current["type"] = "ToCa"
            else:
                current["type"] = "aggressive"
            types[k][layer] = current["type"]
            if current["type"] == "full":
                rows = 1
                if attention_maps is not None:
                    cache_dic["attn_map"][layer] = attention_maps(k, layer)
                    rows = cache_dic["attn_map"][layer].shape[0]
                if value_vectors is not None:
                    cache_dic["v_norm"] = cache_dic.get("v_norm", {})
                    cache_dic["v_norm"][layer] = value_vectors(k, layer)
                    rows = cache_dic["v_norm"][layer].shape[0]
                for module in ("attn", "mlp"):  # force_init after each module
                    cache_dic["cache_index"][(layer, module)] = torch.zeros(rows, num_tokens, dtype=torch.int)
                    w = 0.0 if cache_dic["fresh_ratio"] == 0 else 0.4
                    step_factor = torch.tensor(1 + w - 2 * w * current["step"] / current["num_steps"])
                    threshold = torch.round(cache_dic["fresh_threshold"] / step_factor)
                    if (current["step"] in range(int(num_steps * 0.2), int(num_steps * 0.4))
                            and cache_dic["fresh_ratio"] != 0):
                        threshold = 2
                    cache_dic["cal_threshold"] = threshold
                mlp_tokens[k][layer] = num_tokens
                continue
            if current["type"] == "aggressive":
                mlp_tokens[k][layer] = 0
                continue
            ratio = _duca_fresh_ratio(ratio_scheduler, fresh_ratio, i, num_steps, layer, num_blocks)
            ratio = torch.clamp(torch.tensor(ratio), 0.0, 1.0)
            topk = int(ratio * num_tokens)
            mlp_tokens[k][layer] = topk
            if attention_maps is not None or value_vectors is not None:
                if value_vectors is not None:
                    score = duca_kv_norm_score(cache_dic["v_norm"][layer])
                else:
                    score = F.normalize(cache_dic["attn_map"][layer].sum(dim=1), dim=1, p=2)
                counter = cache_dic["cache_index"][(layer, "mlp")]
                soft_step_score = counter.float() / fresh_threshold
                score = score + cache_dic["soft_fresh_weight"] * soft_step_score
                score = _local_selection_with_bonus(score, 0.8, 2)
                fresh = score.argsort(dim=-1, descending=True)[:, :topk]
                counter = counter + 1
                counter.scatter_(1, fresh, torch.zeros_like(fresh, dtype=torch.int))
                cache_dic["cache_index"][(layer, "mlp")] = counter
                chosen[(k, layer)] = fresh
    return types, mlp_tokens, chosen


def _duca_fresh_ratio(schedule, fresh_ratio, step, num_steps, layer, num_blocks):
    """``fresh_ratio_scheduler.py`` 12–13 and 38–54 for the MLP, with /27 written as /(L − 1)."""
    if schedule == "constant":
        return fresh_ratio
    assert schedule == "ToCa", schedule
    step_factor = 1 + 2.0 - 2 * 2.0 * step / num_steps
    layer_factor = 1 + -0.2 - 2 * -0.2 * layer / (num_blocks - 1)
    module_factor = 1 + 0.6 * 2.5
    return fresh_ratio * layer_factor * step_factor * module_factor


# ------------------------------------------------------------------- First-Block Cache (diffusers)


class FBCSharedBlockState:
    """``first_block_cache.py`` 51–62."""

    def __init__(self):
        self.head_block_output = None
        self.head_block_residual = None
        self.tail_block_residuals = None
        self.should_compute = True


class DiffusersFirstBlockCache:
    """``FBCHeadBlockHook`` (65–142) and ``FBCBlockHook`` (145–190) around a model's blocks.

    ``head(original_forward, hidden_states, ...)`` wraps the first block, ``block(...)`` every
    other, ``block(..., is_tail=True)`` the last (``apply_first_block_cache`` 226–246). No encoder
    stream. ``log`` records, per call of the head, ``(diff or None, should_compute)``.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.state = FBCSharedBlockState()
        self.log = []

    def head(self, original_forward, hidden_states, *args, **kwargs):
        original_hidden_states = hidden_states
        output = original_forward(hidden_states, *args, **kwargs)
        hidden_states_residual = output - original_hidden_states
        shared_state = self.state
        should_compute = self._should_compute_remaining_blocks(hidden_states_residual)
        shared_state.should_compute = should_compute
        if not should_compute:
            return shared_state.tail_block_residuals[0] + output
        shared_state.head_block_output = output
        shared_state.head_block_residual = hidden_states_residual
        return output

    def _should_compute_remaining_blocks(self, hidden_states_residual) -> bool:
        shared_state = self.state
        if shared_state.head_block_residual is None:
            self.log.append((None, True))
            return True
        prev_hidden_states_residual = shared_state.head_block_residual
        absmean = (hidden_states_residual - prev_hidden_states_residual).abs().mean()
        prev_hidden_states_absmean = prev_hidden_states_residual.abs().mean()
        diff = (absmean / prev_hidden_states_absmean).item()
        self.log.append((diff, diff > self.threshold))
        return diff > self.threshold

    def block(self, original_forward, hidden_states, *args, is_tail=False, **kwargs):
        original_hidden_states = hidden_states
        shared_state = self.state
        if shared_state.should_compute:
            output = original_forward(hidden_states, *args, **kwargs)
            if is_tail:
                hidden_states_residual = output - shared_state.head_block_output
                shared_state.tail_block_residuals = (hidden_states_residual, None)
            return output
        return original_hidden_states


# ------------------------------------------------------------------- cache-dit (DBCache, F_n B_n)


class CacheDiTContext:
    """``cache_context.py`` (``CachedContext``) and ``cache_manager.py`` (``can_cache``, ``similarity``)
    for one context without separate CFG, no steps_computation_mask, no token selection."""

    def __init__(self, residual_diff_threshold=0.08, max_warmup_steps=8, warmup_interval=1, max_cached_steps=-1,
                 max_continuous_cached_steps=-1, max_accumulated_residual_diff_threshold=None):
        self.residual_diff_threshold = residual_diff_threshold
        self.max_warmup_steps = max_warmup_steps
        self.warmup_interval = warmup_interval
        self.max_cached_steps = max_cached_steps
        self.max_continuous_cached_steps = max_continuous_cached_steps
        self.max_accumulated_residual_diff_threshold = max_accumulated_residual_diff_threshold
        self.buffers = {}
        self.executed_steps = 0
        self.transformer_executed_steps = 0
        self.cached_steps = []
        self.residual_diffs = {}
        self.continuous_cached_steps = 0
        self.accumulated_residual_diff = 0.0
        self.log = []  # per step: (diff or None, can_use_cache)

    def mark_step_begin(self):  # cache_context.py 147–176
        self.transformer_executed_steps += 1
        self.executed_steps += 1
        if self.transformer_executed_steps - 1 == 0:
            self.cached_steps.clear()
            self.residual_diffs.clear()

    def get_current_step(self):  # :290–291
        return self.executed_steps - 1

    def is_in_warmup(self):  # :319–346
        return self.get_current_step() in list(range(0, self.max_warmup_steps, self.warmup_interval))

    def add_residual_diff(self, diff):  # :220–230
        step = str(self.get_current_step())
        if step not in self.residual_diffs:
            self.residual_diffs[step] = diff
            if diff > 0.0:
                self.accumulated_residual_diff += diff

    def add_cached_step(self):  # :249–263
        curr_cached_step = self.get_current_step()
        if self.cached_steps:
            prev_cached_step = self.cached_steps[-1]
            if curr_cached_step - prev_cached_step == 1:
                if self.continuous_cached_steps == 0:
                    self.continuous_cached_steps += 2
                else:
                    self.continuous_cached_steps += 1
        else:
            self.continuous_cached_steps += 1
        self.cached_steps.append(curr_cached_step)

    def similarity(self, t1, t2, threshold):  # cache_manager.py 553–626 (no token selection)
        if threshold <= 0.0:
            self.add_residual_diff(-0.0)
            return False
        if threshold >= 1.0:
            self.add_residual_diff(-1.0)
            return True
        if t1.shape != t2.shape:
            self.add_residual_diff(-2.0)
            return False
        mean_diff = (t1 - t2).abs().mean()
        mean_t1 = t1.abs().mean()
        diff = (mean_diff / mean_t1).item()
        self.add_residual_diff(diff)
        self._diff = diff
        return diff < threshold

    def can_cache(self, states_tensor):  # cache_manager.py 863–956
        self._diff = None
        result = self._can_cache(states_tensor)
        self.log.append((self._diff, result))
        return result

    def _can_cache(self, states_tensor):
        if self.is_in_warmup():
            return False
        if self.max_cached_steps >= 0 and (len(self.cached_steps) >= self.max_cached_steps):
            return False
        if self.max_continuous_cached_steps >= 0 and (self.continuous_cached_steps
                                                      >= self.max_continuous_cached_steps):
            self.continuous_cached_steps = 0
            return False
        if (self.max_accumulated_residual_diff_threshold is not None
                and self.max_accumulated_residual_diff_threshold > 0.0):
            if self.accumulated_residual_diff >= self.max_accumulated_residual_diff_threshold:
                return False
        threshold = self.residual_diff_threshold
        if threshold <= 0.0:
            return False
        prev_states_tensor = self.buffers.get("Fn_residual")
        return prev_states_tensor is not None and self.similarity(prev_states_tensor, states_tensor, threshold)


def cachedit_blocks_forward(context: CacheDiTContext, blocks, hidden_states, *args, Fn=1, Bn=0):
    """``CachedBlocks_Pattern_Base.forward`` (pattern_base.py 198–327) over ``blocks`` (callables
    hidden_states, *args → hidden_states), residual cache, no encoder stream."""
    original_hidden_states = hidden_states
    for block in blocks[:Fn]:  # call_Fn_blocks 372–389
        hidden_states = block(hidden_states, *args)
    Fn_hidden_states_residual = hidden_states - original_hidden_states  # _get_Fn_residual 195
    context.mark_step_begin()
    can_use_cache = context.can_cache(Fn_hidden_states_residual)
    middle = blocks[Fn:] if Bn == 0 else blocks[Fn:-Bn]  # _Mn_blocks 357–364
    if can_use_cache:
        context.add_cached_step()
        hidden_states = context.buffers["Bn_residual"] + hidden_states  # apply_cache 830–831
    else:
        context.buffers["Fn_residual"] = Fn_hidden_states_residual
        before = hidden_states
        for block in middle:  # call_Mn_blocks 391–427
            hidden_states = block(hidden_states, *args)
        context.buffers["Bn_residual"] = hidden_states - before
    if Bn:
        for block in blocks[-Bn:]:  # call_Bn_blocks 429–449
            hidden_states = block(hidden_states, *args)
    return hidden_states


# ---------------------------------------------------------------------------------------- TeaCache


class TeaCacheLatte:
    """The TeaCache branch of Latte's ``teacache_forward`` (``latte.py`` 169–192, 206, 322), with the
    class attributes ``eval_teacache_slow`` sets (500–509), for a model whose embedded input,
    block-0 modulation and block stack the caller supplies. ``log`` holds, per call,
    ``(rel or None, should_calc)``."""

    def __init__(self, rel_l1_thresh: float, coefficients, all_timesteps):
        self.enable_teacache = True
        self.rel_l1_thresh = rel_l1_thresh
        self.coefficients = list(coefficients)
        self.all_timesteps = list(all_timesteps)
        self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = None
        self.previous_residual = None
        self.log = []

    def forward(self, hidden_states, org_timestep, modulated_inp, run_blocks):
        """``hidden_states``: the embedded input; ``modulated_inp``: block 0's modulated input;
        ``run_blocks(h)``: the transformer blocks on h. Returns the blocks' output."""
        rel = None
        if org_timestep[0] == self.all_timesteps[0] or org_timestep[0] == self.all_timesteps[-1]:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            rescale_func = np.poly1d(self.coefficients)
            rel = ((modulated_inp - self.previous_modulated_input).abs().mean()
                   / self.previous_modulated_input.abs().mean()).cpu().item()
            self.accumulated_rel_l1_distance += rescale_func(rel)
            if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = modulated_inp
        self.log.append((rel, should_calc))
        if not should_calc:
            hidden_states += self.previous_residual
            return hidden_states
        hidden_states_origin = hidden_states.clone().detach()
        hidden_states = run_blocks(hidden_states)
        self.previous_residual = hidden_states - hidden_states_origin
        return hidden_states


# ============================================================================ newer baselines (issue 23)
# ClusCa and SpeCa — Shenyi-Z/Cache4Diffusion @ 91a1949fcc88acab46547f0b5f295f5de2df2870,
#   ``dit/clusca-dit/`` and ``dit/speca-dit/`` (paths below are relative to those folders).
# MagCache — Zehong-Ma/MagCache @ df81cb181776c2c61477c08e1d21f87fda1cd938 (``MagCache4FLUX/magcache_flux.py``,
#   ``MagCache4Wan2.1/magcache_generate.py``); diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951,
#   ``src/diffusers/hooks/mag_cache.py``.
# DuCa kv-norm — Shenyi-Z/DuCa @ 0a7151b7bfea3822295e8d29f26cd2e10756670c, ``DuCa-DiT/``.
# Δ-DiT — arXiv 2406.01125; no official code: ``delta_dit_plan`` is this project's reading of the paper.


def _taylor_terms(factors, distance):
    """``taylor_utils/__init__.py`` (clusca 25–38, speca 35–46): output = 0, then for i = 0, 1, …
    output += (1 / i!) · F_i · distance**i (a Python float, then the tensor, then a Python int)."""
    import math

    total = 0
    for order, factor in enumerate(factors):
        total = total + (1 / math.factorial(order)) * factor * (distance ** order)
    return total


def _taylor_refresh(old, feature, gap, step, num_steps, max_order, first_enhance):
    """``derivative_approximation`` (clusca/speca ``taylor_utils/__init__.py`` 5–23): F_0 = the new
    output; F_{i+1} = (F_i(new) − F_i(old)) / gap while the old list has order i and
    step < T − first_enhance + 1. Returns the new list (the official dict is replaced)."""
    new = [feature]
    for order in range(max_order):
        if order < len(old) and step < num_steps - first_enhance + 1:
            new.append((new[order] - old[order]) / gap)
        else:
            break
    return new


# ----------------------------------------------------------------------------------------- ClusCa


def clusca_schedule(num_steps: int, interval: int = 4, first_enhance: int = 2) -> list[str]:
    """Per sampling step k (= T−1−s): "full" or "ClusCa".

    ``cache_functions/cal_type.py`` 8–27 (once per forward, ``models.py`` 378): full iff
    s > T − first_enhance − 1 (``first_enhance = 2``, ``cache_init.py`` 21) or
    ``cache_counter == cal_threshold − 1``; a full step zeroes the counter, appends s to
    ``activated_steps`` and sets ``cal_threshold = interval`` (``force_scheduler.py`` 6); otherwise
    the counter + 1 and the type is 'ClusCa' when ``cluster_num > 0`` (``cache_init.py`` 28).
    This is TaylorSeer's schedule: full at k = 0, 1, then k = 1 + jN.
    """
    types, counter, threshold = [], 0, None
    for k in range(num_steps):
        s = num_steps - 1 - k
        warm = s > num_steps - first_enhance - 1
        limit = interval if warm else threshold
        if warm or counter == limit - 1:
            types.append("full")
            counter, threshold = 0, interval
        else:
            counter += 1
            types.append("ClusCa")
    return types


def clusca_kmeans(x: torch.Tensor, clusters: int, init_idx: torch.Tensor = None, centroids: torch.Tensor = None,
                  max_iter: int = 100, rtol: float = 1e-4):
    """``cluster_utils/Kmeans.py`` 11–34 with ``cluster_utils/__init__.py`` 7–14: Lloyd iterations
    in L1 distance on x (B, N, D) — block 27's output on a full step (``models.py`` 160–161).

    * start: ``centroids`` (the previous full step's, a warm start) or, the first time,
      x[b, init_idx[b]] with ``init_idx`` = randint(0, N, (B, K)) from the global RNG (34);
    * each iteration (at most ``max_iter`` = 100): labels = argmin of cdist(x, C, p=1) (first
      index on ties); C' = (one-hot(labels)ᵀ x) / (counts + 1e-8) — an empty cluster gets the
      zero centroid; stop when allclose(C, C', rtol=1e-4) over the *whole batch* (atol 1e-8),
      keeping C (not C'); else C ← C'.

    Returns ``(labels, centroids, iterations)``: the labels of the last iteration, the centroids
    the official code caches for the next full step, and the number of iterations run.
    """
    if centroids is None:
        rows = torch.arange(x.shape[0])[:, None]
        centroids = x[rows, init_idx]
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        labels = torch.cdist(x, centroids, p=1).argmin(dim=-1)
        members = F.one_hot(labels, num_classes=clusters).type_as(x)  # (B, N, K)
        sizes = members.sum(dim=1) + 1e-8
        moved = torch.bmm(members.transpose(1, 2), x) / sizes.unsqueeze(-1)
        if torch.allclose(centroids, moved, rtol=rtol):
            break
        centroids = moved
    return labels, centroids, iterations


def clusca_select_tokens(labels: torch.Tensor, clusters: int, weights: torch.Tensor) -> torch.Tensor:
    """``cache_functions/select_fresh_tokens.py`` 3–17: one token per cluster, (B, K) indices.

    ``weights`` is the official ``torch.rand((B, N))`` drawn once per block on every ClusCa step
    (``select_fresh_tokens.py`` 11, via ``cache_cutfresh.py`` 19 and ``models.py`` 208). Cluster
    j's token is the member with the largest weight; an empty cluster has only −inf and argmax gives token 0.
    """
    ids = torch.arange(clusters).view(1, -1, 1)
    inside = labels.unsqueeze(1) == ids  # (B, K, N)
    masked = torch.where(inside, weights.unsqueeze(1), torch.tensor(-float("inf")))
    return masked.argmax(dim=2)


def clusca_refresh_mlp(factors, fresh_idx: torch.Tensor, fresh_out: torch.Tensor, labels: torch.Tensor,
                       clusters: int, distance: int, propagation_ratio: float = 0.0, tokens_per_cluster: int = 1):
    """The MLP of a ClusCa block (``models.py`` 207–220, ``update_cache.py`` 2–50).

    ``factors``: the MLP's Taylor factors [F_0, F_1, …] from the last full step; ``fresh_out``:
    the MLP recomputed on the chosen tokens of x *after* the forecast attention residual
    (``models.py`` 202–209), (B, K, D). Official arithmetic:

    * F_0 ← F_0 with the fresh outputs scattered in (in place: the change persists into the next
      ClusCa steps and into the next full step's differences);
    * propagation only when ``propagation_ratio > 0`` (``models.py`` 211–214): per cluster the
      float32 *sum* of its fresh outputs (k == 1: no division; an empty cluster's duplicate of
      token 0 adds to token 0's cluster), mean for k > 1 (count clamp 1e-6); every token then
      F_0 ← sum[cluster]·p + F_0·(1 − p) (a new tensor, float32 by promotion);
    * output = Σ_i (1/i!)·F_i·distance^i over the updated factors (``models.py`` 217–220).

    Returns ``(new_factors, forecast)`` — ``new_factors[0]`` is what the official cache holds next.
    """
    first = factors[0].clone()
    index = fresh_idx.unsqueeze(-1).expand(-1, -1, fresh_out.shape[-1])
    first.scatter_(1, index, fresh_out)
    if propagation_ratio > 0.0:
        rows, _, width = first.shape
        owner = labels.gather(1, fresh_idx)
        total = torch.zeros(rows, clusters, width)
        total.scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, width), fresh_out.float())
        if tokens_per_cluster == 1:
            per_cluster = total
        elif tokens_per_cluster > 1:
            count = torch.zeros(rows, clusters)
            count.scatter_add_(1, owner, torch.ones(owner.shape, dtype=torch.float))
            per_cluster = total / count.unsqueeze(-1).clamp(min=1e-6)
        else:
            raise UnboundLocalError("k < 1: the official mean_per_cluster is never assigned")
        spread = per_cluster.gather(1, labels.unsqueeze(-1).expand(-1, -1, width))
        first = spread * propagation_ratio + first * (1 - propagation_ratio)
    new = [first] + list(factors[1:])
    return new, _taylor_terms(new, distance)


def clusca_full_refresh(old, feature, gap, step, num_steps, max_order=4):
    """A ClusCa full block's Taylor update (``models.py`` 144–158; ``taylor_utils`` 5–23 with
    ``first_enhance = 2``); ``old[0]`` must be the in-place refreshed F_0 the ClusCa steps left."""
    return _taylor_refresh([] if step == num_steps - 1 else old, feature, gap, step, num_steps, max_order, 2)


def clusca_rng_calls(num_steps: int, num_blocks: int, rows: int, num_tokens: int, clusters: int = 16,
                     interval: int = 4, latent=(4, 32, 32)):
    """The official draws from the global RNG, in order (``sample.py`` 23, 58; ``gaussian_diffusion.py``
    p_sample / ddim_sample ``th.randn_like(x)``): ('randn', (rows/2, *latent)) for z; then per step
    k: on a full step ('randint', (rows, K)) once, at the first full step's block L−1 (the K-means
    init); on a ClusCa step ('rand', (rows, N)) per block in order; after the model call the
    sampler's ('randn', (rows, *latent)) — drawn by DDIM too (η = 0 multiplies it by 0)."""
    calls = [("randn", (rows // 2, *latent), None, None)]
    initialised = False
    for k, kind in enumerate(clusca_schedule(num_steps, interval)):
        if kind == "full" and not initialised:
            calls.append(("randint", (rows, clusters), k, num_blocks - 1))
            initialised = True
        elif kind == "ClusCa":
            calls.extend(("rand", (rows, num_tokens), k, block) for block in range(num_blocks))
        calls.append(("randn", (rows, *latent), k, None))
    return calls


# ------------------------------------------------------------------------------------------ SpeCa


def speca_threshold(k: int, num_steps: int, base_threshold: float = 0.1, decay_rate: float = 0.01) -> float:
    """``cache_functions/cal_type.py`` 16–20: progress = (T − s)/T = (k + 1)/T, threshold =
    max(base · decay**progress, 0.01), Python floats, computed at the step that decides."""
    progress = (num_steps - (num_steps - 1 - k)) / num_steps
    return max(base_threshold * (decay_rate ** progress), 0.01)


def speca_decisions(num_steps: int, errors, base_threshold: float = 0.1, decay_rate: float = 0.01,
                    min_taylor_steps: int = 2, max_taylor_steps: int = 5, first_enhance: int = 3):
    """Per sampling step k: "full" or "Taylor", and whether block 27 is verified in full.

    ``cache_functions/cal_type.py`` 1–57 (once per forward, ``models.py`` 391), state from
    ``cache_init.py`` 20–34 (``first_enhance = 3``, counter 0, ``last_layer_error = 0.0``,
    ``last_type = 'None'``):

    * after a full step the next is always Taylor: counter = 1, check = False, error = None (8–12);
    * otherwise check = (counter ≥ min) (22–25); then, in this priority: s > T − first_enhance − 1
      → full; counter ≥ max → full; (error is not None and error > threshold(k)) and check → full;
      else Taylor, counter + 1 (29–48);
    * a Taylor step with check True computes block 27 in full on the forecast stream's block-27
      input and stores ``error(forecast output, full output)`` as the error (``models.py``
      222–251); the verified output is discarded (256).

    ``errors``: a callable k → the error measured at verification step k (or a dict / sequence).
    Returns ``(types, verified, thresholds)``: thresholds[k] is the value step k compared with.
    """
    if not callable(errors):
        table = errors
        errors = lambda k: table[k]  # noqa: E731
    types, verified, thresholds = [], [], []
    last, counter, check, error = "None", 0, False, 0.0
    for k in range(num_steps):
        s = num_steps - 1 - k
        threshold = speca_threshold(k, num_steps, base_threshold, decay_rate)
        thresholds.append(threshold)
        if last == "full":
            kind, counter, check, error = "Taylor", 1, False, None
        else:
            check = counter >= min_taylor_steps
            too_large = error is not None and error > threshold
            if s > num_steps - first_enhance - 1 or counter >= max_taylor_steps or (too_large and check):
                kind, counter = "full", 0
            else:
                kind, counter = "Taylor", counter + 1
        last = kind
        verify = kind == "Taylor" and check
        if verify:
            error = errors(k)
        types.append(kind)
        verified.append(verify)
    return types, verified, thresholds


def speca_taylor(types, num_steps: int, max_order: int = 4, features=None):
    """SpeCa's Taylor factors per (block, module): ``activated_steps = [T − 1]`` (``cache_init.py``
    33), s appended on full steps (``cal_type.py`` 52–54), ``first_enhance = 3`` in the derivative
    condition; a Taylor step forecasts with distance s − activated[−1] (``models.py`` 214–220,
    264–271). ``features``: k → the module output on full step k (a scalar stand-in if omitted).

    Returns ``(held, forecasts)``: held[k] factors after a full step k; forecasts[k] on Taylor steps.
    """
    if features is None:
        def features(k):
            return torch.zeros(1)
    activated, factors, held, forecasts = [num_steps - 1], [], {}, {}
    for k, kind in enumerate(types):
        s = num_steps - 1 - k
        if kind == "full":
            activated.append(s)
            old = [] if s == num_steps - 1 else factors
            factors = _taylor_refresh(old, features(k), activated[-1] - activated[-2], s, num_steps, max_order, 3)
            held[k] = len(factors)
        else:
            forecasts[k] = _taylor_terms(factors, s - activated[-1])
    return held, forecasts


def speca_error(x: torch.Tensor, full_x: torch.Tensor, metric: str = "relative_l1") -> float:
    """``models.py`` 30–81 and 236–249: the verification error over the whole batch, a Python float.

    l1 = mean|x − f|; l2 = sqrt(mean((x − f)²)); relative_l1 = mean(|x − f| / (|f| + 1e-10));
    relative_l2 = sqrt(mean((|x − f| / (|f| + 1e-10))²)); cosine_similarity = 1 − mean over rows of
    cos(x.view(B, −1), f.view(B, −1)) (eps 1e-8; the 1e-10 argument is unused); ``all`` computes
    every one and returns relative_l1. ``.view`` is kept: on the official residual stream, which
    keeps PatchEmbed's transposed (B, N, D) strides, it raises — so ``cosine_similarity`` and
    ``all`` crash there.
    """
    def cosine():
        a, b = x.view(x.size(0), -1), full_x.view(full_x.size(0), -1)
        return (1 - F.cosine_similarity(a, b, dim=1).mean()).item()

    relative = (x - full_x).abs() / (full_x.abs() + 1e-10)
    measures = {
        "l1": lambda: (x - full_x).abs().mean().item(),
        "l2": lambda: torch.sqrt(torch.mean((x - full_x) ** 2)).item(),
        "relative_l1": lambda: relative.mean().item(),
        "relative_l2": lambda: torch.sqrt(torch.mean(relative ** 2)).item(),
        "cosine_similarity": cosine,
    }
    if metric == "all":
        values = {name: fn() for name, fn in measures.items()}
        return values["relative_l1"]
    return measures[metric]()


# --------------------------------------------------------------------------------------- MagCache


def magcache_nearest_interp(ratios, target_length: int) -> np.ndarray:
    """``nearest_interp`` (``magcache_flux.py`` 12–19; diffusers ``mag_cache.py`` 69–80): index
    round(i · (n − 1)/(m − 1)) — round half to even (numpy and torch alike); m = 1 → the last."""
    ratios = np.asarray(ratios)
    if target_length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (target_length - 1)
    return ratios[np.round(np.arange(target_length) * scale).astype(int)]


def magcache_fit(residuals, flavor: str = "official") -> list[float]:
    """The magnitude-ratio curve from one full trajectory's residuals r_k = (output of the last
    block) − (input of the first block), (B, N, D) per step.

    * ``official`` (``magcache_flux.py`` 113, 196–207, 459): for k ≥ 1,
      round(mean over (B, N) of ‖r_k‖/‖r_{k−1}‖ (L2 over D), 5); the curve is [1.0] + those;
    * ``diffusers`` (``mag_cache.py`` 363–377): 1.0 at k = 0, then mean(‖r_k‖/(‖r_{k−1}‖ + 1e-8))
      in float32, not rounded.
    """
    curve = [1.0]
    for prev, cur in zip(residuals[:-1], residuals[1:]):
        if flavor == "official":
            curve.append(round((cur.norm(dim=-1) / prev.norm(dim=-1)).mean().item(), 5))
        elif flavor == "diffusers":
            now, before = torch.linalg.norm(cur.float(), dim=-1), torch.linalg.norm(prev.float(), dim=-1)
            curve.append((now / (before + 1e-8)).mean().item())
        else:
            raise ValueError(flavor)
    return curve


def magcache_decisions(mag_ratios, num_steps: int, threshold: float, retention_ratio: float, max_skip_steps: int,
                       flavor: str = "official", flux_forced_step: bool = False):
    """Per step k: True = compute the blocks, False = skip (input + the stored residual).

    * ``official`` (FLUX, ``magcache_flux.py`` 326–338, 427–436): from k ≥ int(r·T + 0.5):
      ratio ← ratio·mag[k], steps + 1, err += |1 − ratio| (numpy float64); skip iff err ≤ δ and
      steps ≤ K (and, with ``flux_forced_step``, round(k·27/(T − 1)) ≠ 11 — FLUX's hard-coded
      forced step); otherwise compute and reset ratio = 1, steps = 0, err = 0. A skip keeps the old
      residual; a computed step stores its own.
    * ``wan`` (``MagCache4Wan2.1/magcache_generate.py`` 279–292): start int(T·r) (no + 0.5) and
      err < δ (strict); per CFG branch (the caller runs it once per branch curve).
    * ``diffusers`` (``mag_cache.py`` 202–224): start int(r·T + 0.5); the ratios a float32 tensor
      (so the accumulators are float32); skip also needs a stored residual; k ≥ len(ratios) → 1.0.

    Returns ``(compute, errors)``: errors[k] the accumulated error tested at k (None before start).
    """
    if flavor == "diffusers":
        ratios = torch.as_tensor(mag_ratios, dtype=torch.float32) if not torch.is_tensor(mag_ratios) else mag_ratios
        start = int(retention_ratio * num_steps + 0.5)
    else:
        ratios = np.asarray(mag_ratios, dtype=np.float64)
        start = int(retention_ratio * num_steps + 0.5) if flavor == "official" else int(num_steps * retention_ratio)
    acc_ratio, acc_steps, acc_err, stored = 1.0, 0, 0.0, False
    compute, errors = [], []
    for k in range(num_steps):
        skip = False
        if k >= start:
            scale = 1.0 if (flavor == "diffusers" and k >= len(ratios)) else ratios[k]
            acc_ratio = acc_ratio * scale
            acc_steps += 1
            acc_err = acc_err + abs(1.0 - acc_ratio)
            errors.append(float(acc_err))
            if flavor == "wan":
                skip = acc_err < threshold and acc_steps <= max_skip_steps
            else:
                skip = bool(acc_err <= threshold) and acc_steps <= max_skip_steps
                if flavor == "diffusers":
                    skip = skip and stored
                if flux_forced_step:
                    skip = skip and int(np.round(k * ((28 - 1) / (num_steps - 1)))) != 11
            if not skip:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        else:
            errors.append(None)
        compute.append(not skip)
        stored = stored or not skip
    return compute, errors


# ---------------------------------------------------------------------------------- DuCa kv-norm


def duca_kv_norm_score(v: torch.Tensor) -> torch.Tensor:
    """DuCa's ``cache_type='kv-norm'`` s1 (``cache_functions/attention.py`` 44–47, ``scores.py``
    25–32): v (B, H, N, d) — the value heads of the block's last *full* attention, before q/k
    norms — v_norm = ‖v‖₂ over d (B, H, N); score = L2-normalise over N of Σ_heads (1 − v_norm).
    Tokens whose value vectors are *small* score highest."""
    v_norm = torch.norm(v, dim=-1, p=2)
    return F.normalize((1 - v_norm).sum(dim=-2), p=2)


def duca_kv_norm_choose(score: torch.Tensor, counter: torch.Tensor, fresh_threshold: int, topk: int,
                        soft_fresh_weight: float = 0.25):
    """``score_evaluate.py`` 36–37, 64–70 and ``cache_cutfresh.py`` 20–33 with the kv-norm s1:
    score + λ·counter/N, then the 2×2 bonus (+0.8 × the cell maximum's own score — with negative
    scores this *lowers* the cell's best), descending argsort, the first ``topk``; counters + 1,
    the chosen 0. Returns ``(fresh, counter)``."""
    total = score + soft_fresh_weight * (counter.float() / fresh_threshold)
    total = _local_selection_with_bonus(total, 0.8, 2)
    fresh = total.argsort(dim=-1, descending=True)[:, :topk]
    counter = counter + 1
    counter.scatter_(1, fresh, torch.zeros_like(fresh, dtype=counter.dtype))
    return fresh, counter


# -------------------------------------------------------------------------------------------- Δ-DiT


def delta_dit_plan(num_steps: int, depth: int, boundary: int, front_blocks: int, rear_blocks: int,
                   interval: int = 2):
    """Δ-DiT (arXiv 2406.01125; no official code — every detail here is this project's reading).

    The paper's rule: on cached steps the Δ-Cache replaces a span of consecutive blocks by its input
    plus the deviation Δ = (span output − span input) stored at the last full step; the *rear*
    blocks are cached in the early sampling stage and the *front* blocks after the boundary b.
    Ours: a full step every ``interval`` steps from k = 0 (k % interval == 0); the cached steps
    after a full step f cache blocks [L − rear_blocks, L − 1] if f + 1 < b (the boundary step),
    else [0, front_blocks − 1] (with interval 2: the stage of the cached step itself); the full
    step stores Δ of that span. Returns per k ``None`` (full) or ``(start, end)`` of the cached span.
    """
    plan, span = [], None
    for k in range(num_steps):
        if k % interval == 0:
            plan.append(None)
            span = (depth - rear_blocks, depth - 1) if k + 1 < boundary else (0, front_blocks - 1)
        else:
            plan.append(span)
    return plan
