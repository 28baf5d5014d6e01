"""Gives every test process 2 CPU devices, so sharding runs on a real (host) mesh in every test,
and a test marked `devices(n)` a process of its own with n (8 for the claims about a pod-sized
mesh); one persistent compilation cache, so that the many tiny runs (in-process and in
subprocesses, which inherit the environment) compile each program once; and XLA's backend (LLVM)
optimisations off (--xla_backend_optimization_level=0): compilation is most of the suite's time,
the tiny runs execute few steps, which run nearly as fast (the convolutions are library calls),
and no test is about the optimised machine code. Both sides of every comparison compile alike, so
bitwise claims hold; rounding may differ from the default build's, one more rounding the
tolerances must survive. A level given in XLA_FLAGS stands (=2 runs the suite on the default
build).

Why 2 devices and not 8: on two cores, eight host devices make every program an 8-way partitioned
one, every step eight device threads, and every Orbax save a copy from each device, which slows
every run for no claim that two devices do not test as well.

XLA reads XLA_FLAGS once, when jax first initialises its backends, and jax reads its JAX_*
variables when it is imported; pytest imports this file before any test module, hence first.
A cached executable is the program a fresh compilation makes, so bitwise comparisons hold.
"""

import fcntl
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# Set in the process that runs a `devices(n)` test (see pytest_pyfunc_call).
DEVICES = int(os.environ.get("RESNET_JAX_TEST_DEVICES", "2"))


def xla_flags(devices: int) -> str:
  """This session's XLA flags (an ISA limit, say) with `devices` CPU devices per process."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES_FLAG)]
  return " ".join([*flags, f"{_DEVICES_FLAG}={devices}"])


os.environ["XLA_FLAGS"] = xla_flags(DEVICES)
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
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


# How the suite is shared among pytest-xdist's workers (--dist loadgroup): a module's tests stay
# on one worker, so its module fixtures (trained runs, a scheduler's jobs) are built once, except
# in these modules, whose tests are many, long and share only cheap fixtures: they go to
# whichever worker is free, one by one, so no one module holds the suite's end.
SPREAD_MODULES = ("test_faults", "test_sweep", "test_train", "test_curvature",
                  "test_steps_per_call")
# The modules with the longest work start first (the largest jobs first leave the small ones to
# fill the workers' ends); the others follow in file order.
FIRST_MODULES = ("test_slurm", "test_population", "test_faults", "test_sweep", "test_curvature",
                 "test_train", "test_steps_per_call", "test_multiprocess", "test_landscape")


# First: xdist's worker adds the group to each test's id in its own hook of this name, which
# otherwise runs before this one and finds no group (every test then went to any worker).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(FIRST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # Stable: file order within.
  for item in items:
    if item.path.stem not in SPREAD_MODULES:
      item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "devices(n): runs in a pytest process of its own with n CPU devices (the suite's "
      "processes have 2)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """A `devices(n)` test, where this process has another count, runs again in a child pytest
  with n devices (its fixtures built there); its result is the child's."""
  marker = pyfuncitem.get_closest_marker("devices")
  if marker is None or marker.args[0] == DEVICES:
    return None
  devices = marker.args[0]
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), RESNET_JAX_TEST_DEVICES=str(devices))
  child = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
       "--no-header", f"{pyfuncitem.path}::{pyfuncitem.name}"],  # The id without its @group.
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=900)
  if child.returncode != 0:
    pytest.fail(f"with {devices} devices, in a process of its own:\n{child.stdout[-6000:]}"
                f"{child.stderr[-3000:]}", pytrace=False)
  assert " passed" in child.stdout.splitlines()[-1], child.stdout[-2000:]
  return True
