"""Where methods come from: built-in modules, plugin folders, entry points; one-line errors; typed specs."""
import json
import sys
from pathlib import Path

import pytest
import torch

from tokencache.cache import (
    PluginError,
    attach,
    available_methods,
    describe_methods,
    get_method,
    load_plugins,
    parse_labelled_spec,
    parse_method_spec,
    reference_method,
)
from tokencache.cache import registry
from tokencache.sampling import draw_labels, generate, sample_generators

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
BUILT_IN = {"full", "steps", "fora", "toca", "taylorseer", "duca", "deepcache", "l2c", "tokencache"}


@pytest.fixture
def isolated(monkeypatch):
    """Methods and plugin files registered by a test disappear with it."""
    available_methods()  # the built-ins first, so they are in the snapshot
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_LOADED", dict(registry._LOADED))
    return registry._REGISTRY


def test_the_built_ins_are_the_installed_baselines_modules():
    import tokencache.baselines as builtin

    assert BUILT_IN <= set(available_methods())
    assert [Path(p).resolve() for p in builtin.__path__] == [BASELINES]
    sources = {m["name"]: Path(m["source"]) for m in describe_methods()}
    assert all(sources[name].parent == BASELINES for name in BUILT_IN)
    assert reference_method() == "full"


def test_a_folder_plugin_is_picked_up(isolated, tmp_path, tiny_dit):
    source = (BASELINES / "fora.py").read_text().replace('name = "fora"', 'name = "fora-copy"')
    (tmp_path / "my_fora.py").write_text(source)
    (tmp_path / "_helper.py").write_text("raise RuntimeError('helpers are not plugins')\n")
    assert load_plugins(tmp_path) == ["fora-copy"]
    assert load_plugins(tmp_path) == ["fora-copy"]  # a second load is a no-op
    assert "fora-copy" in available_methods()
    outs = []
    for name in ("fora", "fora-copy"):
        with attach(tiny_dit, name, "ddim10", interval=2) as engine:
            gens = sample_generators(0, range(2))
            outs.append(generate(tiny_dit, engine.sampler, draw_labels(gens, 10), gens,
                                 step_listener=engine.step_listener, clip_denoised=True))
        assert engine.summary()["full_steps"] == 6  # i = 9, then i even: 8, 6, 4, 2, 0
    assert torch.equal(*outs)


def test_the_plugin_path_variable_and_the_cli_option(isolated, tmp_path, monkeypatch, capsys):
    from tokencache.cli import main

    source = (BASELINES / "fora.py").read_text().replace('name = "fora"', 'name = "fora-env"')
    (tmp_path / "env_fora.py").write_text(source)
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    monkeypatch.setenv(registry.PLUGIN_PATH_VARIABLE, str(tmp_path))
    assert "fora-env" in available_methods()
    other = tmp_path / "other"
    other.mkdir()
    (other / "cli_fora.py").write_text(source.replace("fora-env", "fora-cli"))
    assert main(["methods", "--plugins", str(other), "--json"]) == 0
    assert "fora-cli" in {m["name"] for m in json.loads(capsys.readouterr().out)}


def test_a_plugin_that_loads_its_own_folder_does_not_recurse(isolated, tmp_path):
    body = (BASELINES / "full.py").read_text().replace('name = "full"', 'name = "selfish"').replace(
        'role = "reference"', 'role = "cache"')
    body += f"\nfrom tokencache.cache import load_plugins\nload_plugins({str(tmp_path)!r})\n"
    (tmp_path / "selfish.py").write_text(body)
    assert load_plugins(tmp_path) == ["selfish"]


def test_an_entry_point_registers_methods(isolated, tmp_path, monkeypatch):
    package = tmp_path / "third_party_methods"
    package.mkdir()
    (package / "__init__.py").write_text(
        (BASELINES / "fora.py").read_text().replace('name = "fora"', 'name = "fora-entry"'))
    monkeypatch.syspath_prepend(str(tmp_path))

    class Point:
        name, value = "third", "third_party_methods"

        def load(self):
            import importlib

            return importlib.import_module(self.value)

    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Point()] if group == registry.ENTRY_POINT_GROUP
                        else [])
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    assert "fora-entry" in available_methods()
    sys.modules.pop("third_party_methods", None)


def test_readme_examples_are_working_plugins(isolated):
    from conftest import readme_examples

    folder, blocks = readme_examples()
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        assert code.count("\n") < 60, f"README example {i} has {code.count(chr(10))} lines"
    names = load_plugins(folder)
    assert {"every-other", "taylor-first-order", "residual-skip"} <= set(names)
    method = get_method("every-other", interval=3)
    assert method.branch_action(1, 0, "mlp").__class__.__name__ == "Reuse"
    assert method.branch_action(3, 0, "mlp").__class__.__name__ == "Compute"


@pytest.mark.parametrize("body, reason", [
    ("import tokencache_no_such_module\n", "ModuleNotFoundError: No module named 'tokencache_no_such_module'"),
    ("def broken(:\n", "SyntaxError"),
    ("x = 1\n", "registers no method"),
])
def test_a_broken_plugin_is_one_line_naming_file_and_reason(isolated, tmp_path, body, reason):
    (tmp_path / "broken.py").write_text(body)
    with pytest.raises(PluginError) as info:
        load_plugins(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "broken.py") in message and reason in message


def test_a_name_cannot_be_taken_twice(isolated, tmp_path):
    (tmp_path / "again.py").write_text((BASELINES / "fora.py").read_text())
    with pytest.raises(PluginError, match="registered twice"):
        load_plugins(tmp_path)
    assert Path(registry._source(registry._REGISTRY["fora"])) == BASELINES / "fora.py"


def test_missing_folder(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        load_plugins(tmp_path / "nowhere")


@pytest.mark.parametrize("name, params, message", [
    ("nope", {}, "unknown method 'nope'; available: "),
    ("fora", {"intervall": 2}, "fora: unknown parameter 'intervall'; parameters: interval"),
    ("fora", {"interval": 0}, "fora: parameter interval must be in 1 … ∞, got 0"),
    ("fora", {"interval": 2.5}, "fora: parameter interval must be int, got 2.5"),
    ("toca", {"fresh_ratio": 1.5}, "toca: parameter fresh_ratio must be in 0 … 1, got 1.5"),
    ("toca", {"schedule": "cosine"}, "toca: parameter schedule must be one of 'auto'"),
    ("steps", {"fraction": 0.0}, "steps: fraction must be above 0"),
    ("l2c", {"threshold": "high", "router": "r.pt"}, "l2c: parameter threshold must be float, got 'high'"),
])
def test_parameter_errors_are_one_line(name, params, message):
    with pytest.raises(ValueError) as info:
        get_method(name, **params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_method_specs_are_parsed_by_the_declared_types():
    assert parse_method_spec("fora") == ("fora", {})
    assert parse_method_spec("fora:interval=3") == ("fora", {"interval": 3})
    assert parse_method_spec("l2c:router=123,threshold=0.2") == ("l2c", {"router": "123", "threshold": 0.2})
    assert parse_method_spec("toca:interval=none,per_block_retest=false") == (
        "toca", {"interval": None, "per_block_retest": False})
    assert parse_method_spec(" tokencache : cache_ratio=1 ") == ("tokencache", {"cache_ratio": 1.0})
    assert parse_labelled_spec("fora2=fora:interval=2") == ("fora2", "fora", {"interval": 2})
    assert parse_labelled_spec("fora:interval=2") == ("fora:interval=2", "fora", {"interval": 2})
    for spec, message in (("fora:interval=x", "fora: parameter interval must be int, got 'x'"),
                          ("fora:interval", "expected key=value"), ("fora:every=2", "unknown parameter 'every'"),
                          ("toca:per_block_retest=yes", "must be bool"), ("fora:interval=0", "must be in 1")):
        with pytest.raises(ValueError, match=message):
            parse_method_spec(spec)


def test_parameters_are_typed_and_converted():
    toca = get_method("toca", fresh_ratio=1, interval=4)
    assert toca.fresh_ratio == 1.0 and isinstance(toca.fresh_ratio, float)
    assert get_method("fora").params() == {"interval": 3}


def test_describe_methods_is_json():
    described = {m["name"]: m for m in json.loads(json.dumps(describe_methods()))}
    assert described["fora"]["params"] == [{"name": "interval", "type": "int", "default": 3,
                                            "doc": "N: full where the step index i (counting down) is divisible by N "
                                                   "(official: 3)", "range": "1 … ∞"}]
    toca = {p["name"]: p for p in described["toca"]["params"]}
    assert toca["fresh_ratio"]["default"] == 0.07 and toca["interval"]["type"] == "int | None"
    assert all(m["doc"] for m in described.values())
    assert described["full"]["role"] == "reference" and described["steps"]["role"] == "fewer-steps"
    assert described["l2c"]["calibration"]["file_parameter"] == "router"
    assert {p["name"] for p in described["l2c"]["calibration"]["settings"]} >= {"steps", "lr", "l1", "seed"}
