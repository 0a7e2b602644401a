"""Multi-process start-up: `jax.distributed.initialize` from config or the environment.

Order of precedence:
  1. config.distributed.coordinator_address (+ num_processes, process_id): explicit;
  2. JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment (the
     Kubernetes and local launchers set these);
  3. a detected cluster: a multi-host TPU slice or a SLURM job with more than one task, where
     JAX finds the coordinator itself;
  otherwise one process. Must run before anything touches a device.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in tpu_hosts.split(",") if h]) > 1


def initialize(cfg) -> None:
  env = os.environ
  if cfg.coordinator_address:
    if cfg.num_processes < 1 or cfg.process_id < 0:
      raise ValueError("config.distributed: coordinator_address needs num_processes >= 1 and "
                       "process_id >= 0")
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  elif env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
