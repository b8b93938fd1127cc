"""Fusion-weight search stage (imported lazily: the config checks names in `registry` without
loading torch or optuna)."""

from __future__ import annotations

__all__ = ["search_weights", "SearchError"]


def __getattr__(name: str):
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
