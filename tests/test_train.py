"""The main job end to end on a tiny model, resume, eval-only, config checks, optimizer rules."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swinv2_jax import config as config_lib
from swinv2_jax import data
from swinv2_jax import optim
from swinv2_jax import train
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import weights
from swinv2_jax.models import SwinTransformerV2

from helpers import load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, steps=8):
  """Two model levels (stride 8), 32 px digits: compiles in seconds."""
  c = load_config("digits.py", "tiny")
  c.data.data_dir = data_dir
  c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (2, 2), (1, 2)
  for stage in (c.pretrain, c.finetune):
    stage.steps, stage.warmup_steps, stage.log_every, stage.checkpoint_every = steps, 1, 1, 4
    stage.batch_size, stage.base_lr, stage.min_lr = 32, 8e-2, 1e-3
  c.pretrain.pretrained_window_sizes, c.finetune.pretrained_window_sizes = 0, 4
  c.eval.batch_size = 64
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_pretrain_finetune_eval_then_resume_and_eval_only(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  result = train.run(config, workdir)

  records = read_metrics(workdir)
  for stage in ("pretrain", "finetune"):
    losses = [r["loss"] for r in records if r["stage"] == stage]
    assert len(losses) == 8 and np.isfinite(losses).all()
    if stage == "pretrain":  # fine-tuning's descent is tested on a fixed batch below
      assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"loss did not go down: {losses}"
    assert sorted(os.listdir(os.path.join(workdir, stage, "checkpoints"))) == ["4", "8"]
    assert {"stage", "step", "loss", "lr", "grad_norm", "images_per_s"} <= set(records[0])
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved["num_examples"] == 360 and saved["checkpoint"].endswith(os.path.join("finetune",
                                                                              "checkpoints", "8"))
  assert 0 <= saved["top1"] <= saved["top5"] <= 1 and saved == result
  # Evaluation while fine-tuning (finetune.eval_every=3), logged as stage "eval".
  evals = [r for r in records if r["stage"] == "eval"]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in evals)
  best = max([(r["top1"], r["step"]) for r in evals] + [(saved["top1"], 8)],
             key=lambda p: (p[0], -p[1]))
  assert (saved["best_top1"], saved["best_step"]) == best
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))

  # A longer fine-tune on the same workdir: pretraining is complete and skipped, fine-tuning
  # resumes from its step-8 checkpoint (state and data position) and logs steps 9..12 only.
  config.finetune.steps = 12
  train.run(config, workdir)
  new = read_metrics(workdir)[len(records):]
  assert [r["step"] for r in new if r["stage"] == "finetune"] == [9, 10, 11, 12]
  assert [r["step"] for r in new if r["stage"] == "eval"] == [9, 12]
  assert not [r for r in new if r["stage"] == "pretrain"]

  config.eval_only = True
  evaluated = train.run(config, workdir)
  assert evaluated["checkpoint"].endswith(os.path.join("finetune", "checkpoints", "12"))

  # Eval-only on a parameter checkpoint written by the converter (as for official weights):
  # a model whose head always answers class 3 scores exactly the share of 3s in the test split.
  model = trainer_lib.build_classifier(config, "eval", num_classes=10)
  nnx.update(model.head, {"kernel": jnp.zeros_like(model.head.kernel[...]),
                          "bias": jnp.zeros(10).at[3].set(1.0)})
  weights.save_params(str(tmp_path / "converted"), model)
  config.eval_checkpoint = str(tmp_path / "converted")
  constant = train.run(config, str(tmp_path / "eval_only"))
  assert constant["checkpoint"] == str(tmp_path / "converted")
  threes = sum(int(np.sum((b["label"] == 3) & b["valid"])) for b in data.build_eval_iterator(
      config.data, image_size=32, global_batch_size=120))
  assert constant["top1"] == pytest.approx(threes / 360) and constant["num_examples"] == 360


def test_finetune_step_fits_a_fixed_batch(data_dir):
  """The real jitted fine-tuning step (mixup off, stochastic depth on) drives the loss down."""
  config = tiny_config(data_dir)
  config.finetune.warmup_steps, config.finetune.base_lr = 0, 2e-2
  task = trainer_lib.finetune_task(config, num_classes=10)
  trainer = trainer_lib.make_trainer(config, task, trainer_lib.make_layout(config))
  rng = np.random.default_rng(0)
  batch = dict(image=rng.normal(size=(32, 32, 32, 3)).astype(np.float32),
               label=rng.integers(0, 10, 32).astype(np.int32))
  batch = {k: v[None] for k, v in batch.items()}  # (accum_steps=1, batch, ...)
  state, key = trainer.init(), jax.random.key(0)
  losses = []
  for _ in range(10):
    state, metrics = trainer.step(state, batch, key)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.04 and np.all(np.diff(losses) < 0.01), losses


def test_ema_follows_the_parameter_trajectory(data_dir):
  """finetune.ema_decay=0.5: after each update ema = 0.5 * ema + 0.5 * new params, starting
  from the initial parameters. Recomputed in numpy from the parameters recorded after every
  step, it catches an EMA of the previous step's parameters, a swapped decay, an EMA that is
  not carried from step to step or not updated at all."""
  config = tiny_config(data_dir)
  config.model.depths, config.model.num_heads = (2,), (1,)  # one stage: compiles in seconds
  config.finetune.ema_decay, config.finetune.warmup_steps = 0.5, 0
  task = trainer_lib.finetune_task(config, num_classes=10)
  trainer = trainer_lib.make_trainer(config, task, trainer_lib.make_layout(config))
  rng = np.random.default_rng(0)
  batch = dict(image=rng.normal(size=(1, 32, 32, 32, 3)).astype(np.float32),
               label=rng.integers(0, 10, (1, 32)).astype(np.int32))
  state, key = trainer.init(), jax.random.key(0)
  flat = lambda tree: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  ema = flat(state["params"])
  np.testing.assert_array_equal(np.concatenate(flat(state["ema"])), np.concatenate(ema))
  for _ in range(3):
    state, _ = trainer.step(state, batch, key)
    params = flat(state["params"])  # read before the next step donates the state
    ema = [0.5 * e + 0.5 * p for e, p in zip(ema, params)]
  got, params = np.concatenate(flat(state["ema"])), np.concatenate(params)
  np.testing.assert_allclose(got, np.concatenate(ema), rtol=0, atol=1e-6)
  # The EMA lags the parameters by far more than that tolerance.
  assert np.max(np.abs(got - params)) > 1e-3
  # Without a decay there is no EMA copy in the state.
  config.finetune.ema_decay = 0.0
  plain = trainer_lib.make_trainer(config, task, trainer_lib.make_layout(config))
  assert "ema" not in plain.abstract_state


def test_resumed_run_continues_exactly(data_dir, tmp_path):
  """A run killed after its step-4 checkpoint and restarted == the uninterrupted run."""
  config = tiny_config(data_dir)
  config.stages = ("pretrain",)
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  straight = [r["loss"] for r in read_metrics(workdir)]

  # Undo everything after step 4, as if the process had died there.
  shutil.rmtree(os.path.join(workdir, "pretrain", "checkpoints", "8"))
  shutil.rmtree(os.path.join(workdir, "pretrain", "encoder"))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  with open(metrics_path) as f:
    first_four = f.readlines()[:4]
  with open(metrics_path, "w") as f:
    f.writelines(first_four)
  train.run(config, workdir)
  resumed = [r["loss"] for r in read_metrics(workdir)]
  assert len(resumed) == 8
  np.testing.assert_allclose(resumed, straight, rtol=1e-6)


def test_non_finite_loss_stops_with_an_actionable_message(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.stages = ("pretrain",)
  config.pretrain.base_lr, config.pretrain.clip_grad = 1e30, 0.0
  with pytest.raises(train.NonFiniteLossError, match=r"Lower pretrain.base_lr"):
    train.run(config, str(tmp_path / "nan"))


def test_skip_nonfinite_keeps_the_state_and_stops_after_k_in_a_row(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.finetune.skip_nonfinite = 2
  task = trainer_lib.finetune_task(config, num_classes=10)
  trainer = trainer_lib.make_trainer(config, task, trainer_lib.make_layout(config))
  rng = np.random.default_rng(0)
  good = dict(image=rng.normal(size=(1, 32, 32, 32, 3)).astype(np.float32),
              label=rng.integers(0, 10, (1, 32)).astype(np.int32))
  bad = dict(good, image=np.full_like(good["image"], np.nan))
  state, key = trainer.init(), jax.random.key(0)
  state, _ = trainer.step(state, good, key)
  before = jax.tree.map(np.asarray, state)
  state, metrics = trainer.step(state, bad, key)
  assert int(metrics["skipped"]) == 1 and int(metrics["skipped_in_row"]) == 1
  assert int(state["step"]) == 2  # the step (schedule, data) moves on
  for part in ("params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state[part]),
                 before[part])
  state, metrics = trainer.step(state, good, key)
  assert int(metrics["skipped"]) == 0 and int(metrics["skipped_in_row"]) == 0

  # In a run, K non-finite steps in a row stop it, naming the limit.
  config.stages = ("pretrain",)
  config.pretrain.base_lr, config.pretrain.clip_grad = 1e30, 0.0
  config.pretrain.skip_nonfinite = 2
  with pytest.raises(train.NonFiniteLossError, match=r"2 non-finite steps in a row.*"
                     r"pretrain.skip_nonfinite=2"):
    train.run(config, str(tmp_path / "skip"))
  skipped = [r["skipped"] for r in read_metrics(str(tmp_path / "skip"))]
  assert skipped and skipped[-1] == 1


def test_batch_arithmetic_is_checked_before_anything_is_written(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.finetune.batch_size, config.finetune.accum_steps = 3, 2
  with pytest.raises(config_lib.ConfigError) as error:
    train.run(config, str(tmp_path / "refused"))
  message = str(error.value)
  assert message.startswith("config.finetune.batch_size: 3 is not finetune.accum_steps=2 x "
                            "microbatch x 1 devices") and "\n" not in message
  assert not os.path.exists(tmp_path / "refused")
  with pytest.raises(config_lib.ConfigError, match=r"^config.eval.batch_size: 7 does not "
                     r"divide over 2 devices"):
    config = tiny_config(data_dir)
    config.eval.batch_size = 7
    config_lib.check_batches(config, 2)
  with pytest.raises(config_lib.ConfigError, match=r"^config.pretrain.batch_size: 32 is not "
                     r"pretrain.accum_steps=1 x microbatch x 3 devices"):
    config_lib.check_batches(tiny_config(data_dir), 3)
  config_lib.check_batches(tiny_config(data_dir), 8)  # 32 = 1 x 4 x 8, eval 64 = 8 x 8


@pytest.mark.parametrize("key,value,message", [
    ("mesh.zero", 5, "config.mesh.zero: must be 0, 1, 2 or 3"),
    ("model.dtype", "int8", "config.model.dtype: one of"),
    ("model.remat", "sometimes", "config.model.remat: 'sometimes' is not one of"),
    ("model.attention_chunks", 0, "config.model.attention_chunks: pieces must be >= 1"),
    ("model.attention_chunks", (1, 2), "config.model.attention_chunks: one int or one per "
     "model level"),
    ("pretrain.mask_ratio", 1.5, "config.pretrain.mask_ratio"),
    ("finetune.img_size", 36, "config.finetune.img_size: image height 36"),
    ("finetune.warmup_steps", 10**6, "config.finetune.warmup_steps"),
    ("stages", ("finetune", "pretrain"), "config.stages"),
    ("model.name", "swinv3", "config.model.name: unknown model"),
    ("finetune.accum_steps", 0, "config.finetune.accum_steps: must be a positive"),
    ("pretrain.accum_steps", "max", "config.pretrain.accum_steps: must be a positive"),
    ("finetune.skip_nonfinite", -1, "config.finetune.skip_nonfinite"),
    ("finetune.eval_every", -5, "config.finetune.eval_every"),
    ("plan.accelerator", "tpu9", "config.plan.accelerator: one of"),
    ("plan.mfu", 1.5, "config.plan.mfu"),
])
def test_bad_config_values_name_the_key(key, value, message):
  config = load_config("digits.py")
  section, _, leaf = key.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_per_level_setting_of_one_value_is_every_level():
  """--config.model.remat=full on a config whose remat is a tuple gives ('full',): that is
  one value for every level, in the checks and in the model."""
  config = load_config("digits.py")
  config.model.remat, config.model.attention_chunks = ("full",), (1,)
  config_lib.validate(config)
  args = config_lib.model_args(config, "finetune")
  model = nnx.eval_shape(lambda: SwinTransformerV2(**args, num_classes=10))
  assert all(level.remat == "full" for level in model.levels)


def test_unknown_config_keys_are_rejected():
  config = load_config("digits.py")
  with config.unlocked():
    config.finetune.learning_rate = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"^config.finetune.learning_rate: unknown key"):
    config_lib.validate(config)
  config_lib.validate(load_config("digits.py"))  # the shipped config itself is valid


def _official_layer_id(name, depths):
  """The official SimMIM get_swin_layer_id, on official parameter names."""
  if name == "mask_token" or name.startswith("patch_embed"):
    return 0
  parts = name.split(".")
  if parts[0] == "layers" and parts[2] == "blocks":
    return sum(depths[:int(parts[1])]) + int(parts[3]) + 1
  if parts[0] == "layers" and parts[2] == "downsample":
    return sum(depths[:int(parts[1]) + 1])
  return sum(depths) + 1


def test_layer_decay_ids_match_the_official_mapping():
  depths = (2, 2, 6, 2)
  model = nnx.eval_shape(lambda: SwinTransformerV2(img_size=64, embed_dim=16, depths=depths,
                                                   num_heads=(1, 2, 4, 8), window_size=4))
  params = nnx.to_pure_dict(nnx.state(model))
  ids = optim.layer_ids(params, depths, [s.blocks_per_group for s in model.levels])
  for s, depth in enumerate(depths):
    for k in range(depth):  # block k of stage s: group k // 2, position k % 2
      got = ids["levels"][s]["groups"]["blocks"][k % 2]["attn"]["qkv"]["kernel"][k // 2]
      assert got == _official_layer_id(f"layers.{s}.blocks.{k}.attn.qkv.weight", depths)
    if s < 3:
      assert ids["levels"][s]["downsample"]["reduction"]["kernel"] == _official_layer_id(
          f"layers.{s}.downsample.reduction.weight", depths)
  assert ids["patch_embed"]["proj"]["kernel"] == 0
  assert ids["head"]["kernel"] == ids["norm"]["scale"] == 13
  scales = optim.layer_scales(params, depths, [2, 2, 2, 2], 0.75)
  np.testing.assert_allclose(scales["patch_embed"]["proj"]["kernel"], 0.75**13)
  assert scales["levels"][2]["groups"]["blocks"][1]["mlp"]["fc1"]["kernel"].shape == (3, 1, 1)


def test_weight_decay_exemptions():
  model = nnx.eval_shape(lambda: SwinTransformerV2(img_size=64, embed_dim=16, depths=(2, 2),
                                                   num_heads=(1, 2), window_size=4))
  mask = optim.weight_decay_mask(nnx.to_pure_dict(nnx.state(model)))
  attn = mask["levels"][0]["groups"]["blocks"][0]["attn"]
  assert attn["qkv"]["kernel"] and attn["proj"]["kernel"] and mask["head"]["kernel"]
  assert not attn["cpb_mlp"]["fc1"]["kernel"] and not attn["cpb_mlp"]["fc2"]["kernel"]
  assert not attn["logit_scale"] and not attn["q_bias"] and not attn["proj"]["bias"]
  assert not mask["norm"]["scale"] and not mask["patch_embed"]["norm"]["bias"]
