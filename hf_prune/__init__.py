"""hf_prune: prune any Hugging Face transformers model."""

__version__ = "0.1.0"
