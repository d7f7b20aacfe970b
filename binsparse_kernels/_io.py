"""Crash-safe file writes: a checkpoint is either the old file or the new one, never half of one."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Callable


_TMP_SUFFIX = ".tmp"


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files that ``atomic_write(path, ...)`` calls left behind when their process was
    killed before the rename (a KeyboardInterrupt or an exception removes its own)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(glob.escape(path.name) + "*" + _TMP_SUFFIX) if p.is_file())


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``; it is fsynced and renamed over ``path``.

    A crash (or KeyboardInterrupt) before the rename leaves ``path`` as it was and removes the
    temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=_TMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); give the mode open() would
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (not possible on every platform / filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
