"""JAX's persistent compilation cache: a resumed run reuses its compiled steps.

Compiling GPT-2's train step takes tens of seconds on a GPU; without a cache every resume
(after a preemption, say) pays it again. The CLI turns the cache on by default, in
`$JAXDIST_COMPILATION_CACHE` if set, else `$XDG_CACHE_HOME/jaxdist/xla` (by default
`~/.cache/jaxdist/xla`); `--compilation-cache DIR` chooses another folder and
`--compilation-cache off` none. In Python, call `enable_compilation_cache()` before the first
compile. Entries are keyed by the program, the devices and the jax/jaxlib version, so a
shared folder (e.g. on NFS, for every host of a run) is safe.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

from jaxdist.base.errors import UserError

ENV = "JAXDIST_COMPILATION_CACHE"
OFF = "off"

_counts = {"hits": 0, "misses": 0}
_counts_lock = threading.Lock()
_listening = False


def default_cache_dir() -> Path | None:
    """`$JAXDIST_COMPILATION_CACHE` (`off`: none), else `$XDG_CACHE_HOME/jaxdist/xla`."""
    chosen = os.environ.get(ENV)
    if chosen:
        return None if chosen == OFF else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxdist" / "xla"


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Cache compiled programs in `path` (default: `default_cache_dir()`); return it.

    Every program is cached however quickly it compiled, so that a CPU run caches too.
    `path="off"` turns nothing on and returns None. Call before the first compile.
    """
    if path is not None and not str(path).strip():
        raise UserError("the compilation cache folder is empty; give a folder, or off")
    if path is None:
        folder = default_cache_dir()
    elif str(path) == OFF:
        folder = None
    else:
        folder = Path(path).expanduser()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the compilation cache {folder} ({error.strerror}); "
                        f"choose a writable folder with --compilation-cache DIR (or ${ENV}), "
                        f"or turn it off with --compilation-cache off") from None
    import jax

    # An entry that cannot be written (a full disk) or read (torn by a process killed while
    # writing it, or being written by another process right now) costs only a compile: jax
    # checks each entry as it decompresses it and compiles afresh when that fails. It warns
    # once per program, which would bury the line that says what failed.
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache")
    warnings.filterwarnings("ignore", message="Error reading persistent compilation cache")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _listen()
    return folder


def cache_counts() -> dict[str, int]:
    """How many compiles were answered from the persistent cache so far, and how many not."""
    with _counts_lock:
        return dict(_counts)


def _listen() -> None:
    global _listening
    if _listening:
        return
    from jax import monitoring

    def count(event: str, **_: object) -> None:
        key = {"/jax/compilation_cache/cache_hits": "hits",
               "/jax/compilation_cache/cache_misses": "misses"}.get(event)
        if key is not None:
            with _counts_lock:
                _counts[key] += 1

    monitoring.register_event_listener(count)
    _listening = True


class FirstStepTimer:
    """Times a run's first step, compiling included, and says where its programs came from."""

    def __init__(self) -> None:
        self.pending = True
        self._started = time.perf_counter()
        self._counts = cache_counts()

    def report(self, outputs: object) -> str:
        """Wait for the first step's `outputs`; one line on how long it took (only once)."""
        import jax

        jax.block_until_ready(outputs)
        self.pending = False
        seconds = time.perf_counter() - self._started
        line = f"first step (compiling included) took {seconds:.2f} s"
        folder = jax.config.jax_compilation_cache_dir
        if folder:
            now = cache_counts()
            hits = now["hits"] - self._counts["hits"]
            misses = now["misses"] - self._counts["misses"]
            line += (f"; compilation cache {folder}: {hits} program(s) reused, {misses} "
                     f"compiled")
        return line
