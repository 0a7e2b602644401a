"""SwinV2-H (C=352, depths 2,2,18,2, heads of dim 32, extra norm every 6 blocks; paper 3.6):
SimMIM 192/w12 -> ImageNet-1K fine-tune at 640/w40 (the paper's H/G fine-tune resolution).

The paper gives no H recipe; this one is G's (paper A2.2; docs/design.md, "The recipes and
their sources") at H's size: SimMIM with wd 0.1 and clip 100, supervised fine-tune with layer
decay 0.87 and drop path 0.3.
Memory: bf16, ZeRO-3, full remat, sequential attention in the first two stages (as G).

  python -m swinv2_jax.main --config=configs/swinv2_h.py --workdir=DIR
  python -m swinv2_jax.main --config=configs/swinv2_h.py:tiny --workdir=DIR   # laptop check
"""

from swinv2_jax import errors
from swinv2_jax import recipes


def get_config(arg: str = ""):
  errors.check_config_arg(arg, ("", "tiny"), __file__)
  c = recipes.simmim_recipe("swinv2_huge_window40_640", pretrain_batch=4096,
                            finetune_batch=576, finetune_drop_path=0.3)
  c.model.remat = "full"
  c.model.attention_chunks = (4, 4, 1, 1)  # 640/w40: 4 windows in stages 1 and 2
  c.pretrain.weight_decay, c.pretrain.clip_grad = 0.1, 100.0
  f = c.finetune
  f.img_size, f.window_size, f.pretrained_window_sizes = 640, 40, (12, 12, 12, 6)
  f.layer_decay, f.base_lr, f.warmup_lr, f.min_lr = 0.87, 2.1e-5 * 512 / 576, 2e-8, 2e-7
  c.mesh.zero = 3
  if arg == "tiny":
    c = recipes.shrink_for_laptop(c, embed_dim=32, depths=(2, 2, 6, 2), heads=(1, 2, 4, 8))
    c.model.extra_norm_period = 6
    c.model.attention_chunks = (4, 2, 1, 1)
  return c
