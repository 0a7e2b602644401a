"""Runs the configured stages: SimMIM pretraining -> fine-tuning -> evaluation.

  python -m swinv2_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m swinv2_jax.main --config=configs/g_1536.py --workdir=DIR --config.dry_run=True
  python -m swinv2_jax.main --config=configs/digits.py --workdir=DIR --config.eval_only=True
  python -m swinv2_jax.main --config=configs/swinv2_b.py --workdir=gs://BUCKET/b  # docs/cloud.md
  python -m swinv2_jax.main --config=configs/digits.py:tiny --helpfull   # that config's values

A setting is changed with --config.<key>=<value> (keys below). A config file may take an
argument after a colon (configs/digits.py:tiny); each names the ones it accepts.

Mistakes (an unknown or bad config key, a config file or argument that does not exist, a
missing or truncated checkpoint, a batch that does not divide over the devices, a data set
that is not there) are checked before anything is compiled, loaded or written. Each prints
`error: <message>` on stderr, the message naming the key or file and what to do, and exits
with status 2, without a traceback; --verbose shows the traceback instead. Any other
exception is a bug and keeps its traceback (swinv2_jax/errors.py says which are which).

The config keys and their values (--help / --helpfull list those of --config=FILE[:ARG] when
given, else the defaults of swinv2_jax.config.base_config()):
"""

if __name__ == "__main__":
  # Before the imports below, which are slow: glibc reads its tunables only at start-up, so
  # the run re-executes itself once with huge pages for XLA's host buffers (hugepages.py).
  from swinv2_jax import hugepages
  hugepages.ensure()

import difflib  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from swinv2_jax import config as config_lib
from swinv2_jax import distributed
from swinv2_jax import errors
from swinv2_jax import logs
from swinv2_jax import preemption
from swinv2_jax import train
from swinv2_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go: a "
                               "local folder or gs://BUCKET/PATH (docs/cloud.md).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a user error (a bad key, "
                             "a missing file, ...) instead of its one-line message.")
flags.mark_flags_as_required(["config", "workdir"])

_DOC_HEAD = __doc__


def _listing(config, title: str = "") -> str:
  lines = config_lib.describe(config).replace("%", "%%")  # absl's usage() formats the doc
  return _DOC_HEAD + (f"({title})\n" if title else "") + "".join(
      f"  {line}\n" for line in lines.splitlines())


__doc__ = _listing(config_lib.base_config())


# ---------------------------------------------------------------------------------------------
# The command line, checked before absl and ml_collections parse it: a missing config file,
# a bad config argument or an unknown --config.<key> is one line, not a traceback.
# ---------------------------------------------------------------------------------------------
def _flag_args(argv):
  """The arguments absl parses as flags: up to a bare '--'."""
  args = list(argv[1:])
  return args[:args.index("--")] if "--" in args else args


def _flag_name(arg: str) -> str:
  return arg.lstrip("-").split("=", 1)[0]


def _config_spec(argv) -> str | None:
  """The value of --config (FILE or FILE:ARG) in argv, if given."""
  args = _flag_args(argv)
  for i, arg in enumerate(args):
    if re.match(r"^--?config(=|$)", arg):
      if "=" in arg:
        return arg.split("=", 1)[1]
      return args[i + 1] if i + 1 < len(args) else None
  return None


def _config_overrides(argv) -> list[str]:
  """The dotted keys of --config.<key>=... (and --noconfig.<key>) in argv."""
  return [_flag_name(arg).split(".", 1)[1] for arg in _flag_args(argv)
          if re.match(r"^--?(no)?config\.", arg)]


def _bool_flag_requested(argv, names) -> bool:
  for arg in _flag_args(argv):
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in names:
      return value.lower() in ("", "true", "t", "1", "yes", "y")
  return False


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of --config=FILE[:ARG], as ml_collections calls it."""
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
        folder) else []
    near = difflib.get_close_matches(os.path.basename(path), files, n=1, cutoff=0.5)
    hint = (f"; did you mean {os.path.join(os.path.dirname(path), near[0])}?" if near else
            f" ({folder} holds {', '.join(files)})" if files else "")
    what = "is not a file" if os.path.exists(path) else "does not exist"
    raise errors.UserError(f"--config: config file {path} {what}{hint}")
  spec_ = importlib.util.spec_from_file_location("swinv2_jax_checked_config", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise errors.UserError(f"--config: {path} has no get_config() function")
  return module.get_config(*([arg] if colon else []))


# Settings that take a number or 'auto'. absl parses an override by the type of the config
# file's value, so --config.finetune.accum_steps=auto over a file's 72 would fail as an int:
# such overrides are taken off the command line and applied once the config is loaded.
_AUTO_OVERRIDE = re.compile(r"^--config\.((?:pretrain|finetune)\.accum_steps)=(['\"]?)auto\2$")
_auto_overrides: list[str] = []


def _take_auto_overrides(argv) -> list[str]:
  kept = []
  for arg in argv:
    match = _AUTO_OVERRIDE.match(arg)
    if match:
      _auto_overrides.append(match.group(1))
    else:
      kept.append(arg)
  return kept


def _check_overrides(config, keys) -> None:
  """Every --config.<key> names a setting of the config (ml_collections would raise a bare
  AttributeError from deep inside flag parsing)."""
  for key in keys:
    group = config
    for part in key.split("."):
      if "[" in part:  # an element of a sequence: left to ml_collections
        break
      if not (isinstance(group, ml_collections.ConfigDict) and part in group):
        raise config_lib.ConfigError(
            f"config.{key}: {config_lib.unknown_key_message(key, config)}")
      group = group[part]


def _check_command_line(argv) -> None:
  argv = argv[:1] + flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)  # --flagfile
  spec = _config_spec(argv)
  help_wanted = _bool_flag_requested(argv, ("help", "?", "helpshort", "helpfull"))
  if spec is None:
    if not help_wanted:
      raise errors.UserError("--config is required: --config=FILE[:ARG], e.g. "
                             "--config=configs/digits.py (see --help)")
    return
  config = _load_config_file(spec)
  _check_overrides(config, _config_overrides(argv))
  if help_wanted:
    globals()["__doc__"] = _listing(config, f"values of --config={spec}")


def _flag_error(e: flags.Error) -> errors.UserError:
  """One line for a flag parsing error: the user error inside it, else its first line."""
  seen, inner = e, None
  while seen is not None:
    if isinstance(seen, errors.UserError) and "Traceback" not in str(seen):
      inner = seen
    seen = seen.__cause__ or seen.__context__
  if inner is not None:
    return inner
  return errors.UserError(str(e).strip().splitlines()[0])


def parse_flags(argv):
  """absl's flag parsing with user errors as `error: ...` lines (status 2)."""
  verbose = _bool_flag_requested(argv, ("verbose",))
  argv = _take_auto_overrides(argv)
  try:
    _check_command_line(argv)
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    error = _flag_error(e) if isinstance(e, flags.Error) else e
    if verbose or not errors.is_user_error(error):
      raise
    errors.report(error)
    sys.exit(errors.EXIT_USER_ERROR)


# ---------------------------------------------------------------------------------------------
# The checks of a run, before anything is compiled, loaded or written (milliseconds).
# ---------------------------------------------------------------------------------------------
def check_config(config, workdir: str) -> None:
  """The checks that need no device, before distributed start-up, JAX or the data set: keys
  and values, the model's levels, the workdir's store, the input files of a run (a dry run
  reads none). Raises a user error."""
  config_lib.validate(config)
  workdir_lib.check_workdir(workdir)
  if not config.dry_run:
    stages = ("eval",) if config.eval_only else tuple(config.stages)
    workdir_lib.check_inputs(config, workdir, stages, workdir_lib.latest_steps(workdir))


def check_devices(config) -> None:
  """The batches over this process's mesh (after distributed start-up), as train.run checks
  them first: here so that the timing logged below covers every check."""
  from swinv2_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  except ValueError as e:  # 'mesh.shape (3,) does not divide 8 devices'
    key, _, problem = str(e).partition(" ")
    raise config_lib.ConfigError(f"config.{key}: {problem}") from e
  config_lib.check_batches(config, mesh.size)


def _config_value():
  try:
    config = _CONFIG.value
  except OSError as e:  # ml_collections defers a config file's load error to this access
    raise errors.UserError(f"--config: {e}") from e
  for key in _auto_overrides:
    stage, leaf = key.split(".")
    with config.ignore_type():
      config[stage][leaf] = "auto"
  return config


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}: settings are flags, "
                           "--config.<key>=<value> (see --help)")
  logs.quiet_other_libraries()  # --verbosity=0 shows other libraries' INFO lines again
  config = _config_value()
  workdir = _WORKDIR.value
  start = time.perf_counter()
  check_config(config, workdir)
  distributed.initialize(config.distributed)
  if config.dry_run:  # the plan's fake devices: plan.dry_run checks the batches over them
    config_lib.check_batches(config, config.plan.num_devices)
  else:
    check_devices(config)
  logging.info("config and inputs checked in %.0f ms (distributed start-up included)",
               1e3 * (time.perf_counter() - start))
  if config.dry_run:
    from swinv2_jax import plan  # pylint: disable=g-import-not-at-top
    plan.dry_run(config, workdir)
    return
  train.run(config, workdir)


def run_main(argv):
  """main, with a user error as `error: ...` (status 2) unless --verbose; a preemption ends
  with status 0 once its checkpoint is written, a lost process with status 3."""
  try:
    main(argv)
  except preemption.Preempted as e:
    logging.info("%s", e)
    sys.exit(0)
  except Exception as e:  # pylint: disable=broad-except
    lost = distributed.lost_processes(e)
    if lost:
      _exit_lost(lost, e)
    if _VERBOSE.value or not errors.is_user_error(e):
      raise
    errors.report(e)
    sys.exit(errors.EXIT_USER_ERROR)


def _exit_lost(lost: list[int], error: Exception) -> None:
  """One line naming the lost processes, then an immediate exit: a normal exit would wait at
  the coordination service's shutdown barrier for the process that will never come."""
  import jax  # pylint: disable=g-import-not-at-top
  names = ", ".join(str(p) for p in lost)
  sys.stderr.write(
      f"error: lost process {names} of {jax.process_count()} (process {jax.process_index()} "
      f"saw: {str(error).splitlines()[0][:200]}). Every checkpoint already written is intact: "
      f"rerun the same command on all processes to continue.\n")
  if _VERBOSE.value:
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exception(error)
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(errors.EXIT_LOST_PROCESS)  # pylint: disable=protected-access


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(run_main, flags_parser=parse_flags)
