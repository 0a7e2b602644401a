"""Preemption: on SIGTERM every process saves at the same next step boundary, then exits 0.

Schedulers announce an eviction with SIGTERM (SLURM's scancel and preemption, Kubernetes,
Cloud TPU maintenance) and kill some seconds later. A multi-process run cannot simply save where
each process happens to be when the signal lands: the processes must agree on one step. JAX's
preemption sync manager, started by `jax.distributed.initialize`, catches SIGTERM on any
process and agrees on the step with the others; `multihost_utils.reached_preemption_sync_point`
answers True on every process at that same step. A single process catches SIGTERM itself.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


# Written by JAX's preemption sync manager (XLA's coordination service) on a notice.
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


class Preempted(Exception):
  """Raised once the preemption checkpoint has been written: the run ends with status 0."""

  def __init__(self, stage: str, step: int, directory: str, before_stage: bool = False):
    where = (f"before {stage} began (at step {step})" if before_stage else f"at step {step}; "
             f"the checkpoint of step {step} is written in {directory}")
    super().__init__(f"{stage}: preempted (SIGTERM) {where}. Rerun the same command to "
                     f"continue.")
    self.stage, self.step, self.directory = stage, step, directory


class Watch:
  """`reached(step)` after each step, on every process: True at the step to save and stop at."""

  def __init__(self):
    self._signalled = threading.Event()

  def reached(self, step: int) -> bool:
    # The sync point's id is the stage's step, as orbax's CheckpointManager gives it to the same
    # sync manager when it saves: one counter, or the two would never agree on a step.
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()

  def pending(self) -> bool:
    """Whether a notice has come, asked between stages, where no step is near; every process
    asks at the same point and all get the same answer.

    A multi-process run reads the key that JAX's preemption sync manager writes into the
    coordination service when any process is signalled (its sync point comes only with the
    next step, which may be a compile away), and the processes pool what they read.
    """
    if jax.process_count() == 1:
      return self._signalled.is_set()
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    try:
      distributed.global_state.client.key_value_try_get(NOTICE_KEY)
      noticed = True
    except Exception:  # pylint: disable=broad-except  (NOT_FOUND: no notice yet)
      noticed = False
    return bool(np.any(multihost_utils.process_allgather(np.int32(noticed))))

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._signalled.set()

  @contextlib.contextmanager
  def installed(self):
    """Catches SIGTERM while the run lasts (a single process in the main thread; JAX's own
    handler serves a multi-process run), and puts the previous handler back after."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = signal.signal(signal.SIGTERM, self._handle)
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)
