"""Every shipped config (and its variants) validates, its batches divide over its planned mesh,
and its pretrain (SimMIM) and fine-tune models build and run abstractly (jax.eval_shape: no
parameter is allocated, so even G-1536 takes a second) with the expected parameter counts."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from helpers import load_config
from swinv2_jax import config as config_lib
from swinv2_jax import trainer as trainer_lib

# file -> the arguments its get_config takes ('' is the full recipe).
CONFIGS = {
    "digits.py": ("", "tiny"),
    "swinv2_t.py": ("", "256", "tiny"),
    "swinv2_s.py": ("", "256", "tiny"),
    "swinv2_b.py": ("", "256", "tiny"),
    "swinv2_l.py": ("", "256", "tiny"),
    "swinv2_h.py": ("", "tiny"),
    "g_1536.py": ("", "tiny"),
}
CASES = [(name, arg) for name, args in CONFIGS.items() for arg in args]

# Fine-tune classifiers of the full recipes, 1000 ImageNet classes. T/S/B/L: the PyTorch
# (timm) counts of those presets; H and G: paper section 3.6 gives 658M and 3.0B (the exact
# numbers are this codebase's, with the extra norm every 6 blocks; tests/test_models.py checks
# them against the paper to 1%).
KNOWN_FINETUNE_PARAMS = {
    "swinv2_t.py": 28_347_154,
    "swinv2_s.py": 49_728_418,
    "swinv2_b.py": 87_918_816,
    "swinv2_l.py": 196_739_932,
    "swinv2_h.py": 658_036_370,
    "g_1536.py": 3_001_940_680,
}
NUM_CLASSES = {"imagenet2012": 1000, "digits": 10}


def expected_params(embed_dim, depths, num_heads, *, num_classes, patch_size=4,
                    extra_norm_period=0) -> int:
  """Swin V2 parameters counted by hand from the official architecture.

  Block of width C with h heads: qkv 3C^2 (q and v biases 2C), logit scale h, CPB MLP
  2x512 + 512 + 512h, proj C^2 + C, two post-norms 4C, MLP 4C^2 + 4C + 4C^2 + C.
  Patch embedding: conv 3p^2 C + C, norm 2C. Patch merging: 4C -> 2C without bias, norm 4C.
  Final norm 2C, head C*K + K; an extra norm (2C) after every `extra_norm_period` blocks of a
  stage at least that deep.
  """
  n = 3 * patch_size**2 * embed_dim + embed_dim + 2 * embed_dim
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    c = embed_dim * 2**i
    n += depth * (12 * c * c + 12 * c + 513 * heads + 1536)
    if extra_norm_period:
      n += depth // extra_norm_period * 2 * c
    if i < len(depths) - 1:
      n += 8 * c * c + 4 * c
  features = embed_dim * 2**(len(depths) - 1)
  n += 2 * features
  if num_classes:
    n += features * num_classes + num_classes
  return n


def _architecture(config) -> dict:
  args = config_lib.model_args(config, "finetune")
  return dict(embed_dim=args["embed_dim"], depths=args["depths"], num_heads=args["num_heads"],
              patch_size=args["patch_size"], extra_norm_period=args.get("extra_norm_period", 0))


def test_the_hand_count_matches_the_pytorch_counts():
  """The formula itself, against the timm counts of T/S/B/L (so it is not fitted to the code)."""
  timm = {(96, (2, 2, 6, 2), (3, 6, 12, 24)): 28_347_154,
          (96, (2, 2, 18, 2), (3, 6, 12, 24)): 49_728_418,
          (128, (2, 2, 18, 2), (4, 8, 16, 32)): 87_918_816,
          (192, (2, 2, 18, 2), (6, 12, 24, 48)): 196_739_932}
  for (c, depths, heads), count in timm.items():
    assert expected_params(c, depths, heads, num_classes=1000) == count


def _abstract(build):
  """(parameter count, graphdef, abstract state) of a model built under eval_shape."""
  model = nnx.eval_shape(build)
  graphdef, state = nnx.split(model)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return count, graphdef, state


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_shipped_config_validates_and_its_models_build(name, arg):
  """Catches a config that fails validation, whose batches do not divide over its planned
  devices, whose windows / chunks do not fit its image sizes (the abstract forward and loss
  run the real model code), or whose model is not the intended size."""
  config = load_config(name, arg)
  config_lib.validate(config)
  config_lib.check_batches(config, config.plan.num_devices)
  num_classes = NUM_CLASSES[config.data.name]
  arch = _architecture(config)
  stages = len(arch["depths"])

  # Fine-tune classifier: parameter count, and logits (batch, classes) in float32.
  count, graphdef, state = _abstract(
      lambda: trainer_lib.build_classifier(config, "finetune", num_classes))
  assert count == expected_params(**arch, num_classes=num_classes)
  if name in KNOWN_FINETUNE_PARAMS and arg != "tiny":
    assert count == KNOWN_FINETUNE_PARAMS[name]
  h, w = config_lib.to_pair(config.finetune.img_size)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
  assert (logits.shape, logits.dtype) == ((2, num_classes), jnp.float32)

  if arg == "256":  # the pretraining of the default recipe, built by its own case
    default = load_config(name)
    assert config.pretrain.to_dict() == default.pretrain.to_dict()
    assert config.model.to_dict() == default.model.to_dict()
    return
  # SimMIM: the encoder without head, a mask token (C) and the 1x1 decoder conv to stride^2 x 3
  # channels (with bias); the loss of one abstract batch is a float32 scalar.
  count, graphdef, state = _abstract(lambda: trainer_lib.build_simmim(config))
  stride = arch["patch_size"] * 2**(stages - 1)
  features = arch["embed_dim"] * 2**(stages - 1)
  assert count == (expected_params(**arch, num_classes=0) + arch["embed_dim"]
                   + features * stride**2 * 3 + stride**2 * 3)
  task = trainer_lib.simmim_task(config)
  batch = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype)  # one microbatch of 2 images
           for k, v in trainer_lib.abstract_batch(config, task, 2).items()}
  loss = jax.eval_shape(lambda s, b: task.loss(nnx.merge(graphdef, s), b, jax.random.key(0))[0],
                        state, batch)
  assert (loss.shape, loss.dtype) == ((), jnp.float32)


def test_224_is_the_default_fine_tune_size():
  """':224' and '' are the same recipe; ':256' changes only the fine-tune size and window."""
  default, explicit = load_config("swinv2_b.py"), load_config("swinv2_b.py", "224")
  assert default.to_dict() == explicit.to_dict()
  big = load_config("swinv2_b.py", "256")
  assert (big.finetune.img_size, big.finetune.window_size) == (256, 16)
  assert (default.finetune.img_size, default.finetune.window_size) == (224, 14)
  with pytest.raises(ValueError, match="config argument"):
    load_config("swinv2_b.py", "512")


def test_accum_steps_given_as_digits_over_auto_become_an_int():
  """`--config.pretrain.accum_steps=12` over g_1536.py's 'auto' reaches the config as the
  string '12' (the command line parses by the file's type): it must act as 12, and a word
  other than 'auto' must still be refused."""
  config = load_config("g_1536.py")
  config.pretrain.accum_steps = "12"
  config_lib.validate(config)
  assert config.pretrain.accum_steps == 12
  config.pretrain.accum_steps = "many"
  with pytest.raises(config_lib.ConfigError, match="config.pretrain.accum_steps"):
    config_lib.validate(config)
