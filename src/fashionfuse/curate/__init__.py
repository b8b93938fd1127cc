"""Curation stage: readers, filters, splitting, statistics."""

from .pipeline import CurationError, curate

__all__ = ["curate", "CurationError"]
