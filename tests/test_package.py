"""The package installs: `pip install -r requirements.txt` (README's first command) installs
swinv2_jax itself, so it imports and runs from any directory, not only the repository root."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def _outside_the_repo(tmp_path, *args):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)


def test_import_and_main_work_from_another_directory(tmp_path):
  result = _outside_the_repo(tmp_path, "-c", "import swinv2_jax.train, swinv2_jax; "
                             "print(swinv2_jax.__file__)")
  assert result.returncode == 0, ("not installed? pip install -r requirements.txt\n"
                                  + result.stderr[-2000:])
  assert result.stdout.strip() == os.path.join(ROOT, "swinv2_jax", "__init__.py")
  config = os.path.join(ROOT, "configs", "digits.py")
  result = _outside_the_repo(tmp_path, "-m", "swinv2_jax.main", f"--config={config}:tiny",
                             f"--workdir={tmp_path / 'plan'}", "--config.dry_run=True",
                             "--config.plan.num_devices=1", "--config.stages=('finetune',)",
                             # 'auto' over the config file's int (absl would parse an int):
                             "--config.finetune.accum_steps=auto",
                             "--config.finetune.init=scratch")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "plan" / "plan.json") as f:
    finetune = json.load(f)["stages"]["finetune"]
  assert (finetune["accum_steps"], finetune["microbatch_per_device"]) == (1, 16)  # all fits
