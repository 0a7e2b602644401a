"""Input pipeline: tfds prepares data sets (array_record), grain reads them.

Importing this package registers the tfds `digits` builder.
"""

from swinv2_jax.data import digits  # registers the tfds builder  # noqa: F401
from swinv2_jax.data.config import (default_data_config, folder_root, is_folder,
                                    validate_data_config)
from swinv2_jax.data.mixup import (apply_mixup_cutmix, mixup_cutmix, mixup_cutmix_params,
                                   smooth_one_hot)
from swinv2_jax.data.pipeline import (EvalIterable, build_eval_iterator, build_train_dataset,
                                      build_train_iterator)
from swinv2_jax.data.randaugment import RandAugment
from swinv2_jax.data.sources import DatasetInfo, DatasetNotFoundError, dataset_info
from swinv2_jax.data.transforms import simmim_mask

__all__ = [
    "DatasetInfo", "DatasetNotFoundError", "EvalIterable", "RandAugment", "apply_mixup_cutmix",
    "build_eval_iterator",
    "build_train_dataset", "build_train_iterator", "dataset_info", "default_data_config",
    "folder_root", "is_folder", "mixup_cutmix", "mixup_cutmix_params", "simmim_mask",
    "smooth_one_hot", "validate_data_config",
]
