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


# ---------------------------------------------------------------------------------------------
# The main job in child processes.
# ---------------------------------------------------------------------------------------------
# The children compile for speed, not for peak performance.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cli_value(value) -> str:
  return repr(tuple(value)) if isinstance(value, tuple) else str(value)


def config_args(overrides: dict) -> list:
  """`--config.<key>=<value>` arguments of `python -m swinv2_jax.main`."""
  return [f"--config.{k}={cli_value(v)}" for k, v in overrides.items()]


def child_env(extra_xla_flags: str = "", **extra) -> dict:
  """The environment of a child JAX process: CPU, fast compiles, this checkout importable, and
  the suite's persistent compilation cache (tests/conftest.py), so the children share it."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), FAST_COMPILE, extra_xla_flags]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env.update(extra)
  return env
