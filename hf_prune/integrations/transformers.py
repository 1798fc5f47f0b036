"""transformers integration: ``PreTrainedModel.prune``, a ``save_pretrained`` that is atomic, writes the
pruning report and the model card (`hf_prune.card`), refuses half-pruned models and accepts ``sparse_format=``, a
``push_to_hub`` that uploads exactly what that save writes, and the load hook that builds structurally pruned
checkpoints with their per-layer shapes (`hf_prune.structure.loading`).

Installed once when `hf_prune` is imported; `uninstall()` restores transformers' originals.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ..core.distributed import is_main_process, world
from ..errors import IncompletePruningError
from .hub import HUB_KWARGS, push_folder, upload_folder

logger = logging.getLogger("hf_prune")

_ORIGINAL_SAVE = PreTrainedModel.save_pretrained
_ORIGINAL_PUSH = PreTrainedModel.push_to_hub
_INSTALLED = False


def _save_pretrained(self: PreTrainedModel, save_directory: str | os.PathLike, *args: Any,
                     sparse_format: str | None = None, **kwargs: Any) -> Any:
    if not is_main_process():  # data-parallel pruning: every rank holds the same model; rank 0 writes it
        logger.info("hf_prune: rank %d skips save_pretrained(%s); rank 0 writes it", world().rank, save_directory)
        return None
    if getattr(self, "_hf_prune_incomplete", False):
        raise IncompletePruningError(
            "refusing to save: this model was left partially pruned by a failed hf_prune run; reload and prune again"
        )
    if sparse_format not in (None, "dense"):
        try:
            from ..formats import save_sparse_pretrained
        except ImportError as exc:  # pragma: no cover - formats ship with hf_prune
            raise ImportError(f"sparse_format={sparse_format!r} needs hf_prune.formats ({exc})") from exc
        if args:
            raise TypeError("save_pretrained(..., sparse_format=...) takes keyword arguments only after save_directory")
        return save_sparse_pretrained(self, save_directory, sparse_format, **kwargs)
    if not getattr(self, "_hf_prune_report", None) and not _is_pruned(self) and not _is_structured(self):
        return _ORIGINAL_SAVE(self, save_directory, *args, **kwargs)
    from ..io import atomic_save_pretrained

    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    push = bool(hub.pop("push_to_hub", False))
    out = atomic_save_pretrained(_ORIGINAL_SAVE, self, save_directory, *args, finalize=_finalize, **kwargs)
    if push:
        # Upload the finished folder, so the report, the trust_remote_code file and auto_map go up with the weights
        # (transformers' own push would upload before hf_prune's files are written).
        upload_folder(save_directory, hub, token=kwargs.get("token"))
    return out


def _finalize(model: PreTrainedModel, folder: Path) -> None:
    """Last files of a pruned checkpoint: the structured-pruning modeling file and ``auto_map``, then the card
    (written last, so it sees every other file; a failure to write it never loses the checkpoint)."""
    from ..card import write_model_card
    from ..structure.loading import finalize_checkpoint

    finalize_checkpoint(model, folder)
    try:
        write_model_card(folder, model)
    except Exception as exc:  # noqa: BLE001 - the card documents the checkpoint; it must not cost the save
        import logging

        logging.getLogger("hf_prune").warning("could not write the model card into %s: %s", folder, exc)


def _push_to_hub(self: PreTrainedModel, repo_id: str, *, commit_message: str | None = None,
                 commit_description: str | None = None, private: bool | None = None,
                 token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                 max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                 sparse_format: str | None = None) -> Any:
    """``model.push_to_hub(repo_id)``: for a pruned model, save with hf_prune into a temporary folder (weights,
    report, model card and plot, the ``trust_remote_code`` file) and upload that folder as one commit
    (`hf_prune.integrations.hub.push_folder`); the generated card replaces the repo's ``README.md``. Other models
    go to transformers' own ``push_to_hub``."""
    if sparse_format in (None, "dense") and not getattr(self, "_hf_prune_report", None) and not _is_pruned(self) \
            and not _is_structured(self):
        return _ORIGINAL_PUSH(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                              private=private, token=token, revision=revision, create_pr=create_pr,
                              max_shard_size=max_shard_size, tags=tags)
    with tempfile.TemporaryDirectory(prefix="hf_prune-push-") as tmp:
        folder = Path(tmp) / repo_id.rsplit("/", 1)[-1]
        self.save_pretrained(folder, max_shard_size=max_shard_size,
                             **({"sparse_format": sparse_format} if sparse_format else {}))
        return push_folder(folder, repo_id, private=private, commit_message=commit_message,
                           commit_description=commit_description, revision=revision, create_pr=create_pr,
                           token=token, tags=tags)


def _is_pruned(model: PreTrainedModel) -> bool:
    return bool(getattr(getattr(model, "config", None), "pruning_config", None))


def _is_structured(model: PreTrainedModel) -> bool:
    """Structurally pruned: per-layer shapes (hf_prune_structure) or a model loaded through the remote-code class."""
    from ..structure.config_io import is_structured

    return is_structured(getattr(model, "config", None)) or type(model).__name__.startswith("HfPrune")


def _model_prune(self: PreTrainedModel, config: Any = None, calibration: Any = None, tokenizer: Any = None,
                 **kwargs: Any) -> Any:
    """``model.prune(config, calibration=..., tokenizer=...)``: same as `hf_prune.prune(model, ...)`."""
    from ..api import prune

    return prune(self, config, calibration, tokenizer, **kwargs)


def install() -> None:
    """Add ``prune`` to every transformers model and wrap ``save_pretrained`` and ``push_to_hub`` (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    PreTrainedModel.prune = _model_prune  # type: ignore[attr-defined]
    PreTrainedModel.save_pretrained = functools.wraps(_ORIGINAL_SAVE)(_save_pretrained)  # type: ignore[method-assign]
    PreTrainedModel.push_to_hub = functools.wraps(_ORIGINAL_PUSH)(_push_to_hub)  # type: ignore[method-assign]
    from ..structure import loading

    loading.install()  # build structurally pruned checkpoints with their per-layer shapes
    _INSTALLED = True


def uninstall() -> None:
    """Undo `install()`."""
    global _INSTALLED
    if hasattr(PreTrainedModel, "prune"):
        del PreTrainedModel.prune  # type: ignore[attr-defined]
    PreTrainedModel.save_pretrained = _ORIGINAL_SAVE  # type: ignore[method-assign]
    PreTrainedModel.push_to_hub = _ORIGINAL_PUSH  # type: ignore[method-assign]
    from ..structure import loading

    loading.uninstall()
    _INSTALLED = False
