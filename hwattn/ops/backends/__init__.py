"""The registry of attention backends: implementations of the paged decode ops.

A backend is registered under a name with a factory that builds it (`register_backend`), or
from another package through the `hwattn.backends` entry-point group, whose entries name
factories (usually `AttentionBackend` subclasses):

    [project.entry-points."hwattn.backends"]
    mykernels = "mypkg.attention:MyBackend"

`get_backend(name, device)` returns the one instance of a backend; "auto" picks, once per
device, the registered backend of highest priority whose `auto_select(device)` is true: Hopper
(priority 20) on compute capability 9.0 GPUs, Triton (10) on other CUDA devices, PyTorch (0)
everywhere else. A backend for one GPU generation registers the way the Hopper one does:

    register_backend("hopper", factory, priority=20, auto_select=on_compute_capability((9, 0)))

To override the choice, ask for a backend by name (`LLM(..., backend="triton")`), or set
HWATTN_ATTENTION_BACKEND to the name "auto" should mean.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from hwattn.ops.backends.base import AttentionBackend
from hwattn.ops.backends.torch_backend import TorchBackend

ENTRY_POINT_GROUP = "hwattn.backends"
ENV_OVERRIDE = "HWATTN_ATTENTION_BACKEND"


@dataclass
class _Entry:
    factory: Callable[[], AttentionBackend]
    priority: int
    auto_select: Callable[[torch.device], bool] | None
    instance: AttentionBackend | None = None


_REGISTRY: dict[str, _Entry] = {}
_LOADED_ENTRY_POINTS: set[str] = set()
_AUTO: dict[tuple[str, torch.device], str] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend], *,
                     priority: int | None = None,
                     auto_select: Callable[[torch.device], bool] | None = None,
                     replace: bool = False) -> None:
    """Make a backend available as `name`.

    Args:
        factory: called without arguments, once, on first use; returns the backend. It may
            raise ImportError when what the backend needs is missing ("auto" then skips it).
        priority: order of preference for "auto" (higher first); default `factory.priority`
            or 0.
        auto_select: `f(device) -> bool`, whether "auto" may choose this backend for tensors
            on `device`; called before the factory, so it must be cheap. Default
            `factory.auto_select` if the factory has one, else never chosen automatically.
        replace: allow replacing a backend registered under the same name.
    """
    if not name or name == "auto" or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"backend name must be a word other than 'auto', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True)")
    if priority is None:
        priority = getattr(factory, "priority", 0)
    if auto_select is None:
        auto_select = getattr(factory, "auto_select", None)
    _REGISTRY[name] = _Entry(factory, priority, auto_select)
    _AUTO.clear()


def on_compute_capability(*capabilities: tuple[int, int]) -> Callable[[torch.device], bool]:
    """An `auto_select` for a backend written for some GPUs: true for CUDA devices whose compute
    capability is one of `capabilities`, e.g. `on_compute_capability((9, 0))` for Hopper."""
    def select(device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" and torch.cuda.get_device_capability(device) in capabilities
    return select


def _load_entry_points() -> None:
    """Register the `hwattn.backends` entry points not seen yet; a broken one is skipped
    with a warning rather than breaking every other backend."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _LOADED_ENTRY_POINTS or ep.name in _REGISTRY:
            continue
        _LOADED_ENTRY_POINTS.add(ep.name)
        try:
            register_backend(ep.name, ep.load())
        except Exception as err:  # noqa: BLE001 - a third-party plugin may fail in any way
            warnings.warn(f"attention backend entry point {ep.name!r} ({ep.value}) failed to "
                          f"load: {type(err).__name__}: {err}", stacklevel=2)


def backend_names() -> tuple[str, ...]:
    """Names of every registered backend (entry points included), by priority."""
    _load_entry_points()
    return tuple(sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority))


def _instance(name: str) -> AttentionBackend:
    entry = _REGISTRY[name]
    if entry.instance is None:
        backend = entry.factory()
        if not isinstance(backend, AttentionBackend):
            raise TypeError(f"backend factory for {name!r} returned {type(backend).__name__}, "
                            "not an AttentionBackend")
        entry.instance = backend
    return entry.instance


def _auto(device: torch.device) -> str:
    override = os.environ.get(ENV_OVERRIDE, "auto")
    key = (override, device)
    if key not in _AUTO:
        if override != "auto":
            get_backend(override)  # a clear error if the override names no backend
            _AUTO[key] = override
        else:
            _load_entry_points()
            for name in backend_names():
                entry = _REGISTRY[name]
                if entry.auto_select is None or not entry.auto_select(device):
                    continue
                try:
                    _instance(name)
                except ImportError:
                    continue
                _AUTO[key] = name
                break
            else:
                raise ValueError(f"no registered attention backend accepts device {device}")
    return _AUTO[key]


def get_backend(backend: str | AttentionBackend = "auto", device=None) -> AttentionBackend:
    """The backend `backend` names ("auto": chosen for `device`, default the CPU); a backend
    object is returned as it is. Raises ValueError naming the registered backends."""
    if isinstance(backend, AttentionBackend):
        return backend
    if backend == "auto":
        backend = _auto(torch.device(device) if device is not None else torch.device("cpu"))
    if backend not in _REGISTRY:
        _load_entry_points()
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}, got {backend!r}")
    return _instance(backend)


def _triton_factory() -> AttentionBackend:
    from hwattn.ops.backends.triton_backend import TritonBackend

    return TritonBackend()


def _hopper_factory() -> AttentionBackend:
    from hwattn.ops.backends.hopper_backend import HopperBackend

    return HopperBackend()


register_backend("torch", TorchBackend)
register_backend("triton", _triton_factory, priority=10,
                 auto_select=lambda device: torch.device(device).type == "cuda")
register_backend("hopper", _hopper_factory, priority=20,
                 auto_select=on_compute_capability((9, 0)))

__all__ = ["AttentionBackend", "ENTRY_POINT_GROUP", "ENV_OVERRIDE", "backend_names",
           "get_backend", "on_compute_capability", "register_backend"]
