"""Atomic checkpoint publishing, shared by plain and compressed (``sparse_format``) saves.

Everything is written into a temporary folder next to the target first; `publish_directory` then swaps the
finished folder in with two renames, carrying over the user's own files (anything that is not a weight file or
a file the new save rewrote). A crash half-way leaves the previous checkpoint as it was, and weight files of an
older save that the new one does not produce (e.g. ``model.safetensors`` when the new save is sharded) are
dropped so ``from_pretrained`` cannot pick up stale weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..report import REPORT_FILE

logger = logging.getLogger("hf_prune")

_WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "adapter_model")


def is_weight_file(name: str) -> bool:
    """True for safetensors/bin weight files and their shard indexes."""
    return name.startswith(_WEIGHT_FILE_PREFIXES) and (".safetensors" in name or ".bin" in name)


def publish_directory(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished checkpoint folder ``tmp`` to ``out`` atomically, keeping the user's other files."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; pass a folder path")
    produced = {p.name for p in tmp.iterdir()}
    dropped = []
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
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    if dropped:
        logger.warning("replaced old weight files in %s: %s", out, dropped)
    shutil.rmtree(backup, ignore_errors=True)


def atomic_save_pretrained(
    save_fn: Callable[..., Any], model: Any, save_directory: str | os.PathLike, *args: Any,
    finalize: Callable[[Any, Path], None] | None = None, **kwargs: Any
) -> Any:
    """Call ``save_fn(model, tmpdir, ...)``, add ``pruning_report.json`` if the model carries a report from
    `hf_prune.prune`, run ``finalize(model, tmpdir)`` if given (e.g. add the structured-pruning modeling file),
    and publish the folder to ``save_directory`` with `publish_directory`."""
    out = Path(save_directory).resolve()
    if out.is_file():
        raise FileExistsError(f"save_directory={str(out)!r} is a file; pass a folder path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        result = save_fn(model, str(tmp), *args, **kwargs)
        report = getattr(model, "_hf_prune_report", None)
        if report is not None:
            report.save(tmp)
        if finalize is not None:
            finalize(model, tmp)
        publish_directory(tmp, out)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
