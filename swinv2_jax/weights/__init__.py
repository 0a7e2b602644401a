"""PyTorch Swin V2 weights in and out of this project's Flax NNX models, and our own
parameter directories. One module per step of the data flow:

- `readers`: a checkpoint file (.safetensors, .pth) -> a flat state dict {name: np.ndarray};
  `pth` reads torch.save zips without torch (a restricted unpickler), `hub` fetches
  `hf-hub:<owner>/<name>` ids through huggingface_hub;
- `layouts`: the official / timm / SimMIM key layouts, detected and renamed to the official one;
- `mapping`: official names <-> our parameter tree (`load_pytorch_weights`,
  `to_pytorch_state_dict`);
- `export`: our parameter tree <-> a parameter directory on disk (`save_params`,
  `load_params`, `restore_model`), also read from a training stage's checkpoints;
- `heads`: whether a checkpoint's classifier head is loaded (`drop_head`), for every format;
- `__main__`: the CLI, `python -m swinv2_jax.weights --checkpoint=IN --model=NAME --output=DIR`.
"""

from swinv2_jax.weights.export import MODEL_JSON
from swinv2_jax.weights.export import find_params
from swinv2_jax.weights.export import head_classes
from swinv2_jax.weights.export import load_model_config
from swinv2_jax.weights.export import load_params
from swinv2_jax.weights.export import read_params
from swinv2_jax.weights.export import restore_model
from swinv2_jax.weights.export import save_params
from swinv2_jax.weights.heads import HeadMismatchError
from swinv2_jax.weights.hub import is_hub_id
from swinv2_jax.weights.layouts import BUFFER_NAMES
from swinv2_jax.weights.layouts import LAYOUTS
from swinv2_jax.weights.layouts import detect_layout
from swinv2_jax.weights.layouts import is_buffer
from swinv2_jax.weights.layouts import to_official_layout
from swinv2_jax.weights.mapping import load_pytorch_weights
from swinv2_jax.weights.mapping import to_pytorch_state_dict
from swinv2_jax.weights.readers import read_state_dict

__all__ = ["BUFFER_NAMES", "HeadMismatchError", "LAYOUTS", "MODEL_JSON", "detect_layout",
           "find_params", "head_classes", "is_buffer", "is_hub_id", "load_model_config",
           "load_params", "load_pytorch_weights", "read_params", "read_state_dict",
           "restore_model", "save_params", "to_official_layout", "to_pytorch_state_dict"]
