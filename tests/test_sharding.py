"""ZeRO-0 to ZeRO-3 on fake CPU devices, and the mesh / rule building blocks.

The multi-device cases run this file as a script in subprocesses (the device count is fixed
when jax starts): each child builds the tiny digits model through `trainer_lib.make_trainer` at some
ZeRO settings, measures the created state's shards, trains a few steps on fixed synthetic
batches and writes losses, parameters and byte counts to an .npz that the tests compare.
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from helpers import ROOT, load_config  # tests/ is on sys.path, as a script too
from swinv2_jax import sharding

STEPS = 3
GLOBAL_BATCH = 16
# Which ZeRO settings each device count trains (the 1-device run is the reference).
RUNS = {1: (0,), 2: (0,), 8: (1, 2, 3)}
ACCUM_DEVICES = (1, 8)  # gradient accumulation vs one big step, on these device counts
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ---------------------------------------------------------------------------------------------
# Child: one device count, several ZeRO settings.
# ---------------------------------------------------------------------------------------------
def _tiny_config():
  c = load_config("digits.py", "tiny")
  # One model level of two blocks (a shifted window pair): compiles fastest on 2 cores.
  c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (2,), (1,)
  c.finetune.pretrained_window_sizes = 4
  c.finetune.batch_size = GLOBAL_BATCH
  c.finetune.drop_path_rate = 0.1  # the step draws random numbers: they must not depend on sharding
  c.finetune.init = "scratch"
  # Peak lr 1e-2 from the first step: parameters move ~1e-2, far beyond the 1e-5 tolerance.
  c.finetune.base_lr, c.finetune.warmup_steps = 0.32, 0
  return c


def _state_bytes_per_device(tree) -> int:
  """The most bytes any one device holds of `tree`, from the arrays' real shards."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def _total_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _child(num_devices: int, zeros: tuple[int, ...], train_zeros: tuple[int, ...], out: str):
  from swinv2_jax import trainer as trainer_lib  # after XLA_FLAGS took effect (the parent set it)

  assert jax.device_count() == num_devices, jax.devices()
  config = _tiny_config()
  task = trainer_lib.finetune_task(config, num_classes=10)
  data = np.random.default_rng(0)
  batches = [dict(image=data.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
                  label=data.integers(0, 10, size=(GLOBAL_BATCH,)).astype(np.int32))
             for _ in range(STEPS)]
  results = {}
  for zero in zeros:
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
    # min_sharded_size=0: the tiny model's leaves are all below the production threshold.
    layout = sharding.Layout(mesh, zero=zero, rules=config.mesh.rules,
                                 min_sharded_size=0)
    trainer = trainer_lib.make_trainer(config, task, layout)
    state = trainer.init()
    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    for part in ("params", "opt_state"):
      results[f"z{zero}/{part}/total"] = _total_bytes(abstract[part])
      results[f"z{zero}/{part}/held"] = _state_bytes_per_device(state[part])
      results[f"z{zero}/{part}/planned"] = sharding.per_device_bytes(abstract[part],
                                                                      shardings[part])
    results[f"z{zero}/grads/planned"] = sharding.per_device_bytes(
        abstract["params"], layout.grads(abstract["params"]))
    if zero not in train_zeros:
      continue
    rng = jax.jit(lambda: jax.random.key(1), out_shardings=layout.replicated())()
    # The step exactly as the main job compiles it (ahead of time, under the mesh).
    step = trainer_lib.compile_step(trainer, trainer_lib.trainer_batch(config, trainer))
    results[f"z{zero}/init_params"] = _flat(state["params"])
    losses = []
    for local in batches:
      batch = sharding.global_microbatches(local, layout, trainer.accum_steps)
      state, metrics = step(state, batch, rng)
      losses.append(float(metrics["loss"]))
    results[f"z{zero}/loss"] = np.array(losses)
    results[f"z{zero}/params"] = _flat(state["params"])

  if num_devices in ACCUM_DEVICES:
    results.update(_accumulation(config, num_devices))

  if num_devices == 8:
    # -1 takes the devices left over, in any position.
    results["mesh_shapes"] = json.dumps([
        list(sharding.make_mesh(("a", "b"), shape).devices.shape)
        for shape in ((2, -1), (-1, 2), (8, -1))])
    # The production threshold on a real model: SwinV2-T's abstract state (nothing allocated).
    from swinv2_jax import config as config_lib
    c = config_lib.base_config()
    c.mesh.zero, c.finetune.init = 3, "scratch"
    task = trainer_lib.finetune_task(c, 1000)
    trainer = trainer_lib.make_trainer(c, task, trainer_lib.make_layout(c))
    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    results["swinv2_tiny/total"] = sum(_total_bytes(abstract[k]) for k in ("params", "opt_state"))
    results["swinv2_tiny/planned"] = sum(sharding.per_device_bytes(abstract[k], shardings[k])
                                         for k in ("params", "opt_state"))
  np.savez(out, **results)


def _accumulation(config, num_devices: int) -> dict:
  """One step of 8 images per device vs 4 microbatches of 2, at ZeRO 1 and 3 (mixup off,
  drop path 0, so the two see the same function of the same images); and the compiled
  accumulating step's collectives, none of which may carry image-shaped data."""
  from swinv2_jax import trainer as trainer_lib
  config = config.copy_and_resolve_references()
  config.finetune.drop_path_rate = 0.0
  config.finetune.batch_size = 8 * num_devices
  config.finetune.base_lr = 1e-3 * 512 / config.finetune.batch_size  # lr 1e-3 on any count
  task = trainer_lib.finetune_task(config, num_classes=10)
  data = np.random.default_rng(1)
  batches = [dict(image=data.normal(size=(8 * num_devices, 32, 32, 3)).astype(np.float32),
                  label=data.integers(0, 10, size=(8 * num_devices,)).astype(np.int32))
             for _ in range(2)]
  out = {}
  for zero in (1, 3):
    for accum in (1, 4):
      mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
      layout = sharding.Layout(mesh, zero=zero, rules=config.mesh.rules,
                               min_sharded_size=0)
      trainer = trainer_lib.make_trainer(config, task, layout, accum_steps=accum)
      step = trainer_lib.compile_step(trainer, trainer_lib.trainer_batch(config, trainer))
      if accum > 1:
        out[f"accum/z{zero}/hlo_collectives"] = json.dumps(_collective_shapes(step.as_text()))
      state = trainer.init()
      state["params"] = _trained_post_norms(state["params"])
      out[f"accum/z{zero}/a{accum}/init"] = _flat(state["params"])
      rng = jax.jit(lambda: jax.random.key(1), out_shardings=layout.replicated())()
      losses = []
      for local in batches:
        batch = sharding.global_microbatches(local, layout, accum)
        state, metrics = step(state, batch, rng)
        losses.append(float(metrics["loss"]))
      out[f"accum/z{zero}/a{accum}/loss"] = np.array(losses)
      out[f"accum/z{zero}/a{accum}/params"] = _flat(state["params"])
      for moment in ("mu", "nu"):  # Adam's running sums of the gradients (and squares)
        out[f"accum/z{zero}/a{accum}/{moment}"] = _flat(_moment(state["opt_state"], moment))
  return out


def _trained_post_norms(params):
  """The blocks' res-post-norms at scale 1, as after training: at their zero init the blocks
  get exactly zero gradients at the first step, which would make their part of the
  comparison trivial."""
  def set_scale(path, leaf):
    name = sharding.path_string(path)
    if any(f"{n}.scale" in name for n in ("norm1", "norm2")):
      return jax.device_put(np.ones(leaf.shape, leaf.dtype), leaf.sharding)
    return leaf
  return jax.tree_util.tree_map_with_path(set_scale, params)


def _moment(opt_state, name: str) -> list:
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if f".{name}." in "." + sharding.path_string(path) + "."]


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _collective_shapes(hlo: str) -> list[str]:
  """The result shapes of every collective in an optimised HLO module."""
  shapes = []
  for line in hlo.splitlines():
    if "=" not in line:
      continue
    lhs, rhs = line.split("=", 1)
    op = rhs.strip().split("(")[0].split(" ")[-1]
    if any(op.startswith(c) for c in COLLECTIVES):
      shapes.append(rhs.strip().split(" ")[0] + " " + op)
  return shapes


# ---------------------------------------------------------------------------------------------
# Parent: start the children together (two cores: they overlap their compiles), compare.
# ---------------------------------------------------------------------------------------------
def child_env(num_devices: int) -> dict:
  env = dict(os.environ)
  # Cheap LLVM code generation: compiling dominates these runs, 3x faster on 2 cores.
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), FAST_COMPILE,
                               f"--xla_force_host_platform_device_count={num_devices}"]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  # Children share the suite's compilation cache (tests/conftest.py) across runs.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{device count: npz contents}, from one child per device count run side by side."""
  out_dir = tmp_path_factory.mktemp("zero")
  children = {}
  for n, train_zeros in RUNS.items():
    zeros = (0, 1, 2, 3) if n == 8 else train_zeros
    cmd = [sys.executable, os.path.abspath(__file__), "--devices", str(n),
           "--zeros", ",".join(map(str, zeros)),
           "--train-zeros", ",".join(map(str, train_zeros)),
           "--out", str(out_dir / f"{n}.npz")]
    children[n] = subprocess.Popen(cmd, env=child_env(n), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
  failed = []
  for n, child in children.items():
    log, _ = child.communicate(timeout=600)
    if child.returncode:
      failed.append(f"--- {n} devices, exit {child.returncode}:\n{log[-4000:]}")
  assert not failed, "\n".join(failed)
  return {n: dict(np.load(out_dir / f"{n}.npz")) for n in RUNS}


def _ratio(run, key, zero):
  """Bytes one device holds relative to an even split over 8 devices."""
  return run[f"z{zero}/{key}/held"] / (run[f"z{zero}/{key}/total"] / 8)


def test_each_zero_setting_holds_the_expected_share_per_device(runs):
  run = runs[8]
  for zero in (0, 1, 2, 3):
    for key in ("params", "opt_state"):  # the created arrays hold what the layout says
      assert run[f"z{zero}/{key}/held"] == run[f"z{zero}/{key}/planned"], (zero, key)
  both = lambda z: ((run[f"z{z}/params/held"] + run[f"z{z}/opt_state/held"]) /
                    ((run[f"z{z}/params/total"] + run[f"z{z}/opt_state/total"]) / 8))
  # ZeRO 0: everything whole on every device.
  assert _ratio(run, "params", 0) == 8 and _ratio(run, "opt_state", 0) == 8
  # ZeRO 1 and 2: the optimizer state split 8 ways, the parameters whole.
  for zero in (1, 2):
    assert _ratio(run, "params", zero) == 8
    assert 1 <= _ratio(run, "opt_state", zero) <= 1.05, _ratio(run, "opt_state", zero)
  # ZeRO 2 also plans the gradients split; ZeRO 3 the parameters as well.
  assert run["z1/grads/planned"] == run["z1/params/total"]
  assert run["z2/grads/planned"] <= 1.05 * run["z2/params/total"] / 8
  assert 1 <= both(3) <= 1.05, both(3)
  # The production threshold (small leaves replicate) still splits a real model evenly.
  real = run["swinv2_tiny/planned"] / (run["swinv2_tiny/total"] / 8)
  assert 1 <= real <= 1.05, real


def test_training_is_identical_at_every_zero_and_device_count(runs):
  reference = runs[1]
  assert np.all(np.isfinite(reference["z0/loss"]))
  assert np.ptp(reference["z0/params"]) > 0
  for n, zeros in RUNS.items():
    for zero in zeros:
      got = runs[n]
      np.testing.assert_allclose(got[f"z{zero}/loss"], reference["z0/loss"], rtol=0, atol=1e-5,
                                 err_msg=f"loss, {n} devices, ZeRO {zero}")
      np.testing.assert_allclose(got[f"z{zero}/params"], reference["z0/params"], rtol=0,
                                 atol=1e-5, err_msg=f"params, {n} devices, ZeRO {zero}")
  # The steps moved the parameters well beyond the tolerance, so the comparison has teeth.
  assert np.max(np.abs(reference["z0/params"] - reference["z0/init_params"])) > 1e-3


def test_accumulated_microbatches_equal_one_large_step(runs):
  """4 microbatches of 2 images per device == one step of 8, on 1 and 8 devices at ZeRO 1
  and 3, to float32 rounding (the sums are reassociated): the loss, Adam's moments (the
  accumulated gradients as the optimizer saw them) and the parameters after two updates.

  Adam's update is m / sqrt(v): its relative error is the gradient's, and a small gradient's
  rounding is relative to the largest terms of its sum. At lr 1e-3 (an update of up to 1e-3
  per step) the 2e-6 on the parameters asks the updates to agree to 0.2% of their size."""
  for n in ACCUM_DEVICES:
    for zero in (1, 3):
      got = lambda a, what: runs[n][f"accum/z{zero}/a{a}/{what}"]
      where = f"{n} devices, ZeRO {zero}"
      np.testing.assert_allclose(got(4, "loss"), got(1, "loss"), rtol=2e-6,
                                 err_msg=f"loss, {where}")
      for moment in ("mu", "nu"):
        scale = np.max(np.abs(got(1, moment)))
        np.testing.assert_allclose(got(4, moment), got(1, moment), rtol=0, atol=1e-5 * scale,
                                   err_msg=f"{moment}, {where}")
      np.testing.assert_allclose(got(4, "params"), got(1, "params"), rtol=0, atol=2e-6,
                                 err_msg=f"params, {where}")
      # The two updates moved the parameters far beyond that tolerance.
      assert np.max(np.abs(got(1, "params") - got(1, "init"))) > 1e-3


def test_accumulating_step_moves_no_image_between_devices(runs):
  """The host lays out (accum, microbatch) so each device already holds its images: the
  compiled 8-device step has collectives (gradient reductions, ZeRO-3 gathers), but none of
  them carries image-shaped data (..., 32, 32, 3)."""
  for zero in (1, 3):
    shapes = json.loads(str(runs[8][f"accum/z{zero}/hlo_collectives"]))
    assert shapes, "an 8-device step without collectives: the check would be vacuous"
    assert not [s for s in shapes if "32,32,3]" in s], shapes
    assert not [s for s in shapes if "all-to-all" in s], shapes


def test_make_mesh_rejects_bad_shapes():
  with pytest.raises(ValueError, match="differ in length"):
    sharding.make_mesh(("data",), (1, 1))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh(("a", "b"), (-1, -1))
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(("a", "b"), (3, -1), devices=list(range(8)))
  with pytest.raises(ValueError, match="needs 4 devices, 8 are available"):
    sharding.make_mesh(("a", "b"), (2, 2), devices=list(range(8)))


def test_make_mesh_fills_minus_one(runs):
  assert json.loads(str(runs[8]["mesh_shapes"])) == [[2, 4], [4, 2], [8, 1]]


MESH = AbstractMesh((8, 2), ("data", "model"))


def test_auto_spec_shards_the_largest_divisible_dimension():
  assert sharding.auto_spec((24, 4096), ("data",), MESH) == P(None, "data")
  assert sharding.auto_spec((4096, 4100), ("data",), MESH) == P("data", None)  # 4100 % 8 != 0
  assert sharding.auto_spec((64, 64, 8), ("data",), MESH) == P("data", None, None)  # tie: first
  assert sharding.auto_spec((64, 4096), ("data", "model"), MESH) == P(None, ("data", "model"))
  assert sharding.auto_spec((4099, 7), ("data",), MESH) == P()  # nothing divisible


def test_auto_spec_replicates_tiny_leaves():
  small = (8, sharding.MIN_SHARDED_SIZE // 8 - 8)
  assert sharding.auto_spec(small, ("data",), MESH) == P()
  assert sharding.auto_spec(small, ("data",), MESH, min_size=0) == P(None, "data")
  assert sharding.auto_spec((8, sharding.MIN_SHARDED_SIZE // 8), ("data",), MESH) == P(
      None, "data")
  assert sharding.auto_spec((4096,), ("data",), AbstractMesh((1,), ("data",))) == P()


def test_rules_map_paths_to_specs_first_match_wins():
  rules = [(r".*\.attn\.qkv\.kernel", (None, "model")), (r".*norm.*", "replicate"),
           (r"head\..*", "auto"), (r".*", "replicate")]
  spec = lambda path, shape: sharding.spec_for(path, shape, rules, ("data",), MESH)
  assert spec("layers.0.attn.qkv.kernel", (96, 288)) == P(None, "model")
  assert spec("layers.0.norm1.scale", (4096,)) == P()
  assert spec("head.kernel", (768, 1000)) == P(None, "data")
  assert spec("patch_embed.kernel", (4096, 96)) == P()
  assert sharding.spec_for("x", (4096,), [], ("data",), MESH) == P()  # no rule: replicate


def test_rule_with_a_wrong_number_of_entries_is_an_error():
  with pytest.raises(ValueError, match="one entry per dimension"):
    sharding.spec_for("layers.0.attn.qkv.kernel", (1, 96, 288),
                      [(r".*qkv.*", (None, "model"))], ("data",), MESH)


def test_a_parameter_rule_also_shards_that_parameters_adam_moments():
  r"""optax states are named tuples: their paths read `1.0.mu.head.kernel`, which a rule
  anchored on the parameter path (`head\..*`) must still reach."""
  import optax
  mesh = sharding.make_mesh(("data",), (-1,))
  rules = [(r"head\.kernel", (None, "data")), (r".*", "replicate")]
  layout = sharding.Layout(mesh, zero=1, rules=rules)
  params = {"head": {"kernel": jax.ShapeDtypeStruct((64, 10), np.float32),
                     "bias": jax.ShapeDtypeStruct((10,), np.float32)},
            "stem": {"kernel": jax.ShapeDtypeStruct((64, 64), np.float32)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = jax.eval_shape(tx.init, params)
  specs = {sharding.path_string(path): s.spec for path, s in
           jax.tree_util.tree_leaves_with_path(layout.opt_state(opt_state, params))}
  moments = {p: spec for p, spec in specs.items() if p.endswith("head.kernel")}
  assert sorted(moments) == ["1.0.mu.head.kernel", "1.0.nu.head.kernel"], sorted(specs)
  assert set(moments.values()) == {P(None, "data")}
  assert all(spec == P() for p, spec in specs.items() if p not in moments), specs


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument("--zeros", required=True)
  parser.add_argument("--train-zeros", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  _child(args.devices, tuple(int(s) for s in args.zeros.split(",")),
         tuple(int(s) for s in args.train_zeros.split(",")), args.out)
