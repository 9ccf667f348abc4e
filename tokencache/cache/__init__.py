"""Token and feature caching: the engine, the method API, the registry, calibration.

* :func:`attach` / :class:`CacheEngine` — run a method on a model (see :mod:`.engine`);
* :class:`CacheMethod`, :func:`param`, :func:`register_method` and the actions — write a method
  (see :mod:`.methods` and :mod:`.actions`);
* :func:`get_method`, :func:`available_methods`, :func:`describe_methods`,
  :func:`parse_method_spec` — find methods by name (built in, plugin folders, entry points;
  see :mod:`.registry`);
* :class:`Calibration`, :func:`calibrate`, :func:`load_calibration` — the trained or fitted
  part of a method, and what fitting one takes: :func:`record_trajectories`
  (:class:`Trajectories`), :func:`batch_rows`, :func:`sample_batches`, :func:`replay_trajectories`,
  :func:`relaxation_batches` and the fitting loop :func:`fit_relaxation` (see :mod:`.calibration`);
* :class:`Step` — the step every hook receives: k, the official count-down s = T−1−k, the
  timestep and T (see :mod:`.steps`); :func:`sample_view` — a sample's CFG rows side by side.

The methods themselves are modules of ``tokencache.baselines`` (the repository's ``baselines/``).
"""
from tokencache.cache.actions import (
    COMPUTE,
    COMPUTE_NO_STORE,
    REUSE,
    Blend,
    Compute,
    ComputeSpan,
    Forecast,
    Reuse,
    ReuseSpan,
    Span,
    Subset,
)
from tokencache.cache.calibration import (
    Calibration,
    CalibrationError,
    FitHistory,
    RelaxationBatch,
    Replayed,
    SamplingSettings,
    Trajectories,
    batch_rows,
    calibrate,
    fit_relaxation,
    load_calibration,
    record_trajectories,
    relaxation_batches,
    replay_trajectories,
    sample_batches,
    write_random_calibration,
)
from tokencache.cache.engine import BlockInput, CacheEngine, attach, model_info, sample_view
from tokencache.cache.methods import CacheMethod, ModelInfo, param
from tokencache.cache.registry import (
    PluginError,
    available_methods,
    describe_methods,
    get_method,
    load_plugins,
    method_class,
    parse_labelled_spec,
    parse_method_spec,
    reference_method,
    register_method,
    search_points,
)
from tokencache.cache.steps import Step, sampling_steps

__all__ = [
    "COMPUTE", "COMPUTE_NO_STORE", "REUSE", "Blend", "Compute", "ComputeSpan", "Forecast", "Reuse", "ReuseSpan",
    "Span", "Subset", "Calibration", "CalibrationError", "SamplingSettings", "calibrate", "load_calibration",
    "write_random_calibration", "FitHistory", "RelaxationBatch", "Replayed", "Trajectories", "batch_rows",
    "fit_relaxation", "record_trajectories", "relaxation_batches", "replay_trajectories", "sample_batches",
    "BlockInput", "CacheEngine", "attach", "model_info", "sample_view", "Step", "sampling_steps", "CacheMethod",
    "ModelInfo", "param", "PluginError", "available_methods", "describe_methods", "get_method", "load_plugins",
    "method_class", "parse_labelled_spec", "parse_method_spec", "reference_method", "register_method",
    "search_points",
]
