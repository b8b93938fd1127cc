"""fashionfuse: multiple LoRA-adapter fusion fine-tuning."""

__version__ = "0.1.0"
