"""The frameworks users fine-tune with, without installing them (``make test-frameworks`` runs the real ones):
axolotl's plugin contract for ``sai_hf.axolotl.SGDSaIPlugin``."""

from __future__ import annotations

import importlib
import pickle
import sys
import types

import pytest
from transformers.training_args import OptimizerNames

import sai_hf.axolotl

# axolotl.integrations.base, as much of it as the contract needs: plugins subclass BasePlugin (PluginManager calls
# every BasePlugin hook on each plugin), and are loaded by load_plugin("module.Class"), built without arguments.
AXOLOTL_BASE = '''
import importlib

class BasePlugin:
    def register(self, cfg):
        pass

    def get_input_args(self):
        return None

def load_plugin(plugin_name):
    module_name, class_name = plugin_name.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)()
'''


@pytest.fixture
def axolotl_base(monkeypatch):
    """A stand-in ``axolotl.integrations.base`` in ``sys.modules``; the plugin class is rebuilt on it."""
    modules = {name: types.ModuleType(name) for name in ("axolotl", "axolotl.integrations", "axolotl.integrations.base")}
    exec(AXOLOTL_BASE, modules["axolotl.integrations.base"].__dict__)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    sai_hf.axolotl._plugin_class.cache_clear()
    yield modules["axolotl.integrations.base"]
    sai_hf.axolotl._plugin_class.cache_clear()


def test_axolotl_loads_the_plugin_by_name_and_it_registers_sgd_sai(axolotl_base):
    plugin = axolotl_base.load_plugin("sai_hf.axolotl.SGDSaIPlugin")
    assert isinstance(plugin, axolotl_base.BasePlugin)
    assert plugin.get_input_args() is None  # every other hook is BasePlugin's
    plugin.register({"optimizer": "sgd_sai", "optim_args": {"momentum": 0.9, "normalize": "max"}, "learning_rate": "2e-4"})
    assert OptimizerNames("sgd_sai") is OptimizerNames.SGD_SAI
    plugin.register({"optimizer": "adamw_torch", "optim_args": "betas=0.9"})  # other optimizers' optim_args: theirs
    plugin.register({"base_model": "x"})  # no optimizer key
    with pytest.raises(ValueError, match=r"optim_args: expected key=value,... or a mapping, got \['momentum=0.9'\]"):
        plugin.register({"optimizer": "sgd_sai", "optim_args": ["momentum=0.9"]})
    assert type(pickle.loads(pickle.dumps(plugin))) is type(plugin)
    assert importlib.import_module("sai_hf.axolotl").SGDSaIPlugin is type(plugin)  # built once


@pytest.mark.parametrize(
    "optim_args, named",
    [
        ({"momentun": 0.9}, "unknown key 'momentun'"),
        ({"momentum": 2}, r"Invalid momentum=2.0: must be in \[0, 1\)"),
        ("momentum=0.9,fused=maybe", "cannot parse fused='maybe'"),
        ("momentum=0.9,", "empty entry"),
    ],
)
def test_plugin_refuses_bad_optim_args_when_axolotl_registers_it(axolotl_base, optim_args, named):
    """register(cfg) runs before axolotl loads the data or the model: the error comes first, naming the key."""
    plugin = axolotl_base.load_plugin("sai_hf.axolotl.SGDSaIPlugin")
    with pytest.raises(ValueError, match=rf"--optim_args for sgd_sai: .*{named}"):
        plugin.register({"optimizer": "sgd_sai", "optim_args": optim_args})


def test_plugin_module_imports_without_axolotl(monkeypatch):
    monkeypatch.setitem(sys.modules, "axolotl", None)  # `import axolotl` raises ImportError
    sai_hf.axolotl._plugin_class.cache_clear()
    try:
        module = importlib.reload(sai_hf.axolotl)
        assert module.optim_args_text({"momentum": 0.9, "maximize": True}) == "momentum=0.9,maximize=True"
        with pytest.raises(ImportError, match="axolotl plugin: axolotl is not importable"):
            module.SGDSaIPlugin
        with pytest.raises(AttributeError, match="no attribute 'Other'"):
            module.Other
    finally:
        sai_hf.axolotl._plugin_class.cache_clear()
