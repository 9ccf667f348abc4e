"""Where methods come from: the registry, the built-in modules, plugin folders and entry points.

Methods are found in three places, loaded on the first question asked of the registry:

* the built-in modules, the files of the repository's ``baselines/`` folder, installed with the
  package as ``tokencache.baselines`` (so a wheel or ``pip install git+…`` has all of them);
* plugin folders: every ``*.py`` file of a folder named by ``--plugins DIR`` on the command
  line, :func:`load_plugins`, or the environment variable ``TOKENCACHE_PLUGINS`` (folders
  separated by ``os.pathsep``) is imported by path (files starting with ``_`` are helpers);
* installed packages that declare an entry point in the group ``tokencache.methods`` (a module
  that registers methods, or a method class).

A method is spelled everywhere (``sample --method``, ``latency --method``, configs) as
``NAME`` or ``NAME:key=value,key=value``, each value parsed by its declared type
(:func:`parse_method_spec`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
import zlib
from pathlib import Path
from typing import Optional, Union

from tokencache.cache.methods import ROLES, CacheMethod, check_declared, describe_params, parse_typed
from tokencache.errors import UserError

#: name → method class
_REGISTRY: dict[str, type] = {}
#: resolved plugin file → module name, for files already imported
_LOADED: dict[Path, str] = {}
#: folders being loaded right now (a plugin that loads its own folder must not recurse)
_LOADING: set[Path] = set()
_DISCOVERED = False
ENTRY_POINT_GROUP = "tokencache.methods"
PLUGIN_PATH_VARIABLE = "TOKENCACHE_PLUGINS"


class PluginError(UserError, RuntimeError):
    """A plugin could not be loaded; the message names the file and the reason (one line)."""


# ---------------------------------------------------------------------- registering


def register_method(cls: type) -> type:
    """Class decorator: make a :class:`CacheMethod` dataclass available by its ``name``.

    Registering the same name again from the same source file replaces it (a plugin loaded
    twice); from another file it is an error, so two plugins cannot silently shadow each other.
    """
    if not (isinstance(cls, type) and issubclass(cls, CacheMethod) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_method expects a @dataclass subclass of CacheMethod, got {cls!r}")
    name = cls.name
    if not name or not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{cls.__name__}: set a method name (letters, digits, '-', '_'), got {name!r}")
    if cls.role not in ROLES:
        raise ValueError(f"{name}: role must be one of {', '.join(ROLES)}, got {cls.role!r}")
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and _source(old) != _source(cls):
        raise ValueError(f"method {name!r} is registered twice: {_source(old)} and {_source(cls)}")
    check_declared(cls, name)
    if cls.calibration is not None:
        check_declared(cls.calibration, f"{name} calibration")
    _REGISTRY[name] = cls
    return cls


def _source(cls: type) -> str:
    try:
        return str(Path(inspect.getfile(cls)).resolve())
    except (TypeError, OSError):
        return cls.__module__


# ---------------------------------------------------------------------- discovery


def _discover() -> None:
    """Load the built-in methods, the folders of ``$TOKENCACHE_PLUGINS`` and the entry points, once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    builtin = _builtin_package()
    for module in pkgutil.iter_modules(builtin.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{builtin.__name__}.{module.name}")
    for folder in filter(None, os.environ.get(PLUGIN_PATH_VARIABLE, "").split(os.pathsep)):
        load_plugins(folder)
    _load_entry_points()


def _builtin_package():
    """``tokencache.baselines``: installed, or (a source tree used without installing) the folder beside it."""
    try:
        import tokencache.baselines as builtin
    except ModuleNotFoundError:
        import tokencache

        folder = Path(tokencache.__file__).resolve().parents[1] / "baselines"
        spec = importlib.util.spec_from_file_location("tokencache.baselines", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        builtin = importlib.util.module_from_spec(spec)
        sys.modules["tokencache.baselines"] = builtin
        spec.loader.exec_module(builtin)
    return builtin


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
        except Exception as exc:  # third-party code: report it the same way as a plugin file
            raise PluginError(f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}): "
                              f"{type(exc).__name__}: {_first_line(exc)}".rstrip(": ")) from exc
        if isinstance(loaded, type) and issubclass(loaded, CacheMethod) and loaded.name not in _REGISTRY:
            register_method(loaded)


def load_plugins(folder: Union[str, Path]) -> list[str]:
    """Import every plugin file of ``folder``; return the names of the methods they registered.

    Raises :class:`PluginError` (one line: file and reason) for a missing folder, a file that
    fails to import, or a file that registers no method. Loading a folder again is a no-op
    that returns its methods; a plugin that loads its own folder does not recurse.
    """
    _discover()
    folder = Path(folder)
    if not folder.is_dir():
        raise PluginError(f"method plugin folder {folder} does not exist (check --plugins or ${PLUGIN_PATH_VARIABLE})")
    key = folder.resolve()
    if key in _LOADING:
        return []
    _LOADING.add(key)
    try:
        names = []
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                names.extend(_load_file(path.resolve()))
        return names
    finally:
        _LOADING.discard(key)


def _load_file(path: Path) -> list[str]:
    if path in _LOADED:
        module = sys.modules.get(_LOADED[path])
        return sorted(n for n, c in _REGISTRY.items() if module is not None and c.__module__ == module.__name__)
    module_name = f"tokencache_plugins.{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    before = dict(_REGISTRY)
    _LOADED[path] = module_name  # before executing: a file that loads its own folder finds itself loaded
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:  # any failure in third-party plugin code is reported the same way
        sys.modules.pop(module_name, None)
        _LOADED.pop(path, None)
        _REGISTRY.clear()
        _REGISTRY.update(before)
        raise PluginError(f"method plugin {path}: {type(exc).__name__}: {_first_line(exc)}".rstrip(": ")) from exc
    added = sorted(n for n, c in _REGISTRY.items() if before.get(n) is not c)
    if not added:
        sys.modules.pop(module_name, None)
        _LOADED.pop(path, None)
        raise PluginError(f"method plugin {path}: registers no method (decorate a CacheMethod dataclass "
                          "with @register_method)")
    return added


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------- looking up


def available_methods() -> list[str]:
    """Names of all registered methods."""
    _discover()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The registered class of method ``name``; ValueError listing the choices otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))} — or load your plugin "
                         f"folder: `plugins:` in the workflow config, `--plugins DIR`, or ${PLUGIN_PATH_VARIABLE}")
    return _REGISTRY[name]


def get_method(name: str, **params) -> CacheMethod:
    """A new instance of method ``name`` with ``params``; one-line ValueError on any mistake."""
    cls = method_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise ValueError(f"{name}: unknown parameter {unknown[0]!r}; parameters: {allowed}")
    return cls(**params)


def methods_with_role(role: str) -> list[str]:
    """Registered methods playing ``role`` ("reference", "fewer-steps", "cache")."""
    return [name for name in available_methods() if _REGISTRY[name].role == role]


def reference_method() -> str:
    """The method every other one is compared with (the uncached model)."""
    found = methods_with_role("reference")
    if len(found) > 1:  # the built-ins have one: a plugin declared another
        raise PluginError(f"exactly one method may have role 'reference', found {', '.join(found)}: "
                          f"give the plugin's method another role")
    if not found:
        raise RuntimeError("no method has role 'reference' (the built-in 'full' was not registered)")
    return found[0]


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:key=value,key=value`` → (name, params typed by the method's declarations)."""
    name, _, rest = spec.strip().partition(":")
    cls = method_class(name.strip())
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"{cls.name}: expected key=value in {spec!r}, got {item!r}")
        key, raw = item.split("=", 1)
        params[key.strip()] = parse_typed(cls, cls.name, key.strip(), raw)
    get_method(cls.name, **params)  # range checks now, with the one-line message
    return cls.name, params


def parse_labelled_spec(spec: str) -> tuple[str, str, dict]:
    """``LABEL=NAME:k=v,…`` or ``NAME:k=v,…`` → (label, name, params); the label defaults to the spec."""
    head = spec.split(":", 1)[0]
    label, _, rest = spec.partition("=") if "=" in head else ("", "", spec)
    name, params = parse_method_spec(rest)
    return (label or spec), name, params


def method_spec(name: str, params: dict) -> str:
    """The text form of (name, params): ``NAME:key=value,…``."""
    items = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{name}:{items}" if items else name


def search_points(method: Union[str, type]) -> list[dict]:
    """Every point of a method's declared ``search_space``, as parameter dicts, in a fixed order.

    The product over the space's keys, the first key varying slowest; a key that is a tuple of
    names takes its values together. Each point is checked by building the method, so a space
    that names an unknown parameter or a value out of range fails here, in one line.
    """
    import itertools

    cls = method_class(method) if isinstance(method, str) else method
    axes = []
    for key, values in cls.search_space.items():
        names = key if isinstance(key, tuple) else (key,)
        rows = [value if isinstance(key, tuple) else (value,) for value in values]
        if not rows or any(len(row) != len(names) for row in rows):
            raise ValueError(f"{cls.name}: search_space[{key!r}] needs one value per name in each entry")
        axes.append([dict(zip(names, row)) for row in rows])
    points = [dict(pair for part in combo for pair in part.items()) for combo in itertools.product(*axes)] if axes else []
    for point in points:
        try:
            cls(**point)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cls.name}: search-space point {point} is not a valid setting ({exc})") from exc
    return points


def describe_methods() -> list[dict]:
    """JSON-serialisable list of {name, doc, role, host_sync, params, calibration, search_space, source}."""
    out = []
    for name in available_methods():
        cls = _REGISTRY[name]
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        calibration = None
        if cls.calibration is not None:
            calibration = {"file_parameter": cls.calibration.file_param, "title": cls.calibration.title,
                           "settings": describe_params(cls.calibration)}
        space = {",".join(k) if isinstance(k, tuple) else k: [list(v) if isinstance(v, tuple) else v for v in values]
                 for k, values in cls.search_space.items()}
        out.append({"name": name, "doc": doc, "role": cls.role, "host_sync": cls.host_sync,
                    "params": describe_params(cls), "calibration": calibration,
                    "search_space": {"knobs": space, "points": len(search_points(cls))} if space else None,
                    "source": _source(cls)})
    return out


def calibration_of(name: str) -> Optional[type]:
    """The :class:`~tokencache.cache.calibration.Calibration` class of method ``name``, or None."""
    return method_class(name).calibration
