"""Checkpoints users make here, as the weights of another run (swinv2_jax/loading.py): a
workdir's `pretrain/encoder` as finetune.init, a fine-tune checkpoint as eval_checkpoint or
finetune.init, drop_head for every format, and what a head that does not fit says."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import loading
from swinv2_jax import train
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import weights

from test_train import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A whole run of the tiny config (the programs of tests/test_train.py and test_workdir.py:
  the compilation cache serves them): pretrain/encoder and finetune/checkpoints/{4,8}."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train.run(tiny_config(data_dir), workdir)
  return workdir


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_tree(got, want):
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def refused(config, workdir, match) -> str:
  with pytest.raises(config_lib.ConfigError, match=match) as info:
    train.run(config, workdir)
  assert "\n" not in str(info.value) and not os.path.exists(workdir)
  return str(info.value)


def test_an_encoder_export_is_a_finetune_init(trained, data_dir, tmp_path):
  encoder = os.path.join(trained, "pretrain", "encoder")
  config = tiny_config(data_dir)
  layout = trainer_lib.make_layout(config)
  config.finetune.init = "pretrain"
  from_workdir = loading.finetune_init_params(config, trained, 10, layout)
  config.finetune.init = encoder  # the same directory, named as any other parameter directory
  assert_same_tree(loading.finetune_init_params(config, str(tmp_path), 10, layout), from_workdir)
  assert "head" not in from_workdir  # the fine-tune state keeps its own head

  config.finetune.drop_head = False
  refused(config, str(tmp_path / "refused"), r"^config\.finetune\.init: .*encoder does not fit "
          r"the model \(set config\.finetune\.drop_head=True to train a new 10-class head\): it "
          r"has no classifier head$")
  config.finetune.drop_head = True
  config.stages = ("finetune",)
  train.run(config, str(tmp_path / "from_encoder"))
  assert sorted(os.listdir(tmp_path / "from_encoder" / "finetune" / "checkpoints")) == ["4", "8"]


def test_a_finetune_checkpoint_is_an_eval_checkpoint_and_a_finetune_init(trained, data_dir,
                                                                          tmp_path):
  with open(os.path.join(trained, "eval.json")) as f:
    trained_eval = json.load(f)
  checkpoints = os.path.join(trained, "finetune", "checkpoints")
  config = tiny_config(data_dir)
  config.eval_only = True
  for path in (os.path.join(checkpoints, "8"), checkpoints):  # a step, or the latest step
    config.eval_checkpoint = path
    result = train.run(config, str(tmp_path / f"eval_{os.path.basename(path)}"))
    assert result["checkpoint"] == path and result["num_examples"] == 360
    assert (result["top1"], result["top5"]) == (trained_eval["top1"], trained_eval["top5"])

  # As finetune.init (fine-tuning a fine-tune): the head is kept only without drop_head.
  layout = trainer_lib.make_layout(config)
  params = loading.load_finetune_params(config, trained, 10, layout)[0]
  config.finetune.init = os.path.join(checkpoints, "8")
  config.finetune.drop_head = False
  assert_same_tree(loading.finetune_init_params(config, str(tmp_path), 10, layout), params)
  config.finetune.drop_head = True
  without_head = {k: v for k, v in params.items() if k != "head"}
  assert_same_tree(loading.finetune_init_params(config, str(tmp_path), 10, layout), without_head)


def test_a_train_states_ema_is_evaluated_beside_its_params(data_dir, tmp_path):
  config = tiny_config(data_dir)
  model = trainer_lib.build_classifier(config, "eval", 10)
  params = trainer_lib.split_params(model)[1]
  ema = jax.tree.map(lambda a: a + 1, params)
  step = tmp_path / "checkpoints" / "3"  # a CheckpointManager step: the train state in `state`
  checkpointing.save_tree(str(step / "state"), dict(params=params, ema=ema, step=np.int32(3),
                                                    opt_state=dict(mu=params)))
  config.eval_checkpoint = str(step)
  got = loading.load_eval_params(config, str(tmp_path), 10, trainer_lib.make_layout(config))
  assert_same_tree(got[0], params)
  assert_same_tree(got[1], ema)
  assert got[2:] == (str(step), None)


def test_a_head_that_does_not_fit_says_which_key_fixes_it(trained, data_dir, tmp_path):
  config = tiny_config(data_dir)
  imagenet_head = trainer_lib.build_classifier(config, "eval", 1000)
  directory = weights.save_params(str(tmp_path / "in1k"), imagenet_head)
  file = str(tmp_path / "in1k.safetensors")
  safetensors.numpy.save_file(weights.to_pytorch_state_dict(imagenet_head), file)

  config.eval_only = True
  for path in (directory, file):  # drop_head means the same for every format
    config.eval_checkpoint = path
    message = refused(config, str(tmp_path / "eval"), r"^config\.eval_checkpoint: ")
    assert message == (
        f"config.eval_checkpoint: {path} classifies 1000 classes but data set 'digits' has 10: "
        "evaluate it on the data set it was trained on (config.data.*), or fine-tune it on "
        f"this one first (config.finetune.init={path}, config.finetune.drop_head=True, "
        "config.stages=('finetune', 'eval'))")
  encoder = os.path.join(trained, "pretrain", "encoder")
  config.eval_checkpoint = encoder
  refused(config, str(tmp_path / "eval"), rf"^config\.eval_checkpoint: {encoder} has no "
          r"classifier head \(a pretrain encoder or SimMIM checkpoint\): fine-tune it on this "
          r"data set first \(config\.finetune\.init=")

  # What the message says to do: fine-tune from it with drop_head.
  config.eval_only, config.stages = False, ("finetune", "eval")
  layout = trainer_lib.make_layout(config)
  for path in (directory, file):
    config.finetune.init, config.finetune.drop_head = path, False
    refused(config, str(tmp_path / "finetune"), rf"^config\.finetune\.init: {path} does not fit "
            r"the model \(set config\.finetune\.drop_head=True to train a new 10-class head\): "
            r"its head has 1000 classes, data set 'digits' 10$")
    config.finetune.drop_head = True
    init = loading.finetune_init_params(config, str(tmp_path), 10, layout)
    if path == directory:  # left out: the fine-tune state's own head stays
      assert "head" not in init
    else:  # the model's own, freshly initialised
      assert init["head"]["kernel"].shape == (imagenet_head.num_features, 10)
