"""How arrays are laid out over devices and hosts.

resnet_jax's data-parallel step is `jax.jit` over a one-axis device mesh (`data`), with the global
batch sharded along that axis (`PartitionSpec("data")`) and everything else replicated
(`PartitionSpec()`). It is the current form of a pmapped step: XLA's SPMD partitioner inserts the
all-reduce of the gradients that `lax.pmean` wrote by hand, and a mean over the batch axis —
BatchNorm's statistics included — is the mean over the *global* batch, with no `axis_name` to
thread through the model. One program serves one CPU, one GPU, or every chip of a pod.

Multi-host runs call `initialize_distributed()` first; each process then feeds the part of the
global batch that lives on its own devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run when launched as one (flags, or a cluster's environment).

  With no arguments, JAX's own cluster detection (SLURM, TPU pods, Open MPI, ...) decides; a
  single process started by hand stays single, and so does a SLURM job step of one task (each
  task of a sweep's array), which has no peers to find. On CPU the processes talk through gloo.
  """
  explicit = num_processes is not None and num_processes > 1
  detected = (any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE",
                                            "TPU_WORKER_HOSTNAMES"))
              or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1)
  if not (explicit or detected):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh() -> Mesh:
  """A one-axis mesh over every device of every process.

  The axis is `Auto`: the compiler propagates shardings from the inputs and the few constraints
  we place, as under pmap-era GSPMD, rather than tracking them in the types (`Explicit`).
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the mesh's `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_replicated(tree, mesh: Mesh):
  """Places a host pytree, identical on every process, on every device."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def to_host(tree):
  """Fetches replicated arrays as numpy, on every process (no cross-host transfer needed)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
