"""The built-in caching methods, one module each, installed with the package as ``tokencache.baselines``.

Every module not starting with ``_`` registers its method(s) when imported; the registry
imports them all on first use (:mod:`tokencache.cache.registry`). A new method is a new file
here, or a file in a plugin folder, or an installed package's ``tokencache.methods`` entry point.
"""
