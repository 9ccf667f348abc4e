"""Compute cost in multiply-accumulates (MACs): one forward, and a whole cached sampling run.

Unit. The DiT paper's "Gflops" are MACs as fvcore counts them (fvcore calls one multiply-add a
"flop"; torch's ``FlopCounterMode`` counts 2 per MAC). Every number here is in MACs, and the
convention is fvcore's default, applied identically by the analytic formulas:

* ``linear`` / ``conv`` / ``matmul``: one MAC per weight multiply (biases not counted);
* attention: Q·Kᵀ and P·V, ``B·H·Nq·Nk·d`` each. fvcore has no handle for
  ``aten::scaled_dot_product_attention`` (it would add 0), so :func:`forward_macs` gives it one;
  the explicit-softmax path (ToCa's scoring) runs the same two matmuls and costs the same;
* ``layer_norm``: fvcore's estimate of 4 per element (no affine); it is in every total and
  reported apart in the breakdowns (``layer_norm``) for anyone who wants to drop it;
* elementwise ops (adds, modulate, gates, GELU, SiLU, softmax, sinusoids), the label-embedding
  lookup, gathers/scatters and the unpatchify permutation: 0 (fvcore skips them; they are
  listed in ``unsupported_ops`` of :func:`forward_macs_report`).

With these rules the analytic count of one forward (batch row, no CFG) is, for hidden size D,
N tokens, H heads, MLP hidden M = r·D, patch p, C_in / C_out channels and a 256-d frequency
embedding:

* patch embed N·D·C_in·p²; timestep embedder 256·D + D²; final layer 2D² (adaLN, per row)
  + 4·N·D (LayerNorm) + N·D·p²·C_out;
* per block: adaLN 6D² (per row, not per token), 2 LayerNorms 8·N·D, qkv 3N·D², attention
  2N²·D, proj N·D², MLP 2N·D·M, and in MDTv2's out/decoder blocks ``skip_linear`` 2N·D².

DiT-XL/2 at 256 px gives 118.69 G (paper: 118.6), at 512 px 524.81 G (paper: 524.6), both within
0.05 %; MDTv2-XL/2 at 256 px 129.56 G, exactly the official figure (MDT's code counted with
fvcore). That exact match needs the LayerNorm term (without it: 129.49 G), which is why fvcore's
default is kept; the DiT paper's own rounding convention is not published (without LayerNorm
DiT-XL/2 would be 118.62 G / 524.54 G).

A cached run is priced from the engine's token counts (:func:`sampling_macs`), not by tracing the
engine: the counts say exactly which tokens each branch computed, and the same per-branch formulas
give the full forward when every count is N.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

# The sizes every formula reads. They describe the model, so they live in models/ (the cache engine,
# below metrics, reads them too); execution_blocks and model_shape stay importable from here.
from tokencache.models.shape import ModelShape, execution_blocks, model_shape  # noqa: F401

#: fvcore's estimate for a LayerNorm without affine parameters: 4 per element.
LAYER_NORM_MACS_PER_ELEMENT = 4

#: What fvcore (and therefore this module) prices at 0 MACs, for the reports.
UNCOUNTED = ("elementwise ops (adds, modulate, gates, GELU, SiLU, softmax, sinusoids), the label-embedding "
             "lookup, gathers/scatters and the unpatchify permutation: 0 MACs by fvcore's convention")

UNIT = ("MACs (multiply-accumulates; the DiT paper's 'Gflops'); fvcore convention: linear/conv/matmul "
        "weight MACs, attention 2·N·N·D per row, LayerNorm 4 per element, elementwise ops 0")


# --------------------------------------------------------------------------- analytic costs (per batch row)


def attention_branch_macs(s: ModelShape, k: float) -> float:
    """Attention branch computing k query tokens (0 ≤ k ≤ N), per batch row.

    k > 0: LayerNorm of all N tokens (4·N·D; K/V need every token), queries k·D², keys and values
    of all tokens 2·N·D², logits and weighted sum 2·k·N·D, output projection k·D². At k = N this
    is the full 4·N·D + 4·N·D² + 2·N²·D. k = 0 (reused) costs nothing.
    """
    if k <= 0:
        return 0
    n, d = s.tokens, s.hidden
    return LAYER_NORM_MACS_PER_ELEMENT * n * d + k * d * d + 2 * n * d * d + 2 * k * n * d + k * d * d


def mlp_branch_macs(s: ModelShape, k: float) -> float:
    """MLP branch on k tokens, per batch row: LayerNorm 4·k·D + fc1 and fc2 2·k·D·M."""
    if k <= 0:
        return 0
    return LAYER_NORM_MACS_PER_ELEMENT * k * s.hidden + 2 * k * s.hidden * s.mlp_hidden


def block_fixed_macs(s: ModelShape, skip: bool) -> int:
    """What a block costs whenever it runs, whatever its branches do, per batch row.

    adaLN modulation Linear(D, 6D) on the conditioning vector (6D², once per row, not per token),
    and for MDTv2's skip blocks ``skip_linear`` Linear(2D, D) on all N tokens (2·N·D²).
    """
    d = s.hidden
    return 6 * d * d + (2 * s.tokens * d * d if skip else 0)


def step_fixed_parts(s: ModelShape) -> dict[str, int]:
    """The parts every model call computes outside the blocks, per batch row."""
    n, d, p = s.tokens, s.hidden, s.patch
    return {
        "patch_embed": n * d * s.in_channels * p * p,
        "t_embedder": s.frequency_dim * d + d * d,
        "y_embedder": 0,  # a table lookup
        "final_layer": 2 * d * d + LAYER_NORM_MACS_PER_ELEMENT * n * d + n * d * p * p * s.out_channels,
    }


def step_fixed_macs(s: ModelShape) -> int:
    return sum(step_fixed_parts(s).values())


def analytic_breakdown(model: Union[nn.Module, ModelShape], batch_size: int = 1) -> dict[str, int]:
    """One forward's MACs by part (fvcore convention), for ``batch_size`` rows.

    Keys: patch_embed, t_embedder, y_embedder, adaLN (blocks), qkv, attention (QKᵀ and PV),
    proj, mlp, skip_linear, layer_norm (blocks and final layer), final_layer (adaLN + linear).
    """
    s = model if isinstance(model, ModelShape) else model_shape(model)
    n, d, m, L = s.tokens, s.hidden, s.mlp_hidden, s.depth
    ln = LAYER_NORM_MACS_PER_ELEMENT * n * d
    fixed = step_fixed_parts(s)
    parts = {
        "patch_embed": fixed["patch_embed"],
        "t_embedder": fixed["t_embedder"],
        "y_embedder": 0,
        "adaLN": L * 6 * d * d,
        "qkv": L * 3 * n * d * d,
        "attention": L * 2 * n * n * d,
        "proj": L * n * d * d,
        "mlp": L * 2 * n * d * m,
        "skip_linear": sum(s.skip_blocks) * 2 * n * d * d,
        "layer_norm": (2 * L + 1) * ln,
        "final_layer": fixed["final_layer"] - ln,
    }
    return {k: int(v) * batch_size for k, v in parts.items()}


def analytic_forward_macs(model: Union[nn.Module, ModelShape], batch_size: int = 1) -> int:
    """MACs of one forward (x, t, y) at the model's input size, from the architecture alone.

    Equals :func:`forward_macs` exactly (tests check DiT, MDT v1, MDTv2 at several sizes).
    """
    return sum(analytic_breakdown(model, batch_size).values())


# --------------------------------------------------------------------------- fvcore count of one forward


def _sdpa_macs(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: Q·Kᵀ + P·V = B·H·Nq·Nk·(d + d_v).

    The additive mask (MDT's relative position bias) is elementwise: 0, as fvcore prices adds.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch_heads = math.prod(q[:-2])
    return int(batch_heads * q[-2] * k[-2] * (q[-1] + v[-1]))


def _baddbmm_macs(inputs, outputs) -> int:
    """fvcore handle for ``aten::baddbmm`` (bias + batch1 @ batch2): the product's B·n·k·m; the add is 0."""
    from fvcore.nn.jit_handles import get_shape

    b, n, k = get_shape(inputs[1])
    m = get_shape(inputs[2])[-1]
    return int(b * n * k * m)


def fvcore_analysis(module: nn.Module, inputs: tuple):
    """fvcore's ``FlopCountAnalysis`` of ``module(*inputs)`` with this package's handles.

    ``scaled_dot_product_attention`` (Q·Kᵀ and P·V) and ``baddbmm`` (the per-sample linear layers
    of :func:`tokencache.models.layers.linear`) are counted, which fvcore alone prices at 0; its
    warnings are silenced (what it skips is listed by ``unsupported_ops()``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import-time deprecation warnings (torch.jit.script)
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.set_op_handle("aten::baddbmm", _baddbmm_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def count_macs(module: nn.Module, *inputs) -> int:
    """MACs of ``module(*inputs)`` as fvcore traces them (:func:`fvcore_analysis`), without gradients."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape arithmetic
        return int(fvcore_analysis(module, inputs).total())


def example_inputs(model: nn.Module, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, y) for one forward at the model's configured input size, on its device/dtype."""
    param = next(model.parameters())
    size = int(model.input_size)
    x = torch.randn(batch_size, model.in_channels, size, size, device=param.device, dtype=param.dtype)
    t = torch.full((batch_size,), 500, device=param.device, dtype=torch.long)
    y = torch.zeros(batch_size, device=param.device, dtype=torch.long)
    return x, t, y


def forward_macs_report(model: nn.Module, batch_size: int = 1) -> dict:
    """fvcore count of one plain forward, with what it did not count.

    Returns {"macs", "unit", "batch_size", "input_size", "by_operator", "unsupported_ops"
    (op → calls; priced 0), "uncalled_modules", "uncounted"}. Refuses a model with a cache
    context attached: a traced engine would count whatever the method did on that one call (or
    nothing), so cached runs are priced by :func:`sampling_macs` from the engine's counts.
    """
    if getattr(model, "cache_context", None) is not None:
        raise RuntimeError("forward_macs counts the plain forward, but this model has a cache context attached; "
                           "count outside the attach() block and price a cached run with sampling_macs(model, "
                           "engine.summary())")
    was_training = model.training
    model.eval()
    try:
        inputs = example_inputs(model, batch_size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of the shape arithmetic
            analysis = fvcore_analysis(model, inputs)
            total = analysis.total()
            by_operator = {k: int(v) for k, v in sorted(analysis.by_operator().items())}
            unsupported = {k: int(v) for k, v in sorted(analysis.unsupported_ops().items())}
            uncalled = sorted(analysis.uncalled_modules())
    finally:
        model.train(was_training)
    return {"macs": int(total), "unit": UNIT, "batch_size": batch_size, "input_size": int(model.input_size),
            "by_operator": by_operator, "unsupported_ops": unsupported, "uncalled_modules": uncalled,
            "uncounted": UNCOUNTED}


def forward_macs(model: nn.Module, batch_size: int = 1) -> int:
    """MACs of one forward (x, t, y) at the model's input size, counted by fvcore.

    DiT-XL/2: 118.69 G at input 32, 524.81 G at input 64; MDTv2-XL/2: 129.56 G at input 32.
    """
    return forward_macs_report(model, batch_size)["macs"]


def build_for_counting(name: str, device: str = "cpu", **overrides) -> nn.Module:
    """A model with the right shapes and all-zero weights, built without weight initialisation.

    Built on the ``meta`` device (instant), then given uninitialised storage and zeroed. Counting
    depends only on shapes, so this counts exactly like the real model, in a fraction of the time
    an XL model's initialisation takes. ``device="meta"`` returns the meta model (enough for the
    analytic functions, which read shapes only). Not for sampling: the weights are zeros.
    """
    from tokencache.models.registry import create_model

    with torch.device("meta"):
        model = create_model(name, **overrides)
    if device == "meta":
        return model.eval()
    model = model.to_empty(device=device)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.zero_()
    return model.eval()


def forward_cost(name: str, batch_size: int = 1, count_with_fvcore: bool = True, **overrides) -> dict:
    """One forward of preset/family ``name`` (+ constructor ``overrides``): fvcore and analytic.

    Returns {"model", "overrides", "input_size", "tokens", "batch_size", "unit", "analytic_macs",
    "analytic_breakdown", "fvcore" (the :func:`forward_macs_report`, or None when
    ``count_with_fvcore`` is False: then the model is built on the meta device, instantly),
    "match" (fvcore == analytic, or None)}.
    """
    model = build_for_counting(name, device="cpu" if count_with_fvcore else "meta", **overrides)
    analytic = analytic_forward_macs(model, batch_size)
    report = forward_macs_report(model, batch_size) if count_with_fvcore else None
    return {"model": name, "overrides": overrides, "input_size": int(model.input_size),
            "tokens": int(model.num_tokens), "batch_size": batch_size, "unit": UNIT, "analytic_macs": analytic,
            "analytic_breakdown": analytic_breakdown(model, batch_size), "fvcore": report,
            "match": None if report is None else report["macs"] == analytic}


# --------------------------------------------------------------------------- a whole sampling run


def cfg_rows_per_image(family: str, cfg_scale: float) -> int:
    """Batch rows the model sees per generated image (mirrors ``sampling.guided_model_fn``).

    CFG runs [x; x] with labels [y; null]: 2 rows. DiT at ``cfg_scale == 1`` runs plain (1 row);
    MDT and MDTv2 always go through ``forward_with_cfg`` (2 rows, as the official sampler).
    """
    return 1 if (family == "DiT" and cfg_scale == 1.0) else 2


def _summary_counts(summary: dict) -> np.ndarray:
    counts = summary.get("counts_per_sample", summary.get("counts"))
    if counts is None:
        raise ValueError("the cache summary has no token counts: pass engine.summary(counts=True) or the "
                         "'cache' entry of a run JSON (counts_per_sample)")
    return np.asarray(counts, dtype=np.float64)


def sampling_macs(model: Union[nn.Module, ModelShape], cache_summary: dict, cfg: bool = True) -> dict:
    """MACs per generated image of one sampling run, from the engine's counts.

    ``cache_summary`` is ``engine.summary(counts=True)`` or the ``cache`` entry of a run JSON
    (``tokencache.run``). Its counts are tokens computed per batch row, (steps, blocks, [attn,
    mlp]) — in a run JSON ``counts_per_sample``, the mean over samples of those per-row counts —
    and ``blocks_run`` (steps, blocks) is 0 for a block skipped inside a reused span;
    ``branch_rows`` (steps, blocks, [attn, mlp]) is the fraction of rows that computed each
    branch (per-row decisions: some rows run a block, others skip it). Per row:

    * per step: patch embed, t embedder, final layer (:func:`step_fixed_macs`) — every model call;
    * per step and block that ran: adaLN 6D², and ``skip_linear`` 2·N·D² in MDTv2 skip blocks;
      a block skipped in a reused span costs nothing (the span's residual add is elementwise);
    * per step and block: :func:`attention_branch_macs` (k tokens: N full, 0 < k < N partial with
      K/V for all N tokens, 0 reused) and :func:`mlp_branch_macs`.

    ``cfg=True``: the model sees 2 rows per image (conditional and null label, the same token
    counts in both), so MACs per image = 2 × MACs per row; ``cfg=False``: 1 row per image. With
    CFG, the full sampler costs num_steps × 2 × :func:`forward_macs`.

    The method's own overhead (scores, sorts, forecasts, signals) is priced separately, at the
    MAC-equivalents per unit the method declared (``overhead_prices`` in the summary, from
    :meth:`~tokencache.cache.methods.CacheMethod.overhead_macs`): ``overhead_macs`` by name per
    image, plus the raw counts; a counter without a price is listed in ``overhead_unpriced``.

    ``macs_per_image_full`` is the full model with the *requested* sampler (for fewer steps, the
    sampler before the reduction), so ``macs_speedup`` is the saving against what was asked for.
    """
    from tokencache.sampling import parse_sampler

    s = model if isinstance(model, ModelShape) else model_shape(model)
    counts = _summary_counts(cache_summary)
    blocks_run = np.asarray(cache_summary["blocks_run"], dtype=np.float64)
    steps = counts.shape[0]
    if counts.shape != (steps, s.depth, 2) or blocks_run.shape != (steps, s.depth):
        raise ValueError(f"counts {counts.shape} / blocks_run {blocks_run.shape} do not fit a model with "
                         f"{s.depth} blocks: the summary belongs to another model")
    if int(cache_summary.get("num_tokens", s.tokens)) != s.tokens:
        raise ValueError(f"the summary counts {cache_summary['num_tokens']} tokens per image, the model {s.tokens}")
    if int(cache_summary.get("steps_run", steps)) != steps:
        raise ValueError(f"the summary is of an unfinished generation ({cache_summary['steps_run']} of {steps} steps)")
    if counts.min() < 0 or counts.max() > s.tokens:
        raise ValueError(f"token counts outside 0…{s.tokens}")
    n, d, m = s.tokens, s.hidden, s.mlp_hidden
    ln = LAYER_NORM_MACS_PER_ELEMENT
    attn_k, mlp_k = counts[..., 0], counts[..., 1]
    if cache_summary.get("branch_rows") is not None:  # rows that computed the attention pay its LN and K/V
        attn_rows = np.asarray(cache_summary["branch_rows"], dtype=np.float64)[..., 0]
        attention = (attn_rows * (ln * n * d + 2 * n * d * d) + attn_k * (2 * d * d + 2 * n * d)).sum()
    else:  # older summaries: every row alike
        attention = np.where(attn_k > 0, ln * n * d + 2 * n * d * d + attn_k * (2 * d * d + 2 * n * d), 0.0).sum()
    mlp = np.where(mlp_k > 0, mlp_k * (ln * d + 2 * d * m), 0.0).sum()
    skip = np.asarray(s.skip_blocks, dtype=np.float64)
    adaln = blocks_run.sum() * 6 * d * d
    skip_linear = (blocks_run * skip[None]).sum() * 2 * n * d * d
    fixed = steps * step_fixed_macs(s)
    rows = 2 if cfg else 1
    per_row = {"attention_branch": attention, "mlp_branch": mlp, "adaLN": adaln, "skip_linear": skip_linear,
               "embed_and_final_layer": fixed}
    macs = rows * sum(per_row.values())

    overhead_macs, overhead_counts, unpriced = {}, {}, []
    prices = cache_summary.get("overhead_prices", {})
    for name, entry in sorted(cache_summary.get("overhead", {}).items()):
        total = rows * int(entry["total"])
        overhead_counts[name] = total
        price = prices.get(name)
        if price is None:
            unpriced.append(name)
            price = 0
        overhead_macs[name] = int(price * total)
    overhead = sum(overhead_macs.values())

    requested_name = cache_summary.get("requested_sampler") or cache_summary.get("sampler")
    requested = parse_sampler(requested_name).steps if requested_name else steps
    forward = analytic_forward_macs(s)
    full = rows * requested * forward
    return {
        "unit": UNIT,
        "macs_per_image": int(round(macs)),
        "macs_per_image_full": int(full),
        "macs_speedup": float(full / macs) if macs else math.inf,
        "overhead_macs_per_image": int(overhead),
        "macs_speedup_with_overhead": float(full / (macs + overhead)) if macs + overhead else math.inf,
        "overhead_macs": overhead_macs,
        "overhead_counts_per_image": overhead_counts,
        "overhead_unpriced": unpriced,
        "breakdown_per_image": {k: int(round(rows * v)) for k, v in per_row.items()},
        "forward_macs_per_row": int(forward),
        "cfg_included": bool(cfg),
        "rows_per_image": rows,
        "num_steps": steps,
        "requested_steps": int(requested),
        "method": cache_summary.get("method"),
        "sampler": cache_summary.get("sampler"),
        "requested_sampler": requested_name,
    }


def run_macs(run: Union[str, Path, dict]) -> dict:
    """:func:`sampling_macs` of a finished ``tokencache sample`` run (its ``<out>.json`` or the dict).

    The architecture comes from the run's ``model_config`` (built on the meta device: shapes
    only), CFG rows from its family and ``cfg_scale`` (:func:`cfg_rows_per_image`).
    """
    meta = json.loads(Path(run).read_text()) if isinstance(run, (str, Path)) else run
    config = dict(meta["model_config"])
    name, family = config.pop("name"), config.pop("family")
    model = build_for_counting(name, device="meta", **config)
    cfg_scale = float(meta["request"]["cfg_scale"])
    out = sampling_macs(model, meta["cache"], cfg=cfg_rows_per_image(family, cfg_scale) == 2)
    out.update({"model": name, "cfg_scale": cfg_scale, "num_samples": meta.get("num_samples")})
    if isinstance(run, (str, Path)):
        out["run"] = str(run)
    return out
