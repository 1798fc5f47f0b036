"""Writing files and checkpoints atomically.

* `hf_prune.io.atomic`: the package's one atomic writer (`atomic_write_text`, `atomic_write_bytes`,
  `atomic_write`, and `atomic_directory` for folders); imports nothing else from hf_prune.
* `hf_prune.io.save`: the one checkpoint-writing path (`save_checkpoint`), used for plain HF checkpoints
  (dense safetensors with exact zeros + ``pruning_config`` in config.json + ``pruning_report.json``) and, by
  `hf_prune.formats`, for compressed ones.
"""

from .atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text
from .save import atomic_save_pretrained, is_weight_file, publish_directory, save_checkpoint

__all__ = [
    "atomic_directory",
    "atomic_save_pretrained",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_weight_file",
    "publish_directory",
    "save_checkpoint",
]
