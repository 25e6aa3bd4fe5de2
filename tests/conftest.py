"""Run every test on 8 fake CPU devices; this must happen before jax is imported.

The commands the tests start, and the tests' own processes, share one compilation cache for
the session: a program compiled once (an experiment's step, flax's init ops) is read back by
every later command instead of compiled again. The folder is made by the first process that
imports this file (pytest's controller), inherited by its workers and commands through the
environment, and removed when that process exits. tests/test_compile_cache.py gives its
commands a folder of their own.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

_OWNER = "JAXDIST_TEST_CACHE_OWNER"
if _OWNER not in os.environ:
    _folder = tempfile.mkdtemp(prefix="jaxdist-test-xla-")
    os.environ["JAXDIST_COMPILATION_CACHE"] = _folder
    os.environ[_OWNER] = str(os.getpid())
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)

from jaxdist.loop.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
