"""Sharding as data: a device mesh from config, path rules -> partition specs, ZeRO-0 to ZeRO-3.

ZeRO over the data-parallel devices (Rajbhandari et al.; paper section 3.5), `mesh.zero` = N for
ZeRO-N (DeepSpeed calls N a "stage"; here "stage" is a training stage only):
  0: parameters, gradients and optimizer state replicated;
  1: optimizer state sharded;
  2: optimizer state and gradients sharded (the gradient all-reduce becomes a reduce-scatter);
  3: also the parameters (FSDP): stored sharded, gathered by XLA where used, never stored whole.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# A parameter smaller than this stays replicated: sharding it saves nothing worth a collective.
MIN_SHARDED_SIZE = 2**14
AUTO = "auto"


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """A mesh with named axes; one size of -1 takes the devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(axes) != len(shape):
    raise ValueError(f"mesh.axes {tuple(axes)} and mesh.shape {tuple(shape)} differ in length")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)}: at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"{len(devices)} are available")
  return jax.make_mesh(tuple(shape), tuple(axes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes), devices=devices)


def _key_name(k) -> str:
  # DictKey .key, SequenceKey .idx, GetAttrKey .name (optax's named-tuple states).
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_string(path) -> str:
  return ".".join(_key_name(k) for k in path)


def auto_spec(shape: Sequence[int], axes: tuple[str, ...], mesh: jax.sharding.Mesh,
              min_size: int = MIN_SHARDED_SIZE) -> P:
  """Shards the largest dimension divisible by the product of `axes`; tiny leaves replicate."""
  size = math.prod(mesh.shape[a] for a in axes)
  if size == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % size == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda d: (shape[d], -d))
  spec = [None] * len(shape)
  spec[best] = axes if len(axes) > 1 else axes[0]
  return P(*spec)


def spec_for(path: str, shape: Sequence[int], rules: Sequence[tuple[str, Any]],
             axes: tuple[str, ...], mesh: jax.sharding.Mesh,
             min_size: int = MIN_SHARDED_SIZE) -> P:
  """First rule whose regex matches the parameter path: 'auto', 'replicate' or a spec tuple."""
  for pattern, tactic in rules:
    if re.fullmatch(pattern, path):
      if tactic == AUTO:
        return auto_spec(shape, axes, mesh, min_size)
      if tactic == "replicate":
        return P()
      spec = tuple(tactic)
      if len(spec) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} gives {spec} for {path} of shape "
                         f"{tuple(shape)}: one entry per dimension is needed")
      return P(*spec)
  return P()


def tree_specs(tree, rules, axes, mesh, min_size: int = MIN_SHARDED_SIZE):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: spec_for(path_string(p), x.shape, rules, axes, mesh, min_size), tree)


class Layout:
  """Shardings of parameters, gradients and optimizer state for one ZeRO setting (`zero` 0-3)."""

  def __init__(self, mesh: jax.sharding.Mesh, *, zero: int, rules, data_axes=None,
               min_sharded_size: int = MIN_SHARDED_SIZE):
    if zero not in (0, 1, 2, 3):
      raise ValueError(f"mesh.zero must be 0, 1, 2 or 3, got {zero}")
    self.mesh = mesh
    self.zero = zero
    self.rules = [tuple(r) for r in rules]
    self.data_axes = tuple(data_axes or mesh.axis_names)
    # 'auto' leaves below this many elements replicate (0 shards all: tiny test models).
    self.min_sharded_size = min_sharded_size

  def _sharded(self, tree):
    specs = tree_specs(tree, self.rules, self.data_axes, self.mesh, self.min_sharded_size)
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def _replicated(self, tree):
    return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), tree)

  def params(self, params):
    return self._sharded(params) if self.zero >= 3 else self._replicated(params)

  def grads(self, params):
    return self._sharded(params) if self.zero >= 2 else self.params(params)

  def opt_state(self, opt_state, params=None):
    """Optimizer-state shardings. A leaf that mirrors a parameter (Adam's mu and nu, an EMA)
    is sharded by the rules as that parameter's path, so a rule written for `head.*` also
    splits the head's moments; other leaves (counts) by their own path."""
    if self.zero < 1:
      return self._replicated(opt_state)
    param_paths = {}
    if params is not None:
      for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        param_paths[tuple(_key_name(k) for k in path)] = leaf.shape

    def spec(path, leaf):
      names = tuple(_key_name(k) for k in path)
      for start in range(len(names)):
        if param_paths.get(names[start:]) == leaf.shape:
          names = names[start:]
          break
      return NamedSharding(self.mesh, spec_for(".".join(names), leaf.shape, self.rules,
                                               self.data_axes, self.mesh,
                                               self.min_sharded_size))

    return jax.tree_util.tree_map_with_path(spec, opt_state)

  def batch(self, ndim: int = 1) -> NamedSharding:
    """The batch dimension is split over every data-parallel axis."""
    return NamedSharding(self.mesh, P(self.data_axes, *([None] * (ndim - 1))))

  def microbatches(self, ndim: int = 2) -> NamedSharding:
    """(accum_steps, microbatch, ...): each microbatch is split over every data-parallel axis."""
    return NamedSharding(self.mesh, P(None, self.data_axes, *([None] * (ndim - 2))))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (abstract arrays) under `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    shard = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def global_batch(local: dict, sharding_for) -> dict:
  """Assembles the global batch from each process's local numpy share."""
  return {k: jax.make_array_from_process_local_data(sharding_for(v.ndim), v)
          for k, v in local.items()}


def global_microbatches(local: dict, layout: Layout, accum_steps: int) -> dict:
  """The global batch as the step takes it, (accum_steps, microbatch, ...).

  Each process's rows are cut into `accum_steps` consecutive pieces: piece k goes to
  microbatch k on this process's own devices, so no image moves between devices.
  """
  out = {}
  for k, v in local.items():
    pieces = v.reshape((accum_steps, v.shape[0] // accum_steps) + v.shape[1:])
    global_shape = (accum_steps, pieces.shape[1] * jax.process_count()) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(layout.microbatches(pieces.ndim), pieces,
                                                    global_shape)
  return out
