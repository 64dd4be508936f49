"""The OpenAI-compatible HTTP server (`hwattn serve`): FastAPI routes over an engine that
runs in a background thread."""

from hwattn.server.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "build_app"]


def __getattr__(name):
    if name == "build_app":  # needs fastapi; import only when asked
        from hwattn.server.app import build_app

        return build_app
    raise AttributeError(name)
