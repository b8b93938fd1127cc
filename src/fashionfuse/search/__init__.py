"""Fusion-weight search stage."""

from .pipeline import SearchError, search_weights

__all__ = ["search_weights", "SearchError"]
