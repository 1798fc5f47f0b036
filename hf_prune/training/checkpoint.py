"""Pruning state inside Trainer checkpoints: ``hf_prune_masks.safetensors`` + ``hf_prune_state.json``.

Both files are written to a temporary name in the checkpoint folder and renamed into place, so a crash
mid-save never leaves a half-written state that a resume would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from ..errors import HfPruneError

MASKS_FILE = "hf_prune_masks.safetensors"
STATE_FILE = "hf_prune_state.json"
FORMAT_VERSION = 1


class MissingPruningStateError(HfPruneError, RuntimeError):
    """A resumed run's checkpoint has no (or incompatible) hf_prune mask state."""


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state(folder: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the tensors (masks as uint8) and the JSON metadata into ``folder`` atomically."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    flat = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v).detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(os.path.join(folder, MASKS_FILE), lambda tmp: save_file(flat, tmp))
    text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True)

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    _atomic(os.path.join(folder, STATE_FILE), write_json)


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
