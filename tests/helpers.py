"""Helpers shared by the tests and by the scripts they start (a plain module, not a conftest:
`python tests/test_x.py` and `python -c` children import it too, after putting tests/ on
sys.path; pytest puts tests/ there itself).
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def load_config_module(name: str):
  """The module of a shipped config file, `configs/<name>` (e.g. "digits.py")."""
  path = os.path.join(CONFIGS, name)
  stem = os.path.splitext(os.path.basename(name))[0]
  spec = importlib.util.spec_from_file_location(f"swinv2_configs_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str = ""):
  """`configs/<name>`'s get_config(arg), as `--config=configs/<name>:<arg>` gives it."""
  return load_config_module(name).get_config(arg)
