"""Test-session setup that must happen before JAX initialises its backends, which is why
it lives in conftest.py (imported by pytest before any test module):

- every test gets 8 fake CPU devices, so sharding tests run on any machine;
- compiled programs go to a persistent compilation cache in a fresh directory for this
  session, shared with the subprocesses the tests start (training runs that are killed and
  resumed, the two-process run, the notebooks' kernels): a program they compile again is
  read back instead, which roughly halves a resumed run's start-up. The directory starts
  empty, so the cache only reuses what this session compiled, and is removed at exit.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="deltal-jax-test-compile-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Most test programs compile in well under the default 1 s threshold.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_collection_modifyitems(items):
    """Runs the files holding slow tests first (a stable sort keeps every file's own
    order). With `-n 2 --dist=loadfile` (the README's command) each worker then starts on a
    long file and the short ones fill in behind, instead of the longest file starting last
    and running on alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
