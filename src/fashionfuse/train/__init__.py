"""Training stage: QLoRA adapters, one per curated dataset."""

from .trainer import TrainingError, train_adapters

__all__ = ["train_adapters", "TrainingError"]
