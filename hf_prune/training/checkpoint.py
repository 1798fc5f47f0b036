"""Pruning state inside Trainer checkpoints: ``hf_prune_masks.safetensors`` + ``hf_prune_state.json``.

Both files are written to a temporary name in the checkpoint folder and renamed into place, so a crash
mid-save never leaves a half-written state that a resume would trust.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import HfPruneError
from ..io.atomic import atomic_write, atomic_write_text

MASKS_FILE = "hf_prune_masks.safetensors"
STATE_FILE = "hf_prune_state.json"
FORMAT_VERSION = 1


class MissingPruningStateError(HfPruneError, RuntimeError):
    """A resumed run's checkpoint has no (or incompatible) hf_prune mask state."""


def save_state(folder: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the tensors (masks as uint8) and the JSON metadata into ``folder`` atomically."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    flat = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v).detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(os.path.join(folder, MASKS_FILE), lambda tmp: save_file(flat, tmp))
    text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True)
    atomic_write_text(os.path.join(folder, STATE_FILE), text)


def has_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MASKS_FILE)) and os.path.isfile(os.path.join(folder, STATE_FILE))


def load_state(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what `save_state` wrote; raise `MissingPruningStateError` if it is not there."""
    from safetensors.torch import load_file

    if not has_state(folder):
        raise MissingPruningStateError(
            f"resuming from {folder}, but it holds no pruning state ({MASKS_FILE} and {STATE_FILE}): the checkpoint "
            "was not written by a Trainer with hf_prune.PruningCallback. Start a fresh run, or pass "
            "PruningCallback(..., on_missing_state='from_weights') to rebuild the masks from the zeros in the weights"
        )
    with open(os.path.join(folder, STATE_FILE)) as fh:
        meta = json.load(fh)
    if meta.get("format_version") != FORMAT_VERSION:
        raise MissingPruningStateError(
            f"{folder}/{STATE_FILE} has format_version={meta.get('format_version')!r}; this hf_prune reads {FORMAT_VERSION}"
        )
    return load_file(os.path.join(folder, MASKS_FILE)), meta
