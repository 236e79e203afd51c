"""Every test process sees 8 fake CPU devices; single-device tests build a 1-device mesh.

Every test run sees a new machine's state: an empty TFDS data dir and an empty pip cache of
this session, whatever an earlier run or the user left in ~/tensorflow_datasets or ~/.cache, so
each data set a test reads is prepared (and downloaded, for 'shakespeare' and 'mnist') once per
session, as on a new machine. They reach subprocesses through the environment.

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
# pytest-xdist's workers (PYTEST_XDIST_WORKER) inherit the controller's directories, so that a
# data set is prepared once per session; the controller (or a run with -n 0) makes them, always.
if "PYTEST_XDIST_WORKER" not in os.environ:
  _NEW_MACHINE = tempfile.mkdtemp(prefix="scaling-tests-new-machine-")
  os.environ["TFDS_DATA_DIR"] = os.path.join(_NEW_MACHINE, "tensorflow_datasets")
  os.environ["PIP_CACHE_DIR"] = os.path.join(_NEW_MACHINE, "pip-cache")
else:
  _NEW_MACHINE = None


def pytest_sessionfinish(session, exitstatus):
  # Only the controller, which made them, removes them, after its workers.
  for directory in (_SESSION_CACHE, _NEW_MACHINE):
    if directory:
      shutil.rmtree(directory, ignore_errors=True)
