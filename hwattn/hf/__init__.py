"""Hugging Face `transformers` integration.

Checkpoints carry their own modeling code (`modeling_hwattn.py`, named by `auto_map` in
config.json), so without hwattn

    model = transformers.AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

and with hwattn imported the same classes are registered with the Auto classes, so
`trust_remote_code` is not needed. `import hwattn` calls `install()`: if transformers is
already imported the classes are registered at once; if it is merely installed, a one-shot
import hook registers them right after the first `import transformers`, so `import hwattn`
itself never pays for importing transformers (several seconds).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

_registered = False


def register() -> bool:
    """Register `HwattnConfig` / `HwattnForCausalLM` with the transformers Auto classes."""
    global _registered
    if _registered:
        return True
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hwattn.models.modeling_hwattn import HwattnConfig, HwattnForCausalLM

    AutoConfig.register("hwattn", HwattnConfig, exist_ok=True)
    AutoModelForCausalLM.register(HwattnConfig, HwattnForCausalLM, exist_ok=True)
    AutoModel.register(HwattnConfig, HwattnForCausalLM, exist_ok=True)
    _registered = True
    return True


def _register_quietly() -> None:
    try:
        register()
    except Exception as err:  # a transformers we cannot serve must not break its import
        warnings.warn(f"hwattn: could not register with transformers: {err}", stacklevel=2)


class _AfterImport(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TransformersHook)]
        _register_quietly()


class _TransformersHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the top-level `transformers` package. It
    stays installed until that loader has run: libraries often call
    `importlib.util.find_spec("transformers")` only to ask whether it is installed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" or fullname in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterImport(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers is imported; else on its first import, if installed."""
    if "transformers" in sys.modules:
        _register_quietly()
    elif any(isinstance(f, _TransformersHook) for f in sys.meta_path):
        return
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _TransformersHook())
