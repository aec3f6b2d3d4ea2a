"""Gives every test 8 fake CPU devices so sharding tests run on any machine.

The flags must be set before JAX initialises its backends, which is why this lives in
conftest.py (imported by pytest before any test module).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
