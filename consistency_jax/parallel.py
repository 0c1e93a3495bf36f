"""Device mesh, shardings (data parallel and FSDP) and multi-host start-up.

The mesh has two axes, ('data', 'fsdp'). Batches split over both; parameters
and optimizer state are replicated, except that with fsdp > 1 every large
array is split along its largest dimension divisible by the fsdp size.
"""

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(force: bool, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None) -> None:
    """Calls jax.distributed.initialize() when asked or when a cluster launcher says so.

    With no coordinator given, JAX detects Cloud TPU pods, SLURM and other
    clusters itself. A coordinator address (host:port of process 0) starts a
    job by hand; then num_processes and process_id are required as well. A
    SLURM job with one task, or a plain machine, runs as a single process.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(f"Explicit multi-process start-up needs all of --coordinator_address, "
                         f"--num_processes and --process_id; got coordinator_address={coordinator_address}, "
                         f"num_processes={num_processes}, process_id={process_id}.")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}.")
    in_multitask_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    in_tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if force or coordinator_address is not None or in_multitask_slurm or in_tpu_pod:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def run_once_compiler_options() -> dict[str, Any] | None:
    """jax.jit compiler_options for a program that runs once or a few times: on CPU, no XLA optimisation passes.

    The state's initialisation and the samplers of a small evaluation compile in a
    third to a half of the time this way (the quickstart's init 5.5 -> 2.5 s,
    bit-equal params; its 1-step sampler's compile 9.8 -> 3.2 s under load, samples
    within 2e-9, 2-step within 1.2e-7). The programs run slower (that sampler 6,600
    -> 2,600 images/s), which only pays for programs that run once or on a few
    hundred images. Elsewhere None: accelerator compilers keep their defaults.
    """
    if jax.default_backend() != "cpu":
        return None
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def use_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` JAX devices (config.mesh.cpu_devices); 0 leaves XLA's default.

    XLA's one CPU device runs the many small ops of a small network one after
    another, each on one thread, so a 2-core host sat at ~1.5 busy cores; with
    one device per core the data-parallel mesh runs the batch's halves side by
    side. Only the CPU backend changes: on GPU/TPU hosts jax.devices() stays the
    accelerators. Must run before anything touches the devices. A value that is
    not a positive int is left for validate_config to report.
    """
    valid = isinstance(count, int) and not isinstance(count, bool) and count > 0
    if valid and jax.config.jax_num_cpu_devices != count:
        jax.config.update("jax_num_cpu_devices", count)


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """The ('data', 'fsdp') mesh; an axis size of -1 takes all remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = [mesh_config.data, mesh_config.fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1; got data={sizes[0]}, fsdp={sizes[1]}.")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or len(devices) % known:
        raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} does not fit {len(devices)} devices: "
                         f"the product must divide the device count (use -1 for 'all the rest').")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} uses {math.prod(sizes)} devices, "
                         f"but there are {len(devices)}; the product must equal the device count.")
    device_grid = np.asarray(devices).reshape(sizes)
    if len(devices) == jax.device_count():
        from jax.experimental import mesh_utils  # topology-aware order on TPU/GPU pods
        device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Splits the largest dimension divisible by the fsdp size; arrays under min_size stay replicated."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            return P(*([None] * dim + ["fsdp"]))
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
    """NamedShardings for every leaf of the (abstract) train state."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, fsdp_min_size)),
                        abstract_state)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    if global_batch_size % mesh.size:
        raise ValueError(f"The global batch size {global_batch_size} must divide by the number of devices "
                         f"in the mesh ({mesh.size}); choose a multiple of {mesh.size}.")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the per-process batches into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
