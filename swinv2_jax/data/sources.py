"""Random-access record sources: prepared tfds data sets (array_record) and image folders.

Every source yields {'image': uint8 [H, W, C], 'label': int} by index, which is what grain's
MapDataset needs for a deterministic, checkpointable order.

A tfds data_dir may be a gs:// URL: array_record reads gs:// objects itself (its own GCS
client), but writes local files only, so a data set is built in a local folder and copied up.
"""

import os
import pathlib
import re
import tempfile
from typing import NamedTuple

import numpy as np
from etils import epath
from PIL import Image

from swinv2_jax import paths
from swinv2_jax.data.config import folder_root, is_folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_FOLDER_SPLIT_SEED = 0


class DatasetNotFoundError(ValueError):
  """The data set is not where the config says, or not in a form grain can read."""


class DatasetInfo(NamedTuple):
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


class _Records:
  """Renames a source's image/label keys to 'image'/'label' and drops every other feature."""

  def __init__(self, source, image_key: str, label_key: str):
    self._source, self._image_key, self._label_key = source, image_key, label_key

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return self._select(self._source[index])

  def _getitems(self, indices):
    # grain's batched-read hook: one array_record read for a whole batch of indices.
    return [self._select(e) for e in self._source.__getitems__(list(indices))]

  def _select(self, example):
    return {"image": example[self._image_key], "label": int(example[self._label_key])}


class FolderRecords:
  """Image files decoded with PIL; labels are indices into the sorted class-folder names."""

  def __init__(self, files, labels):
    self.files, self.labels = list(files), list(labels)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    with Image.open(self.files[index]) as img:
      image = np.asarray(img.convert("RGB"))
    return {"image": image, "label": self.labels[index]}


# ----------------------------------------------------------------------------------------------
# tfds
# ----------------------------------------------------------------------------------------------


def _tfds_data_dir(cfg) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.fspath(cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR)


def _build_dir(cfg) -> str:
  """Where `tfds build` writes: the data_dir, or a local folder to copy to a bucket from."""
  data_dir = _tfds_data_dir(cfg)
  return data_dir if paths.is_local(data_dir) else "LOCAL_DIR"


def _prepare_command(cfg, manual: bool) -> str:
  cmd = f"tfds build {cfg.name} --file_format=array_record --data_dir={_build_dir(cfg)}"
  if manual:
    cmd += f" --manual_dir={_manual_dir(cfg)}"
  data_dir = _tfds_data_dir(cfg)
  if not paths.is_local(data_dir):
    cmd += (f", then copy LOCAL_DIR/{cfg.name} to {paths.join(data_dir, cfg.name)} "
            f"(gcloud storage cp -r)")
  return cmd


def _manual_dir(cfg) -> str:
  return os.fspath(cfg.manual_dir or paths.join(_build_dir(cfg), "downloads", "manual"))


def _prepare_digits(tfds, data_dir: str):
  """Prepares `digits` in data_dir. A bucket gets a local build, copied up with the .json files
  last: tfds takes a version folder that holds them for a prepared one."""
  if paths.is_local(data_dir):
    builder = tfds.builder("digits", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
  with tempfile.TemporaryDirectory() as local:
    built = tfds.builder("digits", data_dir=local, file_format="array_record")
    built.download_and_prepare()
    version_dir = epath.Path(built.data_dir)
    target = epath.Path(data_dir) / "digits" / version_dir.name
    for f in sorted(version_dir.iterdir(), key=lambda f: (f.suffix == ".json", f.name)):
      (target / f.name).write_bytes(f.read_bytes())
  return tfds.builder("digits", data_dir=data_dir)


def _one_line(text: str, limit: int = 400) -> str:
  text = re.sub(r"\s+", " ", text).strip()
  return text if len(text) <= limit else text[:limit - 3] + "..."


def tfds_builder(cfg):
  """The prepared array_record builder for cfg.name; `digits` is prepared on first use."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Registers the `digits` builder.
  from swinv2_jax.data import digits  # pylint: disable=g-import-not-at-top,unused-import
  data_dir = _tfds_data_dir(cfg)
  try:
    builder = tfds.builder(cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f'data.name: {cfg.name!r} is not a tfds data set (use data.name="folder" with '
        "data.folder for a directory of class subfolders)") from None
  if cfg.name == "digits" and not builder.is_prepared():
    # Tiny and needs no download (scikit-learn ships the images): prepare it on first use.
    builder = _prepare_digits(tfds, data_dir)
  manual_text = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not builder.is_prepared():
    if manual_text:
      where = (f"put the manually downloaded files in {_manual_dir(cfg)} "
               f"({_one_line(manual_text)}), then run: {_prepare_command(cfg, manual=True)}")
    else:
      where = f"run: {_prepare_command(cfg, manual=False)}"
    raise DatasetNotFoundError(
        f"tfds data set {cfg.name!r} is not prepared in {data_dir}; {where}")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    rebuild = (f"delete {builder.data_dir} and it is rebuilt on first use" if cfg.name == "digits"
               else f"rebuild it: {_prepare_command(cfg, manual=bool(manual_text))}")
    raise DatasetNotFoundError(
        f"tfds data set {cfg.name!r} in {builder.data_dir} is stored as {file_format}, but grain "
        f"needs random access (array_record); {rebuild}")
  return builder


def _tfds_split(builder, cfg, split: str, key: str) -> str:
  try:
    builder.info.splits[split]
  except (KeyError, ValueError):
    raise ValueError(f"data.{key}: {cfg.name!r} has no split {split!r} "
                     f"(it has {sorted(builder.info.splits.keys())})") from None
  return split


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------


def _images_in(directory: pathlib.Path):
  return sorted(p for p in directory.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(directory: pathlib.Path):
  return sorted(p for p in directory.iterdir() if p.is_dir())


def _folder_layout_error(cfg, problem: str):
  return DatasetNotFoundError(
      f"data.folder: {problem}; expected {folder_root(cfg)}/<split>/<class>/<image> with splits "
      f"{cfg.train_split!r} and an eval split (data.eval_split), or {folder_root(cfg)}/<class>/<image> "
      "with data.folder_eval_fraction > 0")


def folder_records(cfg, split: str, train: bool) -> FolderRecords:
  """Files of one split. Classes are the sorted subfolders of the train split (or of the root)."""
  root = pathlib.Path(folder_root(cfg))
  if not root.is_dir():
    raise _folder_layout_error(cfg, f"{root} does not exist")
  if cfg.folder_eval_fraction > 0:
    class_dirs = _class_dirs(root)
    files, labels = [], []
    rng = np.random.default_rng(_FOLDER_SPLIT_SEED)
    for label, class_dir in enumerate(class_dirs):
      images = _images_in(class_dir)
      is_eval = np.zeros(len(images), bool)
      is_eval[rng.permutation(len(images))[:round(cfg.folder_eval_fraction * len(images))]] = True
      keep = [p for p, e in zip(images, is_eval) if e != train]
      files += keep
      labels += [label] * len(keep)
  else:
    train_dir = root / cfg.train_split
    if not train_dir.is_dir():
      raise _folder_layout_error(cfg, f"no split folder {train_dir}")
    class_names = [p.name for p in _class_dirs(train_dir)]
    split_dir = root / split
    if not split_dir.is_dir():
      raise _folder_layout_error(cfg, f"no split folder {split_dir}")
    files, labels = [], []
    for class_dir in _class_dirs(split_dir):
      if class_dir.name not in class_names:
        raise _folder_layout_error(
            cfg, f"class folder {class_dir} has no counterpart in {train_dir}")
      images = _images_in(class_dir)
      files += images
      labels += [class_names.index(class_dir.name)] * len(images)
    class_dirs = class_names
  if not class_dirs:
    raise _folder_layout_error(cfg, f"no class folders under {root}")
  if not files:
    raise _folder_layout_error(
        cfg, f'no images ({", ".join(IMAGE_EXTENSIONS)}) for split {split!r}')
  return FolderRecords([os.fspath(f) for f in files], labels)


def folder_class_names(cfg) -> list[str]:
  """The class folders' names in label order (sorted)."""
  root = pathlib.Path(folder_root(cfg))
  base = root if cfg.folder_eval_fraction > 0 else root / cfg.train_split
  if not base.is_dir():
    raise _folder_layout_error(cfg, f"{base} does not exist")
  return [p.name for p in _class_dirs(base)]


def folder_num_classes(cfg) -> int:
  return len(folder_class_names(cfg))


# ----------------------------------------------------------------------------------------------
# Public
# ----------------------------------------------------------------------------------------------


def eval_split_name(cfg, builder=None) -> str:
  if cfg.eval_split is not None:
    return cfg.eval_split
  if is_folder(cfg):
    return "val"
  splits = builder.info.splits.keys()
  for name in ("validation", "test"):
    if name in splits:
      return name
  raise ValueError(f'data.eval_split: {cfg.name!r} has neither a "validation" nor a "test" split '
                   f"(it has {sorted(splits)}); name one")


def open_split(cfg, which: str):
  """(records, num_classes) of the train (`which='train'`) or eval split of cfg."""
  if is_folder(cfg):
    split = cfg.train_split if which == "train" else eval_split_name(cfg)
    return folder_records(cfg, split, train=which == "train"), folder_num_classes(cfg)
  builder = tfds_builder(cfg)
  if which == "train":
    split = _tfds_split(builder, cfg, cfg.train_split, "train_split")
  else:
    split = _tfds_split(builder, cfg, eval_split_name(cfg, builder), "eval_split")
  records = _Records(builder.as_data_source(split=split), cfg.image_key, cfg.label_key)
  return records, builder.info.features[cfg.label_key].num_classes


def dataset_info(cfg) -> DatasetInfo:
  """(num_classes, num_train_examples, num_eval_examples) of the configured data set."""
  from swinv2_jax.data.config import validate_data_config  # pylint: disable=g-import-not-at-top
  validate_data_config(cfg)
  if is_folder(cfg):
    train, num_classes = open_split(cfg, "train")
    evals, _ = open_split(cfg, "eval")
    return DatasetInfo(num_classes, len(train), len(evals))
  builder = tfds_builder(cfg)
  train = _tfds_split(builder, cfg, cfg.train_split, "train_split")
  evals = _tfds_split(builder, cfg, eval_split_name(cfg, builder), "eval_split")
  splits = builder.info.splits
  train, evals = splits[train].num_examples, splits[evals].num_examples
  return DatasetInfo(builder.info.features[cfg.label_key].num_classes, train, evals)
