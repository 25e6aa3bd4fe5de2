"""Run every test on 8 fake CPU devices; this must happen before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Commands started by the tests compile afresh (tests/test_compile_cache.py turns it on).
os.environ["JAXDIST_COMPILATION_CACHE"] = "off"
