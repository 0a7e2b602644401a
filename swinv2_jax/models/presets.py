"""Named Swin V2 variants, named as timm names them, plus H and G from the paper.

Sizes (docs/design.md, "Model sizes"): T/S/B/L as the official `configs/swinv2/`; H (C=352)
and G (C=512) from paper section 3.6, with head dim 32 and the extra norm every 6
blocks.
"""

from __future__ import annotations

from typing import Any

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_HUGE = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6)
_GIANT = dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128),
              extra_norm_period=6)

# ImageNet-22K pretrained checkpoints classify 21,841 classes (timm's default for them).
_IN22K_CLASSES = 21841
# Fine-tunes from 192/w12 keep the position-table normalisation of the pretraining windows;
# level 4 of a 192 input is 6x6, so its pretrained window was 6.
_FROM_W12 = (12, 12, 12, 6)

PRESETS: dict[str, dict[str, Any]] = {
    "swinv2_tiny_window8_256": dict(_TINY, img_size=256, window_size=8),
    "swinv2_tiny_window16_256": dict(_TINY, img_size=256, window_size=16),
    "swinv2_small_window8_256": dict(_SMALL, img_size=256, window_size=8),
    "swinv2_small_window16_256": dict(_SMALL, img_size=256, window_size=16),
    "swinv2_base_window8_256": dict(_BASE, img_size=256, window_size=8),
    "swinv2_base_window16_256": dict(_BASE, img_size=256, window_size=16),
    "swinv2_base_window12_192": dict(_BASE, img_size=192, window_size=12,
                                     num_classes=_IN22K_CLASSES),
    "swinv2_base_window12to16_192to256": dict(_BASE, img_size=256, window_size=16,
                                              pretrained_window_sizes=_FROM_W12),
    "swinv2_base_window12to24_192to384": dict(_BASE, img_size=384, window_size=24,
                                              pretrained_window_sizes=_FROM_W12),
    "swinv2_large_window12_192": dict(_LARGE, img_size=192, window_size=12,
                                      num_classes=_IN22K_CLASSES),
    "swinv2_large_window12to16_192to256": dict(_LARGE, img_size=256, window_size=16,
                                               pretrained_window_sizes=_FROM_W12),
    "swinv2_large_window12to24_192to384": dict(_LARGE, img_size=384, window_size=24,
                                               pretrained_window_sizes=_FROM_W12),
    # H and G: SimMIM pretraining at 192/w12, ImageNet fine-tuning at 640/w40 (paper 4.1).
    "swinv2_huge_window12_192": dict(_HUGE, img_size=192, window_size=12),
    "swinv2_huge_window40_640": dict(_HUGE, img_size=640, window_size=40,
                                     pretrained_window_sizes=_FROM_W12),
    "swinv2_giant_window12_192": dict(_GIANT, img_size=192, window_size=12),
    "swinv2_giant_window40_640": dict(_GIANT, img_size=640, window_size=40,
                                      pretrained_window_sizes=_FROM_W12),
    # 1536 / w32 (the paper's COCO resolution): level 4 is 48x48, not a multiple of 32, so it
    # takes four 24x24 windows (docs/design.md, "The window grids at high resolution"); one 48x48
    # window would need 47 GiB per device on 8 devices instead of 32 (docs/memory_plan.md).
    "swinv2_giant_window32_1536": dict(_GIANT, img_size=1536, window_size=(32, 32, 32, 24),
                                       pretrained_window_sizes=_FROM_W12),
}
