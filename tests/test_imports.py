"""The built-in methods are the package ``tokencache.baselines``; the top-level name ``baselines``
exists only inside a checkout (``python -m pytest`` puts the checkout on ``sys.path``, plain
``pytest`` and an installed wheel do not). An import of it works for the developer and fails for
everyone else, so no module and no test may use it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["tokencache", "baselines", "tests", "workflow"]


def python_files():
    for folder in SOURCES:
        yield from sorted((ROOT / folder).rglob("*.py"))


def top_level_baselines_imports(path: Path) -> list[int]:
    """Line numbers of ``import baselines…`` / ``from baselines… import …`` in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            lines += [node.lineno for alias in node.names if alias.name.split(".")[0] == "baselines"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "baselines":
            lines.append(node.lineno)
    return lines


def test_the_scan_finds_such_an_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from baselines.toca import x\n    import baselines\n"
                      "    from tokencache.baselines import toca\n    from . import baselines\n")
    assert top_level_baselines_imports(sample) == [2, 3]


def test_nothing_imports_the_top_level_name_baselines():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in python_files() for line in top_level_baselines_imports(path)]
    assert not found, f"import tokencache.baselines instead of baselines: {found}"


@pytest.mark.parametrize("folder", SOURCES)
def test_the_scan_sees_every_source_folder(folder):
    assert any((ROOT / folder).rglob("*.py"))
