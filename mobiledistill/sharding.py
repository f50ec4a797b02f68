"""Mesh construction, parameter partition rules and multi-host initialisation (SPEC §8).

One code path for 1 CPU device, 8 forced CPU devices, a GPU and a TPU pod: a `('data', 'fsdp')` mesh, the batch
split over both axes, parameters replicated or (FSDP) split along one dimension over 'fsdp'.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes (TPU pod or explicit coordinator)."""
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    on_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if (explicit or on_pod) and not jax.distributed.is_initialized():
        if explicit:
            jax.distributed.initialize(coordinator_address=explicit,
                                       num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                       process_id=int(os.environ["JAX_PROCESS_ID"]))
        else:
            jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; -1 for `data` takes what `fsdp` leaves."""
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not equal the device count {n}")
    # Auto axes: XLA's sharding propagation places the activations; the code never annotates intermediates.
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(shape, mesh: Mesh, min_size: int = 2 ** 14) -> NamedSharding:
    """FSDP rule: split the largest dimension divisible by the 'fsdp' size; small tensors stay replicated."""
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(tree, mesh: Mesh):
    """Shardings for every array leaf of a tree (parameters or optimizer state)."""
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), tree)
