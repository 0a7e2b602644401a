"""Input pipeline: digits tfds builder, grain streams (determinism, sharding, restore), eval
padding, SimMIM masks, Mixup/CutMix, RandAugment, errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from swinv2_jax import data
from swinv2_jax.data import randaugment, sources, transforms

MASK = dict(mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory):
  cfg = data.default_data_config("digits")
  cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return cfg


def _id_folder(root, num_images):
  """Folder data set whose image i is a flat gray of value 10 * (i + 1): pixels identify records."""
  for split in ("train", "val"):
    for i in range(num_images):
      class_dir = root / split / f"class_{i % 2}"
      class_dir.mkdir(parents=True, exist_ok=True)
      Image.new("RGB", (12, 10), (10 * (i + 1),) * 3).save(class_dir / f"{i:03d}.png")


def _identity_cfg(root):
  """No randomness that changes pixel values: full-image crop, no flip/RandAugment/erasing."""
  cfg = data.default_data_config("folder")
  cfg.folder = str(root)
  cfg.randaugment, cfg.reprob, cfg.hflip = "", 0.0, False
  cfg.rrc_scale, cfg.rrc_ratio = (1.0, 1.0), (12 / 10, 12 / 10)
  return cfg


def _ids(images, cfg):
  """Record ids (0-based) recovered from normalised flat-gray images."""
  gray = images[:, 4, 4, 0] * cfg.std[0] + cfg.mean[0]
  return np.round(gray * 255 / 10).astype(int) - 1


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def test_digits_prepares_with_stratified_disjoint_splits(digits_cfg):
  from sklearn.datasets import load_digits
  assert data.dataset_info(digits_cfg) == (10, 1437, 360)
  builder = sources.tfds_builder(digits_cfg)
  assert builder.info.file_format.value == "array_record"
  split_images, split_labels = {}, {}
  for split in ("train", "test"):
    src = builder.as_data_source(split=split)
    split_images[split] = [src[i]["image"] for i in range(len(src))]
    split_labels[split] = np.array([src[i]["label"] for i in range(len(src))])
  assert split_images["test"][0].shape == (8, 8, 1) and split_images["test"][0].dtype == np.uint8
  # stratified: each class's test share is its exact proportional quota, rounded
  per_class = np.bincount(split_labels["test"], minlength=10)
  total = per_class + np.bincount(split_labels["train"], minlength=10)
  assert np.all(np.abs(per_class - total * 360 / 1797) < 1)
  # train + test is exactly the sklearn set (as a multiset), so the splits are disjoint.
  ours = sorted(im.tobytes() + bytes([l]) for s in split_images
                for im, l in zip(split_images[s], split_labels[s]))
  digits = load_digits()
  ref = np.round(digits.images * 255 / 16).astype(np.uint8)
  assert ours == sorted(im.tobytes() + bytes([l]) for im, l in zip(ref, digits.target))


def test_supervised_batches_have_the_contracted_shapes(digits_cfg):
  it = data.build_train_iterator(digits_cfg, kind="supervised", image_size=(32, 40),
                                 global_batch_size=8, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (8, 32, 40, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
  assert batch["image"].min() < -1.5 and batch["image"].max() > 1.5  # normalised, not [0, 1]
  # grayscale digits become 3 equal channels (checked without erasing's per-channel noise and
  # RandAugment's ImageNet-mean fill colour)
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.reprob, cfg.randaugment = 0.0, ""
  image = next(data.build_train_iterator(cfg, kind="supervised", image_size=16, global_batch_size=4,
                                         seed=0, process_index=0, process_count=1))["image"]
  rgb = image * np.array(cfg.std, np.float32) + np.array(cfg.mean, np.float32)
  np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-5)
  np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-5)
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.build_train_iterator(digits_cfg, kind="supervised", image_size=32, global_batch_size=9,
                              seed=0, process_index=0, process_count=2)


def test_simmim_batches_and_mask_validation(digits_cfg):
  it = data.build_train_iterator(digits_cfg, kind="simmim", image_size=64, global_batch_size=4,
                                 seed=0, mask_cfg=MASK, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == np.int32
  np.testing.assert_array_equal(batch["mask"].sum((1, 2)), np.full(4, 3 * 64))
  with pytest.raises(ValueError, match="mask_patch_size"):
    data.build_train_iterator(digits_cfg, kind="simmim", image_size=48, global_batch_size=4,
                              seed=0, mask_cfg=MASK, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="model_patch_size"):
    data.build_train_iterator(digits_cfg, kind="simmim", image_size=64, global_batch_size=4, seed=0,
                              mask_cfg=dict(MASK, model_patch_size=5), process_index=0,
                              process_count=1)


# ----------------------------------------------------------------------------------------------
# Determinism, sharding, restore
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_stream_different_seed_different(digits_cfg):
  def stream(seed):
    return _take(data.build_train_iterator(digits_cfg, kind="supervised", image_size=16,
                                           global_batch_size=8, seed=seed, process_index=0,
                                           process_count=1), 3)
  a, b, c = stream(0), stream(0), stream(1)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert not np.array_equal(np.concatenate([x["label"] for x in a]),
                            np.concatenate([x["label"] for x in c]))


def _global_ids(cfg, process_count, steps, start_step=0):
  """Record ids of global batches start_step .. start_step + steps - 1, read by `process_count`
  processes (each process's slice, concatenated in process order)."""
  slices = [_take(data.build_train_iterator(
      cfg, kind="supervised", image_size=8, global_batch_size=10, seed=3, process_index=p,
      process_count=process_count, start_step=start_step), steps) for p in range(process_count)]
  assert all(b["image"].shape == (10 // process_count, 8, 8, 3) for s in slices for b in s)
  return np.concatenate([_ids(np.concatenate([s[i]["image"] for s in slices]), cfg)
                         for i in range(steps)])


def test_global_batches_do_not_depend_on_the_process_count_and_epochs_reshuffle(tmp_path):
  _id_folder(tmp_path, 20)
  cfg = _identity_cfg(tmp_path)
  one = _global_ids(cfg, 1, 6)  # 60 examples: three epochs of 20
  np.testing.assert_array_equal(_global_ids(cfg, 2, 6), one)
  np.testing.assert_array_equal(_global_ids(cfg, 5, 6), one)
  for epoch in range(3):  # each epoch is a permutation of the split, shuffled anew
    np.testing.assert_array_equal(np.sort(one[20 * epoch:20 * epoch + 20]), np.arange(20))
  assert not np.array_equal(one[:20], one[20:40]), "epoch 2 must be reshuffled"


def test_elastic_resume_skips_and_repeats_no_example(tmp_path):
  """2 processes for 3 steps, then a resume at step 3 on 1 process (and on 5): the example ids
  are those of one uninterrupted stream, so within an epoch none is seen twice or skipped."""
  _id_folder(tmp_path, 20)
  cfg = _identity_cfg(tmp_path)
  uninterrupted = _global_ids(cfg, 1, 6)
  before = _global_ids(cfg, 2, 3)
  for resumed_on in (1, 5):
    after = _global_ids(cfg, resumed_on, 3, start_step=3)
    np.testing.assert_array_equal(np.concatenate([before, after]), uninterrupted)
  seen = np.concatenate([before, _global_ids(cfg, 1, 1, start_step=3)])[:20]
  np.testing.assert_array_equal(np.sort(seen), np.arange(20))


def test_restored_iterator_continues_exactly(digits_cfg):
  def build():
    return data.build_train_iterator(digits_cfg, kind="supervised", image_size=16,
                                     global_batch_size=64, seed=7, process_index=1, process_count=2)
  # 719 examples per shard / 32 = 22.5 batches per epoch: the restore point (k=23) is in epoch 2.
  reference = _take(build(), 26)
  it = build()
  _take(it, 23)
  state = json.loads(json.dumps(it.get_state()))
  restored = build()
  restored.set_state(state)
  _assert_same(_take(restored, 3), reference[23:])


def test_worker_processes_give_the_in_process_stream_and_restore(digits_cfg):
  kwargs = dict(kind="simmim", image_size=32, global_batch_size=4, seed=5,
                mask_cfg=dict(MASK, mask_patch_size=16), process_index=0, process_count=1)
  reference = _take(data.build_train_iterator(digits_cfg, **kwargs), 6)
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.num_workers = 1
  it = data.build_train_iterator(cfg, **kwargs)
  try:
    first = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  restored = data.build_train_iterator(cfg, **kwargs)
  try:
    restored.set_state(state)
    _assert_same(first + _take(restored, 3), reference)
  finally:
    restored.close()


# ----------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------


def test_eval_covers_every_example_once_with_padding_flagged(tmp_path):
  _id_folder(tmp_path, 21)
  cfg = _identity_cfg(tmp_path)
  seen, lengths = [], set()
  for p in (0, 1):
    ev = data.build_eval_iterator(cfg, image_size=8, global_batch_size=8, process_index=p,
                                  process_count=2)
    batches = list(ev)
    lengths.add(len(batches))
    assert len(batches) == len(ev) == 3  # ceil(ceil(21 / 2) / 4): the same on both processes
    for b in batches:
      assert b["image"].shape == (4, 8, 8, 3) and b["valid"].dtype == np.bool_
      seen += list(_ids(b["image"][b["valid"]], cfg))
      assert np.all(b["image"][~b["valid"]] == 0)
    # 11 examples on process 0, 10 on process 1
    assert batches[-1]["valid"].sum() == (3 if p == 0 else 2) and not batches[-1]["valid"][-1]
    assert list(batches[0]["valid"]) == [True] * 4
  assert sorted(seen) == list(range(21))


def test_eval_digits_is_deterministic_and_padded(digits_cfg):
  ev = data.build_eval_iterator(digits_cfg, image_size=32, global_batch_size=100,
                                process_index=0, process_count=1)
  first, second = list(ev), list(ev)
  _assert_same(first, second)
  assert len(first) == 4 and sum(int(b["valid"].sum()) for b in first) == 360
  assert first[-1]["valid"].sum() == 60


def test_eval_resize_then_center_crop():
  # 100x50 image, left half black / right half white; eval at 32 px, ratio 0.875:
  # shorter side -> 36, so 72x36, then the central 32x32 straddles the edge.
  img = np.zeros((50, 100, 3), np.uint8)
  img[:, 50:] = 255
  out = np.asarray(transforms.resize_center_crop(Image.fromarray(img), (32, 32), 0.875))
  assert out.shape == (32, 32, 3)
  assert out[:, :14].max() <= 2 and out[:, 18:].min() >= 253


# ----------------------------------------------------------------------------------------------
# SimMIM mask
# ----------------------------------------------------------------------------------------------


def test_simmim_mask_count_blocks_and_uniformity():
  rng = np.random.default_rng(0)
  draws = 3000
  cells = np.zeros((6, 6))
  for _ in range(draws):
    m = data.simmim_mask(rng, 192, **MASK)
    assert m.shape == (48, 48) and m.dtype == np.int32
    assert m.sum() == 22 * 64  # ceil(36 * 0.6) cells of 8x8 tokens
    blocks = m.reshape(6, 8, 6, 8)
    assert np.all(blocks.min((1, 3)) == blocks.max((1, 3)))  # cell-constant
    cells += blocks[:, 0, :, 0]
  freq = cells / draws
  # each cell masked with probability 22/36; binomial std ~ 0.009 at 3000 draws
  np.testing.assert_allclose(freq, 22 / 36, atol=0.04)
  rect = data.simmim_mask(rng, (64, 96), 32, 4, 0.5)
  assert rect.shape == (16, 24) and rect.sum() == 3 * 64


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------


def _flat_batch(batch=6, size=16):
  values = jnp.arange(1, batch + 1, dtype=jnp.float32)
  images = jnp.broadcast_to(values[:, None, None, None], (batch, size, size, 3))
  return images, jnp.arange(batch) % 4


@pytest.fixture(scope="module")
def mixed():
  """Mixup/CutMix (timm defaults, no smoothing) for 48 keys with prob 1, and 8 with prob 0.

  One jit over vmapped (key, prob): compiling the beta sampler is the slow part on CPU.
  """
  images, labels = _flat_batch()

  def one(key, prob):
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=prob, switch_prob=0.5)
    out, targets = data.mixup_cutmix(key, images, labels, num_classes=4, label_smoothing=0.0,
                                     **kwargs)
    return out, targets, data.mixup_cutmix_params(key, images.shape[1:3], **kwargs)

  keys = jax.random.split(jax.random.key(0), 56)
  probs = jnp.array([1.0] * 48 + [0.0] * 8)
  result = jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(keys, probs))
  return (np.asarray(images), np.asarray(labels), jax.tree.map(lambda x: x[:48], result),
          jax.tree.map(lambda x: x[48:], result))


def test_mixup_blends_images_and_targets_with_one_lambda(mixed):
  images, labels, (out, targets, (lam, use_cutmix, _)), _ = mixed
  one_hot = np.eye(4)[labels]
  assert (~use_cutmix).sum() >= 10
  for o, t, l in zip(out[~use_cutmix], targets[~use_cutmix], lam[~use_cutmix]):
    assert np.isclose(o[0, 0, 0, 0], l * 1.0 + (1 - l) * 6.0, atol=1e-5)  # example 0 with 5
    np.testing.assert_allclose(o, l * images + (1 - l) * images[::-1], atol=1e-5)
    np.testing.assert_allclose(t, l * one_hot + (1 - l) * one_hot[::-1], atol=1e-6)
  assert np.unique(lam[~use_cutmix].round(4)).size == (~use_cutmix).sum(), "lambda varies with key"


def test_cutmix_box_is_inside_and_lambda_matches_pasted_area(mixed):
  images, _, (out, targets, (lam, use_cutmix, box)), _ = mixed
  size = images.shape[1]
  assert use_cutmix.sum() >= 10
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  for i in np.flatnonzero(use_cutmix):
    y0, y1, x0, x1 = (int(b[i]) for b in box)
    assert 0 <= y0 <= y1 <= size and 0 <= x0 <= x1 <= size
    pasted = np.mean(out[i, 0] == 6.0)  # example 0 is all 1.0, its partner (example 5) all 6.0
    np.testing.assert_allclose(1.0 - pasted, lam[i], atol=1e-6)
    np.testing.assert_allclose(1.0 - (y1 - y0) * (x1 - x0) / size**2, lam[i], atol=1e-6)
    assert np.all(out[i, 0, y0:y1, x0:x1] == 6.0) and np.all(out[i, 1] != 6.0)
    # label 0 (example 0) vs label 1 (example 5): weights lam and 1 - lam
    np.testing.assert_allclose(targets[i, 0, :2], [lam[i], 1.0 - lam[i]], atol=1e-6)
  assert (lam[use_cutmix] < 1.0).sum() >= 0.8 * use_cutmix.sum()


def test_switch_prob_and_prob_select_the_mode(mixed):
  images, labels, (_, _, (_, use_cutmix, _)), (out_off, targets_off, (lam_off, _, _)) = mixed
  assert 12 <= use_cutmix.sum() <= 36  # switch_prob 0.5 over 48 draws
  np.testing.assert_array_equal(out_off, np.broadcast_to(images, out_off.shape))
  np.testing.assert_array_equal(targets_off[0], np.eye(4)[labels])
  np.testing.assert_array_equal(lam_off, 1.0)


def test_no_mixing_gives_smoothed_one_hot():
  images, labels = _flat_batch()
  out, targets = data.mixup_cutmix(jax.random.key(0), images, labels, num_classes=10,
                                   mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets[np.arange(6), labels], 0.91, rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert np.isclose(targets.min(), 0.01)


# ----------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(randaugment.OPS))
def test_randaugment_op_keeps_shape_and_changes_image(name):
  rng = np.random.default_rng(0)
  pixels = rng.integers(60, 250, size=(24, 20, 3), dtype=np.uint8)
  pixels[:, :10] //= 2  # some structure, so geometric ops move something
  img = Image.fromarray(pixels)
  ctx = {"fill": (124, 116, 104), "resample": Image.Resampling.BICUBIC}
  out = randaugment.OPS[name](img, 9.0, rng, ctx)
  assert out.size == img.size and out.mode == "RGB"
  assert not np.array_equal(np.asarray(out), pixels)


@pytest.mark.parametrize("magnitude", [0.0, 10.0])
def test_randaugment_ops_accept_the_magnitude_extremes(magnitude):
  img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (9, 11, 3), dtype=np.uint8))
  ctx = {"fill": (124, 116, 104), "resample": Image.Resampling.BICUBIC}
  for name, op in randaugment.OPS.items():
    out = op(img, magnitude, np.random.default_rng(0), ctx)
    assert out.size == img.size and out.mode == "RGB", name
  black = randaugment.OPS["PosterizeIncreasing"](img, 10.0, None, ctx)
  assert np.asarray(black).max() == 0  # 0 bits kept


def test_randaugment_string_and_full_transform():
  ra = data.RandAugment.from_string("rand-m9-mstd0.5-inc1")
  assert (ra.magnitude, ra.magnitude_std, ra.num_ops) == (9.0, 0.5, 2)
  assert ra.increasing and ra.prob == 0.5
  assert data.RandAugment.from_string("rand-n3-m5-mstd101").magnitude_std == math.inf
  img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
  ra_always = data.RandAugment.from_string("rand-m9-mstd0.5-inc1-p1.0")
  changed = 0
  for seed in range(10):
    out = ra_always(img, np.random.default_rng(seed))
    assert out.size == img.size and out.mode == "RGB"
    changed += not np.array_equal(np.asarray(out), np.asarray(img))
  assert changed >= 9
  with pytest.raises(ValueError, match="^data.randaugment:"):
    data.RandAugment.from_string("rand-m9-x3")


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  cfg = data.default_data_config("imagenet2012")
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.manual_dir = str(tmp_path / "manual")
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.build_train_iterator(cfg, kind="supervised", image_size=32, global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
  msg = str(err.value)
  assert (f'tfds build imagenet2012 --file_format=array_record --data_dir={tmp_path / "tfds"} '
          f'--manual_dir={tmp_path / "manual"}') in msg
  assert "ILSVRC2012_img_train.tar" in msg and "\n" not in msg
  cfg.name = "no_such_dataset_xyz"
  with pytest.raises(data.DatasetNotFoundError, match="^data.name:"):
    data.dataset_info(cfg)


def test_folder_eval_fraction_splits_each_class(tmp_path):
  for c in ("cat", "dog"):
    (tmp_path / c).mkdir()
    for i in range(8):
      Image.new("RGB", (6, 6), (i, 0, 0)).save(tmp_path / c / f"{i}.jpg")
  cfg = data.default_data_config("folder")
  cfg.folder, cfg.folder_eval_fraction = str(tmp_path), 0.25
  assert data.dataset_info(cfg) == (2, 12, 4)
  train, _ = sources.open_split(cfg, "train")
  evals, _ = sources.open_split(cfg, "eval")
  assert not set(train.files) & set(evals.files)
  assert sorted(evals.labels) == [0, 0, 1, 1]  # 2 of 8 per class; labels = sorted folder names
  assert all(("dog" in f) == (l == 1) for f, l in zip(train.files, train.labels))


def test_missing_folder_says_where_files_go(tmp_path):
  cfg = data.default_data_config("folder")
  cfg.folder = str(tmp_path / "nowhere")
  with pytest.raises(data.DatasetNotFoundError, match="<split>/<class>/<image>"):
    data.dataset_info(cfg)


@pytest.mark.parametrize("key,value", [
    ("reprob", 1.5), ("rrc_scale", (0.9, 0.1)), ("interpolation", "cubic"), ("num_workers", -1),
    ("randaugment", "rand-q9"), ("mean", (0.5, 0.5)), ("mixup_switch_prob", 2.0),
    ("label_smoothing", 1.0), ("eval_crop_ratio", 0.0),
])
def test_bad_config_value_names_the_key(key, value):
  cfg = data.default_data_config()
  cfg[key] = value
  with pytest.raises(ValueError, match=f"^data.{key}: "):
    data.validate_data_config(cfg)


def test_config_rejects_unknown_keys_and_flipped_digits():
  data.validate_data_config(data.default_data_config())
  data.validate_data_config(data.default_data_config("digits"))
  cfg = data.default_data_config()
  cfg.hflp = False
  with pytest.raises(ValueError, match="^data.hflp: unknown key"):
    data.validate_data_config(cfg)
  cfg = data.default_data_config("digits")
  cfg.hflip = True
  with pytest.raises(ValueError, match="^data.hflip: "):
    data.validate_data_config(cfg)


def test_folder_name_with_its_root_reads_the_same_tree(tmp_path):
  """data.name='folder:/root' is data.name='folder' with data.folder='/root', resumable alike."""
  _id_folder(tmp_path, 20)
  cfg = _identity_cfg(tmp_path)
  short = cfg.copy_and_resolve_references()
  short.name, short.folder = f"folder:{tmp_path}", None
  data.validate_data_config(short)
  np.testing.assert_array_equal(_global_ids(short, 2, 4), _global_ids(cfg, 2, 4))
  np.testing.assert_array_equal(_global_ids(short, 1, 2, start_step=2),
                                _global_ids(cfg, 1, 4)[20:])
  assert data.dataset_info(short).num_classes == 2
  short.folder = str(tmp_path / "elsewhere")
  with pytest.raises(ValueError, match="data.folder: .* name two roots"):
    data.validate_data_config(short)
