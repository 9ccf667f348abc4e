"""Token and feature caching: the engine, the method API, the registry, calibration.

* :func:`attach` / :class:`CacheEngine` — run a method on a model (see :mod:`.engine`);
* :class:`CacheMethod`, :func:`param`, :func:`register_method` and the actions — write a method
  (see :mod:`.methods` and :mod:`.actions`);
* :func:`get_method`, :func:`available_methods`, :func:`describe_methods`,
  :func:`parse_method_spec` — find methods by name (built in, plugin folders, entry points;
  see :mod:`.registry`);
* :class:`Calibration`, :func:`calibrate`, :func:`load_calibration` — the trained or fitted
  part of a method (see :mod:`.calibration`).

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
    SamplingSettings,
    calibrate,
    load_calibration,
    write_random_calibration,
)
from tokencache.cache.engine import BlockInput, CacheEngine, attach, model_info
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
)

__all__ = [
    "COMPUTE", "COMPUTE_NO_STORE", "REUSE", "Blend", "Compute", "ComputeSpan", "Forecast", "Reuse", "ReuseSpan",
    "Span", "Subset", "Calibration", "CalibrationError", "SamplingSettings", "calibrate", "load_calibration",
    "write_random_calibration", "BlockInput", "CacheEngine", "attach", "model_info", "CacheMethod", "ModelInfo",
    "param", "PluginError", "available_methods", "describe_methods", "get_method", "load_plugins", "method_class",
    "parse_labelled_spec", "parse_method_spec", "reference_method", "register_method",
]
