"""Makes `lm_eval --model hwattn ...` work on the command line.

lm-evaluation-harness (0.4.x) looks model names up in its registry, which code outside
lm_eval can only fill by being imported first, and its command line imports nothing of ours:
it has no plugin entry points for models. So hwattn installs `hwattn-lm-eval.pth` next to
itself in site-packages; at interpreter start-up it calls `install()`, which only puts an
import hook on `sys.meta_path` (it imports neither torch, nor lm_eval, nor hwattn). When
`lm_eval.api.registry` is first imported, the hook registers "hwattn" as a lazy placeholder
for `hwattn.eval.lm_eval_adapter:HwattnLM`; hwattn itself is imported only if that model is
asked for. This module lives outside the `hwattn` package because importing anything under
`hwattn` imports torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

MODEL_NAME = "hwattn"
TARGET = "hwattn.eval.lm_eval_adapter:HwattnLM"
REGISTRY = "lm_eval.api.registry"


def register(registry) -> None:
    """Add the "hwattn" placeholder to lm-eval's model registry (the module `registry`)."""
    models = getattr(registry, "model_registry", None)
    if models is None:
        raise RuntimeError("`lm_eval --model hwattn` needs lm-eval >= 0.4.10 (its lazy model "
                           "registry); from Python, pass hwattn.eval.lm_eval_adapter.HwattnLM")
    # lm-eval fills its built-in names only into an empty registry, on first lookup; load them
    # first so that adding ours does not hide "hf", "vllm", ... .
    import lm_eval.models  # noqa: F401

    if MODEL_NAME not in models:
        models.register(MODEL_NAME, target=TARGET)


class _RegisterAfterLoading(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_data, ... of the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegistryHook)]
        try:
            register(module)
        except Exception as err:  # an lm-eval we do not understand must still import
            warnings.warn(f"hwattn: could not register the hwattn model with lm-eval: {err}",
                          stacklevel=2)


class _RegistryHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of `lm_eval.api.registry`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY or fullname in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


def install() -> None:
    """Register now if lm-eval's registry is loaded, else right after it is."""
    if REGISTRY in sys.modules:
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())
