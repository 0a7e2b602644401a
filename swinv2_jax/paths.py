"""The one path layer of a run: a local folder or a gs:// bucket, through etils.epath.

Everything a run reads or writes (config.json, metrics, TensorBoard, checkpoints, the encoder,
eval.json, plan.json, the tfds data_dir) is named by a string that is either a local path or a
URL, and reached through `epath.Path`, which orbax and tfds use as well. Importing this module
makes two process-wide choices for gs://, so that ours, orbax's and tfds' accesses agree:

- etils sends gs:// through tf.io.gfile whenever TensorFlow is importable (tfds needs it here).
  TF's GCS client has no endpoint setting and TF has no s3:// at all; fsspec's gcsfs takes
  STORAGE_EMULATOR_HOST and application default credentials alike. EPATH_USE_TF=false (unless
  the environment sets it) picks fsspec.
- gcsfs caches directory listings and never expires them: an object written by another process,
  or by TensorStore in this one (orbax's arrays), would stay unseen, and a resumed run could miss
  its latest checkpoint. The listing cache is off.

docs/cloud.md lists the setting that points each library at a storage server.
"""

from __future__ import annotations

import os
import tempfile

import fsspec
from etils import epath

os.environ.setdefault("EPATH_USE_TF", "false")
for _protocol in ("gs", "gcs"):  # gcsfs.GCSFileSystem.protocol
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

# Object stores whose checkpoints orbax 0.12.8 can write: its OCDBT array layout builds a
# TensorStore spec for gs:// alone (an s3:// path is refused as "not absolute").
CHECKPOINT_SCHEMES = ("gs",)


def scheme(path) -> str | None:
  """'gs' for gs://bucket/x, None for a local path."""
  head, sep, _ = os.fspath(path).partition("://")
  return head if sep else None


def is_local(path) -> bool:
  return scheme(path) is None


def absolute(path) -> str:
  """A local path made absolute (orbax needs one); a URL as it is."""
  return os.path.abspath(path) if is_local(path) else os.fspath(path)


def join(*parts) -> str:
  return os.fspath(epath.Path(*parts))


def makedirs(path) -> None:
  """Creates a local folder. An object store needs none, and gcsfs's mkdir would create a
  missing bucket: a typo in --workdir must fail, not make one."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)


def write_text(path, text: str) -> None:
  """Replaces the file at `path` with `text` whole: readers see the old or the new content,
  never part of it. An object store replaces an object whole on upload; a local file is
  written beside it, synced and renamed over it."""
  if not is_local(path):
    epath.Path(path).write_text(text)
    return
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def move(src, dst) -> None:
  """Moves a file or folder to `dst`, creating its parent folder. On an object store each
  object is copied, then deleted: nothing is lost if that is cut short."""
  if is_local(src):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.rename(src, dst)
  else:
    fs, _ = fsspec.core.url_to_fs(os.fspath(src))
    fs.mv(os.fspath(src), os.fspath(dst), recursive=True)


def copy_tree(src, dst) -> None:
  """Copies every file under `src` to the same relative path under `dst` (either may be a
  URL); each file is written whole."""
  src, dst = epath.Path(src), epath.Path(dst)
  for folder, _, files in src.walk():
    for name in files:
      target = dst / os.path.relpath(os.fspath(folder / name), os.fspath(src))
      if is_local(target):
        target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes((folder / name).read_bytes())
