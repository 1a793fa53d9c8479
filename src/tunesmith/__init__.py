"""tunesmith: fine-tune and pre-train language models on PyTorch's own engine."""

__version__ = "0.1.0"
