"""Multi-process start-up: `jax.distributed.initialize` from config or the environment.

Order of precedence:
  1. config.distributed.coordinator_address (+ num_processes, process_id): explicit; 'auto'
     leaves all three to JAX's cluster detection (Cloud TPU VMs: read from the metadata server,
     which no environment variable reveals beforehand);
  2. JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment (the
     Kubernetes and local launchers set these);
  3. a detected cluster: a multi-host GKE TPU slice or a SLURM job step with more than one task,
     where JAX finds the coordinator itself;
  otherwise one process. Must run before anything touches a device.
"""

from __future__ import annotations

import os

import jax
from absl import logging

AUTO = "auto"


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in tpu_hosts.split(",") if h]) > 1


def slurm_local_device_ids() -> list[int] | None:
  """The GPUs a SLURM task drives, where JAX's own choice would be wrong; else None.

  Left to itself JAX gives each SLURM task the one GPU numbered SLURM_LOCALID: right for one
  task per GPU when every task sees all GPUs, but out of range when SLURM binds one GPU to
  each task, and all GPUs but the first idle with one task per node.
  """
  env = os.environ
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  if len(visible) == 1:
    return [0]
  nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "0")))
  if not nodes or int(env.get("SLURM_NTASKS", "0")) != nodes:
    return None
  count = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", "0"))
  return list(range(count)) if count > 1 else None


def initialize(cfg) -> None:
  env = os.environ
  timeout = dict(heartbeat_timeout_seconds=int(cfg.heartbeat_timeout_s))
  if cfg.coordinator_address == AUTO:
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids(), **timeout)
  elif cfg.coordinator_address:
    if cfg.num_processes < 1 or cfg.process_id < 0:
      raise ValueError("config.distributed: coordinator_address needs num_processes >= 1 and "
                       "process_id >= 0")
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               **timeout)
  elif env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]), **timeout)
  elif _cluster_detected():
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids(), **timeout)
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


# ---------------------------------------------------------------------------------------------
# A lost peer.
# ---------------------------------------------------------------------------------------------
# What a collective or a coordination-service call raises when another process has died:
# gloo's and NCCL's broken connections, gRPC's UNAVAILABLE, the service's heartbeat verdict.
_PEER_FAILURE_WORDS = ("Gloo", "NCCL", "Connection reset", "Connection refused", "UNAVAILABLE",
                       "heartbeat", "coordination service", "Socket closed", "DEADLINE_EXCEEDED")


def lost_processes(error: BaseException) -> list[int] | None:
  """The processes this multi-process run has lost, when `error` looks like a lost peer's;
  None when it does not (or in a single-process run).

  Asks the coordination service which processes are alive: that answers once the service has
  given up on the dead ones (`distributed.heartbeat_timeout_s`), which bounds the wait. A
  coordinator that does not answer is itself lost: process 0 runs the service.
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  count = jax.process_count()
  if client is None or count == 1 or not any(w in str(error) for w in _PEER_FAILURE_WORDS):
    return None
  try:
    alive = client.get_live_nodes(list(range(count)))
  except Exception:  # pylint: disable=broad-except  (the service itself is gone)
    return [0]
  return sorted(set(range(count)) - set(alive))
