"""The embedded default: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes).

SimMIM pretraining -> fine-tuning -> evaluation on a laptop CPU in a few minutes, with no
download. A small SwinV2 (C=48, depths 2,2,2,2) at 32x32 (digits upsampled 4x) with patch 4, window 4.
  python -m swinv2_jax.main --config=configs/digits.py --workdir=/tmp/digits
"""

from swinv2_jax import config as config_lib
from swinv2_jax import data
from swinv2_jax import errors


def get_config(arg: str = ""):
  errors.check_config_arg(arg, ("", "tiny"), __file__)
  c = config_lib.base_config()
  c.model.name = "swinv2_tiny_window8_256"
  c.model.embed_dim = 48
  c.model.depths = (2, 2, 2, 2)
  c.model.num_heads = (3, 6, 12, 24)
  c.model.patch_size = 4
  c.data = data.default_data_config("digits")
  c.data.randaugment = ""
  c.data.reprob = 0.0
  c.data.mixup_alpha = 0.0
  c.data.cutmix_alpha = 0.0
  c.data.label_smoothing = 0.1

  p = c.pretrain
  p.img_size, p.window_size, p.pretrained_window_sizes = 32, 4, 0
  p.mask_patch_size, p.mask_ratio, p.norm_target_window = 8, 0.6, 0
  p.batch_size, p.steps, p.warmup_steps = 128, 300, 30
  p.base_lr, p.warmup_lr, p.min_lr = 4e-3, 1e-5, 1e-5
  p.drop_path_rate, p.log_every, p.checkpoint_every = 0.0, 25, 150
  p.image_every = 100  # TensorBoard: masked input, reconstruction, original

  f = c.finetune
  f.img_size, f.window_size, f.pretrained_window_sizes = 32, 4, 4
  f.batch_size, f.steps, f.warmup_steps = 128, 300, 30
  f.base_lr, f.warmup_lr, f.min_lr, f.layer_decay = 4e-3, 1e-5, 1e-5, 0.9
  f.drop_path_rate, f.log_every, f.checkpoint_every = 0.1, 25, 150
  f.eval_every = 50  # the test split, under the mesh, while fine-tuning
  c.eval.batch_size = 120

  if arg == "tiny":  # seconds: a smoke check of every stage
    for stage in (p, f):
      stage.steps, stage.warmup_steps, stage.log_every, stage.checkpoint_every = 6, 2, 2, 3
      stage.batch_size = 16
    f.eval_every = 3
  return c
