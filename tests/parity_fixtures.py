"""The parity fixtures (tests/fixtures/swinv2_*.npz, see the README there) and models loaded
from them; shared by test_parity.py and test_convert.py. No torch needed."""

import functools
import glob
import json
import os

import numpy as np
from flax import nnx

from swinv2_jax import weights
from swinv2_jax.models import SwinTransformerV2

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FIXTURES = sorted(os.path.basename(p)[len("swinv2_"):-len(".npz")]
                  for p in glob.glob(os.path.join(FIXTURE_DIR, "swinv2_*.npz")))


@functools.lru_cache(maxsize=None)
def fixture(name: str) -> dict:
  with np.load(os.path.join(FIXTURE_DIR, f"swinv2_{name}.npz")) as f:
    return {k: f[k] for k in f.files}


def config(name: str) -> dict:
  return json.loads(str(fixture(name)["config"]))


def state(name: str, layout: str) -> dict:
  prefix = f"state_{layout}/"
  return {k[len(prefix):]: v for k, v in fixture(name).items() if k.startswith(prefix)}


def layouts(name: str) -> list[str]:
  return sorted({k.split("/")[0][len("state_"):] for k in fixture(name) if k.startswith("state_")})


def abstract_model(cfg: dict, **overrides) -> SwinTransformerV2:
  """No random init (slow to compile): every parameter comes from the checkpoint."""
  kwargs = {**cfg, "drop_path_rate": 0.0, **overrides}
  return nnx.eval_shape(lambda: SwinTransformerV2(**kwargs))


def loaded(name: str, layout: str = "timm", **overrides):
  """The fixture's model in eval mode; a SimMIM state (no head) keeps the model's own head."""
  model = abstract_model(config(name), **overrides)
  source = state(name, layout)
  if layout == "simmim":
    source = {"model": source}  # official SimMIM checkpoints wrap the state dict so
  weights.load_pytorch_weights(model, source, drop_head=layout == "simmim")
  model.eval()
  return model
