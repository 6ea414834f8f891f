"""memplan: exact GPU memory plans for fine-tuning large language models."""

__version__ = "0.1.0"
