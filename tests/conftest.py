"""Gives every test process 8 CPU devices, so sharding tests run on a real (host) mesh, one
persistent compilation cache, so that the many tiny runs (in-process and in subprocesses, which
inherit the environment) compile each program once, and XLA's backend (LLVM) optimisations off
(--xla_backend_optimization_level=0): compilation is most of the suite's time, the tiny runs
execute few steps, which run nearly as fast (the convolutions are library calls), and no test
is about the optimised machine code. Both sides of every comparison compile alike, so bitwise
claims hold; rounding may differ from the default build's, one more rounding the tolerances must
survive. A level given in XLA_FLAGS stands (=2 runs the suite on the default build).

XLA reads XLA_FLAGS once, when jax first initialises its backends, and jax reads its JAX_*
variables when it is imported; pytest imports this file before any test module, hence first.
A cached executable is the program a fresh compilation makes, so bitwise comparisons hold.
"""

import fcntl
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".pytest_cache", "xla"))
# Orbax's saves compile dozens of small programs too; they are worth caching here.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

# pytest is this process's entry point: it parses no absl flags, but Grain's worker processes
# read one (see resnet_jax/stream.py), so the defaults stand as parsed.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def prepared_data_dir() -> str:
  """A TFDS data_dir holding fashion_mnist, prepared from Debian's files once for every test
  process, worker and later session (beside the compilation cache): preparing takes 10-20 s on
  two CPU cores, and a prepared dataset is never written again (prepare.prepare returns it as it
  is). The first worker to arrive prepares it; the others wait on a lock."""
  from resnet_jax import prepare  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(prepare.DEBIAN_FASHION_MNIST_DIR):
    pytest.skip("needs Fashion-MNIST's files: apt-get install dataset-fashion-mnist")
  data_dir = os.path.join(_REPO, ".pytest_cache", "tfds")
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    prepare.prepare("fashion_mnist", data_dir=data_dir)
  return data_dir


# Threads of an Orbax save in flight. A test that leaves one running (a Saver never waited for
# and closed) lets its writes race with later tests: a profiler stopping while they ran crashed
# the suite once.
_SAVE_THREADS = ("async_save", "save_finalize", "write_metadata_after_commits", "np_type_handler")


@pytest.fixture(autouse=True)
def no_save_outlives_its_test():
  yield
  import threading  # pylint: disable=g-import-not-at-top
  left = sorted(t.name for t in threading.enumerate() if t.name.startswith(_SAVE_THREADS))
  assert not left, f"checkpoint saves left running after the test: {left}"
