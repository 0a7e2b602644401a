"""Runs the configured stages: SimMIM pretraining -> fine-tuning -> evaluation.

  python -m swinv2_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m swinv2_jax.main --config=configs/g_1536.py --workdir=DIR --config.dry_run=True
  python -m swinv2_jax.main --config=configs/digits.py --workdir=DIR --config.eval_only=True
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from swinv2_jax import distributed
from swinv2_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointLogs(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still show)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  config = _CONFIG.value
  distributed.initialize(config.distributed)
  if config.dry_run:
    from swinv2_jax import plan
    plan.dry_run(config, _WORKDIR.value)
    return
  train.run(config, _WORKDIR.value)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
