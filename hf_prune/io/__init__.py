"""Saving pruned models: plain HF checkpoints (dense safetensors with exact zeros + ``pruning_config`` in
config.json + ``pruning_report.json``), written atomically."""

from .save import atomic_save_pretrained, is_weight_file, publish_directory

__all__ = ["atomic_save_pretrained", "is_weight_file", "publish_directory"]
