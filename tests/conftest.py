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

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Send the tests that share a module-scoped fixture to one worker (`--dist loadgroup`).

    Such a fixture (a trained run, say) is made once per worker that needs it; in one group
    it is made once. A test that names its own `xdist_group` keeps it.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, defs in (info.name2fixturedefs.items() if info else ())
                        if defs and defs[-1].scope == "module")
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared[0]}"))
