"""Every test process sees 8 fake CPU devices; single-device tests build a 1-device mesh.

One XLA compilation cache serves the whole session: many tests train the same tiny trial, and
each train.run (or subprocess) builds fresh jitted functions, so without it every test compiled
the same steps again. It lives in a temporary directory of this session (nothing carries over
between runs, so a test run never depends on an earlier one) and reaches subprocesses through
the environment (scaling.main has its own --compilation_cache)."""
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="scaling-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  # Writing an entry costs milliseconds; only trivial compilations are not worth it.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
else:
  _SESSION_CACHE = None   # the caller's cache: theirs to keep


def pytest_sessionfinish(session, exitstatus):
  # pytest-xdist's workers inherit the controller's cache directory (through the environment),
  # so they share it and only the controller, which made it, removes it after them.
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
