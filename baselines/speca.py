"""``speca``: SpeCa, speculative feature caching (Liu et al., 2025; Shenyi-Z/Cache4Diffusion @
91a1949fcc88acab46547f0b5f295f5de2df2870, ``dit/speca-dit/``).

The official DiT code's rules, file:line at that commit (paths under ``dit/speca-dit/``; s = the
respaced step index ``current['step']``, counting down from T−1 at the first step to 0):

* **State** (``cache_functions/cache_init.py`` 20–34): ``first_enhance = 3``, a Taylor-step
  counter 0, ``check`` False, the last error 0.0, ``activated_steps = [T − 1]``, last type none.
* **Type per step** (``cache_functions/cal_type.py`` 1–57, once per forward, ``models.py`` 391):
  after a full step the next step is **always** a Taylor step — counter 1, check False, error
  None (8–12; this overrides the warm-up: k = 1 is a Taylor step). Otherwise check = (counter ≥
  min) (22–25) and, in this order: s > T − first_enhance − 1 → full; counter ≥ max → full;
  (error > threshold and check) → full; else Taylor and counter + 1 (29–48). The threshold is
  max(base · decay^((T − s)/T), 0.01) (16–20). A full step zeroes the counter and appends s to
  ``activated_steps`` (52–54).
* **Full step** (``models.py`` 191–212): every branch computed; TaylorSeer's derivatives
  (``taylor_utils/__init__.py`` 5–23) with ``first_enhance = 3``.
* **Taylor step** (``models.py`` 214–220, 264–271): both branches of every block forecast by
  the Taylor series at distance s − activated[−1] (``taylor_utils/__init__.py`` 35–46).
* **Verification** (``models.py`` 222–251): on a Taylor step with check True, the last block
  (27) is also computed in full on its input (the forecast stream, ``x.clone()``, 183); the error
  between the forecast output and that full output is the error the next step decides with; the
  full output is discarded (256). Error measures (``models.py`` 30–81): ``l1`` mean|x − f|,
  ``l2`` sqrt(mean (x − f)²), ``relative_l1`` mean(|x − f| / (|f| + 1e-10)) (the default,
  ``sample.py`` 124), ``relative_l2`` sqrt(mean(relative²)); f = the full output. The
  command line also offers ``cosine_similarity`` and ``all``: both crash on the residual stream
  (``x.view(B, −1)`` on PatchEmbed's transposed strides, ``models.py`` 61), so they are not
  offered here.

Official setting (``sample.py`` 102–126): DiT-XL/2 256², cfg 1.5, DDIM-50 (``--ddim-sample`` is
always on), O = 4, base 0.1, decay 0.01, min 2, max 5 Taylor steps, ``relative_l1``. (``sample.py``
69 reads a missing ``--interval`` and crashes; ``sample_ddp.py`` 172–197 uses 100 steps, base
0.3, decay 0.05, min 3, max 8.) With min 2 a Taylor run is never verified on its first two
steps, so runs last 3 to 5 steps; the verification of a run's last allowed step is wasted (the
next step is full by the maximum), as is one on the last step.

Official quirk kept as the default: a full step is always followed by a Taylor step, whatever
the warm-up and the maximum (``taylor_after_full=True``); with False that step is decided by the
rules like any other (and ``max_taylor_steps=0`` then computes every step).

What is ours:

* **Per sample.** The official error is one Python float over the whole batch (every row of
  every sample). Here each sample measures its error over its own rows (its conditional and
  null-label row together) and follows its own schedule; a step where samples disagree
  forecasts some rows and computes the others (``Forecast(rows=…)``), and only the samples that
  verify run the shadow block. For a batch of one sample the two agree.
* Any depth (the verification block is the last block in execution order; MDTv2 too).
* The verification's cost is overhead: ``verification_tokens`` (N per verifying row, each priced
  at a full block's MACs ÷ N, the block's adaLN and MDTv2's ``skip_linear`` included; the
  engine records the shadow computation's tokens apart from the model's counts) and
  ``error_values`` (the error measure, 3 MAC-equivalents per value compared). The errors
  are read on the host (``host_sync``), as the official ``.item()`` does.
* ``state.history`` records per step each sample's type, whether it verified, the error
  measured and the threshold compared with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tokencache.baselines._taylor import refresh_factors, taylor_forecast
from tokencache.cache import COMPUTE_NO_STORE, CacheMethod, Forecast, param, register_method, sample_view

METRICS = ("relative_l1", "l1", "l2", "relative_l2")
FULL, TAYLOR = "full", "Taylor"


def speca_threshold(k: int, num_steps: int, base: float, decay: float, floor: float = 0.01) -> float:
    """max(base · decay^((T − s)/T), floor) with s = T − 1 − k (``cal_type.py`` 16–20)."""
    s = num_steps - 1 - k
    return max(base * (decay ** ((num_steps - s) / num_steps)), floor)


def verification_error(forecast: torch.Tensor, full: torch.Tensor, metric: str) -> torch.Tensor:
    """The error of each row of (S, V) tensors (a sample's values side by side), ``models.py`` 30–81."""
    if metric == "l1":
        return (forecast - full).abs().mean(dim=1)
    if metric == "l2":
        return torch.sqrt(((forecast - full) ** 2).mean(dim=1))
    relative = (forecast - full).abs() / (full.abs() + 1e-10)
    if metric == "relative_l1":
        return relative.mean(dim=1)
    return torch.sqrt((relative ** 2).mean(dim=1))


@dataclass
class Sample:
    """One sample's decision state (``cache_init.py`` 20–34)."""

    activated: list
    last: str = "None"
    counter: int = 0
    check: bool = False
    error: Optional[float] = 0.0
    held: int = 0  # Taylor factors held per (block, branch)


@dataclass
class SpeCaState:
    samples: Optional[list] = None  # one Sample per sample of the batch
    rows_per_sample: int = 1
    kinds: list = field(default_factory=list)  # this step: FULL / TAYLOR per sample
    verify: list = field(default_factory=list)  # this step: whether each sample verifies
    taylor_rows: Optional[torch.Tensor] = None  # (B,) bool on the device, None when every row agrees
    all_full: bool = True
    distance: object = None  # int or (B, 1, 1) tensor: s − activated[−1] per row
    factors: dict = field(default_factory=dict)  # (block, branch) → [F_0, …] over all rows (zeros past a row's order)
    shadow: Optional[torch.Tensor] = None  # the last block's full output for the verifying rows
    shadow_rows: Optional[torch.Tensor] = None
    history: list = field(default_factory=list)


@register_method
@dataclass
class SpeCa(CacheMethod):
    """SpeCa: TaylorSeer forecasts whose runs end when a full computation of the last block disagrees."""

    name = "speca"
    host_sync = True
    State = SpeCaState
    noop = {"taylor_after_full": False, "max_taylor_steps": 0}
    search_space = {"base_threshold": (0.05, 0.1, 0.2, 0.3, 0.5)}  # τ₀; sample.py 0.1, sample_ddp.py 0.3
    max_order: int = param(4, "O: highest Taylor order (--max-order 4)", min=0)
    base_threshold: float = param(0.1, "τ₀: error threshold at the start (--base-threshold 0.1)", min=0.0)
    decay_rate: float = param(0.01, "β: threshold τ₀·β^((T−s)/T) (--decay-rate 0.01)", min=0.0)
    min_threshold: float = param(0.01, "floor of the threshold (official: 0.01, hard-coded)", min=0.0)
    min_taylor_steps: int = param(2, "Taylor steps of a run before verification starts (--min-taylor-steps 2)", min=0)
    max_taylor_steps: int = param(5, "Taylor steps of a run at most (--max-taylor-steps 5)", min=0)
    error_metric: str = param("relative_l1", "the verification error (--error-metric; official default "
                                             "relative_l1)", choices=METRICS)
    first_enhance: int = param(3, "full steps at the start, s > T − this − 1 (official: 3, hard-coded)", min=1)
    taylor_after_full: bool = param(True, "official: a full step is always followed by a Taylor step; False: "
                                          "decided by the rules")

    def resolved(self):
        out = self.params()
        if self.state is not None and self.state.history:
            kinds = [h["kinds"] for h in self.state.history]
            out["full_steps_per_sample"] = [sum(row[i] == FULL for row in kinds) for i in range(len(kinds[0]))]
        return out

    def overhead_macs(self, shape):
        """``verification_tokens``: a token of the last block run in full (a shadow computation; one
        full block's MACs per N tokens);
        ``error_values``: the error measure (difference, absolute value or square, sum: 3)."""
        from tokencache.metrics.flops import attention_branch_macs, block_fixed_macs, mlp_branch_macs

        n = shape.tokens
        block = (attention_branch_macs(shape, n) + mlp_branch_macs(shape, n)
                 + block_fixed_macs(shape, shape.skip_blocks[-1]))
        return {"verification_tokens": block / n, "error_values": 3, "derivative_values": 2, "taylor_terms": 2}

    # ------------------------------------------------------------------ decisions

    def _decide(self, sample: Sample, k: int, T: int) -> tuple[str, bool, float]:
        s = T - 1 - k
        threshold = speca_threshold(k, T, self.base_threshold, self.decay_rate, self.min_threshold)
        if sample.last == FULL and self.taylor_after_full:
            kind, sample.counter, sample.check, sample.error = TAYLOR, 1, False, None
        else:
            sample.check = sample.counter >= self.min_taylor_steps
            too_large = sample.error is not None and sample.error > threshold
            if s > T - self.first_enhance - 1 or sample.counter >= self.max_taylor_steps or (too_large and sample.check):
                kind, sample.counter = FULL, 0
            else:
                kind, sample.counter = TAYLOR, sample.counter + 1
        sample.last = kind
        if kind == FULL:
            sample.activated.append(s)
        return kind, kind == TAYLOR and sample.check, threshold

    def block_action(self, step, block, inputs):
        state = self.state
        if block == 0:
            self._begin(step, inputs)
        if block == self.info.block_count - 1 and any(state.verify):
            rows = self._rows_of(state.verify, inputs.x.device)
            state.shadow_rows = rows
            state.shadow = inputs.shadow(rows=rows)
            # per batch row: N tokens of a full block for each verifying row (the mean over the rows)
            self.count("verification_tokens", round(self.info.num_tokens * sum(state.verify) / len(state.verify)))
        return None

    def _begin(self, step, inputs):
        state, T = self.state, step.num_steps
        batch = inputs.x.shape[0]
        if state.samples is None:
            state.rows_per_sample = inputs.rows_per_sample
            state.samples = [Sample([T - 1]) for _ in range(batch // inputs.rows_per_sample)]
        decided = [self._decide(sample, step.k, T) for sample in state.samples]
        state.kinds = [d[0] for d in decided]
        state.verify = [d[1] for d in decided]
        state.history.append({"step": step.k, "kinds": list(state.kinds), "verify": list(state.verify),
                              "threshold": decided[0][2], "error": [None] * len(decided)})
        state.all_full = all(kind == FULL for kind in state.kinds)
        taylor = [kind == TAYLOR for kind in state.kinds]
        state.taylor_rows = None if len(set(taylor)) == 1 else self._row_mask(taylor, inputs.x.device)
        distances = [step.countdown - sample.activated[-1] for sample in state.samples]
        if len(set(distances)) == 1:
            state.distance = distances[0]
        else:
            per_row = torch.tensor(distances * state.rows_per_sample, dtype=inputs.x.dtype, device=inputs.x.device)
            state.distance = per_row.view(-1, 1, 1)
        state.shadow = state.shadow_rows = None

    def _row_mask(self, per_sample: list, device) -> torch.Tensor:
        """Rows i, i + S, … of sample i (the CFG layout)."""
        return torch.tensor(per_sample * self.state.rows_per_sample, dtype=torch.bool, device=device)

    def _rows_of(self, per_sample: list, device) -> Optional[torch.Tensor]:
        if all(per_sample):
            return None
        return self._row_mask(per_sample, device).nonzero().flatten()

    # ------------------------------------------------------------------ branches

    def branch_action(self, step, block, branch):
        state = self.state
        if state.all_full:
            return COMPUTE_NO_STORE
        factors = state.factors[(block, branch)]
        taylor_samples = sum(kind == TAYLOR for kind in state.kinds)
        per_row = int(factors[0][0].numel())
        terms = sum(s.held for s, kind in zip(state.samples, state.kinds) if kind == TAYLOR)
        self.count("taylor_terms", round(terms * per_row / len(state.samples)))
        forecast = taylor_forecast(factors, state.distance)
        if taylor_samples == len(state.samples):
            return Forecast(forecast)
        return Forecast(forecast, rows=state.taylor_rows)

    def observe(self, step, block, branch, *, x, output, attention, rows):
        """Refresh the factors of the rows computed (every row of each full sample)."""
        state, T, s = self.state, step.num_steps, step.countdown
        key = (block, branch)
        full = [kind == FULL for kind in state.kinds]
        samples = [i for i, f in enumerate(full) if f]
        S, r = len(state.samples), state.rows_per_sample
        old = state.factors.get(key)
        # the rows computed: every row, or (rows given) the rows of the full samples, ascending
        computed = list(range(S * r)) if rows is None else sorted(i + j * S for j in range(r) for i in samples)
        groups = {}
        for i in samples:
            sample = state.samples[i]
            held = 0 if s == T - 1 else sample.held
            groups.setdefault((held, sample.activated[-1] - sample.activated[-2]), []).append(i)
        if old is None:
            old = [torch.zeros_like(output[:1]).expand(S * r, *output.shape[1:]).clone()]
        width = max(len(old), 1)
        pieces = []  # (row indices in the batch, new factors of those rows)
        for (held, gap), members in groups.items():
            batch_rows = [i + j * S for j in range(r) for i in members]
            local = self._local_rows(batch_rows, computed).to(output.device)
            index = torch.tensor(batch_rows, device=output.device)
            previous = [f.index_select(0, index) for f in old[:held]]
            new = refresh_factors(previous, output.index_select(0, local).clone(), gap, s, T, self.max_order,
                                  self.first_enhance)
            pieces.append((index, new))
            width = max(width, len(new))
            self.count("derivative_values", round((len(new) - 1) * int(output[0].numel()) * len(batch_rows) / (S * r)))
        factors = [old[i] if i < len(old) else torch.zeros_like(old[0]) for i in range(width)]
        for index, new in pieces:
            for i in range(width):
                value = new[i] if i < len(new) else torch.zeros_like(new[0])
                factors[i] = factors[i].index_copy(0, index, value)
        state.factors[key] = factors
        if block == self.info.block_count - 1 and branch == "mlp":
            self._set_held(groups, s, T)

    def _set_held(self, groups, s, T):
        for (held, _), members in groups.items():
            count = 1 + (min(held, self.max_order) if s < T - self.first_enhance + 1 else 0)
            for i in members:
                self.state.samples[i].held = count

    @staticmethod
    def _local_rows(batch_rows: list, computed: list) -> torch.Tensor:
        """Positions of ``batch_rows`` among the computed rows (ascending batch rows)."""
        where = {r: i for i, r in enumerate(computed)}
        return torch.tensor([where[r] for r in batch_rows])

    # ------------------------------------------------------------------ verification

    def observe_block(self, step, block, output):
        state = self.state
        if block != self.info.block_count - 1 or state.shadow is None:
            return
        forecast = output if state.shadow_rows is None else output.index_select(0, state.shadow_rows)
        verifying = [i for i, v in enumerate(state.verify) if v]
        rows = state.rows_per_sample
        errors = verification_error(sample_view(forecast, rows), sample_view(state.shadow, rows), self.error_metric)
        self.count("error_values", round(int(output[0].numel()) * len(verifying) * rows / int(output.shape[0])))
        values = self.to_host(errors)
        for i, value in zip(verifying, values):
            state.samples[i].error = value
            state.history[-1]["error"][i] = value
        state.shadow = state.shadow_rows = None
