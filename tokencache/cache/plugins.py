"""Method plugins: every ``*.py`` file of a folder registers one caching method.

The folder is ``baselines/`` at the repository root (next to the ``tokencache`` package), or
the one named by the environment variable ``TOKENCACHE_BASELINES``. Each file is imported by
path, so a new method is a new file and nothing else. Files whose name starts with ``_`` are
skipped (shared helpers).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from pathlib import Path
from typing import Optional, Union

from tokencache.cache import methods

#: resolved plugin file → module name, for files already imported.
_LOADED: dict[Path, str] = {}
_DEFAULT_LOADED = False


class PluginError(RuntimeError):
    """A plugin file could not be loaded; the message names the file and the reason (one line)."""


def default_folder() -> Path:
    """``$TOKENCACHE_BASELINES`` if set, else ``<repo>/baselines``."""
    env = os.environ.get("TOKENCACHE_BASELINES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "baselines"


def load_plugins(folder: Optional[Union[str, Path]] = None) -> list[str]:
    """Import every plugin file of ``folder`` (default: :func:`default_folder`).

    Returns the names of the methods registered by those files. Raises :class:`PluginError`
    (one line: file and reason) for a missing folder, a file that fails to import, or a file
    that registers no method.
    """
    global _DEFAULT_LOADED
    folder = Path(folder) if folder is not None else default_folder()
    if folder is None or not folder.is_dir():
        raise PluginError(f"method plugin folder {folder} does not exist (set TOKENCACHE_BASELINES)")
    names = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        names.extend(_load_file(path.resolve()))
    if folder.resolve() == default_folder().resolve():
        _DEFAULT_LOADED = True
    return names


def load_default_plugins() -> None:
    """Load the default folder once (what :func:`methods.available_methods` relies on)."""
    if not _DEFAULT_LOADED:
        load_plugins()


def _load_file(path: Path) -> list[str]:
    if path in _LOADED:
        module = sys.modules.get(_LOADED[path])
        return sorted(n for n, c in methods._REGISTRY.items() if module is not None and c.__module__ == module.__name__)
    module_name = f"tokencache_plugins.{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    before = dict(methods._REGISTRY)
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:  # any failure in third-party plugin code is reported the same way
        sys.modules.pop(module_name, None)
        methods._REGISTRY.clear()
        methods._REGISTRY.update(before)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PluginError(f"method plugin {path}: {type(exc).__name__}: {reason}".rstrip(": ")) from exc
    added = sorted(n for n, c in methods._REGISTRY.items() if before.get(n) is not c)
    if not added:
        sys.modules.pop(module_name, None)
        raise PluginError(f"method plugin {path}: registers no method (decorate a CacheMethod dataclass "
                          "with @register_method)")
    _LOADED[path] = module_name
    return added
