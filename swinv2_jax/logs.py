"""What the commands log: this package's lines, and other libraries' only when they matter.

JAX (the TPU backend it did not find), orbax (about 35 INFO lines per save), tfds (each data
set info it loads, a warning that OpenCV is absent) log on every run; none of it is about the
run. `quiet_other_libraries()` keeps their INFO lines and those known warnings out of absl's
handler, unless the command line gives absl's `--verbosity`: `--verbosity=0` shows every
library's INFO lines again, `--verbosity=1` their DEBUG lines too.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import flags
from absl import logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Warnings of other libraries that ask for nothing: silenced with their INFO lines.
HARMLESS_WARNINGS = (
    "OpenCV is not installed",  # tfds decodes images with PIL instead (all this project needs)
    # orbax, when the report reads one item of a checkpoint step: that file is the step's.
    "Metadata file does not exist",
)


class QuietOtherLibraries(std_logging.Filter):
  """Passes this package's records and other libraries' warnings and errors, except the known
  harmless ones."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.pathname.startswith(PACKAGE_DIR + os.sep):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    message = record.getMessage()
    return not any(text in message for text in HARMLESS_WARNINGS)


def quiet_other_libraries() -> None:
  """Installs the filter on absl's handler (once), unless --verbosity was given; call it at
  the start of a command's main, after absl has parsed the flags."""
  if flags.FLAGS["verbosity"].present:
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietOtherLibraries) for f in handler.filters):
    handler.addFilter(QuietOtherLibraries())
