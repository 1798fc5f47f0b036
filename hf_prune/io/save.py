"""The one checkpoint-writing path, shared by plain (dense with exact zeros) and compressed (``sparse_format``)
saves.

`save_checkpoint` writes everything into one temporary folder next to the target (`atomic_directory`);
`publish_directory` then swaps the finished folder in with two renames, carrying over the user's own files
(anything that is not a weight file or a file the new save rewrote). A crash half-way leaves the previous
checkpoint as it was, and weight files of an older save that the new one does not produce (e.g.
``model.safetensors`` when the new save is sharded) are dropped so ``from_pretrained`` cannot pick up stale
weights. A save that runs inside another one (``hf_prune.formats.save_sparse_pretrained`` calls the patched
``save_pretrained`` on the compressed model) writes straight into the outer temporary folder: one folder, one
publish.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from .atomic import atomic_directory, replace_directory

__all__ = ["save_checkpoint", "atomic_save_pretrained", "publish_directory", "is_weight_file"]

logger = logging.getLogger("hf_prune")


#: the report file written next to the weights (`hf_prune.report.Report.save`)
REPORT_FILE = "pruning_report.json"

_WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "adapter_model")


def is_weight_file(name: str) -> bool:
    """True for safetensors/bin weight files and their shard indexes.

    Example:
        >>> is_weight_file("model-00001-of-00002.safetensors"), is_weight_file("tokenizer.json")
        (True, False)
    """
    return name.startswith(_WEIGHT_FILE_PREFIXES) and (".safetensors" in name or ".bin" in name)


def publish_directory(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished checkpoint folder ``tmp`` to ``out`` atomically, keeping the user's other files."""

    tmp, out = Path(tmp), Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; pass a folder path")
    dropped = []
    if out.exists():
        produced = {p.name for p in tmp.iterdir()}
        for p in out.iterdir():
            if p.name in produced:
                continue
            if is_weight_file(p.name) or p.name == REPORT_FILE:  # stale weights or a report of another model
                dropped.append(p.name)
                continue
            dest = tmp / p.name
            if p.is_dir():
                shutil.copytree(p, dest, symlinks=True)
            else:
                shutil.copy2(p, dest, follow_symlinks=False)
    replace_directory(tmp, out)
    if dropped:
        logger.warning("replaced old weight files in %s: %s", out, dropped)


def save_checkpoint(
    save_fn: Callable[..., Any],
    model: Any,
    save_directory: str | os.PathLike,
    *args: Any,
    prepare: AbstractContextManager[Any] | None = None,
    finalize: Callable[[Any, Path], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Write one checkpoint atomically and return what ``save_fn`` returned.

    Steps, all inside one temporary folder beside ``save_directory``: enter ``prepare`` (a context manager
    that temporarily rewrites the model for the save, e.g. swaps in compressed layers; it is exited, and the
    model restored, before anything else runs), call ``save_fn(model, tmpdir, *args, **kwargs)``, run
    ``finalize(model, tmpdir)`` if given, then publish the folder once with `publish_directory`.
    """
    out = Path(save_directory).resolve()
    if out.is_file():
        raise FileExistsError(f"save_directory={str(out)!r} is a file; pass a folder path")
    with atomic_directory(out, publish=publish_directory) as folder:
        with prepare if prepare is not None else nullcontext():
            result = save_fn(model, str(folder), *args, **kwargs)
        if finalize is not None:
            finalize(model, folder)
    return result


def atomic_save_pretrained(
    save_fn: Callable[..., Any], model: Any, save_directory: str | os.PathLike, *args: Any,
    finalize: Callable[[Any, Path], None] | None = None, **kwargs: Any
) -> Any:
    """`save_checkpoint` for a pruned model: call ``save_fn(model, tmpdir, ...)``, add ``pruning_report.json``
    if the model carries a report from `hf_prune.prune`, run ``finalize(model, tmpdir)`` if given (e.g. add
    the structured-pruning modeling file), and publish the folder to ``save_directory``."""

    def finish(model: Any, folder: Path) -> None:
        report = getattr(model, "_hf_prune_report", None)
        if report is not None:
            report.save(folder)
        if finalize is not None:
            finalize(model, folder)

    return save_checkpoint(save_fn, model, save_directory, *args, finalize=finish, **kwargs)
