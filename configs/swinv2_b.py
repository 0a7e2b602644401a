"""SwinV2-B: SimMIM 192/w12 -> ImageNet-1K fine-tune at 224/w14 (default) or 256/w16.

  python -m swinv2_jax.main --config=configs/swinv2_b.py --workdir=DIR        # 224/w14
  python -m swinv2_jax.main --config=configs/swinv2_b.py:256 --workdir=DIR    # 256/w16
  python -m swinv2_jax.main --config=configs/swinv2_b.py:tiny --workdir=DIR   # laptop check
Drop path: pretraining 0.1, fine-tuning 0.1 (B's are the official SimMIM values).
"""

from swinv2_jax import errors
from swinv2_jax import recipes


def get_config(arg: str = ""):
  errors.check_config_arg(arg, ("", "224", "256", "tiny"), __file__)
  return recipes.get_sized_config("swinv2_base_window16_256", arg, pretrain_drop_path=0.1,
                                  finetune_drop_path=0.1)
