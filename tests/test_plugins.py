"""Method plugins: discovery by path, one-line errors, parameter validation, descriptions."""
import json
import re
from pathlib import Path

import pytest
import torch

from tokencache.cache import PluginError, attach, available_methods, describe_methods, get_method, load_plugins
from tokencache.cache import methods, plugins
from tokencache.sampling import draw_labels, generate, sample_generators

BASELINES = Path(__file__).resolve().parents[1] / "baselines"


@pytest.fixture
def registry(monkeypatch):
    """Methods registered by a test disappear with it."""
    available_methods()  # the default plugins first, so they are in the snapshot
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods._REGISTRY


def test_default_folder_holds_the_baselines(monkeypatch, tmp_path):
    assert {"full", "steps", "fora", "toca", "deepcache", "l2c"} <= set(available_methods())
    assert plugins.default_folder() == BASELINES
    monkeypatch.setenv("TOKENCACHE_BASELINES", str(tmp_path))
    assert plugins.default_folder() == tmp_path


def test_a_new_file_is_picked_up(registry, tmp_path, tiny_dit):
    source = (BASELINES / "fora.py").read_text().replace('name = "fora"', 'name = "fora-copy"')
    (tmp_path / "my_fora.py").write_text(source)
    (tmp_path / "_helper.py").write_text("raise RuntimeError('helpers are not plugins')\n")
    assert load_plugins(tmp_path) == ["fora-copy"]
    assert "fora-copy" in available_methods()
    outs = []
    for name in ("fora", "fora-copy"):
        with attach(tiny_dit, name, "ddim10", interval=2) as engine:
            gens = sample_generators(0, range(2))
            outs.append(generate(tiny_dit, engine.sampler, draw_labels(gens, 10), gens,
                                 step_listener=engine.step_listener, clip_denoised=True))
        assert engine.summary()["full_steps"] == 6  # i = 9, then i even: 8, 6, 4, 2, 0
    assert torch.equal(*outs)



def test_readme_example_is_a_working_plugin(registry, tmp_path):
    readme = (BASELINES / "README.md").read_text()
    code = re.search(r"```python\n(\"\"\".*?)```", readme, re.S).group(1)
    (tmp_path / "every_other.py").write_text(code)
    assert load_plugins(tmp_path) == ["every-other"]
    method = get_method("every-other", interval=3)
    assert method.branch_action(1, 0, "mlp").__class__.__name__ == "Reuse"
    assert method.branch_action(3, 0, "mlp").__class__.__name__ == "Compute"


@pytest.mark.parametrize("body, reason", [
    ("import tokencache_no_such_module\n", "ModuleNotFoundError: No module named 'tokencache_no_such_module'"),
    ("def broken(:\n", "SyntaxError"),
    ("x = 1\n", "registers no method"),
])
def test_a_broken_plugin_is_one_line_naming_file_and_reason(registry, tmp_path, body, reason):
    (tmp_path / "broken.py").write_text(body)
    with pytest.raises(PluginError) as info:
        load_plugins(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "broken.py") in message and reason in message


def test_a_name_cannot_be_taken_twice(registry, tmp_path):
    (tmp_path / "again.py").write_text((BASELINES / "fora.py").read_text())
    with pytest.raises(PluginError, match="registered twice"):
        load_plugins(tmp_path)
    assert methods.describe_methods() and Path(methods._source(methods._REGISTRY["fora"])) == BASELINES / "fora.py"


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
    ("steps", {}, "steps: give exactly one of num_steps and fraction"),
    ("l2c", {"threshold": "high", "router": "r.pt"}, "l2c: parameter threshold must be float, got 'high'"),
])
def test_parameter_errors_are_one_line(name, params, message):
    with pytest.raises(ValueError) as info:
        get_method(name, **params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parameters_are_typed_and_converted():
    toca = get_method("toca", fresh_ratio=1, interval=4)
    assert toca.fresh_ratio == 1.0 and isinstance(toca.fresh_ratio, float)
    assert get_method("fora").params() == {"interval": 3}


def test_describe_methods_is_json():
    described = {m["name"]: m for m in json.loads(json.dumps(describe_methods()))}
    assert described["fora"]["params"] == [{"name": "interval", "type": "int", "default": 3,
                                            "doc": "N: full where the step index i (counting down) is divisible by N (official: 3)",
                                            "range": "1 … ∞"}]
    toca = {p["name"]: p for p in described["toca"]["params"]}
    assert toca["fresh_ratio"]["default"] == 0.07 and toca["interval"]["type"] == "int | None"
    assert all(m["doc"] for m in described.values())
