"""Lazy loading of the optional Triton kernel package ``hf_prune_kernels``.

Looked up, in order: an installed ``hf_prune_kernels`` module; the directory named by the
``HF_PRUNE_KERNELS_PATH`` environment variable (a kernel-builder ``torch-ext`` folder or the
package folder itself); the ``kernels/torch-ext`` folder of a source checkout of hf_prune. No Hub
access. Missing pieces raise an ``ImportError`` that says what to install.

Example:
    >>> from hf_prune.nn.kernels_loader import kernels_available
    >>> isinstance(kernels_available(), bool)
    True
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_kernels", "kernels_available", "kernel_search_paths"]

_PKG = "hf_prune_kernels"
_cache: dict[str, ModuleType | ImportError] = {}


def kernel_search_paths() -> list[Path]:
    """Folders that may hold the ``hf_prune_kernels`` package (env var first, then the checkout).

    Example:
        >>> all(isinstance(p, Path) for p in kernel_search_paths())
        True
    """
    paths = []
    env = os.environ.get("HF_PRUNE_KERNELS_PATH")
    if env:
        p = Path(env)
        paths.append(p.parent if p.name == _PKG else p)
    paths.append(Path(__file__).resolve().parents[2] / "kernels" / "torch-ext")
    return paths


def load_kernels() -> ModuleType:
    """Import and return ``hf_prune_kernels``; raise ``ImportError`` saying what to install.

    Example:
        >>> try:
        ...     k = load_kernels()
        ... except ImportError as e:
        ...     k = None
    """
    hit = _cache.get(_PKG)
    if isinstance(hit, ModuleType):
        return hit
    if isinstance(hit, ImportError):
        raise hit
    if importlib.util.find_spec("triton") is None:
        err = ImportError(
            "hf_prune's sparse GPU kernels need Triton: `pip install triton` (it ships with CUDA builds of "
            "torch). Without it SparseLinear uses its pure-torch reference forward."
        )
        _cache[_PKG] = err
        raise err
    try:
        mod = importlib.import_module(_PKG)
    except ImportError:
        mod = None
        for folder in kernel_search_paths():
            if (folder / _PKG / "__init__.py").is_file():
                if str(folder) not in sys.path:
                    sys.path.insert(0, str(folder))
                mod = importlib.import_module(_PKG)
                break
        if mod is None:
            err = ImportError(
                "hf_prune_kernels not found: use a hf_prune source checkout (its kernels/torch-ext folder is "
                "found automatically) or set HF_PRUNE_KERNELS_PATH=<checkout>/kernels/torch-ext. "
                f"Searched: {[str(p) for p in kernel_search_paths()]}"
            )
            _cache[_PKG] = err
            raise err from None
    _cache[_PKG] = mod
    return mod


def kernels_available() -> bool:
    """True when :func:`load_kernels` succeeds (Triton importable and the package found).

    Example:
        >>> kernels_available() in (True, False)
        True
    """
    try:
        load_kernels()
    except ImportError:
        return False
    return True
