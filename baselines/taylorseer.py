"""``taylorseer``: TaylorSeer, feature forecasting by Taylor series (Liu et al., ICCV 2025;
Shenyi-Z/TaylorSeer @ 288776dfd0cbb6e201c654c31cd22139f848a6cf, ``TaylorSeer-DiT/``).

The official DiT code's rules, file:line at that commit (paths under ``TaylorSeer-DiT/``; s = the
respaced step index ``current['step']``, counting down from T−1 at the first, noisiest step to 0,
``diffusion/gaussian_diffusion.py`` 499/513 and 679/693):

* **State per sampling loop.** ``cache_init`` runs once per loop (``gaussian_diffusion.py`` 508 /
  688): ``first_enhance = 2`` hard-coded, ``cache_counter = 0``, and ``activated_steps = [49]``
  (``cache_functions/cache_init.py`` 21–22, 26).
* **Full or Taylor, once per step for all blocks.** ``cal_type`` is called once per forward,
  before the block loop (``models.py`` 324–327): full iff s > T − first_enhance − 1 (the first
  ``first_enhance`` steps) or ``cache_counter == N − 1``; a full step resets the counter and
  appends s to ``activated_steps``; otherwise the counter + 1 (``cache_functions/cal_type.py``
  6–18). So: full at k = 0, 1, then every N-th step (k = 1 + jN). ``last_steps`` (``cal_type.py``
  5) is computed and never used: the last step is full only when (T − 2) mod N == 0.
* **Full step** (``models.py`` 129–155): adaLN with this step's c; the attention output before
  its gate is cached by ``derivative_approximation`` (147), then x += gate·attn; the MLP runs on
  x after the real attention residual and its pre-gate output is cached the same way (154). At
  s = T − 1 the (layer, module) factors are emptied first (``taylor_utils/__init__.py`` 46–47).
* **Derivatives by finite differences** (``taylor_utils/__init__.py`` 5–23): with the Python
  int gap = activated_steps[−1] − activated_steps[−2] (negative: steps count down; −1 at k = 1,
  then −N), F_0 = the new output and, for i = 0 … O − 1 while the *old* factors have order i and
  s < T − first_enhance + 1, F_{i+1} = (F_i(new) − F_i(old)) / gap — ``tensor / int``, one new
  order per full step at most; the dict is replaced. The [49] only enters the gap of the first
  full step, which is never used (no old factors there): it is inert at every T.
* **Taylor step** (``models.py`` 164–178): adaLN with this step's c, no norm, attention or MLP
  in any block; x += gate_msa·forecast(attn), then x += gate_mlp·forecast(mlp), each forecast
  from its own factors (the forecast attention never feeds an MLP). ``taylor_formula``
  (``taylor_utils/__init__.py`` 25–38): x = s − activated_steps[−1] (a negative Python int),
  output = 0, then output += (1 / i!) · F_i · x**i for i = 0, 1, … in that evaluation order
  (a Python float times the tensor, then times a Python int). Nothing is stored on a Taylor step.

Official DiT settings: DiT-XL/2 256², DDIM-50, cfg 1.5 (``/TaylorSeer-DiT.md`` 33, 39–48);
recommended N = 4, O = 4 (``/TaylorSeer-DiT.md`` 25: "3.57× computation compression while only
increasing FID by 0.17"); N = 3, O = 3: "FID is 2.34, compared to 2.32 without acceleration"
(``/TaylorSeer-DiT.md`` 27); ``/README.md`` 66: "lossless computational compression of 2.77×",
and at 4.53× "FID only increased by 0.33 from the non-accelerated baseline of 2.32, reaching
2.65" (interval and order not stated; N = 5 gives 11 full steps of 50). The command-line
defaults are N = 4, O = 4 with DDPM-250 (``sample.py`` 101–113).

Memory of the stored derivatives: each block keeps, for each of its two branches, up to O + 1
factors F_0 … F_O of the branch output's shape N × D, so at most (O + 1) · 2 · L · N · D values
per batch row (twice per image with CFG) — linear in the order, the depth, the tokens and the
width, independent of T and of the interval once O + 1 full steps have run. ``resolved()``
reports the planned peak (``stored_factors``, ``stored_values_per_row``); the state records the
peak actually held (``peak_values_per_row``). DiT-XL/2 256² at O = 4: 5 · 2 · 28 · 256 · 1152 =
82,575,360 values per row, 330 MB per row in float32, 661 MB per image with CFG. (The engine
also keeps the last forecast of every branch, as for any ``Forecast``: one more N × D per
branch.)

What is ours: the official code hard-codes 28 blocks (``cache_init.py`` 9–14); any depth and
MDTv2 (its skip blocks run their ``skip_linear`` on Taylor steps, as a block that runs) work
here. ``first_enhance`` is a parameter (official 2, not on the command line; ≥ 1, because a
first Taylor step would find no factors, a KeyError there). ``final_full_steps`` (not official;
default 0) makes the last steps full, what the unused ``last_steps`` (s ≤ 2, i.e. 3 steps)
suggests was considered. The first full output F_0 is kept as a copy (the engine may hand out
an output buffer that compiled CUDA-graph branches reuse); the arithmetic is the official one.
Overhead counters (per batch row): ``derivative_values`` — values of a new order formed on a
full step (a difference and a division: 2); ``taylor_terms`` — values × terms of a forecast
(a scaling by 1/i! and a multiply-add by x^i: 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tokencache.baselines._taylor import full_steps, taylor_forecast  # noqa: F401 (re-exported)
from tokencache.cache import COMPUTE_NO_STORE, CacheMethod, Forecast, param, register_method, sampling_steps

#: ``cache_init.py`` 26: the hard-coded first entry of ``activated_steps`` (inert, see above)
OFFICIAL_ACTIVATED_STEPS = (49,)


def factor_counts(num_steps: int, full: list[bool], max_order: int, first_enhance: int = 2) -> list[int]:
    """Factors held per (block, branch) after each step: one new order per full step, at most O + 1."""
    held, out = 0, []
    for step, is_full in zip(sampling_steps(num_steps), full):
        s = step.countdown
        if is_full:
            old = 0 if s == num_steps - 1 else held
            held = 1 + (min(old, max_order) if s < num_steps - first_enhance + 1 else 0)
        out.append(held)
    return out


@dataclass(frozen=True)
class TaylorPlan:
    full: list  # full[k]: step k computes every branch (and forms new factors)
    held: list  # held[k]: factors held per (block, branch) after step k


@dataclass
class TaylorState:
    """Per generation: the activated (full) steps and each (block, branch)'s factors F_0 … F_m."""

    activated_steps: list = field(default_factory=lambda: list(OFFICIAL_ACTIVATED_STEPS))
    factors: dict = field(default_factory=dict)  # (block, branch) → [F_0, F_1, …]
    held_values: int = 0  # values held now, per batch row
    peak_values_per_row: int = 0


@register_method
@dataclass
class TaylorSeer(CacheMethod):
    """TaylorSeer: full every N steps after a warm-up; in between, every attention and MLP output forecast by its Taylor series."""

    name = "taylorseer"
    State = TaylorState
    noop = {"interval": 1}
    search_space = {"interval": (3, 4, 5, 6), "max_order": (2, 3, 4)}  # N × O; official 4 × 4
    interval: int = param(4, "N: a full step every N steps after the warm-up (official recommendation 4)", min=1)
    max_order: int = param(4, "O: highest derivative order of the Taylor series (official recommendation 4)", min=0)
    first_enhance: int = param(2, "full steps at the start (official: 2, hard-coded)", min=1)
    final_full_steps: int = param(0, "not official: the last this-many steps are full too (the unused last_steps "
                                     "of cal_type.py would be 3)", min=0)

    def plan_for(self, info):
        full = full_steps(info.num_steps, self.interval, self.first_enhance, self.final_full_steps)
        return TaylorPlan(full, factor_counts(info.num_steps, full, self.max_order, self.first_enhance))

    def resolved(self):
        out = self.params()
        if self.plan is None:
            return out
        info = self.info
        stored = max(self.plan.held, default=0)
        hidden = _hidden_size(info.model)
        out.update(full_steps=sum(self.plan.full), stored_factors=stored)
        if hidden is not None:
            out["stored_values_per_row"] = stored * 2 * info.block_count * info.num_tokens * hidden
        if self.state is not None:
            out["peak_values_per_row"] = self.state.peak_values_per_row
        return out

    def overhead_macs(self, shape):
        """``derivative_values``: (new − old) / gap per value of a new order (2);
        ``taylor_terms``: ((1/i!)·F_i)·x^i added to the sum, per value and term (2)."""
        return {"derivative_values": 2, "taylor_terms": 2}

    def begin_step(self, step):
        if self.plan.full[step]:
            self.state.activated_steps.append(step.countdown)  # cal_type.py 13

    def branch_action(self, step, block, branch):
        if self.plan.full[step]:
            return COMPUTE_NO_STORE  # never reused: the factors are the cache
        state = self.state
        factors = state.factors[(block, branch)]
        x = step.countdown - state.activated_steps[-1]
        self.count("taylor_terms", len(factors) * factors[0][0].numel())
        return Forecast(taylor_forecast(factors, x))

    def observe(self, step, block, branch, *, x, output, attention, rows):
        T, s, state = step.num_steps, step.countdown, self.state
        key = (block, branch)
        old = [] if s == T - 1 else state.factors.get(key, [])  # taylor_cache_init at the first step
        gap = state.activated_steps[-1] - state.activated_steps[-2]
        new = [output.clone()]
        for i in range(self.max_order):
            if i < len(old) and s < T - self.first_enhance + 1:
                new.append((new[i] - old[i]) / gap)
            else:
                break
        state.factors[key] = new
        per_row = output[0].numel()
        self.count("derivative_values", (len(new) - 1) * per_row)
        state.held_values += (len(new) - len(old)) * per_row
        state.peak_values_per_row = max(state.peak_values_per_row, state.held_values)


def _hidden_size(model):
    """D of the model's blocks, or None when the method was set up without a model."""
    if model is None:
        return None
    from tokencache.metrics.flops import model_shape

    return model_shape(model).hidden
