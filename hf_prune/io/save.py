"""Atomic ``save_pretrained``: write into a temporary folder next to the target, then move files in.

A crash half-way never leaves a mix of old and new weight files, and weight files of an older save that
the new one does not produce (e.g. ``model.safetensors`` when the new save is sharded) are removed so
``from_pretrained`` cannot pick up stale weights.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from ..report import REPORT_FILE

_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def atomic_save_pretrained(
    save_fn: Callable[..., Any], model: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
) -> Any:
    """Call ``save_fn(model, tmpdir, ...)`` and move its files into ``save_directory``.

    Also writes ``pruning_report.json`` when the model carries a report from `hf_prune.prune`.
    """
    target = os.fspath(save_directory)
    if os.path.isfile(target):
        raise FileExistsError(f"save_directory={target!r} is a file; pass a folder path")
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf_prune-save-", dir=parent)
    try:
        result = save_fn(model, tmp, *args, **kwargs)
        report = getattr(model, "_hf_prune_report", None)
        if report is not None:
            report.save(tmp)
        os.makedirs(target, exist_ok=True)
        new_files = set(os.listdir(tmp))
        for name in os.listdir(target):
            if name not in new_files and (_WEIGHT_FILE.match(name) or name == REPORT_FILE):
                os.unlink(os.path.join(target, name))
        for name in new_files:
            src, dst = os.path.join(tmp, name), os.path.join(target, name)
            if os.path.isdir(src):
                if os.path.isdir(dst):
                    shutil.rmtree(dst)
                os.replace(src, dst)
            else:
                os.replace(src, dst)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
