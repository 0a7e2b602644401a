"""The official SwinV2 SimMIM recipes as config builders (docs/design.md, "The recipes and their
sources"; official `configs/simmim/simmim_{pretrain,finetune}__swinv2_base__*.yaml`).

SimMIM pretraining at 192/w12 (800 epochs, AdamW 1e-4 per 512 images, 10 warmup epochs,
clip 5, target normalisation 47), then ImageNet-1K fine-tuning at 224/w14 or 256/w16 with the
position tables normalised by the pretraining windows (12, 12, 12, 6): lr 1.25e-3 per 512,
layer decay 0.75, 100 epochs with 20 warmup, RandAugment m9, mixup 0.8, cutmix 1.0, label
smoothing 0.1, random erasing 0.25. Step counts derive from epochs at the given batch.
"""

from __future__ import annotations

from swinv2_jax import config as config_lib
from swinv2_jax import data

IMAGENET_TRAIN_IMAGES = 1_281_167
# Fine-tune sizes: resolution -> window (stage 4 of 224 is 7x7 and clamps to 7).
FINETUNE_WINDOWS = {224: 14, 256: 16}


def _steps(epochs: float, batch: int) -> int:
  return int(epochs * IMAGENET_TRAIN_IMAGES / batch)


def simmim_recipe(model_name: str, *, finetune_res: int = 224, pretrain_batch: int = 2048,
                  finetune_batch: int = 2048, pretrain_drop_path: float = 0.1,
                  finetune_drop_path: float = 0.1, pretrain_epochs: int = 800,
                  finetune_epochs: int = 100, dtype: str = "bfloat16"):
  c = config_lib.base_config()
  c.model.name = model_name
  c.model.dtype = dtype
  c.data = data.default_data_config("imagenet2012")

  p = c.pretrain
  p.img_size, p.window_size, p.pretrained_window_sizes = 192, 12, 0
  p.batch_size, p.drop_path_rate = pretrain_batch, pretrain_drop_path
  p.steps, p.warmup_steps = _steps(pretrain_epochs, pretrain_batch), _steps(10, pretrain_batch)
  p.base_lr, p.warmup_lr, p.min_lr, p.weight_decay, p.clip_grad = 1e-4, 5e-7, 5e-6, 0.05, 5.0
  p.mask_patch_size, p.mask_ratio, p.norm_target_window = 32, 0.6, 47
  p.log_every, p.checkpoint_every = 100, 5000

  f = c.finetune
  f.img_size, f.window_size = finetune_res, FINETUNE_WINDOWS[finetune_res]
  f.pretrained_window_sizes = (12, 12, 12, 6)
  f.batch_size, f.drop_path_rate = finetune_batch, finetune_drop_path
  f.steps, f.warmup_steps = _steps(finetune_epochs, finetune_batch), _steps(20, finetune_batch)
  f.base_lr, f.warmup_lr, f.min_lr, f.weight_decay = 1.25e-3, 2.5e-7, 2.5e-6, 0.05
  f.layer_decay, f.clip_grad, f.init = 0.75, 5.0, "pretrain"
  f.log_every, f.checkpoint_every = 100, 2500
  c.eval.batch_size = 512
  return c


def shrink_for_laptop(c, *, embed_dim: int = 32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8)):
  """The same recipe structure at laptop size on the digits data: a few steps per stage.

  Pretraining at 64/w4 and fine-tuning at 96/w6 with pretrained windows (4, 4, 4, 2) keeps the
  window transfer of the full recipe (192/w12 -> 224/w14) in miniature.
  """
  c.model.embed_dim, c.model.depths, c.model.num_heads = embed_dim, depths, heads
  c.model.dtype = "float32"  # bf16 matmuls are slow on most CPUs
  c.data = data.default_data_config("digits")
  c.data.randaugment, c.data.reprob, c.data.mixup_alpha, c.data.cutmix_alpha = "", 0.0, 0.0, 0.0
  p, f = c.pretrain, c.finetune
  p.img_size, p.window_size, p.mask_patch_size, p.norm_target_window = 64, 4, 8, 0
  f.img_size, f.window_size, f.pretrained_window_sizes = 96, 6, (4, 4, 4, 2)
  for stage in (p, f):
    stage.batch_size, stage.steps, stage.warmup_steps = 16, 6, 2
    stage.base_lr, stage.warmup_lr, stage.min_lr = 2e-3, 1e-5, 1e-5
    stage.log_every, stage.checkpoint_every = 2, 3
  c.eval.batch_size = 40
  return c


def get_sized_config(model_name: str, arg: str, **recipe_kwargs):
  """`arg`: '' or '224' -> 192/w12 -> 224/w14; '256' -> 256/w16; 'tiny' -> laptop check.

  `model_name` is the preset that gives the architecture; the sizes come from the recipe.
  """
  if arg == "tiny":
    return shrink_for_laptop(simmim_recipe(model_name, **recipe_kwargs))
  if arg not in ("", "224", "256"):
    raise ValueError(f"config argument must be '', '224', '256' or 'tiny', got {arg!r}")
  return simmim_recipe(model_name, finetune_res=int(arg or 224), **recipe_kwargs)
