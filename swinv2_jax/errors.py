"""User errors: mistakes in the command line, the config or an input file.

`python -m swinv2_jax.main` reports a user error as a few lines on stderr, `error: <message>`,
the message naming the key or file and what to do, and exits with status EXIT_USER_ERROR (2),
with no traceback (`--verbose` shows it). Every other exception is taken for a bug and keeps
its traceback.

What counts as a user error (`is_user_error`):
  - `UserError` and its subclasses (`swinv2_jax.config.ConfigError` is one);
  - `FileNotFoundError` (a missing config file, checkpoint, data directory, ...);
  - a `ValueError` raised by a `raise` statement of this package (its own checks: weight
    loading's missing/unexpected keys, the data package's DatasetNotFoundError, a mesh that
    does not divide the devices, ...). A ValueError raised inside a library (numpy, jax) is
    not: that is a bug of ours until shown otherwise.
"""

from __future__ import annotations

import linecache
import os
import sys
from typing import Sequence

EXIT_USER_ERROR = 2
# Another process of a multi-process run died: this one stops instead of waiting forever.
EXIT_LOST_PROCESS = 3
# The most lines of a message the CLI prints; the rest is behind --verbose.
MAX_LINES = 4

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
  """A mistake the user can fix: the message names the key or file and what to do."""


class ConfigError(ValueError, UserError):
  """A bad configuration value or input of a run; the message names the key."""


def _raised_here(exc: BaseException) -> bool:
  """Whether `exc` was raised by a `raise` statement in this package's own code."""
  tb = exc.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  if not filename.startswith(_PACKAGE_DIR + os.sep):
    return False
  return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def is_user_error(exc: BaseException) -> bool:
  if isinstance(exc, (UserError, FileNotFoundError)):
    return True
  return isinstance(exc, ValueError) and _raised_here(exc)


def message(exc: BaseException) -> str:
  """The text printed after `error: `: at most MAX_LINES lines."""
  if isinstance(exc, OSError) and exc.filename and exc.strerror:
    text = f"{exc.strerror}: {exc.filename}"  # e.g. [Errno 2] from open()
  else:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:
      text = str(exc.args[0])
  lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
  if len(lines) > MAX_LINES:
    hidden = len(lines) - (MAX_LINES - 1)
    lines = lines[:MAX_LINES - 1] + [f"  ... {hidden} more lines (--verbose shows them all)"]
  return "\n".join(lines)


def report(exc: BaseException, stream=None) -> None:
  """Prints `error: <message>` for a user error."""
  stream = stream or sys.stderr
  stream.write(f"error: {message(exc)}\n")
  stream.flush()


def _display_path(path: str) -> str:
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def _alternatives(values: Sequence[str]) -> str:
  quoted = [repr(v) for v in values]
  return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_config_arg(arg: str, accepted: Sequence[str], config_file: str) -> None:
  """For a config file's `get_config(arg)`: a ConfigError naming the accepted arguments when
  `arg` (the part after ':' in `--config=FILE:ARG`) is not one of them."""
  if arg in accepted:
    return
  raise ConfigError(f"config argument {arg!r} of {_display_path(config_file)}: use "
                    f"{_alternatives(accepted)}")
