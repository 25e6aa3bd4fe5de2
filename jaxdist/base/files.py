"""Writing files: never seen half-written, and a tool's output only inside its workdir."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from jaxdist.base.errors import UserError


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, rename it over `path`.

    Readers see the old content or the new one, never a mix; a crash leaves the old one. A
    write that fails (a full disk) leaves the old file too, and is one line (`UserError`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({error.strerror}); it is unchanged: free "
                        f"space on that disk and rerun the same command") from None


def output_folder(workdir: Path, name: str) -> Path:
    """`WORKDIR/NAME` for a tool's output, made if need be.

    Refused in one line if it is a file, or a link that leads out of the workdir.
    """
    out = Path(workdir) / name
    if out.is_symlink() and not out.resolve().is_relative_to(Path(workdir).resolve()):
        raise UserError(f"{out} is a link to {out.resolve()}, outside the workdir; remove it "
                        f"(jaxdist writes only inside the workdir)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; move it away and run again")
    try:
        out.mkdir(exist_ok=True)
    except OSError as error:
        raise UserError(f"could not make {out} ({error.strerror})") from None
    return out


def replace_inside(folder: Path, filename: str, write: Callable[[Path], object]) -> Path:
    """Write `folder/filename` by `write(path)` to a new file beside it, then rename it there.

    The rename replaces a link at that name instead of writing to where it points. The
    temporary name keeps the file's suffix (`.ATTRS.tmp-PID.png`), for writers that go by it.
    """
    folder = Path(folder).resolve()
    path = folder / filename
    if path.parent != folder or filename in (".", ".."):
        raise ValueError(f"{path} would not be inside {folder}")
    stem, suffix = os.path.splitext(filename)
    tmp = folder / f".{stem}.tmp-{os.getpid()}{suffix}"
    try:
        tmp.unlink(missing_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({error.strerror})") from None
    return path
