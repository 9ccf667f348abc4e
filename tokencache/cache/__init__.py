"""Token and feature caching: the engine, the method API and registry, plugin loading.

* :func:`attach` / :class:`CacheEngine` — run a method on a model (see :mod:`.engine`);
* :class:`CacheMethod`, :func:`param`, :func:`register_method` — write a method (see :mod:`.methods`);
* :func:`get_method`, :func:`available_methods`, :func:`describe_methods` — find methods by name;
* :func:`load_plugins` — import the method files of ``baselines/`` (or ``$TOKENCACHE_BASELINES``);
* :func:`train_router`, :func:`load_router` — Learning-to-Cache's router (see :mod:`.router`);
* :func:`train_predictor`, :func:`load_predictor` — TokenCache's Cache Predictor (see
  :mod:`.predictor`); the ``tokencache`` method itself is built in (:mod:`.token_cache`).
"""
from tokencache.cache.actions import (
    COMPUTE,
    COMPUTE_NO_STORE,
    REUSE,
    Blend,
    Compute,
    ComputeSpan,
    Reuse,
    ReuseSpan,
    Subset,
)
from tokencache.cache.engine import CacheEngine, attach, model_info
from tokencache.cache.methods import (
    CacheMethod,
    ModelInfo,
    available_methods,
    describe_methods,
    get_method,
    method_class,
    param,
    register_method,
)
from tokencache.cache.plugins import PluginError, load_plugins
from tokencache.cache.predictor import PredictorError, load_predictor, save_predictor, train_predictor
from tokencache.cache.router import RouterError, load_router, save_router, train_router
from tokencache.cache import token_cache  # noqa: E402,F401  registers the built-in ``tokencache`` method

__all__ = [
    "COMPUTE", "COMPUTE_NO_STORE", "REUSE", "Blend", "Compute", "ComputeSpan", "Reuse", "ReuseSpan", "Subset",
    "CacheEngine", "attach", "model_info", "CacheMethod", "ModelInfo", "available_methods", "describe_methods",
    "get_method", "method_class", "param", "register_method", "PluginError", "load_plugins", "RouterError",
    "load_router", "save_router", "train_router", "PredictorError", "load_predictor", "save_predictor",
    "train_predictor",
]
