"""`python -m swinv2_jax.predict`: the top-5 of digits images from an exported tiny model, read
from a parameter directory (in process) and from an hf-hub id (the command), against the
model's own output on the eval pipeline's images; its one-line errors."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from swinv2_jax import errors
from swinv2_jax import predict
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import weights
from swinv2_jax import workdir as workdir_lib
from swinv2_jax.data import sources
from swinv2_jax.data.pipeline import EvalTransform

from helpers import ROOT
from hub_cache import safetensors_bytes, write_hub_cache
from test_train import tiny_config

HUB_ID = "hf-hub:timm/swinv2_digits_tiny.test"
LINE = re.compile(r"^  ([1-5])\. +(\d+\.\d\d)%  +(\d+)  (\S+)$")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def digits_images(data_cfg, directory, count=4) -> list[str]:
  """The first test-split digits, as 8x8 grayscale PNG files."""
  records, _ = sources.open_split(data_cfg, "eval")
  paths = []
  for i in range(count):
    path = os.path.join(directory, f"digit_{i}.png")
    Image.fromarray(np.asarray(records[i]["image"])[..., 0], mode="L").save(path)
    paths.append(path)
  return paths


def random_classifier(config, seed=0):
  """The tiny eval model with every parameter drawn wide, so that the classes' probabilities
  are far apart (a fresh head gives nearly equal ones)."""
  model = trainer_lib.build_classifier(config, "eval", 10)
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.unflatten(treedef, [
      rng.normal(0.0, 0.5, leaf.shape).astype(np.float32) for leaf in leaves]))
  return model


def test_top5_of_digits_from_a_directory_and_a_hub_id(data_dir, tmp_path):
  config = tiny_config(data_dir)
  model = random_classifier(config)
  run = tmp_path / "run"  # as a workdir holds it: config.json beside the weights
  weights.save_params(str(run / "params"), model)
  (run / workdir_lib.CONFIG_JSON).write_text(json.dumps(workdir_lib.config_json(config)))
  images = digits_images(config.data, str(tmp_path))

  # The model's own answer on the images as evaluation prepares them.
  transform = EvalTransform(config.data, (32, 32))
  batch = np.stack([transform.map(dict(image=np.asarray(Image.open(p).convert("RGB")), label=0,
                                       valid=True))["image"] for p in images])
  model.eval()
  probs = np.asarray(jax.nn.softmax(nnx.jit(lambda m, x: m(x))(model, batch)))
  want = [list(np.argsort(-row, kind="stable")[:5]) for row in probs]

  # In process, --model found from the workdir the weights lie in.
  results = predict.predict(str(run / "params"), images)
  for top, row, order in zip(results, probs, want):
    assert [i for i, _, _ in top] == order
    assert [name for _, _, name in top] == [str(i) for i in order]  # digits' names: 0-9
    np.testing.assert_allclose([p for _, p, _ in top], row[order], rtol=1e-5)

  # The command, from an hf-hub id in a local Hub cache.
  cache = tmp_path / "hub"
  write_hub_cache(cache, HUB_ID[len("hf-hub:"):], {
      "model.safetensors": safetensors_bytes(weights.to_pytorch_state_dict(model, "timm"))})
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_CACHE": str(cache),
         "HF_HUB_OFFLINE": "1"}
  result = subprocess.run(
      [sys.executable, "-m", "swinv2_jax.predict", f"--checkpoint={HUB_ID}",
       f"--model={run / workdir_lib.CONFIG_JSON}", *images],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 6 * len(images), result.stdout
  for k, (path, order, row) in enumerate(zip(images, want, probs)):
    block = lines[6 * k: 6 * k + 6]
    assert block[0] == path
    parsed = [LINE.match(line) for line in block[1:]]
    assert all(parsed), block
    assert [int(m[1]) for m in parsed] == [1, 2, 3, 4, 5]
    assert [int(m[3]) for m in parsed] == order and [m[4] for m in parsed] == [
        str(i) for i in order]
    np.testing.assert_allclose([float(m[2]) for m in parsed], 100 * row[order], atol=0.006)


def test_class_names():
  names = predict.class_names(None, 1000)  # the official weights' ImageNet-1k classes
  assert (len(names), names[0], names[1], names[999]) == (1000, "tench", "goldfish",
                                                          "toilet tissue")
  assert predict.class_names(None, 10) is None


def test_errors_are_one_line(tmp_path, capsys):
  unreadable = tmp_path / "notes.png"
  unreadable.write_text("not an image")
  missing = tmp_path / "missing.png"
  weights_file = str(tmp_path / "w.safetensors")  # never read: the images are checked first
  cases = [
      ([str(missing)], "swinv2_tiny_window8_256", f"{missing}: no such image file"),
      ([str(unreadable)], "swinv2_tiny_window8_256",
       f"{unreadable}: not an image PIL can read (UnidentifiedImageError)"),
      ([str(unreadable)], str(tmp_path / "nope.py"),
       f"--model: {tmp_path / 'nope.py'} is neither a preset"),
      ([str(unreadable)], None, f"--model: needed for {weights_file}: a preset name, a config "
       "file or a run's config.json"),
      ([], None, "no images: python -m swinv2_jax.predict --checkpoint=... IMAGE..."),
  ]
  for images, model_spec, message in cases:
    assert predict.run(weights_file, images, model_spec) == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
