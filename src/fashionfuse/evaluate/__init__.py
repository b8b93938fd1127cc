"""Evaluation stage: lm-evaluation-harness scoring and the comparison table."""

from .harness import EvalError, evaluate

__all__ = ["evaluate", "EvalError"]
