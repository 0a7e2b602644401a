"""SwinV2-G: SimMIM pretraining at 192/w12, fine-tuning at 1536 with windows (32,32,32,24).

The recipe is the paper's for G (appendix A2.2 of Liu et al.; docs/design.md, "The recipes and
their sources"):
  pretrain: SimMIM 192/w12, global batch 9216, lr 1.4e-3 at that batch (the config's base_lr
            is per 512 images, so 1.4e-3 * 512 / 9216), 30k warmup steps, wd 0.1, clip 100.
            The paper's 70M-image set is not public: data is imagenet2012-style here.
  finetune: 1536/w32 (the paper's COCO resolution, here a classifier); stage 4 (48x48) takes
            24x24 windows (a single 48x48 window does not fit 40 GB, see below);
            position tables normalised by the 192/w12 windows (12,12,12,6).
            Layer decay 0.87 and drop path 0.3 of the paper's supervised stage; batch 576 and
            lr 2.1e-5 of its ImageNet-1K fine-tune. Step counts are ours (the paper gives
            epochs on a private set).
Memory (paper section 3.5, docs/memory_plan.md): bf16 compute, ZeRO-3 over the data axis,
full remat in every stage, sequential attention in every stage with more than one window
(the paper used it in the first two; stage 3 needs it too here, its logits stay float32).

  python -m swinv2_jax.main --config=configs/g_1536.py --workdir=DIR --config.dry_run=True
  python -m swinv2_jax.main --config=configs/g_1536.py:tiny --workdir=/tmp/g_tiny
"""

from swinv2_jax import config as config_lib
from swinv2_jax import data
from swinv2_jax import errors


def get_config(arg: str = ""):
  errors.check_config_arg(arg, ("", "tiny"), __file__)
  c = config_lib.base_config()
  c.model.name = "swinv2_giant_window32_1536"
  c.model.dtype = "bfloat16"
  c.model.remat = ("full", "full", "full", "full")
  # 144, 36, 9 and 4 windows per level at 1536: pieces of 9, 9, 1 and 1 windows.
  c.model.attention_chunks = (16, 4, 9, 4)
  c.data = data.default_data_config("imagenet2012")

  p = c.pretrain
  p.img_size, p.window_size, p.pretrained_window_sizes = 192, 12, 0
  p.batch_size, p.steps, p.warmup_steps = 9216, 150_000, 30_000
  p.base_lr, p.warmup_lr, p.min_lr = 1.4e-3 * 512 / 9216, 1e-7, 1e-6
  p.weight_decay, p.clip_grad, p.drop_path_rate = 0.1, 100.0, 0.1
  p.log_every, p.checkpoint_every = 100, 2000

  f = c.finetune
  # Stage 4 (48x48) takes four 24x24 windows (docs/design.md, "The window grids at high
  # resolution"): one 48x48 window of 128 heads needs 2.5 GiB per attention-sized buffer and
  # cannot be split by sequential attention; with it G-1536 needs 47 GiB per device
  # (docs/memory_plan.md).
  f.img_size, f.window_size, f.pretrained_window_sizes = 1536, (32, 32, 32, 24), (12, 12, 12, 6)
  f.batch_size, f.steps, f.warmup_steps = 576, 20_000, 2_000
  f.base_lr, f.warmup_lr, f.min_lr = 2.1e-5 * 512 / 576, 2e-8, 2e-7
  f.weight_decay, f.layer_decay, f.drop_path_rate, f.clip_grad = 0.05, 0.87, 0.3, 5.0
  f.init = "pretrain"
  f.log_every, f.checkpoint_every = 50, 1000
  c.eval.batch_size = 64

  # The smallest mesh on which the 1536 fine-tune fits 40 GiB (docs/memory_plan.md), with
  # gradient accumulation up to the recipe's global batches. Pretraining: 'auto' picks 16 x 72
  # images per device (37.1 GiB in the CPU plan). Fine-tuning: 576 = 72 x 1 x 8 (30.9 GiB; a
  # microbatch of 2 needs 48.3).
  c.mesh.zero = 3
  p.accum_steps = "auto"
  f.accum_steps = 72
  c.plan.num_devices, c.plan.device_memory_gb = 8, 40.0

  if arg == "tiny":  # the same structure at laptop size, digits data, a few steps per stage
    c.model.embed_dim, c.model.depths, c.model.num_heads = 32, (2, 2, 6, 2), (1, 2, 4, 8)
    c.model.dtype = "float32"  # bf16 matmuls are slow on most CPUs
    # 16 and 4 windows in the first two stages, both at 64/w4 and at 128/w8.
    c.model.attention_chunks = (4, 2, 1, 1)
    c.data = data.default_data_config("digits")
    c.data.randaugment, c.data.reprob = "", 0.0
    c.data.mixup_alpha, c.data.cutmix_alpha = 0.0, 0.0
    # Pretrain at 64/w4 as G at 192/w12: maps 16, 8, 4, 2 -> effective windows (4, 4, 4, 2);
    # fine-tune at 128 with the last stage's window equal to its 4x4 map, as G's 48x48.
    p.img_size, p.window_size, p.mask_patch_size, p.norm_target_window = 64, 4, 8, 0
    f.img_size, f.window_size, f.pretrained_window_sizes = 128, (8, 8, 8, 4), (4, 4, 4, 2)
    for stage in (p, f):
      stage.batch_size, stage.steps, stage.warmup_steps = 16, 6, 2
      stage.base_lr, stage.warmup_lr, stage.min_lr = 2e-3, 1e-5, 1e-5
      stage.log_every, stage.checkpoint_every = 2, 3
      stage.accum_steps = 2  # microbatches of 8 on one device, of 1 on the planned 8
    c.eval.batch_size = 40
    c.plan.num_devices = 8
  return c
