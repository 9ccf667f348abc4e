"""The package's layers import downward only, function-level imports included, and no two packages
import each other in a circle.

A function-level import hides a cycle from Python (it runs late, so nothing fails) but not from a
reader: the engine asking the metrics for the model's shape, or the data format asking the metrics
for feature statistics, made each pair of packages depend on each other. :data:`LAYERS` is the
order, bottom first; every import in every module of ``tokencache/`` and ``baselines/`` (installed
as ``tokencache.baselines``) — at the top, inside functions, under ``try`` or ``if`` — is mapped
to its package and checked against it. An import by string (``importlib.import_module``) is not
seen; the plug-in discovery is the one place that uses it, on purpose.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The layers, bottom first. A package may import its own layer and those below it, never one above;
#: within a layer no circle. "tokencache" is the package's ``__init__`` (the version, the torchvision
#: shim), which every import of a submodule runs anyway.
LAYERS = (
    ("tokencache", "_compat", "errors", "io", "provenance", "checks"),  # no tokencache import but these
    ("mirror", "weights", "diffusion", "data"),  # downloads, shipped weights, the diffusion process, npz files
    ("models", "sampling"),  # the networks and their shape; seeds, noise and the sampling loop
    ("cache",),  # the engine, the method API, calibration
    ("metrics",),  # MACs, latency, FID & co. (they attach methods to time and count them)
    ("baselines",),  # the built-in methods: the cache API, plus the metrics' MAC formulas for their overheads
    ("run", "tuning", "train", "standins", "compare", "results"),  # jobs: sampling, tuning, training, stand-ins, results
    ("cli", "__main__", "_allocator"),  # the command line
)

#: Upward imports that are not dependencies: the registry finds the built-in methods by importing
#: their package, as it loads any plug-in folder or entry point (cache/registry.py ``_builtin_package``).
DISCOVERY = {("tokencache.cache.registry", "baselines")}

#: where each top-level package's modules are, and under which dotted name they are imported
SOURCES = {"tokencache": ROOT / "tokencache", "tokencache.baselines": ROOT / "baselines"}


def modules(sources: dict) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under the source folders."""
    found = {}
    for prefix, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def package_of(dotted: str, packages: set) -> str | None:
    """The layer unit of a dotted name: ``tokencache.cache.engine`` → "cache"; None outside tokencache."""
    parts = dotted.split(".")
    if parts[0] != "tokencache":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in packages else "tokencache"


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module an ``import`` / ``from … import`` anywhere in ``tree`` may load, with its line.

    ``from a import b`` counts as ``a.b`` as well (b may be a submodule); relative imports are
    resolved against ``module``.
    """
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.append((target, node.lineno))
            names += [(f"{target}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return names


def package_imports(sources: dict) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) → ["module:line", …] over all modules, self-imports left out."""
    found = modules(sources)
    packages = {name.split(".")[1] for name in found if name.count(".") >= 1}
    edges = {}
    for module, path in found.items():
        source = package_of(module, packages)
        tree = ast.parse(path.read_text(), filename=str(path))
        seen = set()
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            target = package_of(name, packages)
            if target is None or target == source or (module, line, target) in seen:
                continue
            seen.add((module, line, target))
            if (module, target) in DISCOVERY:
                continue
            edges.setdefault((source, target), []).append(f"{module}:{line}")
    return edges


def rank(layers) -> dict[str, int]:
    return {package: level for level, layer in enumerate(layers) for package in layer}


def violations(edges: dict, layers) -> list[str]:
    """Imports of a higher layer, and packages missing from ``layers``."""
    ranks = rank(layers)
    found = []
    for (source, target), where in sorted(edges.items()):
        for package in (source, target):
            if package not in ranks:
                found.append(f"package {package!r} is in no layer (add it to LAYERS)")
        if source in ranks and target in ranks and ranks[target] > ranks[source]:
            found.append(f"{source} (layer {ranks[source]}) imports {target} (layer {ranks[target]}): {', '.join(where)}")
    return sorted(set(found))


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan), each sorted."""
    graph = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


# ------------------------------------------------------------------------------ the package


def test_no_import_reaches_a_higher_layer():
    found = violations(package_imports(SOURCES), LAYERS)
    assert not found, "imports against the layer order (tests/test_layers.py LAYERS):\n" + "\n".join(found)


def test_no_two_packages_import_each_other():
    edges = package_imports(SOURCES)
    found = cycles(edges)
    detail = [f"{s} → {t}: {', '.join(edges[s, t])}" for group in found for s in group for t in group
              if (s, t) in edges]
    assert not found, f"import cycles between packages {found}:\n" + "\n".join(detail)


def test_every_package_has_a_layer():
    found = modules(SOURCES)
    packages = {package_of(name, {n.split(".")[1] for n in found if "." in n}) for name in found}
    assert packages <= set(rank(LAYERS)), sorted(packages - set(rank(LAYERS)))
    assert len(rank(LAYERS)) == sum(map(len, LAYERS)), "a package is in two layers"


def test_the_scan_sees_function_level_imports_of_the_package():
    edges = package_imports(SOURCES)
    assert "tokencache.cache.engine:" in " ".join(edges["cache", "models"])  # model_shape, a top-level import
    assert any(where.startswith("tokencache.cli:") for where in edges["cli", "metrics"])  # inside cmd_* functions
    assert ("baselines", "cache") in edges and ("baselines", "metrics") in edges


# ------------------------------------------------------------------------------ the checker can fail


def _plant(tmp_path, files: dict) -> dict:
    for name, text in files.items():
        path = tmp_path / "tokencache" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"tokencache": tmp_path / "tokencache"}


def test_a_planted_function_level_import_of_a_higher_layer_is_found(tmp_path):
    sources = _plant(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/dit.py": "import torch\n\ndef f():\n    if True:\n        from tokencache.metrics.flops import x\n",
        "metrics/__init__.py": "from tokencache.models import dit\n",
        "metrics/flops.py": "from . import other\nfrom ..models.dit import f\n",
    })
    edges = package_imports(sources)
    assert edges == {("models", "metrics"): ["tokencache.models.dit:5"],
                     ("metrics", "models"): ["tokencache.metrics:1", "tokencache.metrics.flops:2"]}
    assert violations(edges, LAYERS) == ["models (layer 2) imports metrics (layer 4): tokencache.models.dit:5"]
    assert cycles(edges) == [["metrics", "models"]]


def test_a_planted_cycle_within_one_layer_and_an_unknown_package_are_found(tmp_path):
    sources = _plant(tmp_path, {
        "__init__.py": "",
        "data.py": "def f():\n    from tokencache import mirror\n",
        "mirror.py": "try:\n    import tokencache.diffusion.rng\nexcept ImportError:\n    pass\n",
        "diffusion/rng.py": "from tokencache.data import f\nfrom tokencache.extra import y\n",
        "extra.py": "",
    })
    edges = package_imports(sources)
    assert cycles(edges) == [["data", "diffusion", "mirror"]]
    assert violations(edges, LAYERS) == ["package 'extra' is in no layer (add it to LAYERS)"]
