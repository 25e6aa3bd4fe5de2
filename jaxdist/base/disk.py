"""Disk trouble in words: a full disk, a file-size limit or a quota, foreseen or met.

Callers use these at call time (`disk.lacking_room(...)`), so a test may replace one.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path

DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file-size "
               "limit was reached", errno.EDQUOT: "the disk quota was reached"}


def lacking_room(folder: Path, size: int) -> str | None:
    """Why `size` bytes of state will not fit in `folder` (free space, file-size limit)."""
    if shutil.disk_usage(folder).free < size + (16 << 20):
        return DISK_ERRORS[errno.ENOSPC]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < size:
        return DISK_ERRORS[errno.EFBIG]
    return None


def disk_error(error: BaseException) -> str | None:
    """Words for a full disk, file-size limit or quota anywhere in `error`'s chain, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return DISK_ERRORS[error.errno]
        # orbax and tensorstore re-raise an OSError as a ValueError (or their own type)
        # whose text alone keeps the system's words for it.
        text = str(error)
        for code, words in DISK_ERRORS.items():
            if os.strerror(code) in text:
                return words
        error = error.__cause__ or error.__context__
    return None


def fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries to the disk, so that a rename into it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
