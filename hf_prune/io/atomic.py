"""Atomic writes: a file or a whole folder is written under a temporary name beside its target and renamed
into place, so a crash half-way never leaves a half-written file where a reader would trust it.

The one implementation for the package (reports, checkpoints, caches, trainer state). It imports nothing
from hf_prune, so any module can use it.

* `atomic_write` / `atomic_write_bytes` / `atomic_write_text`: one file.
* `atomic_directory`: a folder, filled inside a ``with`` block and published on success.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> atomic_write_text(os.path.join(d, "a", "note.txt"), "hello")
    >>> open(os.path.join(d, "a", "note.txt")).read(), os.listdir(os.path.join(d, "a"))
    ('hello', ['note.txt'])
    >>> with atomic_directory(os.path.join(d, "ckpt")) as tmp:
    ...     atomic_write_text(tmp / "config.json", "{}")
    >>> sorted(os.listdir(d))
    ['a', 'ckpt']
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_directory", "replace_directory"]

# Temporary folders that an `atomic_directory` block is filling right now (resolved paths).
_FILLING: set[Path] = set()


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask (mkstemp/mkdtemp create private 0600/0700 paths)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``.

    The parent folder is created if needed; the file gets the permissions a plain ``open(path, "w")`` would
    give. If ``write`` raises, the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> atomic_write(p, lambda tmp: Path(tmp).write_bytes(b"ab"))
        >>> open(p, "rb").read()
        b'ab'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _umask_mode(0o666))
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write`).

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> atomic_write_text(p, "{}"); open(p).read()
        '{}'
    """
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def replace_directory(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Default publish step of `atomic_directory`: rename ``tmp`` to ``out``, replacing an existing ``out``."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike, publish: Callable[[Path, Path], None] = replace_directory
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an exception, call
    ``publish(tmp, target)`` to move it into place. The temporary folder is removed in every case.

    Nesting writes in place: when ``target`` is itself a folder that an enclosing `atomic_directory` block is
    filling, the block gets ``target`` as it is (it is not visible yet) and nothing is published twice.
    """
    out = Path(target).resolve()
    if out in _FILLING:
        yield out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)).resolve()
    _FILLING.add(tmp)
    try:
        os.chmod(tmp, _umask_mode(0o777))  # the published folder gets a plain mkdir's permissions
        yield tmp
        publish(tmp, out)
    finally:
        _FILLING.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
